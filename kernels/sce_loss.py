"""SPEC 1.4, symmetric cross-entropy (alpha CE + beta RCE + reg_weight REG) in Triton.

The numerics follow csrc/cpu/sce_loss.cpp: the log1p series for the CE of saturated pixels, the
torch.clamp gradient rule of RCE, the backward's sums of the other classes' p instead of the
cancelling differences 1 - p_y and 1 - sum(kept p), and the division of exp(z - lse) by its sum.

Layout: a program takes BLOCK_P consecutive pixels of one image plane (NCHW, the pixels of a
plane are contiguous) and all C classes at once, a [BLOCK_C, BLOCK_P] tile (BLOCK_C the next power
of two >= C, the padding masked). The 1-D grid enumerates the tiles of plane 0, then plane 1, ...;
offsets are int64. Arithmetic is in float32 (float16/bfloat16/float32 logits) or float64.

Forward: one pass writes the per-pixel log-sum-exp (for the backward) and per-program float64
partial sums (CE, RCE, log p, valid count) to a [programs, 4] workspace; a one-program finalize
kernel adds the partials in a fixed order (deterministic, no atomics) and assembles the loss and
the valid count on the device (no host synchronisation). Backward: one pass that reads grad_loss
and num_valid from the device.
"""
import math

import torch
import triton
import triton.language as tl

from .common import FINALIZE_BLOCK, compute_dtype, loss_dtype, on_device, plane_tile, tile_shape

# -log(1e-4): the RCE weight of every non-target class, log(clamp(onehot, 1e-4, 1)) = log(1e-4)
RCE_WEIGHT = -math.log(1e-4)


@triton.jit
def _sce_forward_kernel(logits_ptr, target_ptr, lse_ptr, ws_ptr, C, S, tiles, ignore_index,
                        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, DT: tl.constexpr):
    pid, b, s, pmask, cls, cmask, offs = plane_tile(tiles, C, S, BLOCK_C, BLOCK_P)
    z = tl.load(logits_ptr + offs, mask=cmask[:, None] & pmask[None, :], other=0.0).to(DT)
    z = tl.where(cmask[:, None], z, float("-inf"))
    y = tl.load(target_ptr + b * S + s, mask=pmask, other=0).to(tl.int64)
    # the class index of the pixel: -1 for ignore_index, labels outside [0, C) and padding
    valid = pmask & (y != ignore_index) & (y >= 0) & (y < C)
    y = tl.where(valid, y, -1)
    is_y = cls[:, None] == y[None, :]
    other_class = cmask[:, None] & (cls[:, None] != y[None, :])

    one = tl.full([], 1.0, DT)
    lo = tl.full([], 1e-7, DT)
    mx = tl.max(z, axis=0)
    d = z - mx[None, :]
    e = tl.exp(d)  # 0 on the padding
    total = tl.sum(e, axis=0)
    zs = tl.sum(tl.where(cmask[:, None], d, 0.0), axis=0)
    zy = tl.sum(tl.where(is_y, d, 0.0), axis=0)
    ey = tl.sum(tl.where(is_y, e, 0.0), axis=0)
    others = tl.sum(tl.where(other_class, e, 0.0), axis=0)
    ls = tl.log(total)
    inv = one / total
    p = e * inv[None, :]
    clamped = tl.where(p < lo, lo, tl.where(p > one, one, p))
    rce = tl.sum(tl.where(other_class, clamped, 0.0), axis=0)
    tl.store(lse_ptr + b * S + s, (mx + ls).to(lse_ptr.dtype.element_ty), mask=pmask)

    # -log p_y = log1p(x), x = sum_{k != y} p_k / p_y: a series where x is small, since
    # log(sum) - z_y rounds to 0 once p_y rounds to 1
    x = others / ey
    third = one / 3
    series = x * (one - x * (0.5 - x * (third - x * 0.25)))
    ce = tl.where(x < tl.full([], 1e-2, DT), series, ls - zy)
    log_p = zs - (one * C) * ls
    ce_sum = tl.sum(tl.where(valid, ce, 0.0).to(tl.float64), axis=0)
    rce_sum = tl.sum(tl.where(valid, rce, 0.0).to(tl.float64), axis=0)
    log_p_sum = tl.sum(tl.where(pmask, log_p, 0.0).to(tl.float64), axis=0)
    count = tl.sum(valid.to(tl.int32), axis=0).to(tl.float64)
    w = ws_ptr + pid.to(tl.int64) * 4
    tl.store(w, ce_sum)
    tl.store(w + 1, rce_sum)
    tl.store(w + 2, log_p_sum)
    tl.store(w + 3, count)


