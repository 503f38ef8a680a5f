"""SPEC 1.1 in Triton: exact class thresholds, the streaming class histogram, CBST pseudo-labels.

Launches per call (no host sync; output shapes from the arguments only; a copy more for a
non-contiguous input):
- class_thresholds: 1 zero-fill, then 2 per radix pass (histogram, scan; see radix), ceil(32 / D)
  passes for float32 and ceil(64 / D) for float64, the digit width D in [4, 16] picked from N and C:
  N = 10^7, C = 19: D = 16, 5 launches (float32) / 9 (float64); N = 5000, C = 19: 7 / 11.
- class_histogram_add_: 1 launch (int64 atomic adds straight into `counts`, through its strides).
- cbst_pseudo_labels: 1 launch (each program loops over the classes for a block of pixels).
"""
import struct

import torch
import triton
import triton.language as tl

from . import radix


@torch.library.custom_op("udafast_triton::class_thresholds", mutates_args=())
def class_thresholds(conf: torch.Tensor, pred: torch.Tensor, num_classes: int, portion: float,
                     ignore_index: int) -> torch.Tensor:
    if conf.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"class_thresholds: conf must be float32 or float64; got {conf.dtype}")
    x = conf.contiguous().view(-1)
    labels = radix.flat_labels(pred)
    out = torch.empty(num_classes, dtype=conf.dtype, device=conf.device)
    # floor(N_c * portion) is taken in float64 on the device: the portion goes in as its bits
    portion_bits = struct.unpack("<q", struct.pack("<d", float(portion)))[0]
    radix.select(x, labels, num_classes, ignore_index, 0, portion_bits=portion_bits, out=out)
    return out


@triton.jit
def _histogram_add_kernel(counts_ptr, stride_c, stride_b, x_ptr, label_ptr, n, num_classes, bins, ignore_index,
                          BLOCK: tl.constexpr):
    """counts[c, min(floor(x * bins), bins - 1)] += 1 per pixel; NaN, negative confidences and
    ignored or out-of-range labels are left out."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0)
    c = tl.load(label_ptr + offs, mask=inside, other=0).to(tl.int64)
    # bins is a power of two: x * bins is exact, in the confidences' dtype
    b = tl.minimum(tl.floor(x * bins), bins - 1)
    keep = inside & (c != ignore_index) & (c >= 0) & (c < num_classes) & (x == x) & (b >= 0)
    c = tl.where(keep, c, 0)
    b = tl.where(keep, b, 0).to(tl.int64)
    tl.atomic_add(counts_ptr + c * stride_c + b * stride_b, 1, mask=keep, sem="relaxed")


@torch.library.custom_op("udafast_triton::class_histogram_add_", mutates_args=("counts",))
def class_histogram_add_(counts: torch.Tensor, conf: torch.Tensor, pred: torch.Tensor, ignore_index: int) -> None:
    if counts.dim() != 2 or counts.dtype != torch.int64:
        raise ValueError("class_histogram_add_: counts must be int64 [C, bins]")
    num_classes, bins = counts.shape
    if bins < 1 or bins & (bins - 1):
        raise ValueError("class_histogram_add_: bins must be a power of two")
    if conf.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"class_histogram_add_: conf must be float32 or float64; got {conf.dtype}")
    x = conf.contiguous().view(-1)
    labels = radix.flat_labels(pred)
    n = x.numel()
    if n == 0 or num_classes == 0:
        return
    block = 1 << 16 if radix.interpreting(x) else 1024
    _histogram_add_kernel[(triton.cdiv(n, block),)](
        counts, counts.stride(0), counts.stride(1), x, labels, n, num_classes, bins, ignore_index, BLOCK=block
    )


@triton.jit
def _pseudo_label_kernel(probs_ptr, thresholds_ptr, out_ptr, num_classes, pixels, blocks_per_image, ignore_index,
                         IEEE_DIV_RN: tl.constexpr, BLOCK: tl.constexpr):
    """argmax_c probs_c / thresholds_c over a block of one image's pixels, the first maximum
    winning and NaN counting as the maximum (torch.argmax); ignore_index where the best is < 1."""
    pid = tl.program_id(0)
    image = (pid // blocks_per_image).to(tl.int64)
    offs = (pid % blocks_per_image).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < pixels
    base = probs_ptr + image * num_classes * pixels + offs
    zero = offs * 0
    p = tl.load(base, mask=inside, other=1)
    t = tl.load(thresholds_ptr + zero)
    # IEEE division in the probabilities' dtype: `/` is already round-to-nearest for float64,
    # float32 asks for it explicitly (never a reciprocal multiply or an approximate divide)
    if IEEE_DIV_RN:
        best = tl.math.div_rn(p, t)
    else:
        best = p / t
    label = tl.zeros([BLOCK], dtype=tl.int32)
    for c in range(1, num_classes):
        base += pixels  # a pointer: no int32 product c * pixels to overflow
        p = tl.load(base, mask=inside, other=1)
        t = tl.load(thresholds_ptr + c + zero)
        if IEEE_DIV_RN:
            r = tl.math.div_rn(p, t)
        else:
            r = p / t
        take = (r > best) | ((r != r) & (best == best))
        best = tl.where(take, r, best)
        label = tl.where(take, c, label)
    out = tl.where(best < 1, ignore_index, label.to(tl.int64))
    tl.store(out_ptr + image * pixels + offs, out, mask=inside)


@torch.library.custom_op("udafast_triton::cbst_pseudo_labels", mutates_args=())
def cbst_pseudo_labels(probs: torch.Tensor, thresholds: torch.Tensor, ignore_index: int) -> torch.Tensor:
    if probs.dim() != 4 or thresholds.dim() != 1 or thresholds.shape[0] != probs.shape[1] or probs.shape[1] < 1:
        raise ValueError("cbst_pseudo_labels: probs must be [B, C, H, W] and thresholds [C]")
    if probs.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"cbst_pseudo_labels: probs must be float32 or float64; got {probs.dtype}")
    batch, num_classes, height, width = probs.shape
    out = torch.empty((batch, height, width), dtype=torch.int64, device=probs.device)
    pixels = height * width
    if out.numel() == 0:
        return out
    p = probs.contiguous()
    t = thresholds.to(probs.dtype).contiguous()
    block = 1 << 14 if radix.interpreting(p) else 512
    blocks = triton.cdiv(pixels, block)
    _pseudo_label_kernel[(batch * blocks,)](
        p, t, out, num_classes, pixels, blocks, ignore_index,
        IEEE_DIV_RN=probs.dtype == torch.float32, BLOCK=block,
    )
    return out


LAUNCHERS = {
    "class_thresholds": class_thresholds,
    "class_histogram_add_": class_histogram_add_,
    "cbst_pseudo_labels": cbst_pseudo_labels,
}
