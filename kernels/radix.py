"""Per-class radix selection on the GPU, shared by class_thresholds and topk_per_class.

The r_c-th largest of a class's keys is found most significant digit first, without a host sync:
per pass, `radix_histogram` counts the digit of every element whose class is still selecting and
whose higher digits equal the class's chosen prefix (integer atomics, so the counts do not depend
on the order the adds land in), then `radix_scan`, a few classes per program, walks the class's
bins from the top, finds the bin that holds rank r_c, appends it to the prefix and keeps the rank
left inside that bin. After the last pass the prefix is the exact key of the r_c-th largest.

Keys are unsigned and order like the floats (the sign bit flipped for non-negative values, all
bits for negative ones, -0.0 made +0.0 first), held in uint64 for float32 and float64 alike.
topk_per_class goes on with a second phase on the position (max_position - position, so that the
lower position is the larger composite), which makes every composite distinct.

State, int64 [C, 4] per class: 0 the key prefix, 1 the position prefix, 2 the rank left (0: the
class selects nothing), 3 the slot cursor of topk_per_class. The histogram is [C, 2^D] counters (int32, int64 past 2^31
elements); each scan zeroes the rows it read, so one zeroed buffer serves every pass.
"""
import torch
import triton
import triton.language as tl

# Counters of one pass at most (C x 2^D).
COUNTER_BUDGET = 1 << 24
MIN_DIGIT_BITS = 4
MAX_DIGIT_BITS = 16
STATE_FIELDS = 4
# Counters per scan program on the GPU (SCAN_WARPS warps): a class of 2^16 bins takes 16 chunks.
SCAN_BLOCK = 4096
SCAN_WARPS = 8
# Relative costs for choosing the digit width D: a pass costs two launches, a read of every
# element and a scan (read and re-zero) of C x 2^D counters. On the GPU a launch is worth about
# 2^19 counters (~2 us); under TRITON_INTERPRET=1 the launches are cheaper beside numpy's work on
# each element and counter.
GPU_COSTS = (1 << 19, 2)
INTERPRET_COSTS = (1 << 16, 3)


def interpreting(t):
    """Tensors off CUDA only reach a Triton launcher under TRITON_INTERPRET=1."""
    return t.device.type != "cuda"