@triton.jit
def _sce_finalize_kernel(ws_ptr, loss_ptr, count_ptr, programs, alpha: tl.float64, beta: tl.float64,
                         reg_weight: tl.float64, rce_weight: tl.float64, elements: tl.float64,
                         BLOCK: tl.constexpr):
    # the partials in a fixed order: lane i adds rows i, i + BLOCK, ..., then a tree over the lanes
    r = tl.arange(0, BLOCK)
    ce = tl.zeros([BLOCK], tl.float64)
    rce = tl.zeros([BLOCK], tl.float64)
    log_p = tl.zeros([BLOCK], tl.float64)
    valid = tl.zeros([BLOCK], tl.float64)
    for start in range(0, programs, BLOCK):
        rows = start + r
        m = rows < programs
        w = ws_ptr + rows.to(tl.int64) * 4
        ce += tl.load(w, mask=m, other=0.0)
        rce += tl.load(w + 1, mask=m, other=0.0)
        log_p += tl.load(w + 2, mask=m, other=0.0)
        valid += tl.load(w + 3, mask=m, other=0.0)
    ce_t = tl.sum(ce, axis=0)
    rce_t = tl.sum(rce, axis=0)
    log_p_t = tl.sum(log_p, axis=0)
    n = tl.sum(valid, axis=0)
    # CE and RCE are means over the n valid pixels (0 when n == 0), REG over every element
    nd = tl.maximum(n, 1.0)
    mean = alpha * (ce_t / nd) + beta * (rce_weight * rce_t / nd)
    loss = tl.where(n > 0, mean, 0.0) + reg_weight * (-log_p_t / elements)
    tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))
    tl.store(count_ptr, n.to(tl.int64))


# Precision (float32): exp(z - lse) carries the rounding of the stored lse, a relative error of
# up to |lse| * 2^-24 common to the pixel's classes; dividing by the sum of these values removes
# it. 1 - p_y and 1 - sum(kept p) are not formed by subtraction but summed from the other classes:
#   dCE/dz_j  = p_j for j != y, and -(sum_{k != y} p_k) for j = y
#   dRCE/dz_j = A p_j * (m_j ? sum_k (1 - m_k) p_k : -sum_k m_k p_k)
# with m_k = (k != y and 1e-7 <= p_k <= 1), the classes where torch.clamp passes the gradient.
@triton.jit
def _sce_backward_kernel(grad_loss_ptr, count_ptr, logits_ptr, target_ptr, lse_ptr, grad_ptr, C, S, tiles,
                         ignore_index, alpha: tl.float64, beta: tl.float64, reg_weight: tl.float64,
                         rce_weight: tl.float64, elements: tl.float64,
                         BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, DT: tl.constexpr):
    go = tl.load(grad_loss_ptr).to(tl.float64)
    n = tl.load(count_ptr).to(tl.float64)
    nd = tl.maximum(n, 1.0)
    ce_scale = tl.where(n > 0, go * alpha / nd, 0.0).to(DT)
    rce_scale = tl.where(n > 0, go * beta * rce_weight / nd, 0.0).to(DT)
    reg_scale = (-go * reg_weight / elements).to(DT)

    pid, b, s, pmask, cls, cmask, offs = plane_tile(tiles, C, S, BLOCK_C, BLOCK_P)
    mask = cmask[:, None] & pmask[None, :]
    z = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(DT)
    lse = tl.load(lse_ptr + b * S + s, mask=pmask, other=0.0).to(DT)
    y = tl.load(target_ptr + b * S + s, mask=pmask, other=0).to(tl.int64)
    valid = pmask & (y != ignore_index) & (y >= 0) & (y < C)
    y = tl.where(valid, y, -1)
    is_y = cls[:, None] == y[None, :]
    other_class = cmask[:, None] & (cls[:, None] != y[None, :])

    one = tl.full([], 1.0, DT)
    lo = tl.full([], 1e-7, DT)
    e = tl.where(cmask[:, None], tl.exp(z - lse[None, :]), 0.0)
    inv = one / tl.sum(e, axis=0)
    p = e * inv[None, :]
    keep = other_class & (p >= lo) & (p <= one)
    other = tl.sum(tl.where(other_class, p, 0.0), axis=0)
    kept = tl.sum(tl.where(keep, p, 0.0), axis=0)
    dropped = tl.sum(tl.where(keep, 0.0, p), axis=0)
    ce = tl.where(is_y, -other[None, :], p)
    rce = p * tl.where(keep, dropped[None, :], -kept[None, :])
    ce_s = tl.where(valid, ce_scale, 0.0)
    rce_s = tl.where(valid, rce_scale, 0.0)
    g = ce_s[None, :] * ce + rce_s[None, :] * rce + reg_scale * (one - (one * C) * p)
    tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("udafast_triton::sce_loss", mutates_args=())
