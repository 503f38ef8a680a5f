"""The hot-path ops of udafast (SPEC part 1), each with backend="auto" | "reference" | "native" | "triton".

"reference" is pure PyTorch and defines the semantics; "native" is the compiled extension
(torch.ops.udafast.*); "triton" the kernels in udafast.kernels. `validate=False` (where an op takes
it) skips, for that call, the checks that need a pass over the values; `set_validation(False)`
skips them everywhere. The stateful helpers that processes must keep alike take their collectives
from the caller (udafast.ops.sync); no module here talks to torch.distributed.
"""
from udafast.kernels import LAUNCHERS
from udafast.ops import backend, registrations
from udafast.ops.check import get_validation, set_validation
from udafast.ops.class_thresholds import ClassThresholds, cbst_pseudo_labels, class_thresholds
from udafast.ops.kl_loss import kl_loss
from udafast.ops.class_feature_sums import class_feature_sums
from udafast.ops.prototype_softmax import prototype_rectify, prototype_softmax, update_prototypes
from udafast.ops.sce_loss import sce_loss
from udafast.ops.topk_per_class import ClassMemoryBank, topk_per_class

# fake kernels and autograd of the compiled ops, one table for both backends
if backend.extension_loaded():
    registrations.register("udafast")
if LAUNCHERS:
    registrations.register("udafast_triton")

__all__ = [
    "class_thresholds", "ClassThresholds", "cbst_pseudo_labels",
    "topk_per_class", "ClassMemoryBank",
    "prototype_softmax", "prototype_rectify", "class_feature_sums", "update_prototypes",
    "sce_loss", "kl_loss",
    "set_validation", "get_validation",
]