def digit_bits(n, num_classes, key_bits, pos_bits, interpret=False):
    """The digit width D with the least estimated cost, from the shapes only (so the plan is
    static): 16 for large N and few classes, narrower for small N or very many classes."""
    launch, per_element = INTERPRET_COSTS if interpret else GPU_COSTS
    best, best_cost = MIN_DIGIT_BITS, None
    for d in range(MIN_DIGIT_BITS, MAX_DIGIT_BITS + 1):
        if d > MIN_DIGIT_BITS and (num_classes << d) > COUNTER_BUDGET:
            break
        passes = -(-key_bits // d) + -(-pos_bits // d)
        cost = passes * (2 * launch + per_element * n + (num_classes << d))
        if best_cost is None or cost <= best_cost:
            best, best_cost = d, cost
    return best


def digits(total_bits, d):
    """(shift, width) of each digit of a `total_bits`-bit key, most significant first."""
    out = []
    hi = total_bits
    while hi > 0:
        width = min(d, hi)
        out.append((hi - width, width))
        hi -= width
    return out


def pow2_at_least(x):
    return 1 << max(0, int(x) - 1).bit_length()


def allocate(num_classes, d, n, device):
    """One zeroed buffer: the int64 state [C, 4], then the histogram [C, 2^D]."""
    cells = num_classes << d
    wide = n >= 2**31
    hist_words = cells if wide else (cells + 1) // 2
    buffer = torch.zeros(num_classes * STATE_FIELDS + hist_words, dtype=torch.int64, device=device)
    state = buffer[: num_classes * STATE_FIELDS]
    hist = buffer[num_classes * STATE_FIELDS :]
    if not wide:
        hist = hist.view(torch.int32)[:cells]
    return state, hist


def scan_blocks(num_classes, width, interpret):
    """(classes per program, bins per chunk) of a scan over 2^width bins."""
    budget = 1 << 18 if interpret else SCAN_BLOCK
    chunk = min(1 << width, budget if not interpret else budget >> 2)
    per_program = max(1, min(budget // chunk, pow2_at_least(num_classes)))
    return per_program, chunk


@triton.jit
def order_key(x, KEY64: tl.constexpr):
    """uint64 key that orders like the float x (float32 keys below 2^32); -0.0 keys as +0.0."""
    if KEY64:
        u = x.to(tl.uint64, bitcast=True)
        key = tl.where((u >> 63) != 0, u ^ 0xFFFFFFFFFFFFFFFF, u | 0x8000000000000000)
        key = tl.where(x == 0, 0x8000000000000000, key)
    else:
        u = x.to(tl.uint32, bitcast=True).to(tl.uint64)
        key = tl.where((u >> 31) != 0, u ^ 0xFFFFFFFF, u | 0x80000000)
        key = tl.where(x == 0, 0x80000000, key)
    return key


@triton.jit
def key_value(key, KEY64: tl.constexpr):
    """The float whose order_key is `key` (uint64)."""
    if KEY64:
        u = tl.where((key >> 63) != 0, key & 0x7FFFFFFFFFFFFFFF, key ^ 0xFFFFFFFFFFFFFFFF)
        value = u.to(tl.float64, bitcast=True)
    else:
        u = tl.where(((key >> 31) & 1) != 0, key & 0x7FFFFFFF, key ^ 0xFFFFFFFF)
        value = u.to(tl.uint32).to(tl.float32, bitcast=True)
    return value


@triton.jit
def radix_histogram(
    x_ptr, label_ptr, state_ptr, hist_ptr, n, num_classes, ignore_index,
    BINS: tl.constexpr, SHIFT: tl.constexpr, WIDTH: tl.constexpr, FIRST: tl.constexpr,
    PHASE: tl.constexpr, MATCH_POSITION: tl.constexpr, POS_MAX: tl.constexpr, KEY64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Counts the digit (key bits [SHIFT, SHIFT + WIDTH) in PHASE 0, position bits in PHASE 1) of
    every selecting element whose higher bits match its class's prefix. FIRST: every valid
    element (the class sizes come from this pass)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0)
    c = tl.load(label_ptr + offs, mask=inside, other=0).to(tl.int64)
    ok = inside & (c != ignore_index) & (c >= 0) & (c < num_classes) & (x == x)
    c = tl.where(ok, c, 0)
    key = order_key(x, KEY64)
    position = POS_MAX - offs
    if not FIRST:
        row = state_ptr + c * 4
        ok = ok & (tl.load(row + 2, mask=ok, other=0) > 0)
        prefix = tl.load(row, mask=ok, other=0).to(tl.uint64, bitcast=True)
        if PHASE == 0:
            ok = ok & ((key >> (SHIFT + WIDTH)) == prefix)
        else:
            ok = ok & (key == prefix)
            if MATCH_POSITION:
                ok = ok & ((position >> (SHIFT + WIDTH)) == tl.load(row + 1, mask=ok, other=0))
    if PHASE == 0:
        digit = ((key >> SHIFT) & ((1 << WIDTH) - 1)).to(tl.int64)
    else:
        digit = (position >> SHIFT) & ((1 << WIDTH) - 1)
    tl.atomic_add(hist_ptr + c * BINS + digit, 1, mask=ok, sem="relaxed")


@triton.jit(do_not_specialize=["portion_bits"])
def radix_scan(
    hist_ptr, state_ptr, count_ptr, out_ptr, num_classes, k, portion_bits,
    BINS: tl.constexpr, WIDTH: tl.constexpr, CHUNK: tl.constexpr, NCHUNK: tl.constexpr, CLASSES: tl.constexpr,
    FIRST: tl.constexpr, MODE: tl.constexpr, FIELD: tl.constexpr, FINAL: tl.constexpr, KEY64: tl.constexpr,
):
    """Per class: the bin (of 2^WIDTH) that holds the rank left, appended to the prefix in state
    field FIELD, and the rank left inside it; the rows read are zeroed for the next pass.

    FIRST: the rank comes from the class size, MODE 0 floor(N_c * portion) in float64 (portion
    passed as its IEEE bits), 0 where below 1 (class_thresholds); MODE 1 min(N_c, k), also written
    to count_ptr (topk_per_class). FINAL (class_thresholds): out_ptr[c] = the selected value, or
    1.0 where the class selects nothing."""
    cls = tl.program_id(0) * CLASSES + tl.arange(0, CLASSES)
    live = cls < num_classes
    rows = hist_ptr + cls.to(tl.int64)[:, None] * BINS
    cols = tl.arange(0, CHUNK)
    if FIRST:
        total = tl.zeros([CLASSES], dtype=tl.int64)
        for j in range(NCHUNK):
            h = tl.load(rows + (j * CHUNK + cols)[None, :], mask=live[:, None], other=0).to(tl.int64)
            total += tl.sum(h, axis=1)
        if MODE == 0:
            portion = portion_bits.to(tl.int64).to(tl.float64, bitcast=True)
            floored = (total.to(tl.float64) * portion).to(tl.int64)  # >= 0: truncation is floor
            rank = tl.where(floored >= 1, tl.minimum(floored, total), 0)
        else:
            rank = tl.minimum(total, k)
            tl.store(count_ptr + cls, rank, mask=live)
    else:
        rank = tl.load(state_ptr + cls * 4 + 2, mask=live, other=0)
    above = tl.zeros([CLASSES], dtype=tl.int64)
    found = (rank <= 0).to(tl.int32)
    digit = tl.zeros([CLASSES], dtype=tl.int64)
    left = tl.zeros([CLASSES], dtype=tl.int64)
    for j in range(NCHUNK):
        start = (NCHUNK - 1 - j) * CHUNK
        ptrs = rows + (start + cols)[None, :]
        h = tl.load(ptrs, mask=live[:, None], other=0).to(tl.int64)
        tl.store(ptrs, tl.zeros([CLASSES, CHUNK], dtype=hist_ptr.dtype.element_ty), mask=live[:, None])
        chunk_total = tl.sum(h, axis=1)
        # elements in this bin or above it: non-increasing along the bins
        at_or_above = above[:, None] + chunk_total[:, None] - tl.cumsum(h, axis=1) + h
        hits = tl.sum((at_or_above >= rank[:, None]).to(tl.int32), axis=1)
        here = (hits > 0) & (found == 0)
        bin_ = hits - 1
        strictly_above = tl.sum(tl.where(cols[None, :] == bin_[:, None], at_or_above - h, 0), axis=1)
        digit = tl.where(here, start + bin_, digit)
        left = tl.where(here, rank - strictly_above, left)
        found = tl.where(here, 1, found)
        above += chunk_total
    active = rank > 0
    prefix = (tl.load(state_ptr + cls * 4 + FIELD, mask=live, other=0) << WIDTH) | digit
    tl.store(state_ptr + cls * 4 + FIELD, prefix, mask=live & active)
    tl.store(state_ptr + cls * 4 + 2, tl.where(active, left, 0), mask=live)
    if FINAL:
        value = key_value(prefix.to(tl.uint64, bitcast=True), KEY64)
        tl.store(out_ptr + cls, tl.where(active, value, 1.0).to(out_ptr.dtype.element_ty), mask=live)


def select(x, labels, num_classes, ignore_index, mode, *, k=0, portion_bits=0, out=None, count=None,
           position_phase=False):
    """Runs the passes; returns the state [C, 4] and the position bias (max_position).

    2 launches per pass (histogram, scan): 32 / D key passes (64 / D for float64) and, with
    position_phase, ceil(log2 N / D) position passes."""
    n = x.numel()
    key64 = x.dtype == torch.float64
    interpret = interpreting(x)
    key_bits = 64 if key64 else 32
    pos_bits = max(1, (n - 1).bit_length())
    pos_max = (1 << pos_bits) - 1
    d = digit_bits(n, num_classes, key_bits, pos_bits if position_phase else 0, interpret)
    state, hist = allocate(num_classes, d, n, x.device)
    block = 1 << 16 if interpret else 1024
    grid = (max(1, triton.cdiv(n, block)),)
    passes = [(0, shift, width) for shift, width in digits(key_bits, d)]
    if position_phase:
        passes += [(1, shift, width) for shift, width in digits(pos_bits, d)]
    dummy = state
    for i, (phase, shift, width) in enumerate(passes):
        first = i == 0
        radix_histogram[grid](
            x, labels, state, hist, n, num_classes, ignore_index,
            BINS=1 << d, SHIFT=shift, WIDTH=width, FIRST=first, PHASE=phase,
            MATCH_POSITION=phase == 1 and shift + width < pos_bits, POS_MAX=pos_max, KEY64=key64,
            BLOCK=block,
        )
        classes, chunk = scan_blocks(num_classes, width, interpret)
        final = out is not None and i == len(passes) - 1
        radix_scan[(triton.cdiv(num_classes, classes),)](
            hist, state, count if count is not None else dummy, out if final else dummy,
            num_classes, k, portion_bits,
            BINS=1 << d, WIDTH=width, CHUNK=chunk, NCHUNK=(1 << width) // chunk, CLASSES=classes,
            FIRST=first, MODE=mode, FIELD=phase, FINAL=final, KEY64=key64, num_warps=SCAN_WARPS,
        )
    return state, pos_max


LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def flat_labels(labels):
    """Contiguous [N]; the rarer unsigned dtypes widened to int64 (as the CPU kernels do)."""
    if labels.dtype not in LABEL_DTYPES:
        labels = labels.to(torch.int64)
    return labels.contiguous().view(-1)
