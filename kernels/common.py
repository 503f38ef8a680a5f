"""What every Triton kernel of udafast needs: the interpreter flag, the dtypes of the arithmetic
and of the losses, the shape of a [classes, pixels] tile and its prologue, and the launch context.

TRITON_INTERPRET=1 is read at import, as triton.jit reads it: the interpreter (numpy, one program
at a time) pays per program and per tl operation in Python, so the launchers choose larger tiles
under it (the same code and masks, fewer programs).
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# the losses' dtype per logits dtype: float32 partial results for the reduced types
LOSS_DTYPES = {torch.float64: torch.float64, torch.float32: torch.float32,
               torch.float16: torch.float32, torch.bfloat16: torch.float32}
# elements of a [BLOCK_C, BLOCK_P] tile: registers on a GPU; fewer, larger programs interpreted
TILE_ELEMENTS = 32768 if INTERPRET else 4096
MAX_BLOCK_P = 2048 if INTERPRET else 512
# programs' partial sums one finalize program adds, per step
FINALIZE_BLOCK = 256


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return LOSS_DTYPES[dtype]


def compute_dtype(dtype: torch.dtype):
    """The tl dtype of the arithmetic: float64 for float64 inputs, else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def tile_shape(C: int, S: int) -> tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_P, tiles per plane, num_warps) for C classes and S pixels per plane."""
    block_c = triton.next_power_of_2(max(C, 1))
    block_p = max(1, min(MAX_BLOCK_P, TILE_ELEMENTS // block_c))
    block_p = min(block_p, triton.next_power_of_2(max(S, 1)))
    num_warps = 8 if block_c * block_p >= 4096 else 4
    return block_c, block_p, triton.cdiv(S, block_p), num_warps


def on_device(tensor: torch.Tensor):
    """The context of a launch: the tensor's CUDA device (Triton launches on the current one).

    Under the interpreter, numpy's warnings off: masked lanes (padding classes, pixels past the
    plane, ignored pixels) compute 0/0, log(0) or inf * 0 as IEEE arithmetic does on a GPU, and
    their values are discarded."""
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    if INTERPRET:
        import numpy
        return numpy.errstate(divide="ignore", invalid="ignore", over="ignore")
    return contextlib.nullcontext()


@triton.jit
def plane_tile(tiles, C, S, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The program's tile of a [B, C, S] tensor (NCHW, S = H * W pixels per plane; a 1-D grid of
    the tiles of plane 0, then plane 1, ...): (pid, b, s, pmask, cls, cmask, offs), offsets int64."""
    pid = tl.program_id(0)
    b = (pid // tiles).to(tl.int64)
    s = (pid % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = s < S
    cls = tl.arange(0, BLOCK_C)
    cmask = cls < C
    offs = b * C * S + cls.to(tl.int64)[:, None] * S + s[None, :]
    return pid, b, s, pmask, cls, cmask, offs
