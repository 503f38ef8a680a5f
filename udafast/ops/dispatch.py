"""Runs the chosen backend's implementation of an op.

The reference function, the compiled op torch.ops.udafast.<op> and the Triton launcher in
udafast.kernels.LAUNCHERS all take the same positional arguments; `launch` returns the op's result
alike for every backend (the compiled ops' extra outputs for their backward left out).
"""
from typing import Any, Callable

import torch

from udafast.kernels import LAUNCHERS
from udafast.ops.registrations import public_output


def launch(op: str, backend: str, reference: Callable[..., Any], *args: Any) -> Any:
    if backend == "reference":
        return reference(*args)
    compiled = getattr(torch.ops.udafast, op) if backend == "native" else LAUNCHERS[op]
    return public_output(op, backend, compiled(*args))
