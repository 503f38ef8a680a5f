"""SPEC 1.1: class-balanced confidence thresholds (CBST) and the pseudo-labels they give."""
from typing import Any, Dict, Optional, Union

import torch

from udafast.ops import check
from udafast.ops import reference
from udafast.ops.backend import resolve
from udafast.ops.dispatch import launch
from udafast.ops.sync import AllReduce


def class_thresholds(conf: torch.Tensor, pred: torch.Tensor, num_classes: int, portion: float, *,
                     ignore_index: int = 255, backend: str = "auto", validate: Optional[bool] = None) -> torch.Tensor:
    """Per class c, the `floor(N_c * portion)`-th highest confidence among pixels predicted c
    (1.0 where that count is 0). Exact: equal bit for bit on every backend.

    `conf`: float, any shape, each pixel's max softmax probability in [0, 1]; `pred`: integer, the
    same shape, its argmax class (`ignore_index`: left out); `portion` in [0, 1].

    Returns [C] in `conf`'s dtype."""
    check.tensor("conf", conf)
    check.tensor("pred", pred)
    check.float_dtype("conf", conf, reduced=True)
    dtype, conf = conf.dtype, check.widened(conf)
    check.int_dtype("pred", pred)
    check.same_shape("pred", pred, "conf", conf.shape)
    check.same_device(("conf", conf), ("pred", pred))
    check.positive_int("num_classes", num_classes)
    portion = check.portion(portion)
    ignore_index = check.ignore_index(ignore_index)
    if check.values_checked(validate):
        check.in_unit_interval("conf", conf)
        check.labels_in_range("pred", pred, num_classes, ignore_index)
    chosen = resolve("class_thresholds", backend, conf.device)
    return launch(
        "class_thresholds", chosen, reference.class_thresholds, conf, pred, num_classes, portion, ignore_index
    ).to(dtype)


class ClassThresholds:
    """Streaming class thresholds over a whole dataset in C x bins int64 counts (`counts`).

    Each threshold is the lower edge of the bin holding the exact one (SPEC 1.1), so it never
    selects fewer pixels than `class_thresholds` on all the pixels would. `bins`: a power of two,
    at most 2**24. Under several processes, `all_reduce` sums the counts through the caller's
    collective (udafast.ops.sync).
    """

    def __init__(self, num_classes: int, bins: int = 65536, *, ignore_index: int = 255,
                 device: Optional[Union[torch.device, str]] = None, backend: str = "auto") -> None:
        check.positive_int("num_classes", num_classes)
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1 or bins & (bins - 1) or bins > 2**24:
            raise ValueError(f"bins must be a power of two in [1, 2**24]; got {bins!r}")
        self.num_classes = num_classes
        self.bins = bins
        self.ignore_index = check.ignore_index(ignore_index)
        self.backend = backend
        self.counts = torch.zeros(num_classes, bins, dtype=torch.int64, device=device)

    def update(self, conf: torch.Tensor, pred: torch.Tensor, *, validate: Optional[bool] = None) -> "ClassThresholds":
        """Add pixels: `conf` their max softmax probability, `pred` their argmax class (as in
        `class_thresholds`). Returns self."""
        check.tensor("conf", conf)
        check.tensor("pred", pred)
        check.float_dtype("conf", conf, reduced=True)
        conf = check.widened(conf)
        check.int_dtype("pred", pred)
        check.same_shape("pred", pred, "conf", conf.shape)
        check.same_device(("counts", self.counts), ("conf", conf), ("pred", pred))
        if check.values_checked(validate):
            check.in_unit_interval("conf", conf)
            check.labels_in_range("pred", pred, self.num_classes, self.ignore_index)
        chosen = resolve("class_histogram_add_", self.backend, conf.device)
        launch(
            "class_histogram_add_", chosen, reference.class_histogram_add_, self.counts, conf, pred, self.ignore_index
        )
        return self

    def thresholds(self, portion: float) -> torch.Tensor:
        """float32 [C]: per class, the lower edge of the bin that holds its exact threshold."""
        portion = check.portion(portion)
        return reference.thresholds_from_histogram(self.counts, portion)

    def reset(self) -> None:
        """Zero the counts."""
        self.counts.zero_()

    def all_reduce(self, sync: Optional[AllReduce] = None) -> "ClassThresholds":
        """Sum the counts over the processes with `sync`, the caller's in-place sum (e.g. the run
        context's `all_reduce_`); None: one process, the counts stay as they are. Returns self."""
        if sync is not None:
            sync(self.counts)
        return self

    def state_dict(self) -> Dict[str, Any]:
        """{"num_classes", "bins", "counts" (a copy)}."""
        return {"num_classes": self.num_classes, "bins": self.bins, "counts": self.counts.clone()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore the counts of a `state_dict` with the same `num_classes` and `bins`."""
        if state.get("num_classes") != self.num_classes or state.get("bins") != self.bins:
            raise ValueError(
                f"state must hold num_classes={self.num_classes} and bins={self.bins}; "
                f"got {state.get('num_classes')} and {state.get('bins')}"
            )
        self.counts.copy_(state["counts"])


def cbst_pseudo_labels(probs: torch.Tensor, thresholds: torch.Tensor, *, ignore_index: int = 255,
                       backend: str = "auto", validate: Optional[bool] = None) -> torch.Tensor:
    """argmax_c probs_c / thresholds_c, first maximum winning; `ignore_index` where the best ratio
    is below 1.

    `probs` [B, C, H, W]: softmax probabilities; `thresholds` [C] in (0, 1] (a constant).

    Returns int64 [B, H, W]."""
    check.ndim("probs", probs, 4, "[B, C, H, W]")
    check.float_dtype("probs", probs)
    check.ndim("thresholds", thresholds, 1, "[C]")
    check.float_dtype("thresholds", thresholds)
    check.same_shape("thresholds", thresholds, "probs' class dim", (probs.shape[1],))
    check.same_device(("probs", probs), ("thresholds", thresholds))
    ignore_index = check.ignore_index(ignore_index)
    if check.values_checked(validate):
        check.in_unit_interval("thresholds", thresholds, low_open=True)
    chosen = resolve("cbst_pseudo_labels", backend, probs.device)
    return launch(
        "cbst_pseudo_labels", chosen, reference.cbst_pseudo_labels,
        probs.detach(), thresholds.detach().to(probs.dtype), ignore_index,
    )


__all__ = ["class_thresholds", "ClassThresholds", "cbst_pseudo_labels"]
