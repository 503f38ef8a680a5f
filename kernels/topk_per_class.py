"""SPEC 1.2 in Triton: per-class top-K positions, exact.

Per class, the min(N_c, k)-th largest composite (score key, then max_position - position, so that
equal scores order by the lower position first and every composite is distinct) is found by the
radix select of radix: no host sync, static shapes. Then every element at or above its class's
composite takes a slot of its class's candidate row by an integer atomic (slot order varies, the
set does not), and each candidate is written at its rank: the number of candidates of its class
with a larger composite (k <= PLACE_MAX_K), or, past that, by stable device sorts of the rows.

Launches per call: 1 zero-fill, 2 per radix pass (ceil(32 / D) key digits for float32,
ceil(64 / D) for float64, ceil(log2 N / D) position digits; D in [4, 16] from N and C), 1 gather,
1 placement (about 8 torch ops instead past PLACE_MAX_K); a copy more for a non-contiguous input.
N = 10^7, C = 19: D = 16, 11 launches (float32) / 15 (float64); N = 4191, C = 19: 11 / 15;
N = 4 x 10^5 over 10^5 classes: D = 4, 29 launches (float32).
"""
import torch
import triton
import triton.language as tl

from . import radix
from .radix import order_key

# Largest k whose ranks are counted pairwise (cost sum_c min(N_c, k)^2); above it the candidate
# rows are sorted with torch.sort (static shapes, on the device).
PLACE_MAX_K = 2048


@triton.jit
def _gather_kernel(x_ptr, label_ptr, state_ptr, count_ptr, cand_ptr, n, num_classes, k, ignore_index,
                   POS_MAX: tl.constexpr, KEY64: tl.constexpr, BLOCK: tl.constexpr):
    """Every element whose composite is at least its class's selected one takes the next slot of
    its class's row in cand (the slot counter is state field 3)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0)
    c = tl.load(label_ptr + offs, mask=inside, other=0).to(tl.int64)
    ok = inside & (c != ignore_index) & (c >= 0) & (c < num_classes) & (x == x)
    c = tl.where(ok, c, 0)
    ok = ok & (tl.load(count_ptr + c, mask=ok, other=0) > 0)
    row = state_ptr + c * 4
    key_min = tl.load(row, mask=ok, other=0).to(tl.uint64, bitcast=True)
    position_min = tl.load(row + 1, mask=ok, other=0)
    key = order_key(x, KEY64)
    position = POS_MAX - offs
    chosen = ok & ((key > key_min) | ((key == key_min) & (position >= position_min)))
    slot = tl.atomic_add(row + 3, 1, mask=chosen, sem="relaxed")
    tl.store(cand_ptr + c * k + slot, offs, mask=chosen)


@triton.jit
def _place_kernel(x_ptr, cand_ptr, count_ptr, index_ptr, slots, k, KEY64: tl.constexpr,
                  BLOCK_E: tl.constexpr, BLOCK_J: tl.constexpr):
    """index[c, rank] = position for each candidate, rank = the candidates of class c with a
    larger composite; the slots at or past count[c] get -1."""
    e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    inside = e < slots
    c = e // k
    s = e - c * k
    count = tl.load(count_ptr + c, mask=inside, other=0)
    valid = inside & (s < count)
    pos = tl.load(cand_ptr + e, mask=valid, other=0)
    key = order_key(tl.load(x_ptr + pos, mask=valid, other=0), KEY64)
    row = cand_ptr + c * k
    rank = tl.zeros([BLOCK_E], dtype=tl.int64)
    bound = tl.max(tl.where(valid, count, 0), axis=0).to(tl.int32)
    for t in range(0, bound, BLOCK_J):
        j = t + tl.arange(0, BLOCK_J)
        other = valid[:, None] & (j[None, :] < count[:, None])
        other_pos = tl.load(row[:, None] + j[None, :], mask=other, other=0)
        other_key = order_key(tl.load(x_ptr + other_pos, mask=other, other=0), KEY64)
        larger = (other_key > key[:, None]) | ((other_key == key[:, None]) & (other_pos < pos[:, None]))
        rank += tl.sum((other & larger).to(tl.int64), axis=1)
    dest = tl.where(valid, rank, s)
    tl.store(index_ptr + c * k + dest, tl.where(valid, pos, -1), mask=inside)


def _place_by_sort(x, cand, count, num_classes, k):
    """Rows in descending composite order by two device sorts (positions, then a stable sort on
    the score's signed-order bits)."""
    n = x.numel()
    valid = torch.arange(k, device=x.device)[None, :] < count[:, None]
    if n == 0:
        return torch.full((num_classes, k), -1, dtype=torch.int64, device=x.device)
    pos = torch.sort(torch.where(valid, cand.view(num_classes, k), n), dim=1).values  # invalid last
    values = x[pos.clamp(max=n - 1)]
    if x.dtype == torch.float64:
        bits, flip = values.view(torch.int64), 0x7FFFFFFFFFFFFFFF
    else:
        bits, flip = values.view(torch.int32).to(torch.int64), 0x7FFFFFFF
    bits = torch.where(values == 0, 0, bits)
    ordered = torch.where(bits < 0, bits ^ flip, bits)
    ordered = torch.where(valid, ordered, torch.iinfo(torch.int64).min)
    order = torch.sort(ordered, dim=1, descending=True, stable=True).indices
    return torch.where(valid, torch.gather(pos, 1, order), -1)


@torch.library.custom_op("udafast_triton::topk_per_class", mutates_args=())
def topk_per_class(scores: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int,
                   ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    if scores.dim() != 1 or labels.dim() != 1 or scores.shape[0] != labels.shape[0]:
        raise ValueError("topk_per_class: scores and labels must be [N] tensors of the same length")
    if num_classes < 1 or k < 1:
        raise ValueError("topk_per_class: num_classes and k must be at least 1")
    if scores.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"topk_per_class: scores must be float32 or float64; got {scores.dtype}")
    x = scores.contiguous()
    flat = radix.flat_labels(labels)
    n = x.numel()
    count = torch.empty(num_classes, dtype=torch.int64, device=x.device)
    state, pos_max = radix.select(x, flat, num_classes, ignore_index, 1, k=k, count=count, position_phase=True)
    key64 = x.dtype == torch.float64
    interpret = radix.interpreting(x)
    cand = torch.empty(num_classes * k, dtype=torch.int64, device=x.device)
    block = 1 << 16 if interpret else 1024
    _gather_kernel[(max(1, triton.cdiv(n, block)),)](
        x, flat, state, count, cand, n, num_classes, k, ignore_index, POS_MAX=pos_max, KEY64=key64, BLOCK=block
    )
    if k > PLACE_MAX_K:
        return _place_by_sort(x, cand, count, num_classes, k), count
    index = torch.empty((num_classes, k), dtype=torch.int64, device=x.device)
    slots = num_classes * k
    block_e, block_j = (4096, 32) if interpret else (64, 64)
    _place_kernel[(triton.cdiv(slots, block_e),)](
        x, cand, count, index, slots, k, KEY64=key64, BLOCK_E=block_e, BLOCK_J=block_j
    )
    return index, count


LAUNCHERS = {"topk_per_class": topk_per_class}
