"""The torch device a run or a tool is asked for, checked before anything is built or written."""
import torch

__all__ = ["check_device"]


def check_device(name: str, what: str = "device") -> torch.device:
    """`name` ("cpu", "cuda", "cuda:1", ...) as a torch.device; ValueError naming `what` (the
    flag or config key that gave it) when torch cannot parse it, this torch has no CUDA, or the
    CUDA index is beyond the devices there are."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{what}: not a torch device: {name!r} (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise ValueError(f"{what}: {name!r} needs CUDA, but this torch ({torch.__version__}) is built without "
                             f"it; use cpu, or install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise ValueError(f"{what}: {name!r}: no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES?)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{what}: {name!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{what}: {name!r}: the MPS backend is not available here")
    return device
