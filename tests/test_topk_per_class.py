"""SPEC 1.2: topk_per_class and ClassMemoryBank, every fast backend against the reference (exact)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_reproducible, backend_params, compiled_ops, gen, noncontiguous, random_labels
from udafast.ops import reference
from udafast.ops.topk_per_class import ClassMemoryBank, topk_per_class

PAIRS = backend_params("topk_per_class")


def expected(scores, labels, num_classes, k, ignore_index=255):
    """The reference on a float64 CPU copy (a float32 score converts exactly, so the order is the same)."""
    return reference.topk_per_class(scores.double().cpu(), labels.cpu(), num_classes, k, ignore_index)


def fast_topk(device, scores, labels, *args, **kwargs):
    """topk_per_class on `device`, its outputs back on the CPU."""
    index, count = topk_per_class(scores.to(device), labels.to(device), *args, **kwargs)
    return index.cpu(), count.cpu()


def assert_same(actual, wanted):
    """Equal index and count (int64), compared on the CPU."""
    index, count = actual[0].cpu(), actual[1].cpu()
    ref_index, ref_count = wanted
    assert index.dtype == torch.int64 and count.dtype == torch.int64
    assert torch.equal(index, ref_index), f"index differs in rows {torch.nonzero((index != ref_index).any(1)).flatten().tolist()}"
    assert torch.equal(count, ref_count)


def make_labels(n, num_classes, ignore_fraction=0.1, dtype=torch.int64):
    labels = torch.randint(0, num_classes, (n,))
    labels[torch.rand(n) < ignore_fraction] = 255
    return labels.to(dtype)


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_classes", [19, 16])
@pytest.mark.parametrize("shape", [(1, 127, 33), (1, 1, 1), (2, 16, 24)])
@pytest.mark.parametrize("k", [1, 7, 256])
def test_matches_reference(device, backend, dtype, num_classes, shape, k):
    n = shape[0] * shape[1] * shape[2]
    scores = torch.randn(n, dtype=dtype)
    labels = make_labels(n, num_classes)
    out = fast_topk(device, scores, labels, num_classes, k, backend=backend)
    assert_same(out, expected(scores, labels, num_classes, k))
    # each row holds count valid positions of its class, then -1 padding
    index, count = out
    for c in range(num_classes):
        row = index[c]
        assert bool((row[count[c] :] == -1).all())
        assert bool((labels[row[: count[c]]] == c).all())


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, k", [(1, 1), (1000, 7), (65_536, 256), (40_000, 5000)])
def test_odd_sizes_and_large_k(device, backend, dtype, n, k):
    scores = torch.randn(n, generator=gen(), dtype=torch.float64)
    scores[: n // 4] = torch.round(scores[: n // 4] * 4) / 4  # ties, and -0.0 beside +0.0
    scores[: n // 8 : 2] = -0.0
    scores = scores.to(dtype)
    lab = random_labels((n,), 18, ignore_fraction=0.1, seed=1)
    index, count = fast_topk(device, scores, lab, 19, k, backend=backend)
    want_index, want_count = reference.topk_per_class(scores, lab, 19, k)
    assert torch.equal(count, want_count) and torch.equal(index, want_index)


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_label_dtypes(device, backend, label_dtype):
    scores = torch.randn(2000)
    labels = make_labels(2000, 19)
    if label_dtype == torch.int8:
        labels[labels == 255] = -1  # int8 cannot hold 255: out-of-range labels are also skipped
        ignore = -1
    else:
        ignore = 255
    labels = labels.to(label_dtype)
    out = fast_topk(device, scores, labels, 19, 30, ignore_index=ignore, backend=backend)
    assert_same(out, expected(scores, labels.long(), 19, 30, ignore))


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noncontiguous(device, backend, dtype):
    scores = torch.randn(127 * 33, dtype=dtype)
    labels = make_labels(127 * 33, 19, dtype=torch.int32)
    out = fast_topk(device, noncontiguous(scores.to(device)), noncontiguous(labels.to(device)), 19, 40, backend=backend)
    assert_same(out, expected(scores, labels, 19, 40))
    # a strided slice of a 2-D map, as a column of a [H, W] score map would be
    grid = torch.randn(64, 50, dtype=dtype)
    grid_labels = make_labels(64 * 50, 19).reshape(64, 50)
    out = fast_topk(device, grid.to(device)[:, 3], grid_labels.to(device)[:, 3], 19, 5, backend=backend)
    assert_same(out, expected(grid[:, 3].contiguous(), grid_labels[:, 3].contiguous(), 19, 5))


@pytest.mark.parametrize("device, backend", PAIRS)
def test_empty_classes_and_k_beyond_class_size(device, backend):
    scores = torch.rand(500)
    labels = torch.tensor([0, 3, 3, 18] * 125)  # every other class is empty
    index, count = fast_topk(device, scores, labels, 19, 200, backend=backend)
    assert count.tolist() == [125, 0, 0, 200] + [0] * 14 + [125]
    assert bool((index[1] == -1).all()) and bool((index[0, 125:] == -1).all())
    assert_same((index, count), expected(scores, labels, 19, 200))


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("n", [0, 1, 5])
def test_empty_and_k_beyond_n(device, backend, n):
    scores = torch.rand(n)
    labels = torch.zeros(n, dtype=torch.int64)
    index, count = fast_topk(device, scores, labels, 4, 8, backend=backend)
    assert index.shape == (4, 8) and count.tolist() == [n, 0, 0, 0]
    assert_same((index, count), expected(scores, labels, 4, 8))


@pytest.mark.parametrize("device, backend", PAIRS)
def test_every_pixel_ignored(device, backend):
    scores = torch.randn(4191)
    labels = torch.full((4191,), 255, dtype=torch.uint8)
    index, count = fast_topk(device, scores, labels, 19, 16, backend=backend)
    assert bool((index == -1).all()) and bool((count == 0).all())


@pytest.mark.parametrize("device, backend", PAIRS)
def test_ignore_index_inside_class_range(device, backend):
    scores = torch.randn(3000)
    labels = torch.randint(0, 19, (3000,))
    index, count = fast_topk(device, scores, labels, 19, 50, ignore_index=4, backend=backend)
    assert count[4] == 0 and bool((index[4] == -1).all())
    assert_same((index, count), expected(scores, labels, 19, 50, ignore_index=4))


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_signed_zeros_and_infinities(device, backend, dtype):
    n = 3001
    values = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), 0.5], dtype=dtype)
    scores = values[torch.randint(0, len(values), (n,))]
    labels = torch.randint(0, 5, (n,))
    out = fast_topk(device, scores, labels, 5, 700, backend=backend)
    assert_same(out, expected(scores, labels, 5, 700))
    # -0.0 and +0.0 are equal: a class of only signed zeros comes back in position order
    zeros = torch.tensor([-0.0, 0.0, -0.0, 0.0, 0.0, -0.0], dtype=dtype)
    index, count = fast_topk(device, zeros, torch.zeros(6, dtype=torch.int64), 1, 4, backend=backend)
    assert index.tolist() == [[0, 1, 2, 3]] and count.tolist() == [4]


@pytest.mark.parametrize("device, backend", PAIRS)
def test_all_equal_scores(device, backend):
    scores = torch.full((5000,), 0.25)
    labels = make_labels(5000, 19)
    index, count = fast_topk(device, scores, labels, 19, 64, backend=backend)
    # equal scores: the lowest positions of each class, ascending
    for c in range(19):
        assert index[c].tolist() == torch.nonzero(labels == c).flatten()[:64].tolist()
    assert_same((index, count), expected(scores, labels, 19, 64))


@pytest.mark.parametrize("device, backend", PAIRS)
def test_extreme_values(device, backend):
    finfo = torch.finfo(torch.float32)
    values = torch.tensor([finfo.max, -finfo.max, finfo.tiny, -finfo.tiny, 1e-45, -1e-45, finfo.eps])
    scores = values[torch.randint(0, len(values), (2000,))]
    labels = torch.randint(0, 3, (2000,))
    assert_same(fast_topk(device, scores, labels, 3, 900, backend=backend), expected(scores, labels, 3, 900))


@pytest.mark.parametrize("device, backend", PAIRS)
def test_many_classes(device, backend):
    """100000 classes over 400000 pixels (k = 1), checked without the per-class reference loop:
    the first pixel of each class in a stable descending sort of all the scores."""
    n, num_classes = 400_000, 100_000
    scores = torch.randint(0, 50, (n,)).float()  # ties everywhere
    labels = torch.randint(0, num_classes, (n,))
    index, count = fast_topk(device, scores, labels, num_classes, 1, ignore_index=-1, backend=backend)
    order = torch.sort(scores, descending=True, stable=True).indices
    rank = torch.full((num_classes,), n).scatter_reduce(0, labels[order], torch.arange(n), "amin")
    present = rank < n
    assert torch.equal(count, present.long())
    assert torch.equal(index[present, 0], order[rank[present]])
    assert bool((index[~present] == -1).all())


@pytest.mark.parametrize("device, backend", PAIRS)
def test_bad_values_skipped_without_validation(device, backend):
    """With validation off, NaN scores and labels outside [0, C) are skipped, never written."""
    scores = torch.randn(4000)
    scores[::37] = float("nan")
    labels = torch.randint(-3, 25, (4000,))
    index, count = fast_topk(device, scores, labels, 19, 100, backend=backend, validate=False)
    kept = labels.clone()
    kept[torch.isnan(scores) | (labels < 0) | (labels >= 19)] = 255
    assert_same((index, count), expected(torch.nan_to_num(scores), kept, 19, 100))


@pytest.mark.parametrize("device, backend", PAIRS)
def test_bitwise_reproducible_and_thread_independent(device, backend):
    scores = torch.rand(70000).round(decimals=2)  # many ties
    labels = make_labels(70000, 19)
    scores, labels = scores.to(device), labels.to(device)
    assert_reproducible(lambda: topk_per_class(scores, labels, 19, 256, backend=backend))
    assert_same(topk_per_class(scores, labels, 19, 256, backend=backend), expected(scores, labels, 19, 256))


@pytest.mark.parametrize("device, backend", PAIRS)
def test_opcheck(device, backend):
    """The compiled op (torch.ops.udafast) and the Triton custom op (torch.ops.udafast_triton)."""
    op = compiled_ops(backend).topk_per_class.default
    scores = torch.randn(333).to(device)
    labels = make_labels(333, 19).to(device)
    torch.library.opcheck(op, (scores, labels, 19, 8, 255))
    torch.library.opcheck(op, (scores.double()[:0], labels[:0], 3, 2, 255))


@pytest.mark.parametrize("device, backend", PAIRS)
def test_compile_fullgraph(device, backend):
    def select(scores, labels):
        return topk_per_class(scores, labels, 19, 32, backend=backend, validate=False)

    scores = torch.randn(127 * 33).to(device)
    labels = make_labels(127 * 33, 19).to(device)
    compiled = torch.compile(select, fullgraph=True)
    assert_same(compiled(scores, labels), select(scores, labels))


@pytest.mark.parametrize("device, backend", PAIRS)
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 300),
    num_classes=st.integers(1, 6),
    k=st.integers(1, 40),
    distinct=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
    float64=st.booleans(),
)
def test_property_matches_reference(device, backend, n, num_classes, k, distinct, seed, float64):
    generator = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if float64 else torch.float32
    # few distinct values, signed zeros among them, so that ties are the rule
    pool = torch.tensor([-0.0, 0.0, 1.5, -2.0, float("inf")], dtype=dtype)[:distinct]
    scores = pool[torch.randint(0, distinct, (n,), generator=generator)]
    labels = torch.randint(0, num_classes + 1, (n,), generator=generator)
    labels[labels == num_classes] = 255
    assert_same(fast_topk(device, scores, labels, num_classes, k, backend=backend), expected(scores, labels, num_classes, k))


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("size,per_class", [(8, 3), (4, 6)])
def test_memory_bank_matches_reference(device, backend, size, per_class):
    """Newest first, the oldest dropping off the back, counts capped at size (per_class > size too)."""
    fast = ClassMemoryBank(5, size, 3, device=device, backend=backend)
    slow = ClassMemoryBank(5, size, 3, backend="reference")
    for step in range(5):
        n = 40 + 7 * step
        features = torch.randn(n, 3)
        scores = torch.rand(n).round(decimals=1)  # ties, resolved by position
        labels = torch.randint(0, 6, (n,))
        labels[labels == 5] = 255
        labels[labels == step % 5] = 255  # one class empty in each push
        fast.push(features.to(device), labels.to(device), scores.to(device), per_class)
        slow.push(features, labels, scores, per_class)
        assert torch.equal(fast.counts.cpu(), slow.counts)
        assert torch.equal(fast.features.cpu(), slow.features)
    assert bool((fast.counts <= size).all()) and int(fast.counts.max()) == size
    # the newest push is in front, in descending score order
    index, count = fast_topk(device, scores, labels, 5, per_class, backend=backend)
    c = int(torch.argmax(count))
    n_new = min(int(count[c]), size)
    assert torch.equal(fast.get(c)[:n_new].cpu(), features[index[c, :n_new]])


@pytest.mark.parametrize("device, backend", PAIRS)
def test_memory_bank_many_classes(device, backend):
    bank = ClassMemoryBank(19, 64, 8, device=device, backend=backend)
    cpu = ClassMemoryBank(19, 64, 8, backend="reference")
    for seed in range(3):
        feats = torch.randn(3000, 8, generator=gen(seed))
        lab = random_labels((3000,), 19, seed=seed)
        scores = torch.rand(3000, generator=gen(seed + 10))
        bank.push(feats.to(device), lab.to(device), scores.to(device), 20)
        cpu.push(feats, lab, scores, 20)
    for c in range(19):
        assert torch.equal(bank.get(c).cpu(), cpu.get(c))


# ---------------------------------------------------------------- Triton: radix plans and placement


def _has_triton():
    return bool(backend_params("topk_per_class", devices=("cpu",), backends=("triton",)))


@pytest.mark.triton
@pytest.mark.parametrize("digits", [4, 7, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_digit_widths(digits, dtype, monkeypatch):
    """The radix select with each digit width the cost model can pick (16 for large inputs, 4 for
    very many classes): ties broken on the position digits, signed zeros, infinities."""
    if not _has_triton():
        pytest.skip("Triton is not available in this process")
    from udafast.kernels import radix

    monkeypatch.setattr(radix, "MIN_DIGIT_BITS", digits)
    monkeypatch.setattr(radix, "MAX_DIGIT_BITS", digits)
    values = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), 0.5, 1e-300], dtype=dtype)
    scores = values[torch.randint(0, len(values), (3001,))]
    scores[::5] = torch.randn(601, dtype=dtype)
    labels = make_labels(3001, 5)
    for k in (1, 9, 700):
        assert_same(topk_per_class(scores, labels, 5, k, backend="triton"), expected(scores, labels, 5, k))


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_place_by_sort(dtype, monkeypatch):
    """Past PLACE_MAX_K the candidate rows are ordered by device sorts instead of pairwise ranks."""
    if not _has_triton():
        pytest.skip("Triton is not available in this process")
    from udafast.kernels import topk_per_class as module

    monkeypatch.setattr(module, "PLACE_MAX_K", 4)
    values = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), 0.5], dtype=dtype)
    scores = values[torch.randint(0, len(values), (2000,))]
    scores[::3] = torch.randn(667, dtype=dtype)
    labels = make_labels(2000, 19)
    for k in (5, 64, 300):
        assert_same(topk_per_class(scores, labels, 19, k, backend="triton"), expected(scores, labels, 19, k))
    empty = topk_per_class(scores[:0], labels[:0], 3, 6, backend="triton")
    assert_same(empty, expected(scores[:0], labels[:0], 3, 6))
