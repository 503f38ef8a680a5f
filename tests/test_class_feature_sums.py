"""SPEC 1.3: class_feature_sums, each fast backend against the reference run on float64 copies."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import udafast.ops as ops
from conftest import assert_close_spec, backend_params, noncontiguous, on
from udafast.ops import reference
from udafast.ops.class_feature_sums import class_feature_sums

PAIRS = backend_params("class_feature_sums")
DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(2, 32, 7, 5, 19), (1, 19, 127, 33, 16), (3, 4, 1, 1, 19)])
def test_class_feature_sums_matches_reference(device, backend, dtype, label_dtype, shape):
    b, d, h, w, c = shape
    features = torch.randn(b, d, h, w, dtype=dtype) * 3 + 1
    labels = torch.randint(0, c + 1, (b, h, w))
    labels[labels == c] = 255
    labels[..., 0] = 2  # class 1 may be empty, class 2 is not
    labels[labels == 1] = 255
    labels = labels.to(label_dtype)
    sums, counts = class_feature_sums(noncontiguous(features.to(device)), noncontiguous(labels.to(device)), c, backend=backend)
    sums, counts = sums.cpu(), counts.cpu()
    ref_sums, ref_counts = reference.class_feature_sums(features.double(), labels, c)
    assert sums.dtype == dtype and counts.dtype == torch.int64
    assert torch.equal(counts, ref_counts)
    assert (counts[:, 1] == 0).all() and (sums[:, 1] == 0).all()
    assert_close_spec(sums, ref_sums, "sums")


@pytest.mark.parametrize("device, backend", PAIRS)
def test_class_feature_sums_ignored_and_invalid_labels(device, backend):
    features = torch.randn(2, 8, 5, 6)
    labels = torch.full((2, 5, 6), 255)
    sums, counts = class_feature_sums(*on(device, features, labels), 19, backend=backend)
    assert (sums == 0).all() and (counts == 0).all()
    # with validation off, labels outside [0, C) are skipped, not written out of bounds
    labels[0, 0, :3] = torch.tensor([-1, 19, 1000])
    labels[1, 2, 2] = 4
    ops.set_validation(False)
    try:
        sums, counts = class_feature_sums(*on(device, features, labels), 19, ignore_index=-7, backend=backend)
    finally:
        ops.set_validation(True)
    sums, counts = sums.cpu(), counts.cpu()
    expected = torch.zeros(2, 19, dtype=torch.long)
    expected[1, 4] = 1
    assert torch.equal(counts, expected)
    assert torch.equal(sums[1, 4], features[1, :, 2, 2])
    assert (sums.sum(2)[expected == 0] == 0).all()


@pytest.mark.parametrize("device, backend", PAIRS)
def test_class_feature_sums_accuracy_large(device, backend):
    # 512 x 512 pixels of one class: float32 accumulation would drift, double does not
    features = torch.randn(1, 3, 512, 512) + 10
    labels = torch.zeros(1, 512, 512, dtype=torch.long)
    sums, counts = class_feature_sums(*on(device, features, labels), 2, backend=backend)
    assert counts[0, 0] == 512 * 512
    assert_close_spec(sums, features.double().sum((2, 3))[:, None].expand(1, 2, 3) * torch.tensor([1.0, 0.0])[None, :, None])


@pytest.mark.parametrize("device, backend", PAIRS)
@settings(max_examples=25, deadline=None)
@given(
    c=st.integers(1, 8),
    n=st.integers(1, 70),
    seed=st.integers(0, 2**16),
    ignore=st.sampled_from([255, 0, -1]),
)
def test_class_feature_sums_property(device, backend, c, n, seed, ignore):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 3, 1, n, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, c + 1, (2, 1, n), generator=generator)
    labels[labels == c] = 255 if ignore == 255 else ignore
    if ignore != 255:
        labels[labels == 255] = ignore
    sums, counts = class_feature_sums(*on(device, features, labels), c, ignore_index=ignore, backend=backend)
    ref_sums, ref_counts = reference.class_feature_sums(features, labels, c, ignore)
    assert torch.equal(counts.cpu(), ref_counts)
    assert_close_spec(sums, ref_sums, "sums")
