"""SPEC 1.3 in Triton: ProDA's prototype distance softmax (forward and backward) and rectified
pseudo-labels (the per-class feature sums are in class_feature_sums.py).

The numerics follow csrc/cpu/prototype_softmax.cpp:
- features are NCHW, so one image's channel row is a contiguous run of pixels. A program takes a
  tile of BLOCK_P pixels of one image and all classes at once ([BLOCK_C, BLOCK_P], BLOCK_C the
  next power of two >= C), and loops over the channels, loading features[b, d, tile] and the
  prototypes' column d.
- distances come from the difference f - p: squared differences summed in the compute dtype over
  DEPTH_BLOCK channels, each partial widened into a float64 total (plain float32 summation over
  D = 256 channels misses SPEC 1.5 at distances ~ 20), then the square root in float64.
- the softmax is taken in float64 up to the shift z - max z, then in the compute dtype (float32,
  or float64 for float64 features); the backward reuses the saved softmax and distances:
  grad_f[d] = sum_c a_c (f_d - p_cd), a_c = -dz_c / (tau d_c), 0 where d_c == 0.

Every launcher takes the same positional arguments and returns the same outputs as the compiled
op torch.ops.udafast.<op>. They are torch.library custom ops (namespace udafast_triton), opaque
to torch.compile; prototype_softmax's autograd runs the Triton backward kernel, itself a custom op.
float16/bfloat16 features (CUDA) are computed in float32, with float32 distances.

Python float kernel arguments are float32 in Triton (compiled and interpreted), so tau travels as
three float32 parts that add up to it exactly in float64.
"""
import numpy as np
import torch
import triton
import triton.language as tl

from .common import INTERPRET, compute_dtype, on_device

# Channels whose squared differences are summed in the compute dtype before the partial is added
# into float64 (as kDepthBlock in the CPU kernel).
DEPTH_BLOCK = 32
# Elements of a program's [BLOCK_C, BLOCK_P] tile in the softmax kernels (at most _MAX_BLOCK_P
# pixels); larger under the interpreter (kernels/common.py).
_SOFTMAX_TILE = 32768 if INTERPRET else 2048
_MAX_BLOCK_P = 1024 if INTERPRET else 128


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _tile_distances(f_base, pt_ptr, offs_p, mask_p, offs_c, mask_c, N, D, C,
                    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, COMPUTE: tl.constexpr,
                    DEPTH: tl.constexpr):
    """float64 [BLOCK_C, BLOCK_P]: ||f[:, p] - pt[:, c]||_2 for the tile's pixels and all classes
    (f_base: the image's features [D, N]; pt: the prototypes transposed, [D, C])."""
    total = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float64)
    for d0 in range(0, D, DEPTH):
        d1 = tl.minimum(d0 + DEPTH, D)
        acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=COMPUTE)
        for d in range(d0, d1):
            d64 = tl.cast(d, tl.int64)
            f = tl.load(f_base + d64 * N + offs_p, mask=mask_p, other=0.0).to(COMPUTE)
            p = tl.load(pt_ptr + d64 * C + offs_c, mask=mask_c, other=0.0).to(COMPUTE)
            diff = f[None, :] - p[:, None]
            acc += diff * diff
        total += acc.to(tl.float64)
    return tl.sqrt(total)


@triton.jit
def _tau64(tau_hi, tau_mid, tau_lo):
    return (tl.cast(tau_hi, tl.float64) + tl.cast(tau_mid, tl.float64)) + tl.cast(tau_lo, tl.float64)


@triton.jit
def _shifted_logits(dist, mask_c, tau):
    """x = z - max_c z with z = -d / tau, in float64; -inf on the padding classes."""
    z = tl.where(mask_c[:, None], -dist / tau, float("-inf"))
    zmax = tl.max(z, axis=0)
    return z - zmax[None, :]


