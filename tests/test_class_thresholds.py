"""SPEC 1.1: class_thresholds, ClassThresholds (class_histogram_add_) and cbst_pseudo_labels,
each fast backend against the pure-PyTorch reference."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import udafast.ops as U
from udafast.ops import reference
from udafast.ops.dispatch import launch
from conftest import assert_reproducible, backend_params, compiled_ops, confidences, noncontiguous, random_labels

THRESHOLD_PAIRS = backend_params("class_thresholds")
HISTOGRAM_PAIRS = backend_params("class_histogram_add_")
LABEL_PAIRS = backend_params("cbst_pseudo_labels")
DTYPES = [torch.float32, torch.float64]
LABEL_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


def make_inputs(shape, num_classes, dtype=torch.float32, label_dtype=torch.int64, ignored=0.1, levels=None):
    """Confidences in [0, 1] (quantised to `levels` values to force ties) and labels, a share of
    them ignored (255)."""
    conf = torch.rand(shape, dtype=torch.float64)
    if levels is not None:
        conf = torch.floor(conf * levels) / levels
    pred = torch.randint(0, num_classes, shape)
    pred[torch.rand(shape) < ignored] = 255
    return conf.to(dtype), pred.to(label_dtype)


def exact_thresholds(conf, pred, num_classes, portion, ignore_index=255):
    """The reference on float64 copies; a selection, so casting back to conf's dtype is exact."""
    ref = reference.class_thresholds(conf.double().cpu(), pred.long().cpu(), num_classes, portion, ignore_index)
    return ref.to(conf.dtype)


def assert_equal(actual, expected):
    """Equal dtype, shape and values, compared on the CPU."""
    actual, expected = actual.cpu(), expected.cpu()
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual, expected), f"{actual} != {expected}"


# ---------------------------------------------------------------- class_thresholds


@pytest.mark.parametrize("device, backend", THRESHOLD_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_classes", [19, 16])
@pytest.mark.parametrize("shape", [(1, 127, 33), (3, 1, 1), (5000,)])
@pytest.mark.parametrize("portion", [0.0, 0.2, 0.5, 1.0])
def test_thresholds_match_reference(device, backend, dtype, num_classes, shape, portion):
    conf, pred = make_inputs(shape, num_classes, dtype)
    out = U.class_thresholds(conf.to(device), pred.to(device), num_classes, portion, backend=backend)
    assert_equal(out, exact_thresholds(conf, pred, num_classes, portion))
    if portion == 0.0:
        assert bool((out == 1).all())


@pytest.mark.parametrize("device, backend", THRESHOLD_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 1000, 100_003])
@pytest.mark.parametrize("portion", [0.0, 0.2, 0.5, 1.0])
def test_thresholds_odd_sizes(device, backend, dtype, n, portion):
    """Sizes that fill no block, many exact ties, uint8 labels, class 18 empty."""
    conf = confidences(n, dtype=dtype)
    pred = random_labels((n,), 18, ignore_fraction=0.1, seed=1, dtype=torch.uint8)
    got = U.class_thresholds(conf.to(device), pred.to(device), 19, portion, backend=backend)
    want = reference.class_thresholds(conf, pred, 19, portion)
    assert got.dtype == dtype and torch.equal(got.cpu(), want)


@pytest.mark.parametrize("device, backend", THRESHOLD_PAIRS)
@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
def test_thresholds_label_dtypes(device, backend, label_dtype):
    ignore_index = 100 if label_dtype == torch.int8 else 255
    conf, pred = make_inputs((2, 37, 41), 19, label_dtype=torch.int64)
    pred[pred == 255] = ignore_index
    pred = pred.to(label_dtype)
    out = U.class_thresholds(conf.to(device), pred.to(device), 19, 0.35, ignore_index=ignore_index, backend=backend)
    assert_equal(out, exact_thresholds(conf, pred, 19, 0.35, ignore_index))


