"""SPEC 1.3: prototype_softmax (and its backward), prototype_rectify and update_prototypes, each
fast backend against the reference run on float64 copies (class_feature_sums:
test_class_feature_sums.py)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import udafast.ops as ops
from udafast.ops import reference
from udafast.ops.class_feature_sums import class_feature_sums
from udafast.ops.prototype_softmax import prototype_rectify, prototype_softmax, update_prototypes

from conftest import (assert_close_spec, assert_grad_close_spec, assert_reproducible, backend_params, compiled_ops, gen,
                      max_error, noncontiguous, on)

PAIRS = backend_params("prototype_softmax")
CUDA_PAIRS = backend_params("prototype_softmax", devices=("cuda",))
DTYPES = [torch.float32, torch.float64]


def make(b, d, h, w, c, dtype=torch.float32, scale=3.0):
    """Features ~ N(0, scale^2) and prototypes at the same scale: distances ~ scale * sqrt(2 D)."""
    features = (torch.randn(b, d, h, w, dtype=torch.float64) * scale).to(dtype)
    prototypes = (torch.randn(c, d, dtype=torch.float64) * scale).to(dtype)
    return features, prototypes


def reference_softmax(features, prototypes, tau, log, grad=None):
    """The reference in float64, and the features' gradient for `grad` when given."""
    f = features.detach().double().requires_grad_(grad is not None)
    out = reference.prototype_softmax(f, prototypes.double(), tau, log)
    if grad is None:
        return out, None
    out.backward(grad.double())
    return out, f.grad


def raw_op(backend, op):
    """The backend's op with the compiled signature (prototype_softmax also returns the distances)."""
    if backend == "triton":
        from udafast.kernels import LAUNCHERS
        return LAUNCHERS[op]
    return getattr(torch.ops.udafast, op)


def fast_softmax(features, prototypes, tau, log, backend, grad=None):
    f = features.detach().clone().requires_grad_(grad is not None)
    out = prototype_softmax(f, prototypes, tau, log=log, backend=backend)
    if grad is None:
        return out, None
    out.backward(grad)
    return out, f.grad


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("shape", [(2, 32, 7, 5, 19), (1, 19, 127, 33, 16), (3, 8, 1, 1, 19), (1, 5, 4, 3, 1)])
def test_forward_backward_matches_reference(device, backend, dtype, log, shape):
    b, d, h, w, c = shape
    features, prototypes = on(device, *make(b, d, h, w, c, dtype))
    grad = torch.randn(b, c, h, w, dtype=dtype).to(device)
    out, grad_f = fast_softmax(features, prototypes, 1.0, log, backend, grad)
    ref, ref_grad = reference_softmax(features, prototypes, 1.0, log, grad)
    assert out.dtype == dtype and out.shape == (b, c, h, w)
    assert_close_spec(out, ref, "out")
    assert_grad_close_spec(grad_f, ref_grad)


def features_and_prototypes(b, c, d, h, w):
    """float64 features and prototypes from fixed generators, one feature equal to a prototype (d = 0)."""
    features = torch.randn(b, d, h, w, generator=gen(), dtype=torch.float64)
    prototypes = torch.randn(c, d, generator=gen(1), dtype=torch.float64)
    features[0, :, 0, 0] = prototypes[min(1, c - 1)]
    return features, prototypes


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 19, 64, 17, 23), (1, 16, 256, 1, 1), (2, 7, 33, 9, 70)])  # B, C, D, H, W
@pytest.mark.parametrize("log", [False, True])
def test_odd_shapes(device, backend, dtype, shape, log):
    b, c, d, h, w = shape
    features, prototypes = on(device, *(x.to(dtype) for x in features_and_prototypes(*shape)))
    grad = torch.randn(b, c, h, w, generator=gen(99), dtype=torch.float64).to(dtype).to(device)
    out, grad_f = fast_softmax(features, prototypes, 0.7, log, backend, grad)
    ref, ref_grad = reference_softmax(features, prototypes, 0.7, log, grad)
    assert_close_spec(out, ref)
    assert_grad_close_spec(grad_f, ref_grad)


