"""SPEC 1.3: ProDA's prototype distance softmax, rectified pseudo-labels and the prototypes' update
(the per-class feature sums it takes are udafast.ops.class_feature_sums)."""
import torch

from udafast.ops import validate as check
from udafast.ops import reference
from udafast.ops.backend import resolve
from udafast.ops.dispatch import launch


def _check_features_prototypes(features, prototypes):
    check.ndim("features", features, 4, "[B, D, H, W]")
    check.ndim("prototypes", prototypes, 2, "[C, D]")
    check.float_dtype("features", features, reduced=True)
    check.float_dtype("prototypes", prototypes, reduced=True)
    check.same_device(("features", features), ("prototypes", prototypes))
    if prototypes.shape[1] != features.shape[1]:
        raise ValueError(
            f"prototypes must have D={features.shape[1]} columns (features' channels); got shape {tuple(prototypes.shape)}"
        )


def prototype_softmax(features, prototypes, tau=1.0, *, log=False, backend="auto"):
    """softmax_c(-||f - p_c||_2 / tau) per pixel (log-softmax with log=True): [B, C, H, W].

    Differentiable in `features`; `prototypes` is a constant."""
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


def prototype_rectify(features, prototypes, soft_labels, tau=1.0, *, backend="auto"):
    """argmax_c(prototype_softmax_c * soft_labels_c), first maximum winning: int64 [B, H, W]."""
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
def update_prototypes(prototypes, sums, counts, *, momentum=0.9999, min_pixels=10):
    """ProDA's prototype update (SPEC 1.3), in place: for each image in order and each class with
    at least `min_pixels` pixels in it, eta_c <- momentum * eta_c + (1 - momentum) * mean.

    Under torch.distributed every process's `sums` and `counts` (the same B everywhere) are
    gathered and applied in (rank, image) order, so all processes keep the same prototypes."""
    check.ndim("prototypes", prototypes, 2, "[C, D]")
    check.ndim("sums", sums, 3, "[B, C, D]")
    check.same_shape("sums", sums, "[B, C, D]", (sums.shape[0],) + tuple(prototypes.shape))
    check.same_shape("counts", counts, "[B, C]", sums.shape[:2])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        gathered = [torch.empty_like(sums) for _ in range(world)], [torch.empty_like(counts) for _ in range(world)]
        torch.distributed.all_gather(gathered[0], sums.contiguous())
        torch.distributed.all_gather(gathered[1], counts.contiguous())
        sums, counts = torch.cat(gathered[0]), torch.cat(gathered[1])
    for image_sums, image_counts in zip(sums, counts):
        present = image_counts >= min_pixels
        means = image_sums[present] / image_counts[present].unsqueeze(1).to(image_sums.dtype)
        prototypes[present] = momentum * prototypes[present] + (1 - momentum) * means.to(prototypes.dtype)
    return prototypes


__all__ = ["prototype_softmax", "prototype_rectify", "update_prototypes"]
