"""SPEC 1.3 in Triton: per image and class, the sum of its pixels' features and their count
(ProDA's prototype updates and initial prototypes).

No float atomics: programs over (image, channel block, pixel split) sum their pixels' features
per class in float64 and write partials, which torch then sums over the splits in a fixed order;
the number of splits depends on the shape only. As csrc/cpu/class_feature_sums.cpp, ignored labels
and labels outside [0, C) are skipped. A torch.library custom op (udafast_triton), taking the same
positional arguments and returning the same outputs as torch.ops.udafast.class_feature_sums.
"""
import torch
import triton
import triton.language as tl

from .common import INTERPRET, compute_dtype, on_device

# elements of a program's [BLOCK_C, BLOCK_D, BLOCK_P] tile (larger under the interpreter)
_SUMS_TILE = 65536 if INTERPRET else 8192
# pixels per split (at least), and the most splits of one image
_SPLIT_PIXELS = 4096
_MAX_SPLITS = 64


@triton.jit
def _class_sums_kernel(f_ptr, labels_ptr, sums_ptr, counts_ptr, N, D, C, ignore_index, split_pixels,
                       BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
                       COMPUTE: tl.constexpr):
    """Program (b, channel block j, split s): sums_part[b, s, c, d] (float64) over the pixels of
    split s for the channels of block j; the programs of block 0 also write counts_part[b, s, c]."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    s = tl.program_id(2).to(tl.int64)
    splits = tl.num_programs(2)
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = j * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    row = offs_d.to(tl.int64)[:, None] * N
    f_base = f_ptr + b * D * N
    l_base = labels_ptr + b * N
    start = s * split_pixels
    end = tl.minimum(start + split_pixels, N)
    acc = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float64)
    count = tl.zeros([BLOCK_C], dtype=tl.int64)
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < end
        label = tl.load(l_base + offs_p, mask=mask_p, other=0).to(tl.int64)
        # ignored labels and labels outside [0, C) are skipped, never used as an index
        valid = mask_p & (label != ignore_index) & (label >= 0) & (label < C)
        label = tl.where(valid, label, -1)
        onehot = label[None, :] == offs_c[:, None]  # [BLOCK_C, BLOCK_P]
        f = tl.load(f_base + row + offs_p[None, :], mask=mask_d[:, None] & mask_p[None, :], other=0.0)
        f = f.to(COMPUTE)  # [BLOCK_D, BLOCK_P]
        part = tl.sum(tl.where(onehot[:, None, :], f[None, :, :], 0.0), axis=2)
        acc += part.to(tl.float64)
        count += tl.sum(onehot.to(tl.int32), axis=1).to(tl.int64)
    mask_c = offs_c < C
    base = (b * splits + s) * C
    tl.store(sums_ptr + (base + offs_c.to(tl.int64))[:, None] * D + offs_d[None, :], acc,
             mask=mask_c[:, None] & mask_d[None, :])
    if j == 0:
        tl.store(counts_ptr + base + offs_c, count, mask=mask_c)


def _sums_blocks(C, D, N):
    block_c = max(2, triton.next_power_of_2(C))
    block_d = max(1, min(16, triton.next_power_of_2(max(D, 1)), _SUMS_TILE // 32 // block_c))
    block_p = min(1024, max(16, _SUMS_TILE // (block_c * block_d)))
    # splits: a function of the shape only, each a whole number of pixel blocks
    splits = max(1, min(_MAX_SPLITS, N // _SPLIT_PIXELS))
    split_pixels = triton.cdiv(triton.cdiv(N, splits), block_p) * block_p
    return block_c, block_d, block_p, triton.cdiv(N, split_pixels), split_pixels


@torch.library.custom_op("udafast_triton::class_feature_sums", mutates_args=())
def class_feature_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    if features.dim() != 4:
        raise RuntimeError(f"features must be [B, D, H, W]; got {tuple(features.shape)}")
    B, D, H, W = features.shape
    if labels.dim() != 3 or tuple(labels.shape) != (B, H, W):
        raise RuntimeError(f"labels must be [B, H, W] matching the features; got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise RuntimeError(f"labels must be of an integer dtype; got {labels.dtype}")
    if num_classes < 0:
        raise RuntimeError(f"num_classes must be >= 0; got {num_classes}")
    C, N = num_classes, H * W
    if B * N == 0 or C == 0:
        return (torch.zeros((B, C, D), dtype=features.dtype, device=features.device),
                torch.zeros((B, C), dtype=torch.int64, device=features.device))
    f = features.detach().contiguous()
    lab = labels.contiguous()
    block_c, block_d, block_p, splits, split_pixels = _sums_blocks(C, D, N)
    sums = torch.empty((B, splits, C, D), dtype=torch.float64, device=f.device)
    counts = torch.empty((B, splits, C), dtype=torch.int64, device=f.device)
    with on_device(f):
        _class_sums_kernel[(B, max(1, triton.cdiv(D, block_d)), splits)](
            f, lab, sums, counts, N, D, C, ignore_index, split_pixels,
            BLOCK_C=block_c, BLOCK_D=block_d, BLOCK_P=block_p, COMPUTE=compute_dtype(f.dtype),
        )
    return sums.sum(1).to(f.dtype), counts.sum(1)


LAUNCHERS = {"class_feature_sums": class_feature_sums}