@pytest.mark.parametrize("device, backend", CUDA_PAIRS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_within_twice_the_reference_error(device, backend, dtype):
    """SPEC 1.5 for float16/bfloat16 through the public API (CUDA only): the max abs errors of the
    output and the features' gradient against the float64 reference at most twice the
    reference's own in that precision."""
    features, prototypes = on(device, *features_and_prototypes(2, 19, 64, 45, 61))
    grad = torch.randn(2, 19, 45, 61, generator=gen(99), dtype=torch.float64).to(device)

    def run(backend, x_dtype):
        return fast_softmax(features.to(x_dtype), prototypes.to(x_dtype), 1.0, False, backend, grad.to(x_dtype))

    exact_out, exact_grad = run("reference", torch.float64)
    ref_out, ref_grad = run("reference", dtype)
    out, grad_f = run(backend, dtype)
    assert max_error(out, exact_out) <= 2 * max_error(ref_out, exact_out), "value"
    assert max_error(grad_f, exact_grad) <= 2 * max_error(ref_grad, exact_grad), "gradient"


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("log", [False, True])
def test_float32_accuracy_at_realistic_magnitudes(device, backend, log):
    # D = 256 and distances ~ 20 and more: the squared distance must not be summed in plain float32
    features, prototypes = on(device, *make(2, 256, 23, 31, 19, scale=1.5))
    prototypes = prototypes * 0.5
    grad = torch.randn(2, 19, 23, 31).to(device)
    out, grad_f = fast_softmax(features, prototypes, 1.0, log, backend, grad)
    ref, ref_grad = reference_softmax(features, prototypes, 1.0, log, grad)
    distances = torch.linalg.vector_norm(features[:, None].double() - prototypes.double()[None, :, :, None, None], dim=2)
    assert distances.mean() > 18
    assert_close_spec(out, ref, "out")
    assert_grad_close_spec(grad_f, ref_grad)


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("tau", [0.5, 2.0, 7.3])
def test_tau_and_grad_scale(device, backend, tau):
    features, prototypes = on(device, *make(2, 24, 9, 11, 19, scale=1.0))
    out, grad_f = fast_softmax(features, prototypes, tau, False, backend, None)
    f = features.clone().requires_grad_()
    (prototype_softmax(f, prototypes, tau, backend=backend)[:, 3].sum() * 3.7).backward()
    fd = features.double().requires_grad_()
    (reference.prototype_softmax(fd, prototypes.double(), tau)[:, 3].sum() * 3.7).backward()
    assert_close_spec(out, reference_softmax(features, prototypes, tau, False)[0], "out")
    assert_grad_close_spec(f.grad, fd.grad)


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_distances_output_and_extreme_logits(device, backend, dtype):
    # far-apart prototypes at a small tau: softmax saturates to 0 / 1, log-softmax to large
    # negatives. In float32, logits of ~1000 are only known to ~1e-4 (the distances' rounding), so
    # the saturated case is float64 and the float32 one milder.
    scale, tau = (10.0, 0.05) if dtype == torch.float64 else (2.0, 0.5)
    features, prototypes = on(device, *make(1, 16, 6, 7, 19, dtype, scale=scale))
    out, distances = raw_op(backend, "prototype_softmax")(features, prototypes, tau, False)
    assert distances.dtype == dtype
    ref_d = torch.linalg.vector_norm(features[:, None].double() - prototypes.double()[None, :, :, None, None], dim=2)
    assert_close_spec(distances, ref_d, "distances")
    assert_close_spec(out, reference_softmax(features, prototypes, tau, False)[0], "out")
    saturated = dtype == torch.float64
    assert out.min() < (1e-30 if saturated else 1e-6) and out.max() > (1 - 1e-6 if saturated else 0.9)
    log_out, _ = fast_softmax(features, prototypes, tau, True, backend)
    assert_close_spec(log_out, reference_softmax(features, prototypes, tau, True)[0], "log out")
    assert log_out.min() < (-750 if saturated else -13)  # past exp's underflow at -708


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("log", [False, True])
def test_feature_equal_to_prototype(device, backend, log):
    features, prototypes = on(device, *make(2, 12, 5, 6, 19, dtype=torch.float64, scale=1.0))
    features[0, :, 2, 3] = prototypes[4]
    features[1, :, 0, 0] = prototypes[0]
    grad = torch.randn(2, 19, 5, 6, dtype=torch.float64).to(device)
    out, grad_f = fast_softmax(features, prototypes, 1.0, log, backend, grad)
    ref, ref_grad = reference_softmax(features, prototypes, 1.0, log, grad)
    assert torch.isfinite(grad_f).all()
    assert_close_spec(out, ref, "out")
    assert_grad_close_spec(grad_f, ref_grad)


@pytest.mark.parametrize("device, backend", PAIRS)
def test_noncontiguous_inputs(device, backend):
    features, prototypes = on(device, *make(2, 20, 9, 13, 19))
    grad = torch.randn(2, 19, 9, 13).to(device)
    ref, ref_grad = reference_softmax(features, prototypes, 1.5, False, grad)
    views = [features.contiguous(memory_format=torch.channels_last), noncontiguous(features)]
    wide = torch.randn(2, 40, 9, 13).to(device)
    wide[:, ::2] = features
    views.append(wide[:, ::2])
    for view in views:
        assert not view.is_contiguous()
        f = view.detach().requires_grad_()
        out = prototype_softmax(f, noncontiguous(prototypes), 1.5, backend=backend)
        out.backward(noncontiguous(grad))
        assert_close_spec(out, ref, "out")
        assert_grad_close_spec(f.grad, ref_grad)


@pytest.mark.parametrize("device, backend", PAIRS)
def test_empty_inputs(device, backend):
    for shape in [(0, 8, 4, 4), (2, 8, 0, 5)]:
        f = torch.randn(*shape).to(device).requires_grad_()
        out = prototype_softmax(f, torch.randn(19, 8).to(device), backend=backend)
        assert out.shape == (shape[0], 19, shape[2], shape[3])
        out.sum().backward()
        assert f.grad.shape == f.shape
        assert prototype_rectify(f, *on(device, torch.randn(19, 8), torch.rand(shape[0], 19, shape[2], shape[3])),
                                 backend=backend).shape == (shape[0], shape[2], shape[3])
        sums, counts = class_feature_sums(f, torch.zeros(shape[0], shape[2], shape[3], dtype=torch.long, device=device),
                                          19, backend=backend)
        assert sums.shape == (shape[0], 19, 8) and (sums == 0).all() and (counts == 0).all()


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("log", [False, True])
def test_gradcheck(device, backend, log):
    features, prototypes = on(device, *make(2, 5, 3, 4, 6, dtype=torch.float64, scale=1.0))
    features[1, :, 2, 1] = prototypes[2] + 1e-3  # close to a prototype, still differentiable
    features.requires_grad_()
    # the interpreter pays ~0.1 s a launch: Triton checks J against random projections (fast_mode)
    # rather than column by column (~400 launches, minutes)
    assert torch.autograd.gradcheck(
        lambda f: prototype_softmax(f, prototypes, 0.7, log=log, backend=backend), (features,),
        fast_mode=backend == "triton",
    )


@pytest.mark.parametrize("device, backend", PAIRS)
def test_opcheck(device, backend):
    namespace = compiled_ops(backend)
    features, prototypes = on(device, *make(2, 6, 3, 5, 4))
    soft, labels = on(device, torch.rand(2, 4, 3, 5), torch.randint(0, 5, (2, 3, 5)))
    out, distances = namespace.prototype_softmax(features, prototypes, 1.0, False)
    grad = torch.randn_like(out)
    features.requires_grad_()
    checks = [
        (namespace.prototype_softmax.default, (features, prototypes, 1.0, False)),
        (namespace.prototype_softmax.default, (features, prototypes, 2.0, True)),
        (namespace.prototype_softmax_backward.default,
         (grad, out, distances, features.detach(), prototypes, 1.0, False)),
        (namespace.prototype_rectify.default, (features.detach(), prototypes, soft, 1.0)),
        (namespace.class_feature_sums.default, (features.detach(), labels, 4, 4)),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device, backend", PAIRS)
def test_torch_compile(device, backend):
    features, prototypes = on(device, *make(2, 16, 5, 7, 19))
    ops.set_validation(False)
    try:
        fn = torch.compile(lambda f: prototype_softmax(f, prototypes, 1.3, log=True, backend=backend), fullgraph=True)
        f = features.clone().requires_grad_()
        out = fn(f)
        out.sum().backward()
    finally:
        ops.set_validation(True)
    e = features.clone().requires_grad_()
    eager = prototype_softmax(e, prototypes, 1.3, log=True, backend=backend)
    eager.sum().backward()
    assert torch.equal(out, eager)
    assert torch.equal(f.grad, e.grad)


@pytest.mark.parametrize("device, backend", PAIRS)
def test_torch_compile_rectify_and_sums(device, backend):
    features, prototypes = on(device, *make(2, 16, 5, 7, 19))
    soft, labels = on(device, torch.rand(2, 19, 5, 7), torch.randint(0, 20, (2, 5, 7)))

    def step(f):
        pseudo = prototype_rectify(f, prototypes, soft, 1.3, backend=backend)
        sums, counts = class_feature_sums(f, labels, 19, ignore_index=19, backend=backend)
        return pseudo, sums, counts

    ops.set_validation(False)
    try:
        compiled = torch.compile(step, fullgraph=True)(features)
    finally:
        ops.set_validation(True)
    for got, eager in zip(compiled, step(features), strict=True):
        assert got.dtype == eager.dtype and torch.equal(got, eager)


@pytest.mark.parametrize("device, backend", PAIRS)
def test_bitwise_reproducible_and_thread_independent(device, backend):
    features, prototypes = on(device, *make(2, 64, 37, 41, 19))
    soft, labels, grad = on(device, torch.rand(2, 19, 37, 41), torch.randint(0, 20, (2, 37, 41)), torch.randn(2, 19, 37, 41))

    def run():
        out, g = fast_softmax(features, prototypes, 1.0, False, backend, grad)
        sums, _ = class_feature_sums(features, labels, 19, ignore_index=19, backend=backend)
        return out, g, prototype_rectify(features, prototypes, soft, backend=backend), sums

    assert_reproducible(run)


# ---- prototype_rectify ----


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 32, 7, 5, 19), (1, 19, 127, 33, 16), (1, 8, 1, 1, 19)])
def test_rectify_matches_reference(device, backend, dtype, shape):
    b, d, h, w, c = shape
    features, prototypes = on(device, *make(b, d, h, w, c, dtype, scale=0.3))
    soft = torch.rand(b, c, h, w, dtype=dtype).softmax(1).to(device)
    got = prototype_rectify(noncontiguous(features), prototypes, soft, 1.2, backend=backend)
    assert got.dtype == torch.int64
    scores = reference.prototype_softmax(features.double(), prototypes.double(), 1.2) * soft.double()
    expected = scores.argmax(1)
    top2 = scores.topk(2, dim=1).values
    near_tie = (top2[:, 0] - top2[:, 1]) <= 1e-6 * top2[:, 0]
    assert torch.equal(got[~near_tie], expected[~near_tie])