@triton.jit
def _forward_kernel(f_ptr, pt_ptr, out_ptr, dist_ptr, N, D, C, tau_hi, tau_mid, tau_lo,
                    LOG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                    COMPUTE: tl.constexpr, DEPTH: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < N
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    dist = _tile_distances(f_ptr + b * D * N, pt_ptr, offs_p, mask_p, offs_c, mask_c, N, D, C,
                           BLOCK_C, BLOCK_P, COMPUTE, DEPTH)
    x = _shifted_logits(dist, mask_c, _tau64(tau_hi, tau_mid, tau_lo)).to(COMPUTE)
    e = tl.exp(x)
    total = tl.sum(e, axis=0)
    if LOG:
        out = x - tl.log(total)[None, :]
    else:
        out = e / total[None, :]
    offs = b * C * N + offs_c.to(tl.int64)[:, None] * N + offs_p[None, :]
    mask = mask_c[:, None] & mask_p[None, :]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dist_ptr + offs, dist.to(dist_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(g_ptr, out_ptr, dist_ptr, f_ptr, pt_ptr, grad_ptr, N, D, C, tau_hi, tau_mid, tau_lo,
                     LOG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                     COMPUTE: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < N
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    offs = b * C * N + offs_c.to(tl.int64)[:, None] * N + offs_p[None, :]
    mask = mask_c[:, None] & mask_p[None, :]
    # padding classes and pixels load g = 0, d = 0, so their coefficient is 0
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    o = tl.load(out_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    dist = tl.load(dist_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    if LOG:
        s = tl.sum(g, axis=0)
        dz = g - tl.exp(o) * s[None, :]
    else:
        s = tl.sum(g * o, axis=0)
        dz = o * (g - s[None, :])
    tau = _tau64(tau_hi, tau_mid, tau_lo).to(COMPUTE)
    # a_c = dL/dd_c / d_c = -dz_c / (tau d_c); 0 where d_c == 0 (the norm's zero gradient at 0)
    nonzero = dist > 0
    a = tl.where(nonzero, -dz / (tl.where(nonzero, dist, 1.0) * tau), 0.0)
    f_base = f_ptr + b * D * N
    grad_base = grad_ptr + b * D * N
    for d in range(0, D):
        d64 = tl.cast(d, tl.int64)
        f = tl.load(f_base + d64 * N + offs_p, mask=mask_p, other=0.0).to(COMPUTE)
        p = tl.load(pt_ptr + d64 * C + offs_c, mask=mask_c, other=0.0).to(COMPUTE)
        grad = tl.sum(a * (f[None, :] - p[:, None]), axis=0)
        tl.store(grad_base + d64 * N + offs_p, grad.to(grad_ptr.dtype.element_ty), mask=mask_p)


@triton.jit
def _rectify_kernel(f_ptr, pt_ptr, soft_ptr, labels_ptr, N, D, C, tau_hi, tau_mid, tau_lo,
                    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, COMPUTE: tl.constexpr,
                    DEPTH: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < N
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    dist = _tile_distances(f_ptr + b * D * N, pt_ptr, offs_p, mask_p, offs_c, mask_c, N, D, C,
                           BLOCK_C, BLOCK_P, COMPUTE, DEPTH)
    x = _shifted_logits(dist, mask_c, _tau64(tau_hi, tau_mid, tau_lo)).to(COMPUTE)
    e = tl.exp(x)
    w = e / tl.sum(e, axis=0)[None, :]
    offs = b * C * N + offs_c.to(tl.int64)[:, None] * N + offs_p[None, :]
    soft = tl.load(soft_ptr + offs, mask=mask_c[:, None] & mask_p[None, :], other=0.0).to(COMPUTE)
    score = w * soft
    # NaN scores never win (as the CPU kernel's strictly-greater scan); the first maximum wins,
    # class 0 when no score is above -inf
    score = tl.where(mask_c[:, None] & (score == score), score, float("-inf"))
    best = tl.max(score, axis=0)
    hit = mask_c[:, None] & (score == best[None, :])
    label = tl.min(tl.where(hit, offs_c[:, None], BLOCK_C), axis=0)
    label = tl.where(label < BLOCK_C, label, 0)
    tl.store(labels_ptr + b * N + offs_p, label.to(tl.int64), mask=mask_p)


# ---------------------------------------------------------------------------------------------
# launchers


def _tau_parts(tau):
    """Three float32 values whose float64 sum is tau (float kernel arguments are float32)."""
    hi = float(np.float32(tau))
    mid = float(np.float32(tau - hi))
    lo = float(np.float32(tau - hi - mid))
    return hi, mid, lo


def _distance_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _softmax_blocks(C):
    block_c = max(2, triton.next_power_of_2(C))
    block_p = min(_MAX_BLOCK_P, max(16, _SOFTMAX_TILE // block_c))
    return block_c, block_p


def _check_features_prototypes(features, prototypes, tau):
    if features.dim() != 4:
        raise RuntimeError(f"features must be [B, D, H, W]; got {tuple(features.shape)}")
    if prototypes.dim() != 2 or prototypes.shape[1] != features.shape[1]:
        raise RuntimeError(f"prototypes must be [C, D] with the features' D; got {tuple(prototypes.shape)}")
    if not tau > 0:
        raise RuntimeError(f"tau must be > 0; got {tau}")


def _transposed(prototypes, dtype):
    """The prototypes as [D, C] in the features' dtype, so one channel's classes are adjacent."""
    return prototypes.detach().to(dtype).t().contiguous()


@torch.library.custom_op("udafast_triton::prototype_softmax", mutates_args=())
def prototype_softmax(features: torch.Tensor, prototypes: torch.Tensor, tau: float,
                      log: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check_features_prototypes(features, prototypes, tau)
    f = features.detach().contiguous()
    B, D, H, W = f.shape
    C, N = prototypes.shape[0], H * W
    out = torch.empty((B, C, H, W), dtype=f.dtype, device=f.device)
    distances = torch.empty((B, C, H, W), dtype=_distance_dtype(f.dtype), device=f.device)
    if out.numel() == 0:
        return out, distances
    block_c, block_p = _softmax_blocks(C)
    with on_device(f):
        _forward_kernel[(triton.cdiv(N, block_p), B)](
            f, _transposed(prototypes, f.dtype), out, distances, N, D, C, *_tau_parts(tau),
            LOG=bool(log), BLOCK_C=block_c, BLOCK_P=block_p, COMPUTE=compute_dtype(f.dtype), DEPTH=DEPTH_BLOCK,
        )
    return out, distances


@torch.library.custom_op("udafast_triton::prototype_softmax_backward", mutates_args=())
def prototype_softmax_backward(grad_out: torch.Tensor, out: torch.Tensor, distances: torch.Tensor,
                               features: torch.Tensor, prototypes: torch.Tensor, tau: float,
                               log: bool) -> torch.Tensor:
    _check_features_prototypes(features, prototypes, tau)
    f = features.detach().contiguous()
    B, D, H, W = f.shape
    C, N = prototypes.shape[0], H * W
    for name, x in (("grad_out", grad_out), ("out", out), ("distances", distances)):
        if tuple(x.shape) != (B, C, H, W):
            raise RuntimeError(f"{name} must be [B, C, H, W] = {(B, C, H, W)}; got {tuple(x.shape)}")
    grad = torch.empty_like(f)
    if grad.numel() == 0:
        return grad
    if C == 0:
        return grad.zero_()
    block_c, block_p = _softmax_blocks(C)
    with on_device(f):
        _backward_kernel[(triton.cdiv(N, block_p), B)](
            grad_out.detach().to(f.dtype).contiguous(), out.detach().to(f.dtype).contiguous(),
            distances.detach().contiguous(), f, _transposed(prototypes, f.dtype), grad, N, D, C,
            *_tau_parts(tau), LOG=bool(log), BLOCK_C=block_c, BLOCK_P=block_p, COMPUTE=compute_dtype(f.dtype),
        )
    return grad


@torch.library.custom_op("udafast_triton::prototype_rectify", mutates_args=())
def prototype_rectify(features: torch.Tensor, prototypes: torch.Tensor, soft_labels: torch.Tensor,
                      tau: float) -> torch.Tensor:
    _check_features_prototypes(features, prototypes, tau)
    f = features.detach().contiguous()
    B, D, H, W = f.shape
    C, N = prototypes.shape[0], H * W
    if tuple(soft_labels.shape) != (B, C, H, W):
        raise RuntimeError(f"soft_labels must be [B, C, H, W] = {(B, C, H, W)}; got {tuple(soft_labels.shape)}")
    labels = torch.zeros((B, H, W), dtype=torch.int64, device=f.device)
    if labels.numel() == 0 or C == 0:
        return labels
    block_c, block_p = _softmax_blocks(C)
    with on_device(f):
        _rectify_kernel[(triton.cdiv(N, block_p), B)](
            f, _transposed(prototypes, f.dtype), soft_labels.detach().to(f.dtype).contiguous(), labels,
            N, D, C, *_tau_parts(tau),
            BLOCK_C=block_c, BLOCK_P=block_p, COMPUTE=compute_dtype(f.dtype), DEPTH=DEPTH_BLOCK,
        )
    return labels


LAUNCHERS = {
    "prototype_softmax": prototype_softmax,
    "prototype_rectify": prototype_rectify,
}