@pytest.mark.parametrize("device, backend", THRESHOLD_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_thresholds_noncontiguous(device, backend, dtype):
    conf, pred = make_inputs((2, 127, 33), 19, dtype)
    nc_conf, nc_pred = noncontiguous(conf.to(device)), noncontiguous(pred.to(device)).transpose(1, 2)
    nc_conf = nc_conf.transpose(1, 2)
    out = U.class_thresholds(nc_conf, nc_pred, 19, 0.5, backend=backend)
    assert_equal(out, exact_thresholds(conf.transpose(1, 2), pred.transpose(1, 2), 19, 0.5))


@pytest.mark.parametrize("device, backend", THRESHOLD_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("portion", [0.0, 0.3, 1.0])
def test_thresholds_ties_and_extremes(device, backend, dtype, portion):
    # four levels including exact 0 and 1, -0.0 beside +0.0: nearly every rank is a tie
    conf, pred = make_inputs((4, 64, 64), 16, dtype, levels=3)
    conf[torch.rand(conf.shape) < 0.1] = 1.0
    conf = torch.where((conf == 0) & (torch.rand(conf.shape) < 0.5), torch.tensor(-0.0, dtype=dtype), conf)
    out = U.class_thresholds(conf.to(device), pred.to(device), 16, portion, backend=backend)
    assert_equal(out, exact_thresholds(conf, pred, 16, portion))


@pytest.mark.parametrize("device, backend", THRESHOLD_PAIRS)
def test_thresholds_close_values(device, backend):
    # confidences a few ulps apart, all in one coarse bucket: the exact selection has to resolve them
    base = torch.tensor(0.9, dtype=torch.float32)
    steps = torch.randint(0, 50, (20000,), dtype=torch.int32)
    conf = (base.view(torch.int32) + steps).view(torch.float32)
    pred = torch.randint(0, 3, (20000,))
    for portion in (0.01, 0.5, 0.77):
        out = U.class_thresholds(conf.to(device), pred.to(device), 3, portion, backend=backend)
        assert_equal(out, exact_thresholds(conf, pred, 3, portion))


@pytest.mark.parametrize("device, backend", THRESHOLD_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_thresholds_empty_classes_and_ignored(device, backend, dtype):
    conf, pred = make_inputs((1, 127, 33), 19, dtype)
    pred[(pred >= 5) & (pred != 255)] = 2  # classes 5..18 get no pixels
    out = U.class_thresholds(conf.to(device), pred.to(device), 19, 0.5, backend=backend)
    assert_equal(out, exact_thresholds(conf, pred, 19, 0.5))
    assert bool((out[5:] == 1).all()) and bool((out[:5] < 1).all())
    # a class with a single pixel: n = floor(0.5) = 0 gives 1.0, portion 1 gives the pixel
    pred.fill_(255)
    pred[0, 3, 4] = 7
    conf, pred = conf.to(device), pred.to(device)
    assert_equal(U.class_thresholds(conf, pred, 19, 0.5, backend=backend), torch.ones(19, dtype=dtype))
    expected = torch.ones(19, dtype=dtype)
    expected[7] = conf[0, 3, 4]
    assert_equal(U.class_thresholds(conf, pred, 19, 1.0, backend=backend), expected)


@pytest.mark.parametrize("device, backend", THRESHOLD_PAIRS)
@pytest.mark.parametrize("shape", [(0,), (2, 0, 5)])
def test_thresholds_empty_input(device, backend, shape):
    conf, pred = torch.rand(shape), torch.zeros(shape, dtype=torch.int64)
    assert_equal(U.class_thresholds(conf.to(device), pred.to(device), 19, 0.5, backend=backend), torch.ones(19))


@pytest.mark.parametrize("device, backend", THRESHOLD_PAIRS)
def test_thresholds_every_pixel_ignored(device, backend):
    conf, pred = torch.rand(3, 17, 9), torch.full((3, 17, 9), 255, dtype=torch.uint8)
    assert_equal(U.class_thresholds(conf.to(device), pred.to(device), 19, 1.0, backend=backend), torch.ones(19))


@pytest.mark.parametrize("device, backend", THRESHOLD_PAIRS)
def test_thresholds_ignore_index_inside_classes(device, backend):
    conf, pred = make_inputs((1, 127, 33), 19, ignored=0.0)
    out = U.class_thresholds(conf.to(device), pred.to(device), 19, 0.5, ignore_index=4, backend=backend)
    assert_equal(out, exact_thresholds(conf, pred, 19, 0.5, ignore_index=4))
    assert out[4] == 1


@pytest.mark.parametrize("device, backend", THRESHOLD_PAIRS)
def test_thresholds_bad_values_unvalidated(device, backend, no_validation):
    """With validation off, out-of-range labels and NaN confidences are skipped, not a crash."""
    conf, pred = make_inputs((1, 127, 33), 19, label_dtype=torch.int16)
    bad = torch.rand(conf.shape) < 0.2
    pred[bad] = torch.tensor([-7, 19, 300, 32767], dtype=torch.int16)[torch.randint(0, 4, (int(bad.sum()),))]
    nan = torch.rand(conf.shape) < 0.05
    conf[nan] = float("nan")
    out = U.class_thresholds(conf.to(device), pred.to(device), 19, 0.5, backend=backend)
    keep = ~nan
    assert_equal(out, exact_thresholds(conf[keep], pred[keep], 19, 0.5))


@pytest.mark.parametrize("device, backend", THRESHOLD_PAIRS)
def test_thresholds_reproducible_across_runs_and_threads(device, backend):
    conf, pred = make_inputs((300_000,), 19)
    conf, pred = conf.to(device), pred.to(device)
    assert_reproducible(lambda: U.class_thresholds(conf, pred, 19, 0.5, backend=backend))


@pytest.mark.parametrize("device, backend", THRESHOLD_PAIRS)
def test_thresholds_two_million_pixels(device, backend):
    conf = torch.softmax(torch.randn(2_000_000, 19) * 3, dim=1).amax(dim=1)  # skewed toward 1
    pred = torch.randint(0, 19, (2_000_000,), dtype=torch.uint8)
    out = U.class_thresholds(conf.to(device), pred.to(device), 19, 0.5, backend=backend)
    assert_equal(out, exact_thresholds(conf, pred, 19, 0.5))


@pytest.mark.parametrize("device, backend", THRESHOLD_PAIRS)
@settings(max_examples=25, deadline=None)
@given(
    data=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 12)), max_size=300),
    portion=st.floats(0, 1),
    num_classes=st.integers(1, 6),
    dtype=st.sampled_from(DTYPES),
)
def test_thresholds_property(device, backend, data, portion, num_classes, dtype):
    pred = torch.tensor([label for label, _ in data], dtype=torch.int64).reshape(-1)
    pred[pred >= num_classes] = 255
    conf = torch.tensor([level / 12 for _, level in data], dtype=dtype).reshape(-1)
    out = U.class_thresholds(conf.to(device), pred.to(device), num_classes, portion, backend=backend).cpu()
    assert_equal(out, exact_thresholds(conf, pred, num_classes, portion))
    for c in range(num_classes):  # the defining property: exactly the n-th highest
        values = conf[pred == c]
        n = math.floor(values.numel() * portion)
        if n >= 1:
            assert int((values > out[c]).sum()) < n <= int((values >= out[c]).sum())
        else:
            assert out[c] == 1


