"""Backend selection: which implementation of an op runs, and why another cannot."""
import os
import warnings

import torch

BACKENDS = ("auto", "reference", "native", "triton")

try:
    from udafast import _C  # noqa: F401  (loading it registers torch.ops.udafast.*)

    EXTENSION_ERROR = None
except Exception as exc:  # a missing or broken build must not break `import udafast`
    EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"
    if os.environ.get("UDAFAST_NO_EXT", "0") == "1":
        EXTENSION_ERROR = "built with UDAFAST_NO_EXT=1"

_warned_fallback = False


def extension_loaded():
    return EXTENSION_ERROR is None


# Fixed for the life of the process, so torch.compile may evaluate it once while tracing (it cannot
# trace the dispatcher query itself, which broke fullgraph=True compiles of every public op).
@torch.compiler.assume_constant_result
def native_has_kernel(op, device_type):
    """Whether the compiled extension registers `op` for this device type."""
    if not extension_loaded():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"udafast::{op}", key)


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


def resolve(op, backend, device):
    """The backend that runs `op` on `device` for the requested `backend` name.

    "auto" uses a fixed table (native where the extension has a kernel for the device, else the
    reference), never a run-time timing, so results are reproducible.
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
    if native_has_kernel(op, device_type):
        return "native"
    if not extension_loaded() and not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"udafast: the compiled extension is unavailable ({EXTENSION_ERROR}); "
            "backend='auto' falls back to the pure-PyTorch reference",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference"
