"""Backend selection: which implementation of an op runs, and why another cannot."""
import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "reference", "native", "triton")


def _load_extension():
    """None when udafast._C loaded (which registers torch.ops.udafast.*), else why not.

    A missing or broken build must not break `import udafast`."""
    try:
        importlib.import_module("udafast._C")
    except ModuleNotFoundError:
        return "udafast._C is not built (installed with UDAFAST_NO_EXT=1, or the build failed)"
    except Exception as exc:
        return f"udafast._C failed to load: {type(exc).__name__}: {exc}"
    return None


EXTENSION_ERROR = _load_extension()

_warned_fallback = False


def extension_loaded():
    return EXTENSION_ERROR is None


def _native_kernels():
    """{(op, device type): whether udafast._C registers a kernel}, read once: the registrations are
    fixed for the life of the process, and torch.compile traces a dict lookup where it cannot
    trace the dispatcher query itself (which broke fullgraph=True compiles of every public op)."""
    if not extension_loaded():
        return {}
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("udafast::")]  # backwards too
    return {(name[len("udafast::"):], device): torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
            for name in names for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))}


def native_has_kernel(op, device_type):
    """Whether the compiled extension registers `op` for this device type."""
    return NATIVE_KERNELS.get((op, device_type), False)


def native_unavailable_reason(op, device_type):
    if not extension_loaded():
        return f"the udafast._C extension is not loaded ({EXTENSION_ERROR})"
    if not native_has_kernel(op, device_type):
        return f"udafast._C has no {device_type} kernel for {op} in this build"
    return None


def triton_unavailable_reason(op, device_type):
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"Triton is not installed ({type(exc).__name__}: {exc})"
    if device_type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "Triton needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before import"
    from udafast.kernels import LAUNCHERS

    if op not in LAUNCHERS:
        return f"there is no Triton kernel for {op} in this version of udafast"
    return None


# backend="auto" on CUDA: the backend tried first per op where both are available (the other is
# the fallback). A fixed table, never a run-time timing, so results are reproducible; it is set
# from the GPU benchmark suite (benchmarks/results/cuda-*.json).
CUDA_AUTO = {
    "class_thresholds": "native",
    "class_histogram_add_": "native",
    "cbst_pseudo_labels": "native",
    "topk_per_class": "native",
    "prototype_softmax": "native",
    "prototype_rectify": "native",
    "class_feature_sums": "native",
    "sce_loss": "native",
    "kl_loss": "native",
}


NATIVE_KERNELS = _native_kernels()


def _constant_where_compiled_code_asks(fn):
    """torch.compiler.assume_constant_result(fn) where compiled code can call it (only the CUDA
    path of auto_choice does); elsewhere fn as it is, since the decorator imports torch._dynamo,
    about 1.5 s of every CPU process's start-up."""
    return torch.compiler.assume_constant_result(fn) if torch.cuda.is_available() else fn


def auto_choice(op, device_type):
    """What backend="auto" runs: on CUDA the table's choice, else the other fast backend; on the
    CPU native; the reference where neither is available."""
    if device_type == "cuda":
        preferred = CUDA_AUTO[op]
        order = (preferred, "triton" if preferred == "native" else "native")
        for candidate in order:
            if candidate == "native" and native_has_kernel(op, device_type):
                return "native"
            if candidate == "triton" and triton_available(op, device_type):
                return "triton"
        return "reference"
    return "native" if native_has_kernel(op, device_type) else "reference"


@_constant_where_compiled_code_asks
def triton_available(op, device_type):
    return triton_unavailable_reason(op, device_type) is None


def resolve(op, backend, device):
    """The backend that runs `op` on `device` for the requested `backend` name.

    "auto" uses a fixed table (see auto_choice), never a run-time timing, so results are
    reproducible.
    """
    global _warned_fallback
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    device_type = torch.device(device).type
    if backend == "reference":
        return "reference"
    if backend == "native":
        reason = native_unavailable_reason(op, device_type)
        if reason:
            raise RuntimeError(f"backend='native' is unavailable for {op}: {reason}")
        return "native"
    if backend == "triton":
        reason = triton_unavailable_reason(op, device_type)
        if reason:
            raise RuntimeError(f"backend='triton' is unavailable for {op}: {reason}")
        return "triton"
    chosen = auto_choice(op, device_type)
    if chosen != "reference":
        return chosen
    if not extension_loaded() and not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"udafast: the compiled extension is unavailable ({EXTENSION_ERROR}); "
            "backend='auto' falls back to the pure-PyTorch reference",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference"