# ---------------------------------------------------------------- ClassThresholds (streaming)


def streaming_expected(exact, counts_nonzero, bins):
    """SPEC 1.1: floor(exact * bins) / bins, (bins - 1) / bins for an exact 1.0 that selects, 1.0
    where n < 1."""
    edge = torch.clamp(torch.floor(exact.double() * bins), max=bins - 1) / bins
    return torch.where(counts_nonzero, edge, torch.ones_like(edge)).float()


@pytest.mark.parametrize("device, backend", HISTOGRAM_PAIRS)
@pytest.mark.parametrize("bins", [1, 2, 256, 65536])
@pytest.mark.parametrize("dtype", DTYPES)
def test_streaming_matches_reference_and_exact(device, backend, bins, dtype):
    num_classes = 19
    fast = U.ClassThresholds(num_classes, bins, device=device, backend=backend)
    slow = U.ClassThresholds(num_classes, bins, backend="reference")
    batches = [make_inputs((1, 127, 33), num_classes, dtype, levels=40) for _ in range(3)]
    batches[1][1][(batches[1][1] >= 5) & (batches[1][1] != 255)] = 1  # uneven class sizes
    for conf, pred in batches:
        fast.update(conf.to(device), pred.to(device))
        slow.update(conf.double(), pred)
    assert torch.equal(fast.counts.cpu(), slow.counts)
    conf = torch.cat([c.reshape(-1) for c, _ in batches])
    pred = torch.cat([p.reshape(-1) for _, p in batches])
    for portion in (0.0, 0.25, 0.5, 1.0):
        exact = exact_thresholds(conf, pred, num_classes, portion)
        n = torch.floor(torch.bincount(pred[pred != 255].long(), minlength=num_classes).double() * portion)
        streamed = fast.thresholds(portion).cpu()
        assert_equal(streamed, streaming_expected(exact, n >= 1, bins))
        for c in range(num_classes):  # never fewer pixels than the exact rule
            values = conf[pred == c]
            assert int((values >= streamed[c]).sum()) >= int((values >= exact[c]).sum()) or n[c] < 1


