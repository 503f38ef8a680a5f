"""SPEC 1.3: ProDA's prototype distance softmax, rectified pseudo-labels and the prototypes' update
(the per-class feature sums it takes are udafast.ops.class_feature_sums)."""
from typing import Optional

import torch

from udafast.ops import check
from udafast.ops import reference
from udafast.ops.backend import resolve
from udafast.ops.dispatch import launch
from udafast.ops.sync import AllGather


def _check_features_prototypes(features: torch.Tensor, prototypes: torch.Tensor) -> None:
    check.ndim("features", features, 4, "[B, D, H, W]")
    check.ndim("prototypes", prototypes, 2, "[C, D]")
    check.float_dtype("features", features, reduced=True)
    check.float_dtype("prototypes", prototypes, reduced=True)
    check.same_device(("features", features), ("prototypes", prototypes))
    if prototypes.shape[1] != features.shape[1]:
        raise ValueError(
            f"prototypes must have D={features.shape[1]} columns (features' channels); got shape {tuple(prototypes.shape)}"
        )


def prototype_softmax(features: torch.Tensor, prototypes: torch.Tensor, tau: float = 1.0, *, log: bool = False,
                      backend: str = "auto") -> torch.Tensor:
    """softmax_c(-||f - p_c||_2 / tau) per pixel f (log-softmax with `log=True`).

    `features` [B, D, H, W], differentiable; `prototypes` [C, D], a constant; `tau` > 0.

    Returns [B, C, H, W] in `features`' dtype."""
    _check_features_prototypes(features, prototypes)
    tau = check.tau(tau)
    if not isinstance(log, bool):
        raise ValueError(f"log must be a bool; got {log!r}")
    dtype = features.dtype
    features = check.widened_on_cpu(features)
    chosen = resolve("prototype_softmax", backend, features.device)
    out = launch(
        "prototype_softmax", chosen, reference.prototype_softmax,
        features, prototypes.detach().to(features.dtype), tau, log,
    )
    return out.to(dtype)


def prototype_rectify(features: torch.Tensor, prototypes: torch.Tensor, soft_labels: torch.Tensor, tau: float = 1.0,
                      *, backend: str = "auto") -> torch.Tensor:
    """argmax_c(prototype_softmax_c * soft_labels_c), first maximum winning.

    `features` [B, D, H, W], `prototypes` [C, D] and `tau` as in `prototype_softmax`;
    `soft_labels` [B, C, H, W]: the warm-up model's softmax (a constant).

    Returns int64 [B, H, W]."""
    _check_features_prototypes(features, prototypes)
    check.ndim("soft_labels", soft_labels, 4, "[B, C, H, W]")
    b, _, h, w = features.shape
    check.same_shape("soft_labels", soft_labels, "[B, C, H, W]", (b, prototypes.shape[0], h, w))
    check.float_dtype("soft_labels", soft_labels, reduced=True)
    check.same_device(("features", features), ("soft_labels", soft_labels))
    tau = check.tau(tau)
    features = check.widened_on_cpu(features)
    chosen = resolve("prototype_rectify", backend, features.device)
    return launch(
        "prototype_rectify", chosen, reference.prototype_rectify,
        features.detach(), prototypes.detach().to(features.dtype), soft_labels.detach().to(features.dtype), tau,
    )


@torch.no_grad()
def update_prototypes(prototypes: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, *,
                      momentum: float = 0.9999, min_pixels: int = 10,
                      all_gather: Optional[AllGather] = None) -> torch.Tensor:
    """ProDA's prototype update (SPEC 1.3), in place: for each image in order and each class with
    at least `min_pixels` pixels in it, eta_c <- momentum * eta_c + (1 - momentum) * mean.

    `prototypes` [C, D]; `sums` [B, C, D] and `counts` [B, C] as `class_feature_sums` gives them.
    `all_gather`: under several processes, the caller's gather (e.g. the run context's
    `all_gather`, see udafast.ops.sync): every process's `sums` and `counts` (the same B
    everywhere) are applied in (rank, image) order, so all processes keep the same prototypes;
    None: one process.

    Returns `prototypes`."""
    check.ndim("prototypes", prototypes, 2, "[C, D]")
    check.ndim("sums", sums, 3, "[B, C, D]")
    check.same_shape("sums", sums, "[B, C, D]", (sums.shape[0],) + tuple(prototypes.shape))
    check.same_shape("counts", counts, "[B, C]", sums.shape[:2])
    if all_gather is not None:
        sums, counts = torch.cat(all_gather(sums)), torch.cat(all_gather(counts))
    for image_sums, image_counts in zip(sums, counts):
        present = image_counts >= min_pixels
        means = image_sums[present] / image_counts[present].unsqueeze(1).to(image_sums.dtype)
        prototypes[present] = momentum * prototypes[present] + (1 - momentum) * means.to(prototypes.dtype)
    return prototypes


__all__ = ["prototype_softmax", "prototype_rectify", "update_prototypes"]
