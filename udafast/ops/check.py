"""Input checks shared by every backend (SPEC 1.0): ValueError naming the argument."""
import torch

_validate_values = True

FLOAT_DTYPES = (torch.float32, torch.float64)
REDUCED_DTYPES = (torch.float16, torch.bfloat16)
INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def set_validation(enabled: bool) -> None:
    """Turn the value checks (one pass over the data; a host sync on CUDA) on or off globally."""
    global _validate_values
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled must be a bool; got {enabled!r}")
    _validate_values = enabled


def get_validation() -> bool:
    """Whether the value checks are on globally (`set_validation`)."""
    return _validate_values


def values_checked(validate):
    """Whether the value checks run for a call with this `validate` keyword."""
    if validate is None:
        return _validate_values
    return bool(validate) and _validate_values


def tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor; got {type(x).__name__}")


def ndim(name, x, dims, shape_doc):
    tensor(name, x)
    if x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims {shape_doc}; got shape {tuple(x.shape)}")


def float_dtype(name, x, reduced=False):
    allowed = FLOAT_DTYPES + (REDUCED_DTYPES if reduced else ())
    if x.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise ValueError(f"{name} must be of dtype {names}; got {x.dtype}")


def widened_on_cpu(x):
    """float16/bfloat16 off CUDA -> float32 (the CPU kernels and the reference compute in float32
    there, e.g. under CPU autocast); anything else unchanged. Differentiable: gradients flow back in
    the input's dtype."""
    return x.float() if x.dtype in REDUCED_DTYPES and not x.is_cuda else x


def widened(x):
    """float16/bfloat16 -> float32 on any device: for the exact selections, where the conversion is
    exact and the result (a selection of the input's values) does not change."""
    return x.float() if x.dtype in REDUCED_DTYPES else x


def int_dtype(name, x):
    if x.dtype not in INT_DTYPES:
        raise ValueError(f"{name} must be of an integer dtype; got {x.dtype}")


def same_device(*named):
    (first_name, first), *rest = named
    for name, x in rest:
        if x.device != first.device:
            raise ValueError(f"{name} must be on {first_name}'s device {first.device}; got {x.device}")


def same_shape(name, x, expected_name, shape):
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have the shape of {expected_name} {tuple(shape)}; got {tuple(x.shape)}")


def same_dtype(name, x, other_name, other):
    if x.dtype != other.dtype:
        raise ValueError(f"{name} must have {other_name}'s dtype {other.dtype}; got {x.dtype}")


def positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")


def number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number; got {value!r}")
    return float(value)


def portion(value):
    value = number("portion", value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"portion must be in [0, 1]; got {value!r}")
    return value


def tau(value):
    value = number("tau", value)
    if not value > 0.0:
        raise ValueError(f"tau must be > 0; got {value!r}")
    return value


def ignore_index(value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"ignore_index must be an int; got {value!r}")
    return value


def labels_in_range(name, labels, num_classes, ignore):
    """Labels are in [0, num_classes) or equal to ignore_index."""
    if labels.numel() == 0:
        return
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore)
    if bool(bad.any()):
        value = labels[bad].reshape(-1)[0].item()
        raise ValueError(
            f"{name} holds {value}, outside [0, {num_classes}) and not ignore_index={ignore}"
        )


def no_nan(name, x):
    if x.numel() and bool(torch.isnan(x).any()):
        raise ValueError(f"{name} contains NaN")


def in_unit_interval(name, x, low_open=False):
    """Values in [0, 1] (or (0, 1] with low_open) and not NaN."""
    if x.numel() == 0:
        return
    low_ok = x > 0 if low_open else x >= 0
    if not bool((low_ok & (x <= 1)).all()):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name} must lie in {interval} with no NaN")