@pytest.mark.parametrize("device, backend", HISTOGRAM_PAIRS)
def test_streaming_noncontiguous_updates(device, backend):
    stream = U.ClassThresholds(19, bins=1024, device=device, backend=backend)
    cpu = U.ClassThresholds(19, bins=1024, backend="reference")
    for seed in range(3):
        conf = confidences(5000, seed=seed).view(2, 50, 50)
        pred = random_labels((2, 50, 50), 19, seed=seed)
        stream.update(noncontiguous(conf.to(device)), pred.to(device))
        cpu.update(conf, pred)
    assert torch.equal(stream.state_dict()["counts"].cpu(), cpu.state_dict()["counts"])
    assert torch.equal(stream.thresholds(0.3).cpu(), cpu.thresholds(0.3))


@pytest.mark.parametrize("device, backend", HISTOGRAM_PAIRS)
def test_streaming_exact_ones_and_zeros(device, backend):
    conf = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.5, 1.0, -0.0])
    pred = torch.tensor([0, 0, 0, 1, 1, 1, 255, 1])
    stream = U.ClassThresholds(3, 8, device=device, backend=backend).update(conf.to(device), pred.to(device))
    assert stream.counts.tolist() == [[0, 0, 0, 0, 0, 0, 0, 3], [3, 0, 0, 0, 1, 0, 0, 0], [0] * 8]
    assert_equal(stream.thresholds(1.0), torch.tensor([7 / 8, 0.0, 1.0]))
    assert_equal(stream.thresholds(0.34), torch.tensor([7 / 8, 4 / 8, 1.0]))


@pytest.mark.parametrize("device, backend", HISTOGRAM_PAIRS)
def test_streaming_state_dict_round_trip(device, backend):
    conf, pred = make_inputs((2, 127, 33), 19)
    conf, pred = conf.to(device), pred.to(device)
    stream = U.ClassThresholds(19, 1024, device=device, backend=backend).update(conf, pred)
    state = stream.state_dict()
    restored = U.ClassThresholds(19, 1024, device=device, backend=backend)
    restored.load_state_dict(state)
    assert torch.equal(restored.counts, stream.counts)
    assert_equal(restored.thresholds(0.4), stream.thresholds(0.4))
    restored.update(conf, pred)  # the restored counts go on accumulating, the saved state does not move
    assert torch.equal(restored.counts, 2 * state["counts"])
    restored.reset()
    assert int(restored.counts.sum()) == 0


