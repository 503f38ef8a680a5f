"""SPEC 1.3: per image and class, the sum of its pixels' features and their count (ProDA's
prototype updates and initial prototypes)."""
from typing import Optional, Tuple

import torch

from udafast.ops import check
from udafast.ops import reference
from udafast.ops.backend import resolve
from udafast.ops.dispatch import launch


def class_feature_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, ignore_index: int = 255,
                       backend: str = "auto", validate: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per image and class, the sum of its pixels' features and their count.

    `features` [B, D, H, W]: float; `labels` [B, H, W]: integer (`ignore_index`: left out).

    Returns (sums [B, C, D] in the features' dtype, counts int64 [B, C])."""
    check.ndim("features", features, 4, "[B, D, H, W]")
    check.float_dtype("features", features)
    check.ndim("labels", labels, 3, "[B, H, W]")
    check.int_dtype("labels", labels)
    b, _, h, w = features.shape
    check.same_shape("labels", labels, "[B, H, W]", (b, h, w))
    check.same_device(("features", features), ("labels", labels))
    check.positive_int("num_classes", num_classes)
    ignore_index = check.ignore_index(ignore_index)
    if check.values_checked(validate):
        check.labels_in_range("labels", labels, num_classes, ignore_index)
    chosen = resolve("class_feature_sums", backend, features.device)
    return launch(
        "class_feature_sums", chosen, reference.class_feature_sums, features.detach(), labels, num_classes, ignore_index
    )


__all__ = ["class_feature_sums"]
