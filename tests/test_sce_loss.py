"""SPEC 1.4: sce_loss (alpha CE + beta RCE + reg_weight REG), every fast backend against the reference."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import udafast
from conftest import (assert_close_spec, assert_grad_close_spec, assert_grad_close_spec_representable, assert_reproducible,
                      backend_params, compiled_ops, gen, max_error, noncontiguous, random_labels)
from udafast.ops.sce_loss import sce_loss

PAIRS = backend_params("sce_loss")
TRITON = backend_params("sce_loss", devices=("cpu",), backends=("triton",))
CUDA_PAIRS = backend_params("sce_loss", devices=("cuda",))

GRAD_OUT = 3.7  # the loss is scaled before backward so that grad_loss != 1
WEIGHTS = [(0.1, 1.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.1, 1.0, 0.1)]


def make_target(b, c, h, w, ignore_fraction=0.2):
    target = torch.randint(0, c, (b, h, w))
    target[torch.rand(b, h, w) < ignore_fraction] = 255
    return target


def loss_and_grad(logits, target, backend, **kw):
    x = logits.detach().clone().requires_grad_()
    loss = sce_loss(x, target, backend=backend, **kw)
    (loss * GRAD_OUT).backward()
    return loss.detach(), x.grad


def expected(logits, target, **kw):
    """The reference on a float64 copy of the logits."""
    return loss_and_grad(logits.double(), target, "reference", **kw)


def check_against_reference(logits, target, backend, **kw):
    loss, grad = loss_and_grad(logits, target, backend, **kw)
    ref_loss, ref_grad = expected(logits, target, **kw)
    assert loss.dtype == logits.dtype and loss.dim() == 0
    assert grad.dtype == logits.dtype
    assert_close_spec(loss, ref_loss, "loss")
    assert_grad_close_spec_representable(grad, ref_grad)
    return loss, grad


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 19, 127, 33), (1, 16, 1, 1), (1, 19, 9, 70), (3, 16, 5, 7)])
def test_matches_reference(device, backend, dtype, shape):
    logits = torch.randn(shape, dtype=dtype) * 4
    target = make_target(shape[0], shape[1], shape[2], shape[3])
    check_against_reference(logits.to(device), target.to(device), backend, alpha=0.1, beta=1.0, reg_weight=0.1)


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 19, 127, 33), (1, 16, 1, 1), (3, 19, 9, 70)])
@pytest.mark.parametrize("scale", [4.0, 200.0])
def test_shapes_and_scales(device, backend, dtype, shape, scale):
    """Odd plane sizes, and logits of scale 200 (probabilities of exactly 0 and 1)."""
    logits = (torch.randn(shape, generator=gen(), dtype=torch.float64) * scale).to(dtype)
    target = random_labels((shape[0], shape[2], shape[3]), shape[1])
    check_against_reference(logits.to(device), target.to(device), backend, alpha=0.1, beta=1.0, reg_weight=0.1)


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_weights(device, backend, weights):
    alpha, beta, reg_weight = weights
    logits = torch.randn(2, 19, 31, 17) * 3
    target = make_target(2, 19, 31, 17)
    check_against_reference(logits.to(device), target.to(device), backend, alpha=alpha, beta=beta, reg_weight=reg_weight)


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_label_dtypes(device, backend, label_dtype):
    logits = torch.randn(2, 19, 13, 21)
    target = make_target(2, 19, 13, 21)
    ignore = 255
    if label_dtype == torch.int8:  # int8 cannot hold 255
        target[target == 255] = -1
        ignore = -1
    check_against_reference(logits.to(device), target.to(label_dtype).to(device), backend, ignore_index=ignore, reg_weight=0.1)


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noncontiguous(device, backend, dtype):
    logits = torch.randn(2, 16, 11, 23, dtype=dtype) * 3
    target = make_target(2, 16, 11, 23)
    logits, target = logits.to(device), target.to(device)
    loss, grad = check_against_reference(noncontiguous(logits), noncontiguous(target), backend, reg_weight=0.1)
    ref_loss, ref_grad = loss_and_grad(logits, target, backend, reg_weight=0.1)
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)


@pytest.mark.parametrize("device, backend", PAIRS)
def test_channels_last(device, backend):
    """The gradient keeps the logits' layout, as the fake kernel's empty_like declares."""
    logits = (torch.randn(2, 19, 7, 9) * 3).to(memory_format=torch.channels_last)
    target = make_target(2, 19, 7, 9)
    _, grad = check_against_reference(logits.to(device), target.to(device), backend, reg_weight=0.1)
    assert grad.stride() == logits.stride()


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("num_classes", [19, 16])
def test_every_pixel_ignored(device, backend, num_classes):
    logits = torch.randn(2, num_classes, 9, 13)
    target = torch.full((2, 9, 13), 255)
    logits, target = logits.to(device), target.to(device)
    loss, grad = check_against_reference(logits, target, backend, alpha=0.1, beta=1.0, reg_weight=0.0)
    assert loss.item() == 0.0 and bool((grad == 0).all())
    # REG still covers every pixel: its gradient is -GRAD_OUT * reg_weight / (B C H W) (1 - C p)
    loss, grad = check_against_reference(logits, target, backend, alpha=0.1, beta=1.0, reg_weight=0.5)
    p = torch.softmax(logits.double(), 1)
    assert_close_spec(grad, -GRAD_OUT * 0.5 / logits.numel() * (1 - num_classes * p))
    assert loss.item() > 0


@pytest.mark.parametrize("device, backend", PAIRS)
def test_every_pixel_ignored_uint8_noncontiguous(device, backend):
    logits = noncontiguous(torch.randn(2, 19, 13, 17).to(device))
    target = torch.full((2, 13, 17), 255, dtype=torch.uint8).to(device)
    loss, grad = loss_and_grad(logits, target, backend)
    assert loss.item() == 0.0 and not grad.any()
    loss, grad = loss_and_grad(logits, target, backend, reg_weight=0.5)
    ref_loss, ref_grad = expected(logits, target, reg_weight=0.5)
    assert_close_spec(loss, ref_loss)
    assert_grad_close_spec(grad, ref_grad)


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clamp_lower_boundary(device, backend, dtype):
    """Gaps of 14..18 between the top logit and the rest put p_k on both sides of 1e-7, where the
    RCE gradient switches off; gaps within 2e-3 of -log(1e-7) = 16.118 are left out, so float32
    rounding cannot flip the side."""
    b, c, h, w = 2, 19, 16, 24
    gap = 14 + 4 * torch.rand(b, c, h, w, dtype=torch.float64)
    gap[(gap - 16.118).abs() < 2e-3] = 15.0
    top = torch.randint(0, c, (b, 1, h, w))
    logits = torch.where(torch.arange(c).view(1, c, 1, 1) == top, 0.0, -gap).to(dtype)
    # targets on the top class, on a low class, or ignored
    target = torch.where(torch.rand(b, h, w) < 0.5, top[:, 0], torch.randint(0, c, (b, h, w)))
    target[torch.rand(b, h, w) < 0.1] = 255
    p = torch.softmax(logits.double(), 1)
    assert bool((p < 1e-7).any()) and bool(((p > 1e-7) & (p < 1e-6)).any())
    logits, target = logits.to(device), target.to(device)
    for weights in WEIGHTS:
        alpha, beta, reg_weight = weights
        check_against_reference(logits, target, backend, alpha=alpha, beta=beta, reg_weight=reg_weight)


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_probability_exactly_one(device, backend, dtype):
    """A gap of 200 makes the top probability exactly 1 (the clamp's upper boundary) in both dtypes."""
    logits = torch.full((1, 19, 5, 6), -200.0, dtype=dtype)
    logits[:, 3] = 0.0
    target = torch.randint(0, 19, (1, 5, 6))
    target[0, 0, :3] = 3
    assert bool((torch.softmax(logits, 1)[:, 3] == 1).all())
    loss, _ = check_against_reference(logits.to(device), target.to(device), backend, alpha=0.1, beta=1.0, reg_weight=0.1)
    assert math.isfinite(loss.item())


@pytest.mark.parametrize("device, backend", PAIRS)
def test_extreme_logits(device, backend):
    logits = torch.randn(2, 19, 8, 8) * 60  # log-softmax down to about -500: still finite
    target = make_target(2, 19, 8, 8)
    check_against_reference(logits.to(device), target.to(device), backend, alpha=0.1, beta=1.0, reg_weight=0.1)


@pytest.mark.parametrize("device, backend", PAIRS)
def test_out_of_range_labels_skipped(device, backend, no_validation):
    """With validation off, labels outside [0, C) are skipped like ignore_index (and never indexed)."""
    logits = torch.randn(2, 19, 10, 12)
    target = make_target(2, 19, 10, 12)
    bad = target.clone()
    bad[0, 0, :4] = torch.tensor([19, -1, 100, 10**12])
    bad[1, 3, 5] = -(10**12)
    cleaned = torch.where((bad < 0) | (bad >= 19), 255, bad)
    logits, bad, cleaned = logits.to(device), bad.to(device), cleaned.to(device)
    loss, grad = loss_and_grad(logits, bad, backend, reg_weight=0.1)
    ref_loss, ref_grad = expected(logits, cleaned, reg_weight=0.1)
    assert_close_spec(loss, ref_loss, "loss")
    assert_grad_close_spec(grad, ref_grad)


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("shape", [(0, 19, 4, 4), (2, 19, 0, 5), (1, 16, 3, 0)])
def test_empty(device, backend, shape):
    """No pixel: the loss is 0 (REG, a mean over no element, is left out rather than NaN)."""
    logits = torch.randn(shape)
    target = torch.zeros(shape[0], shape[2], shape[3], dtype=torch.int64)
    loss, grad = loss_and_grad(logits.to(device), target.to(device), backend, reg_weight=0.1)
    assert loss.item() == 0.0
    assert grad.shape == logits.shape


@pytest.mark.parametrize("device, backend", PAIRS)
def test_bitwise_reproducible(device, backend):
    """Two runs, and runs on 1 and 2 threads, agree bit for bit."""
    logits = torch.randn(2, 19, 64, 97) * 3
    target = make_target(2, 19, 64, 97)
    logits, target = logits.to(device), target.to(device)
    assert_reproducible(lambda: loss_and_grad(logits, target, backend, reg_weight=0.1))


@pytest.mark.parametrize("device, backend", TRITON)
@pytest.mark.parametrize("tile", [(64, 2048), (4096, 512)], ids=["2-pixel-tiles", "gpu-tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_tile_sizes(device, backend, tile, dtype, monkeypatch):
    """Other tilings than the interpreter's default: tiles of 2 pixels (tiles that do not divide a
    plane; more programs than a finalize block of 4 partials, the last block partial) and the GPU's."""
    import udafast.kernels.common as common  # the tiling of both losses
    import udafast.kernels.sce_loss as module
    monkeypatch.setattr(common, "TILE_ELEMENTS", tile[0])
    monkeypatch.setattr(common, "MAX_BLOCK_P", tile[1])
    monkeypatch.setattr(module, "FINALIZE_BLOCK", 4)
    logits = torch.randn(2, 19, 3, 7, dtype=dtype) * 4
    target = make_target(2, 19, 3, 7)
    check_against_reference(logits.to(device), target.to(device), backend, alpha=0.1, beta=1.0, reg_weight=0.1)


@pytest.mark.parametrize("device, backend", TRITON)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_reduced_precision(device, backend, dtype):
    """SPEC 1.5 for float16/bfloat16 (CUDA only in the public API; the op itself, on CPU under
    the interpreter): float32 loss, gradient in the logits' dtype, the max abs errors against the
    float64 reference at most twice the reference's own in that precision."""
    logits = (torch.randn(2, 19, 13, 21, dtype=torch.float64) * 3).to(dtype).to(device)
    target = make_target(2, 19, 13, 21).to(device)
    args = (target, 0.1, 1.0, 0.1, 255)

    def run(fn, x):
        x = x.detach().clone().requires_grad_()
        out = fn(x, *args)
        loss = out[0] if isinstance(out, tuple) else out
        (loss * GRAD_OUT).backward()
        return loss.detach(), x.grad

    loss, grad = run(torch.ops.udafast_triton.sce_loss, logits)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    ref_loss, ref_grad = run(udafast.ops.reference.sce_loss, logits.double())
    low_loss, low_grad = run(udafast.ops.reference.sce_loss, logits)
    assert (loss.double() - ref_loss).abs() <= 2 * (low_loss.double() - ref_loss).abs()
    assert (grad.double() - ref_grad).abs().max() <= 2 * (low_grad.double() - ref_grad).abs().max()


@pytest.mark.parametrize("device, backend", CUDA_PAIRS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_within_twice_the_reference_error(device, backend, dtype):
    """SPEC 1.5 for float16/bfloat16 through the public API (CUDA only): the max abs errors of the
    loss and the gradient against the float64 reference at most twice the reference's own in that
    precision."""
    logits = (torch.randn((2, 19, 45, 61), generator=gen(), dtype=torch.float64) * 4).to(device)
    target = random_labels((2, 45, 61), 19).to(device)
    exact_loss, exact_grad = loss_and_grad(logits, target, "reference", reg_weight=0.1)
    low_loss, low_grad = loss_and_grad(logits.to(dtype), target, "reference", reg_weight=0.1)
    loss, grad = loss_and_grad(logits.to(dtype), target, backend, reg_weight=0.1)
    assert max_error(loss, exact_loss) <= 2 * max_error(low_loss, exact_loss), "value"
    assert max_error(grad, exact_grad) <= 2 * max_error(low_grad, exact_grad), "gradient"


@pytest.mark.parametrize("device, backend", PAIRS)
def test_lse_and_count(device, backend):
    """The compiled op's extra outputs: the per-pixel log-sum-exp and the valid-pixel count."""
    logits = torch.randn(2, 19, 6, 7) * 5
    target = make_target(2, 19, 6, 7)
    logits, target = logits.to(device), target.to(device)
    _, lse, count = compiled_ops(backend).sce_loss(logits, target, 0.1, 1.0, 0.0, 255)
    assert count.dtype == torch.int64 and count.item() == int((target != 255).sum())
    assert_close_spec(lse, torch.logsumexp(logits.double(), 1), "lse")


@pytest.mark.parametrize("device, backend", PAIRS)
@given(
    b=st.integers(1, 2), c=st.integers(1, 20), h=st.integers(1, 9), w=st.integers(1, 70),
    scale=st.sampled_from([0.1, 3.0, 30.0]), ignore_fraction=st.sampled_from([0.0, 0.3, 1.0]),
    weights=st.sampled_from(WEIGHTS),
)
@settings(max_examples=25, deadline=None)
def test_property_matches_reference(device, backend, b, c, h, w, scale, ignore_fraction, weights):
    logits = torch.randn(b, c, h, w) * scale
    target = make_target(b, c, h, w, ignore_fraction)
    alpha, beta, reg_weight = weights
    check_against_reference(logits.to(device), target.to(device), backend, alpha=alpha, beta=beta, reg_weight=reg_weight)


@pytest.mark.parametrize("device, backend", PAIRS)
def test_gradcheck(device, backend):
    logits = torch.randn(2, 5, 3, 4, dtype=torch.float64).to(device).requires_grad_()
    target = make_target(2, 5, 3, 4, 0.3).to(device)
    assert torch.autograd.gradcheck(
        lambda x: sce_loss(x, target, alpha=0.3, beta=1.0, reg_weight=0.2, backend=backend), (logits,)
    )


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(device, backend, dtype):
    logits = torch.randn(2, 19, 5, 6, dtype=dtype).to(device).requires_grad_()
    target = make_target(2, 19, 5, 6).to(device)
    torch.library.opcheck(compiled_ops(backend).sce_loss.default, (logits, target, 0.1, 1.0, 0.1, 255))


@pytest.mark.parametrize("device, backend", PAIRS)
def test_compile_fullgraph(device, backend, no_validation):
    logits = torch.randn(2, 19, 8, 11) * 3
    target = make_target(2, 19, 8, 11)
    logits, target = logits.to(device), target.to(device)

    def step(x):
        return sce_loss(x, target, alpha=0.1, beta=1.0, reg_weight=0.1, backend=backend)

    compiled = torch.compile(step, fullgraph=True)
    x_eager = logits.clone().requires_grad_()
    x_compiled = logits.clone().requires_grad_()
    eager, got = step(x_eager), compiled(x_compiled)
    (eager * GRAD_OUT).backward()
    (got * GRAD_OUT).backward()
    assert torch.equal(eager, got)
    assert torch.equal(x_eager.grad, x_compiled.grad)