@pytest.mark.parametrize("device, backend", HISTOGRAM_PAIRS)
def test_streaming_empty_and_ignored(device, backend):
    stream = U.ClassThresholds(19, 64, device=device, backend=backend)
    stream.update(torch.rand(0).to(device), torch.zeros(0, dtype=torch.int64).to(device))
    stream.update(torch.rand(5, 7).to(device), torch.full((5, 7), 255, dtype=torch.uint8).to(device))
    assert int(stream.counts.sum()) == 0
    assert_equal(stream.thresholds(0.5), torch.ones(19))


@pytest.mark.parametrize("device, backend", HISTOGRAM_PAIRS)
@pytest.mark.parametrize("bins", [64, 4096])  # a table per chunk; cells grouped by part
def test_histogram_bad_values_and_strided_counts(device, backend, bins, no_validation):
    conf, pred = make_inputs((1, 127, 33), 19, label_dtype=torch.int32)
    pred[0, :5] = -3
    pred[0, 5:10] = 19
    conf[0, 10:15] = float("nan")
    conf[0, 15:20] = -0.25
    conf[0, 20:25] = 1.5  # above 1 lands in the last bin, as min(floor(x * bins), bins - 1) says
    counts = torch.zeros(bins, 19, dtype=torch.int64, device=device).t()  # a transposed, non-contiguous view
    launch("class_histogram_add_", backend, None, counts, noncontiguous(conf.to(device)), noncontiguous(pred.to(device)), 255)
    keep = (conf == conf) & (conf >= 0)
    expected = torch.zeros(19, bins, dtype=torch.int64)
    reference.class_histogram_add_(expected, conf[keep], pred[keep], 255)
    assert torch.equal(counts.cpu(), expected)


@pytest.mark.parametrize("device, backend", HISTOGRAM_PAIRS)
def test_histogram_two_million_pixels(device, backend):
    conf, pred = make_inputs((2_000_000,), 19, label_dtype=torch.uint8)
    fast = U.ClassThresholds(19, 65536, device=device, backend=backend).update(conf.to(device), pred.to(device))
    slow = U.ClassThresholds(19, 65536, backend="reference").update(conf, pred)
    assert torch.equal(fast.counts.cpu(), slow.counts)


@pytest.mark.parametrize("device, backend", HISTOGRAM_PAIRS)
@settings(max_examples=25, deadline=None)
@given(
    data=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 16)), max_size=200),
    log_bins=st.integers(0, 5),
    portion=st.floats(0, 1),
)
def test_streaming_property(device, backend, data, log_bins, portion):
    bins = 2**log_bins
    pred = torch.tensor([label for label, _ in data], dtype=torch.int64).reshape(-1)
    pred[pred == 4] = 255
    conf = torch.tensor([level / 16 for _, level in data], dtype=torch.float32).reshape(-1)
    stream = U.ClassThresholds(4, bins, device=device, backend=backend).update(conf.to(device), pred.to(device))
    assert torch.equal(stream.counts.cpu(), U.ClassThresholds(4, bins, backend="reference").update(conf, pred).counts)
    exact = exact_thresholds(conf, pred, 4, portion)
    n = torch.floor(torch.bincount(pred[pred != 255], minlength=4).double() * portion)
    assert_equal(stream.thresholds(portion), streaming_expected(exact, n >= 1, bins))


# ---------------------------------------------------------------- cbst_pseudo_labels


def make_probs(shape, dtype):
    return torch.softmax(torch.randn(shape, dtype=torch.float64) * 3, dim=1).to(dtype)


def expected_labels(probs, thresholds, ignore_index=255):
    """The reference in the probabilities' own dtype: SPEC 1.1 fixes IEEE division in that dtype,
    so the labels are exact (a float64 copy could flip a ratio sitting at a tie or at 1)."""
    return reference.cbst_pseudo_labels(probs.cpu(), thresholds.to(probs.dtype).cpu(), ignore_index)