def sce_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float, beta: float, reg_weight: float,
             ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss 0-d, lse [B, H, W], num_valid int64 0-d), as torch.ops.udafast.sce_loss."""
    if logits.dim() != 4 or target.dim() != 3:
        raise ValueError("sce_loss: logits [B, C, H, W], target [B, H, W]")
    logits = logits.contiguous()
    target = target.contiguous()
    B, C, H, W = logits.shape
    S = H * W
    dtype = loss_dtype(logits.dtype)
    lse = torch.empty((B, H, W), dtype=dtype, device=logits.device)
    loss = torch.empty((), dtype=dtype, device=logits.device)
    count = torch.empty((), dtype=torch.int64, device=logits.device)
    if logits.numel() == 0:  # no element: loss 0, no valid pixel (lse of no class is -inf)
        lse.fill_(float("-inf"))
        return loss.zero_(), lse, count.zero_()
    block_c, block_p, tiles, num_warps = tile_shape(C, S)
    programs = B * tiles
    ws = torch.empty((programs, 4), dtype=torch.float64, device=logits.device)
    with on_device(logits):
        _sce_forward_kernel[(programs,)](logits, target, lse, ws, C, S, tiles, ignore_index,
                                         BLOCK_C=block_c, BLOCK_P=block_p, DT=compute_dtype(logits.dtype),
                                         num_warps=num_warps)
        _sce_finalize_kernel[(1,)](ws, loss, count, programs, float(alpha), float(beta), float(reg_weight),
                                   RCE_WEIGHT, float(logits.numel()), BLOCK=FINALIZE_BLOCK)
    return loss, lse, count


@torch.library.custom_op("udafast_triton::sce_loss_backward", mutates_args=())
def sce_loss_backward(grad_loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
                      num_valid: torch.Tensor, alpha: float, beta: float, reg_weight: float,
                      ignore_index: int) -> torch.Tensor:
    """The gradient in the logits' shape, dtype and layout, as torch.ops.udafast.sce_loss_backward."""
    grad = torch.empty_like(logits)
    if logits.numel() == 0:
        return grad
    out = grad if grad.is_contiguous() else torch.empty_like(logits, memory_format=torch.contiguous_format)
    B, C, H, W = logits.shape
    S = H * W
    block_c, block_p, tiles, num_warps = tile_shape(C, S)
    with on_device(logits):
        _sce_backward_kernel[(B * tiles,)](
            grad_loss.reshape(()).contiguous(), num_valid.reshape(()).contiguous(), logits.contiguous(),
            target.contiguous(), lse.contiguous(), out, C, S, tiles, ignore_index,
            float(alpha), float(beta), float(reg_weight), RCE_WEIGHT, float(logits.numel()),
            BLOCK_C=block_c, BLOCK_P=block_p, DT=compute_dtype(logits.dtype), num_warps=num_warps)
    if out is not grad:
        grad.copy_(out)
    return grad


LAUNCHERS = {"sce_loss": sce_loss}