@pytest.mark.parametrize("device, backend", PAIRS)
def test_rectify_ties_first_maximum(device, backend):
    # identical prototypes and soft labels: every class scores the same, the first one wins
    features = torch.randn(2, 6, 4, 5)
    prototypes = torch.randn(1, 6).expand(7, 6).contiguous()
    soft = torch.full((2, 7, 4, 5), 1 / 7)
    features, prototypes, soft = on(device, features, prototypes, soft)
    assert (prototype_rectify(features, prototypes, soft, backend=backend) == 0).all()
    soft[:, 3] = 0.5
    soft[:, 5] = 0.5
    assert (prototype_rectify(features, prototypes, soft, backend=backend) == 3).all()


@pytest.mark.parametrize("device, backend", PAIRS)
@settings(max_examples=25, deadline=None)
@given(
    c=st.integers(1, 9),
    d=st.integers(1, 20),
    n=st.integers(1, 40),
    tau=st.floats(0.2, 5.0),
    seed=st.integers(0, 2**16),
)
def test_rectify_property(device, backend, c, d, n, tau, seed):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(1, d, 1, n, generator=generator, dtype=torch.float64)
    prototypes = torch.randn(c, d, generator=generator, dtype=torch.float64)
    soft = torch.rand(1, c, 1, n, generator=generator, dtype=torch.float64)
    got = prototype_rectify(*on(device, features, prototypes, soft), tau, backend=backend)
    assert torch.equal(got.cpu(), reference.prototype_rectify(features, prototypes, soft, tau))