@pytest.mark.parametrize("device, backend", LABEL_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_classes", [19, 16])
@pytest.mark.parametrize("shape", [(1, 127, 33), (2, 1, 1), (3, 8, 300)])
def test_labels_match_reference(device, backend, dtype, num_classes, shape):
    probs = make_probs((shape[0], num_classes, *shape[1:]), dtype)
    thresholds = torch.rand(num_classes, dtype=dtype) * 0.8 + 0.1
    out = U.cbst_pseudo_labels(probs.to(device), thresholds.to(device), backend=backend).cpu()
    assert out.dtype == torch.int64 and out.shape == (shape[0], *shape[1:])
    assert torch.equal(out, expected_labels(probs, thresholds))
    assert bool((out == 255).any()) or out.numel() < 10  # some pixels fall below every threshold
    # against a float64 reference, labels may differ only where its two best ratios are near ties
    ratio = probs.double() / thresholds.double().view(1, -1, 1, 1)
    top2 = ratio.topk(2, dim=1).values
    near = (top2[:, 0] - top2[:, 1] <= 1e-6 * top2[:, 0]) | ((top2[:, 0] - 1).abs() <= 1e-6)
    agree = out == expected_labels(probs.double(), thresholds.double())
    assert bool((agree | near).all())


@pytest.mark.parametrize("device, backend", LABEL_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_labels_noncontiguous(device, backend, dtype):
    probs = make_probs((2, 19, 33, 127), dtype)
    thresholds = torch.rand(19, dtype=dtype) * 0.8 + 0.1
    probs, thresholds = probs.to(device), thresholds.to(device)
    for view in (noncontiguous(probs), probs.contiguous(memory_format=torch.channels_last), probs.transpose(2, 3)):
        out = U.cbst_pseudo_labels(view, noncontiguous(thresholds), backend=backend)
        assert torch.equal(out.cpu(), expected_labels(view.contiguous(), thresholds))


@pytest.mark.parametrize("device, backend", LABEL_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_labels_ties_thresholds_and_ones(device, backend, dtype):
    # quantised probabilities and equal thresholds: many exact ties, first maximum wins;
    # ratios exactly 1 are kept
    probs = torch.randint(0, 4, (2, 16, 17, 23)).to(dtype) / 8
    thresholds = torch.full((16,), 0.375, dtype=dtype)
    thresholds[3] = 0.25
    thresholds[9] = 1.0
    out = U.cbst_pseudo_labels(probs.to(device), thresholds.to(device), ignore_index=250, backend=backend).cpu()
    assert torch.equal(out, expected_labels(probs, thresholds, 250))
    ratio = probs / thresholds.view(1, -1, 1, 1)
    best = ratio.amax(dim=1, keepdim=True)
    assert bool(((ratio == best).sum(dim=1) > 1).any())
    first = (ratio == best).to(torch.int8).argmax(dim=1)  # the first of the tied maxima
    assert torch.equal(out, torch.where(best[:, 0] < 1, 250, first))
    assert bool((out == 250).any()) and bool((best[:, 0] == 1).any())


@pytest.mark.parametrize("device, backend", LABEL_PAIRS)
def test_labels_extreme_values(device, backend, no_validation):
    probs = make_probs((1, 19, 127, 33), torch.float32)
    probs[0, :, 0, :5] = 0.0  # every ratio 0: ignored
    probs[0, 4, 1, :5] = 1.0  # confident
    probs[0, 7, 2, :5] = float("nan")  # NaN counts as the maximum, as in torch.argmax
    thresholds = torch.rand(19) * 0.9 + 0.1
    thresholds[11] = 1e-30  # tiny thresholds make huge (or infinite) ratios
    out = U.cbst_pseudo_labels(probs.to(device), thresholds.to(device), backend=backend).cpu()
    assert torch.equal(out, expected_labels(probs, thresholds))
    assert bool((out[0, 0, :5] == 255).all()) and bool((out[0, 2, :5] == 7).all())


@pytest.mark.parametrize("device, backend", LABEL_PAIRS)
@pytest.mark.parametrize("shape", [(0, 19, 4, 4), (2, 19, 0, 7), (1, 1, 1, 1)])
def test_labels_empty_and_single_class(device, backend, shape):
    probs = torch.rand(shape)
    out = U.cbst_pseudo_labels(probs.to(device), torch.full((shape[1],), 0.5, device=device), backend=backend).cpu()
    assert out.shape == (shape[0], *shape[2:])
    assert torch.equal(out, expected_labels(probs, torch.full((shape[1],), 0.5)))


@pytest.mark.parametrize("device, backend", LABEL_PAIRS)
def test_labels_reproducible_across_threads(device, backend):
    probs = make_probs((2, 19, 64, 129), torch.float32)
    thresholds = torch.rand(19) * 0.8 + 0.1
    probs, thresholds = probs.to(device), thresholds.to(device)
    assert_reproducible(lambda: U.cbst_pseudo_labels(probs, thresholds, backend=backend))


# ---------------------------------------------------------------- torch.library / torch.compile


@pytest.mark.parametrize("device, backend", THRESHOLD_PAIRS)
def test_opcheck(device, backend):
    """The compiled ops (torch.ops.udafast) and the Triton custom ops (torch.ops.udafast_triton):
    schemas, fake kernels and mutation declared as they behave."""
    ops = compiled_ops(backend)
    conf, pred = make_inputs((2, 17, 9), 19)
    conf, pred = conf.to(device), pred.to(device)
    torch.library.opcheck(ops.class_thresholds.default, (conf, pred, 19, 0.5, 255))
    torch.library.opcheck(ops.class_thresholds.default, (conf.double(), pred.to(torch.uint8), 19, 1.0, 255))
    counts = torch.zeros(19, 32, dtype=torch.int64, device=device)
    torch.library.opcheck(ops.class_histogram_add_.default, (counts, conf, pred, 255))
    probs = make_probs((2, 19, 5, 7), torch.float32).to(device)
    torch.library.opcheck(ops.cbst_pseudo_labels.default, (probs, (torch.rand(19) + 0.1).to(device), 255))


@pytest.mark.parametrize("device, backend", THRESHOLD_PAIRS)
def test_compile_fullgraph(device, backend, no_validation):
    conf, pred = make_inputs((2, 31, 17), 19)
    probs = make_probs((2, 19, 31, 17), torch.float32)
    conf, pred, probs = conf.to(device), pred.to(device), probs.to(device)

    def pseudo_label(conf, pred, probs):
        thresholds = U.class_thresholds(conf, pred, 19, 0.5, backend=backend)
        return U.cbst_pseudo_labels(probs, thresholds, backend=backend)

    compiled = torch.compile(pseudo_label, fullgraph=True)
    assert torch.equal(compiled(conf, pred, probs), pseudo_label(conf, pred, probs))


# ---------------------------------------------------------------- Triton: radix plans


@pytest.mark.triton
@pytest.mark.parametrize("digits", [4, 7, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_digit_widths(digits, dtype, monkeypatch):
    """The radix select with each digit width the cost model can pick (16 for large inputs, 4 for
    very many classes), on ties, signed zeros and values a few ulps apart."""
    if not backend_params("class_thresholds", devices=("cpu",), backends=("triton",)):
        pytest.skip("Triton is not available in this process")
    from udafast.kernels import radix

    monkeypatch.setattr(radix, "MIN_DIGIT_BITS", digits)
    monkeypatch.setattr(radix, "MAX_DIGIT_BITS", digits)
    conf, pred = make_inputs((3000,), 5, dtype, levels=7)
    conf[:40] = -0.0
    bits = torch.int64 if dtype == torch.float64 else torch.int32
    conf[40:300] = (torch.tensor(0.9, dtype=dtype).view(bits) + torch.arange(260, dtype=bits) % 37).view(dtype)
    for portion in (0.0, 0.01, 0.3, 1.0):
        out = U.class_thresholds(conf, pred, 5, portion, backend="triton")
        assert_equal(out, exact_thresholds(conf, pred, 5, portion))
