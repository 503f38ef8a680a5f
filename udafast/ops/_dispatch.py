"""Runs the chosen backend's implementation of an op.

The reference function, the compiled op torch.ops.udafast.<op> and the Triton launcher in
udafast.kernels.LAUNCHERS all take the same positional arguments.
"""
import torch

from udafast.kernels import LAUNCHERS


def launch(op, backend, reference, *args):
    if backend == "reference":
        return reference(*args)
    if backend == "native":
        return getattr(torch.ops.udafast, op)(*args)
    return LAUNCHERS[op](*args)
