"""Triton kernels, one module per hot path (installed as ``udafast.kernels``).

``LAUNCHERS`` maps an op name of ``udafast.ops`` to its Triton launcher, which takes the same
positional arguments and returns the same outputs as the compiled op ``torch.ops.udafast.<op>``.
The differentiable launchers are torch.library custom ops (namespace ``udafast_triton``) with
their own fake kernels and autograd, so that they work under ``torch.compile``.

The modules are imported here, eagerly: ``triton.jit`` decides at decoration time whether a
kernel is compiled or interpreted, so ``TRITON_INTERPRET=1`` must be set before udafast is
imported. Without Triton, ``LAUNCHERS`` is empty and ``backend="triton"`` says why.
"""
import importlib

HOT_PATHS = ("class_thresholds", "topk_per_class", "prototype_softmax", "class_feature_sums", "sce_loss", "kl_loss")


def _load_launchers():
    try:
        import triton  # noqa: F401
    except ImportError:
        return {}
    launchers = {}
    for hot_path in HOT_PATHS:
        launchers.update(importlib.import_module(f"{__name__}.{hot_path}").LAUNCHERS)
    return launchers


LAUNCHERS = _load_launchers()
