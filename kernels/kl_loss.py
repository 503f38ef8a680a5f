"""SPEC 1.4, KL(target || softmax(logits)) over valid pixels in Triton.

The numerics follow csrc/cpu/kl_loss.cpp (t log t = 0 where t == 0; the sum of the targets, which
need not be 1, folded into one factor of the backward) with one change for saturated pixels: the
log-sum-exp is max + log1p(others), others = sum of exp(z - max) below the max (a series where it
is small), and the backward forms q_j T - t_j at the max without the cancelling difference; the
CPU kernel's log(sum) rounds to 0 in float32 once the top probability rounds to 1, which makes the
KL of a target on the top class 0 instead of about others (a relative error of 100%). The
backward recomputes the softmax from the logits' tile (max and sum), so it does not read lse.
Layout, workspace and fixed-order reduction as in sce_loss.py: a program
takes a [BLOCK_C, BLOCK_P] tile (all classes of BLOCK_P consecutive pixels of one plane), the
forward writes the per-pixel log-sum-exp and per-program float64 partials (KL sum, valid count),
a one-program finalize kernel adds them in a fixed order on the device.
"""
import torch
import triton
import triton.language as tl

from .common import FINALIZE_BLOCK, compute_dtype, loss_dtype, on_device, plane_tile, tile_shape


@triton.jit
def _softmax_parts(z, cmask, DT: tl.constexpr):
    """max, d = z - max, e = exp(d), top (the classes at the max), others = sum(e) - 1 and
    ls = log(sum(e)) = log1p(others) of a [BLOCK_C, BLOCK_P] tile (padding classes at -inf).

    others is summed from the classes below the max (and the ties beyond the first), not formed
    as sum - 1, and log1p(others) is a series where others is small: log(sum) rounds to 0 once
    the top probability rounds to 1, when the KL of a target on the top class is log1p(others)."""
    mx = tl.max(z, axis=0)
    d = z - mx[None, :]
    e = tl.exp(d)  # 0 on the padding
    top = cmask[:, None] & (d == 0.0)
    ties = tl.sum(top.to(tl.int32), axis=0) - 1
    others = tl.sum(tl.where(top, 0.0, e), axis=0) + ties.to(DT)
    one = tl.full([], 1.0, DT)
    third = one / 3
    series = others * (one - others * (0.5 - others * (third - others * 0.25)))
    ls = tl.where(others < tl.full([], 1e-2, DT), series, tl.log(one + others))
    return mx, d, e, top, others, ls


@triton.jit
def _kl_forward_kernel(logits_ptr, target_ptr, mask_ptr, lse_ptr, ws_ptr, C, S, tiles,
                       HAS_MASK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, DT: tl.constexpr):
    pid, b, s, pmask, cls, cmask, offs = plane_tile(tiles, C, S, BLOCK_C, BLOCK_P)
    mask = cmask[:, None] & pmask[None, :]
    z = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(DT)
    z = tl.where(cmask[:, None], z, float("-inf"))
    t = tl.load(target_ptr + offs, mask=mask, other=0.0).to(DT)  # 0 on the padding
    if HAS_MASK:
        valid = pmask & (tl.load(mask_ptr + b * S + s, mask=pmask, other=0) != 0)
    else:
        valid = pmask

    mx, d, e, top, others, ls = _softmax_parts(z, cmask, DT)
    # t (log t - log q), log q = (z - max) - log(sum); t log t = 0 where t == 0
    log_q = d - ls[None, :]
    term = t * (tl.log(t) - log_q)
    kl = tl.sum(tl.where(t == 0.0, 0.0, term), axis=0)
    tl.store(lse_ptr + b * S + s, (mx + ls).to(lse_ptr.dtype.element_ty), mask=pmask)

    kl_sum = tl.sum(tl.where(valid, kl, 0.0).to(tl.float64), axis=0)
    count = tl.sum(valid.to(tl.int32), axis=0).to(tl.float64)
    w = ws_ptr + pid.to(tl.int64) * 2
    tl.store(w, kl_sum)
    tl.store(w + 1, count)


@triton.jit
def _kl_finalize_kernel(ws_ptr, loss_ptr, count_ptr, programs, classes: tl.float64, BLOCK: tl.constexpr):
    # the partials in a fixed order: lane i adds rows i, i + BLOCK, ..., then a tree over the lanes
    r = tl.arange(0, BLOCK)
    kl = tl.zeros([BLOCK], tl.float64)
    valid = tl.zeros([BLOCK], tl.float64)
    for start in range(0, programs, BLOCK):
        rows = start + r
        m = rows < programs
        w = ws_ptr + rows.to(tl.int64) * 2
        kl += tl.load(w, mask=m, other=0.0)
        valid += tl.load(w + 1, mask=m, other=0.0)
    kl_t = tl.sum(kl, axis=0)
    n = tl.sum(valid, axis=0)
    denominator = n * classes
    loss = tl.where(denominator > 0, kl_t / tl.maximum(denominator, 1.0), 0.0)
    tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))
    tl.store(count_ptr, n.to(tl.int64))


