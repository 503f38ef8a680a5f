"""SPEC 1.3: per image and class, the sum of its pixels' features and their count (ProDA's
prototype updates and initial prototypes)."""
from udafast.ops import validate as check
from udafast.ops import reference
from udafast.ops.backend import resolve
from udafast.ops.dispatch import launch


def class_feature_sums(features, labels, num_classes, *, ignore_index=255, backend="auto", validate=None):
    """Per image and class, the sum of its pixels' features and their count:
    (sums [B, C, D] in the features' dtype, counts int64 [B, C])."""
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