# ---- update_prototypes ----


@pytest.mark.parametrize("device, backend", PAIRS)
def test_update_prototypes(device, backend):
    features = torch.randn(3, 16, 8, 9, dtype=torch.float64)
    labels = torch.full((3, 8, 9), 255)
    labels[0, :2] = 1  # 18 pixels
    labels[0, 2, :9] = 2  # 9 pixels: below the 10-pixel rule
    labels[1, 3:5] = 1  # 18 pixels, after image 0
    labels[2, :, :5] = 0  # 40 pixels
    labels[2, 7, :] = 2  # 9 pixels again
    sums, counts = class_feature_sums(*on(device, features, labels), 4, backend=backend)
    ref_sums, ref_counts = reference.class_feature_sums(features, labels, 4)
    start = torch.randn(4, 16, dtype=torch.float64)
    got = update_prototypes(start.clone().to(device), sums, counts).cpu()
    expected = update_prototypes(start.clone(), ref_sums, ref_counts)
    assert_close_spec(got, expected, "prototypes")
    # by hand: class 1 twice, in image order; class 0 once; classes 2 and 3 untouched
    by_hand = start.clone()
    for image, mask in ((0, labels[0] == 1), (1, labels[1] == 1)):
        by_hand[1] = 0.9999 * by_hand[1] + 0.0001 * features[image][:, mask].mean(1)
    by_hand[0] = 0.9999 * by_hand[0] + 0.0001 * features[2][:, labels[2] == 0].mean(1)
    assert_close_spec(got, by_hand, "prototypes")
    assert torch.equal(got[2:], start[2:])