# dKL/dz_j = s (q_j T - t_j), T = sum_c t_c (the targets need not sum to 1), q = e / sum(e) with
# e = exp(z - max) recomputed from the tile (the lse of the forward is not read). Below the max,
# q_j T - t_j = e_j (T / sum) - t_j. At the max (e_j = 1, sum = 1 + others) the difference would
# cancel once q_j rounds to 1; it is formed as ((T - t_j) - t_j others) / sum, T - t_j summed from
# the other classes (with ties at the max: the classes below it plus the other ties).
@triton.jit
def _kl_backward_kernel(grad_loss_ptr, count_ptr, logits_ptr, target_ptr, mask_ptr, grad_ptr, C, S, tiles,
                        classes: tl.float64,
                        HAS_MASK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, DT: tl.constexpr):
    go = tl.load(grad_loss_ptr).to(tl.float64)
    denominator = tl.load(count_ptr).to(tl.float64) * classes
    scale = tl.where(denominator > 0, go / tl.maximum(denominator, 1.0), 0.0).to(DT)

    pid, b, s, pmask, cls, cmask, offs = plane_tile(tiles, C, S, BLOCK_C, BLOCK_P)
    mask = cmask[:, None] & pmask[None, :]
    z = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(DT)
    z = tl.where(cmask[:, None], z, float("-inf"))
    t = tl.load(target_ptr + offs, mask=mask, other=0.0).to(DT)  # 0 on the padding
    if HAS_MASK:
        valid = pmask & (tl.load(mask_ptr + b * S + s, mask=pmask, other=0) != 0)
    else:
        valid = pmask

    _, _, e, top, others, _ = _softmax_parts(z, cmask, DT)
    inv = 1.0 / (1.0 + others)
    t_rest = tl.sum(tl.where(top, 0.0, t), axis=0)
    t_top = tl.sum(tl.where(top, t, 0.0), axis=0)
    below = e * ((t_rest + t_top) * inv)[None, :] - t
    at_max = ((t_rest[None, :] + (t_top[None, :] - t)) - t * others[None, :]) * inv[None, :]
    g = tl.where(valid[None, :], scale * tl.where(top, at_max, below), 0.0)
    tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


def _mask_arg(valid_mask, logits):
    """(pointer argument, HAS_MASK): the mask as contiguous bytes, or the logits as a placeholder."""
    if valid_mask is None:
        return logits, False
    if valid_mask.dtype != torch.bool:
        raise ValueError("kl_loss: valid_mask must be bool")
    return valid_mask.contiguous().view(torch.uint8), True


@torch.library.custom_op("udafast_triton::kl_loss", mutates_args=())
def kl_loss(logits: torch.Tensor, target_probs: torch.Tensor,
            valid_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss 0-d, lse [B, H, W], num_valid int64 0-d), as torch.ops.udafast.kl_loss."""
    if logits.dim() != 4 or target_probs.shape != logits.shape:
        raise ValueError("kl_loss: logits and target_probs [B, C, H, W]")
    logits = logits.contiguous()
    # the targets in the logits' dtype, as the reference casts them
    target = target_probs.to(logits.dtype).contiguous()
    B, C, H, W = logits.shape
    S = H * W
    dtype = loss_dtype(logits.dtype)
    lse = torch.empty((B, H, W), dtype=dtype, device=logits.device)
    loss = torch.empty((), dtype=dtype, device=logits.device)
    count = torch.empty((), dtype=torch.int64, device=logits.device)
    if logits.numel() == 0:
        # no element: loss 0; with C == 0 the pixels still count (the loss divides by n * C = 0)
        lse.fill_(float("-inf"))
        loss.zero_()
        if valid_mask is None:
            count.fill_(B * S)
        else:
            count = valid_mask.sum(dtype=torch.int64)
        return loss, lse, count
    mask, has_mask = _mask_arg(valid_mask, logits)
    block_c, block_p, tiles, num_warps = tile_shape(C, S)
    programs = B * tiles
    ws = torch.empty((programs, 2), dtype=torch.float64, device=logits.device)
    with on_device(logits):
        _kl_forward_kernel[(programs,)](logits, target, mask, lse, ws, C, S, tiles, HAS_MASK=has_mask,
                                        BLOCK_C=block_c, BLOCK_P=block_p, DT=compute_dtype(logits.dtype),
                                        num_warps=num_warps)
        _kl_finalize_kernel[(1,)](ws, loss, count, programs, float(C), BLOCK=FINALIZE_BLOCK)
    return loss, lse, count


@torch.library.custom_op("udafast_triton::kl_loss_backward", mutates_args=())
def kl_loss_backward(grad_loss: torch.Tensor, logits: torch.Tensor, target_probs: torch.Tensor,
                     valid_mask: torch.Tensor | None, lse: torch.Tensor, num_valid: torch.Tensor) -> torch.Tensor:
    """The gradient in the logits' shape, dtype and layout, as torch.ops.udafast.kl_loss_backward."""
    grad = torch.empty_like(logits)
    if logits.numel() == 0:
        return grad
    out = grad if grad.is_contiguous() else torch.empty_like(logits, memory_format=torch.contiguous_format)
    B, C, H, W = logits.shape
    S = H * W
    mask, has_mask = _mask_arg(valid_mask, logits)
    block_c, block_p, tiles, num_warps = tile_shape(C, S)
    with on_device(logits):
        _kl_backward_kernel[(B * tiles,)](
            grad_loss.reshape(()).contiguous(), num_valid.reshape(()).contiguous(), logits.contiguous(),
            target_probs.to(logits.dtype).contiguous(), mask, out, C, S, tiles, float(C),
            HAS_MASK=has_mask, BLOCK_C=block_c, BLOCK_P=block_p, DT=compute_dtype(logits.dtype),
            num_warps=num_warps)
    if out is not grad:
        grad.copy_(out)
    return grad


LAUNCHERS = {"kl_loss": kl_loss}
