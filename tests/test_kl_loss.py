"""SPEC 1.4: kl_loss, KL(target || softmax(logits)) over valid pixels, every fast backend against the reference."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_close_spec, assert_grad_close_spec_representable, assert_reproducible, backend_params, compiled_ops, gen, max_error, noncontiguous, on
from udafast.ops.kl_loss import kl_loss

PAIRS = backend_params("kl_loss")
TRITON = backend_params("kl_loss", devices=("cpu",), backends=("triton",))
CUDA_PAIRS = backend_params("kl_loss", devices=("cuda",))

GRAD_OUT = 3.7  # the loss is scaled before backward so that grad_loss != 1
MASKS = ["none", "partial", "all_false", "all_true"]


def make_mask(kind, b, h, w):
    if kind == "none":
        return None
    if kind == "partial":
        return torch.rand(b, h, w) < 0.6
    return torch.full((b, h, w), kind == "all_true")


def make_target(shape, zeros=0.2, normalised=True, dtype=torch.float32):
    t = torch.softmax(torch.randn(shape, dtype=torch.float64) * 2, 1)
    t[torch.rand(shape) < zeros] = 0  # t log t = 0 where t == 0
    if normalised:
        t = t / t.sum(1, keepdim=True).clamp(min=1e-12)
    else:
        t = t * (0.5 + torch.rand(shape[0], 1, *shape[2:], dtype=torch.float64))
    return t.to(dtype)


def loss_and_grad(logits, target, valid_mask, backend):
    x = logits.detach().clone().requires_grad_()
    loss = kl_loss(x, target, valid_mask=valid_mask, backend=backend)
    (loss * GRAD_OUT).backward()
    return loss.detach(), x.grad


def check_against_reference(logits, target, valid_mask, backend):
    """Against the reference on float64 copies of the logits and the targets."""
    loss, grad = loss_and_grad(logits, target, valid_mask, backend)
    ref_loss, ref_grad = loss_and_grad(logits.double(), target.double(), valid_mask, "reference")
    assert loss.dtype == logits.dtype and loss.dim() == 0 and grad.dtype == logits.dtype
    assert_close_spec(loss, ref_loss, "loss")
    assert_grad_close_spec_representable(grad, ref_grad)
    return loss, grad


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 19, 127, 33), (1, 16, 1, 1), (1, 19, 9, 70), (3, 16, 5, 7)])
@pytest.mark.parametrize("mask", MASKS)
def test_matches_reference(device, backend, dtype, shape, mask):
    logits = torch.randn(shape, dtype=dtype) * 3
    target = make_target(shape, dtype=dtype)
    valid_mask = make_mask(mask, shape[0], shape[2], shape[3])
    logits, target, valid_mask = on(device, logits, target, valid_mask)
    loss, grad = check_against_reference(logits, target, valid_mask, backend)
    if mask == "all_false":
        assert loss.item() == 0.0 and bool((grad == 0).all())
    if valid_mask is not None:
        assert bool((grad.permute(1, 0, 2, 3)[:, ~valid_mask] == 0).all())


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("zeros", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("normalised", [True, False])
def test_targets(device, backend, zeros, normalised):
    """Targets with zeros (t log t = 0; all zero at 1.0) and targets that do not sum to 1."""
    shape = (2, 19, 13, 17)
    logits = torch.randn(shape) * 3
    target = make_target(shape, zeros=zeros, normalised=normalised)
    check_against_reference(*on(device, logits, target, make_mask("partial", 2, 13, 17)), backend)


@pytest.mark.parametrize("device, backend", PAIRS)
def test_target_dtype_differs(device, backend):
    """float64 targets with float32 logits: the reference casts the targets to the logits' dtype."""
    shape = (2, 16, 9, 11)
    logits = torch.randn(shape) * 3
    target = make_target(shape, dtype=torch.float64)
    logits, target = on(device, logits, target)
    loss, grad = loss_and_grad(logits, target, None, backend)
    same_loss, same_grad = loss_and_grad(logits, target.float(), None, backend)
    assert torch.equal(loss, same_loss) and torch.equal(grad, same_grad)


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noncontiguous(device, backend, dtype):
    shape = (2, 19, 11, 23)
    logits = torch.randn(shape, dtype=dtype) * 3
    target = make_target(shape, dtype=dtype)
    mask = make_mask("partial", 2, 11, 23)
    logits, target, mask = on(device, logits, target, mask)
    loss, grad = check_against_reference(noncontiguous(logits), noncontiguous(target), noncontiguous(mask), backend)
    contiguous = loss_and_grad(logits, target, mask, backend)
    assert torch.equal(loss, contiguous[0]) and torch.equal(grad, contiguous[1])


@pytest.mark.parametrize("device, backend", PAIRS)
def test_channels_last(device, backend):
    """The gradient keeps the logits' layout, as the fake kernel's empty_like declares."""
    shape = (2, 16, 7, 9)
    logits = (torch.randn(shape) * 3).to(memory_format=torch.channels_last)
    target = make_target(shape).to(memory_format=torch.channels_last)
    _, grad = check_against_reference(*on(device, logits, target), None, backend)
    assert grad.stride() == logits.stride()


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("scale", [30.0, 100.0])
def test_extreme_logits(device, backend, scale):
    """Confident students: softmax probabilities underflow, log-softmax stays finite."""
    shape = (2, 19, 8, 8)
    logits = torch.randn(shape) * scale
    target = make_target(shape)
    check_against_reference(*on(device, logits, target, make_mask("partial", 2, 8, 8)), backend)


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_saturated_one_hot_targets(device, backend, dtype):
    """Confident students (gaps of 5..40 between the top logit and the rest) and one-hot targets on
    the top class: the KL is about log1p(sum of the other probabilities), tiny but resolved.
    log(sum exp(z - max)) rounds to 0 in float32 once the top probability rounds to 1 (a gap of
    about 17; the relative error passes 1e-5 from a gap of about 6); the backends sum the classes
    below the max and take log1p, and so does the float64 reference (log_softmax loses the digits
    beyond a gap of about 25)."""
    b, c, h, w = 2, 5, 6, 7
    gap = 5 + 35 * torch.rand(b, c, h, w, dtype=torch.float64)
    top = torch.randint(0, c, (b, 1, h, w))
    is_top = torch.arange(c).view(1, c, 1, 1) == top
    logits = torch.where(is_top, 0.0, -gap).to(dtype)
    target = is_top.to(dtype)
    loss, grad = check_against_reference(*on(device, logits, target, make_mask("partial", b, h, w)), backend)
    assert loss.item() > 0


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gap", [3.0, 12.0, 30.0, 45.0, 80.0])
def test_saturated_two_classes_closed_form(device, backend, dtype, gap):
    """One pixel, two classes, the target on the top class: KL = log1p(exp(-gap)) / 2 and the
    gradient (-/+) exp(-gap) / (1 + exp(-gap)) / 2, for the reference (checked against the closed
    form) and the backend (against the reference). The property test drew such pixels (scale 30)."""
    logits = torch.tensor([0.5, 0.5 - gap], dtype=torch.float64).view(1, 2, 1, 1)
    target = torch.tensor([1.0, 0.0], dtype=torch.float64).view(1, 2, 1, 1)
    ref_loss, ref_grad = loss_and_grad(logits, target, None, "reference")
    x = math.exp(-gap)
    expected_grad = torch.tensor([-1.0, 1.0], dtype=torch.float64).view(1, 2, 1, 1) * (GRAD_OUT * x / (1 + x) / 2)
    assert abs(ref_loss.item() - math.log1p(x) / 2) <= 1e-14 * math.log1p(x)
    torch.testing.assert_close(ref_grad, expected_grad, rtol=1e-14, atol=0)
    check_against_reference(*on(device, logits.to(dtype), target.to(dtype)), None, backend)


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tied_maxima(device, backend, dtype):
    """Pixels whose maximum is tied (two classes, or all of them equal) with one-hot and soft
    targets: the first maximum is left out of the sum of the others once, the other ties count."""
    b, c, h, w = 2, 6, 4, 5
    logits = (torch.randn(b, c, h, w, dtype=torch.float64) * 3).round()  # many ties
    logits[0, :, 0, 0] = 2.0  # all classes tied
    logits[1, :, 1, 1] = -30.0
    logits[1, [1, 4], 1, 1] = 0.0  # two tied maxima, the rest saturated
    target = make_target((b, c, h, w), dtype=torch.float64)
    target[1, :, 1, 1] = 0.0
    target[1, 4, 1, 1] = 1.0  # one-hot on the second tie
    target[0, :, 2, 2] = 0.0
    target[0, logits[0, :, 2, 2].argmax(), 2, 2] = 1.0  # one-hot on the (first) top class
    mask = make_mask("partial", b, h, w)
    # the reference's autograd gradient at ties: (q_j T - t_j) / (n C), routed to the first maximum
    # only through the max it subtracts, equals the formula's (no pixel here saturates to 1e-16)
    _, ref_grad = loss_and_grad(logits, target, mask, "reference")
    formula = torch.softmax(logits, 1) * target.sum(1, keepdim=True) - target
    formula = GRAD_OUT * torch.where(mask.unsqueeze(1), formula, 0) / (mask.sum() * c)
    torch.testing.assert_close(ref_grad, formula, rtol=1e-12, atol=1e-15)
    check_against_reference(*on(device, logits.to(dtype), target.to(dtype), mask), backend)


@pytest.mark.parametrize("device, backend", PAIRS)
def test_student_equals_teacher(device, backend):
    """t = softmax(logits): the loss is (close to) 0 and so is the gradient."""
    logits = torch.randn(2, 19, 6, 10, dtype=torch.float64) * 2
    target = torch.softmax(logits, 1)
    loss, grad = loss_and_grad(*on(device, logits, target), None, backend)
    assert abs(loss.item()) < 1e-12 and grad.abs().max().item() < 1e-12


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("shape", [(0, 19, 4, 4), (2, 19, 0, 5), (1, 16, 3, 0)])
def test_empty(device, backend, shape):
    logits = torch.randn(shape)
    loss, grad = loss_and_grad(*on(device, logits, torch.rand(shape)), None, backend)
    assert loss.item() == 0.0 and grad.shape == logits.shape


@pytest.mark.parametrize("device, backend", PAIRS)
def test_bitwise_reproducible(device, backend):
    """Two runs, and runs on 1 and 2 threads, agree bit for bit."""
    shape = (2, 19, 64, 97)
    logits = torch.randn(shape) * 3
    target = make_target(shape)
    mask = make_mask("partial", 2, 64, 97)
    logits, target, mask = on(device, logits, target, mask)
    assert_reproducible(lambda: loss_and_grad(logits, target, mask, backend))


@pytest.mark.parametrize("device, backend", TRITON)
@pytest.mark.parametrize("tile", [(64, 2048), (4096, 512)], ids=["2-pixel-tiles", "gpu-tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_tile_sizes(device, backend, tile, dtype, monkeypatch):
    """Other tilings than the interpreter's default: tiles of 2 pixels (tiles that do not divide a
    plane; more programs than a finalize block of 4 partials, the last block partial) and the GPU's."""
    import udafast.kernels.common as common  # the tiling of both losses
    import udafast.kernels.kl_loss
    monkeypatch.setattr(common, "TILE_ELEMENTS", tile[0])
    monkeypatch.setattr(common, "MAX_BLOCK_P", tile[1])
    monkeypatch.setattr(udafast.kernels.kl_loss, "FINALIZE_BLOCK", 4)
    shape = (2, 19, 3, 7)
    logits = torch.randn(shape, dtype=dtype) * 3
    target = make_target(shape, dtype=dtype)
    check_against_reference(*on(device, logits, target, make_mask("partial", 2, 3, 7)), backend)


@pytest.mark.parametrize("device, backend", TRITON)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_reduced_precision(device, backend, dtype):
    """SPEC 1.5 for float16/bfloat16 (CUDA only in the public API; the op itself, on CPU under
    the interpreter): float32 loss, gradient in the logits' dtype, the max abs errors against the
    float64 reference at most twice the reference's own in that precision."""
    from udafast.ops import reference
    shape = (2, 19, 13, 21)
    logits = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
    target = make_target(shape, dtype=dtype)
    mask = make_mask("partial", 2, 13, 21)
    logits, target, mask = on(device, logits, target, mask)

    def run(fn, x, t):
        x = x.detach().clone().requires_grad_()
        out = fn(x, t, mask)
        loss = out[0] if isinstance(out, tuple) else out
        (loss * GRAD_OUT).backward()
        return loss.detach(), x.grad

    loss, grad = run(torch.ops.udafast_triton.kl_loss, logits, target)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    ref_loss, ref_grad = run(reference.kl_loss, logits.double(), target.double())
    low_loss, low_grad = run(reference.kl_loss, logits, target)
    assert (loss.double() - ref_loss).abs() <= 2 * (low_loss.double() - ref_loss).abs()
    assert (grad.double() - ref_grad).abs().max() <= 2 * (low_grad.double() - ref_grad).abs().max()


@pytest.mark.parametrize("device, backend", CUDA_PAIRS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_within_twice_the_reference_error(device, backend, dtype):
    """SPEC 1.5 for float16/bfloat16 through the public API (CUDA only): the max abs errors of the
    loss and the gradient against the float64 reference at most twice the reference's own in that
    precision (the targets in the logits' dtype)."""
    shape = (2, 19, 45, 61)
    logits = (torch.randn(shape, generator=gen(), dtype=torch.float64) * 4).to(device)
    target = (torch.randn(shape, generator=gen(1), dtype=torch.float64) * 3).softmax(1).float().to(device)
    exact_loss, exact_grad = loss_and_grad(logits, target.double(), None, "reference")
    low_loss, low_grad = loss_and_grad(logits.to(dtype), target.to(dtype), None, "reference")
    loss, grad = loss_and_grad(logits.to(dtype), target.to(dtype), None, backend)
    assert max_error(loss, exact_loss) <= 2 * max_error(low_loss, exact_loss), "value"
    assert max_error(grad, exact_grad) <= 2 * max_error(low_grad, exact_grad), "gradient"


@pytest.mark.parametrize("device, backend", PAIRS)
def test_lse_and_count(device, backend):
    """The compiled op's extra outputs: the per-pixel log-sum-exp and the valid-pixel count."""
    ops = compiled_ops(backend)
    logits = torch.randn(2, 19, 6, 7) * 5
    mask = make_mask("partial", 2, 6, 7)
    logits, mask = on(device, logits, mask)
    _, lse, count = ops.kl_loss(logits, make_target(logits.shape).to(device), mask)
    assert count.dtype == torch.int64 and count.item() == int(mask.sum())
    assert_close_spec(lse, torch.logsumexp(logits.double(), 1), "lse")
    assert ops.kl_loss(logits, make_target(logits.shape).to(device), None)[2].item() == 2 * 6 * 7


@pytest.mark.parametrize("device, backend", PAIRS)
@given(
    b=st.integers(1, 2), c=st.integers(1, 20), h=st.integers(1, 9), w=st.integers(1, 70),
    scale=st.sampled_from([0.1, 3.0, 30.0]), zeros=st.sampled_from([0.0, 0.3]),
    normalised=st.booleans(), mask=st.sampled_from(MASKS),
)
@settings(max_examples=25, deadline=None)
def test_property_matches_reference(device, backend, b, c, h, w, scale, zeros, normalised, mask):
    shape = (b, c, h, w)
    logits = torch.randn(shape) * scale
    target = make_target(shape, zeros=zeros, normalised=normalised)
    check_against_reference(*on(device, logits, target, make_mask(mask, b, h, w)), backend)


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("mask", ["none", "partial"])
def test_gradcheck(device, backend, mask):
    shape = (2, 5, 3, 4)
    logits = torch.randn(shape, dtype=torch.float64).to(device).requires_grad_()
    target = make_target(shape, normalised=False, dtype=torch.float64).to(device)
    valid_mask, = on(device, make_mask(mask, 2, 3, 4))
    assert torch.autograd.gradcheck(lambda x: kl_loss(x, target, valid_mask=valid_mask, backend=backend), (logits,))


@pytest.mark.parametrize("device, backend", PAIRS)
@pytest.mark.parametrize("mask", ["none", "partial"])
def test_opcheck(device, backend, mask):
    logits = torch.randn(2, 19, 5, 6).to(device).requires_grad_()
    target = make_target(logits.shape).to(device)
    torch.library.opcheck(compiled_ops(backend).kl_loss.default, (logits, target, *on(device, make_mask(mask, 2, 5, 6))))


@pytest.mark.parametrize("device, backend", PAIRS)
def test_compile_fullgraph(device, backend):
    shape = (2, 19, 8, 11)
    logits = torch.randn(shape) * 3
    target = make_target(shape)
    mask = make_mask("partial", 2, 8, 11)
    logits, target, mask = on(device, logits, target, mask)

    def step(x):
        return kl_loss(x, target, valid_mask=mask, backend=backend)

    compiled = torch.compile(step, fullgraph=True)
    x_eager = logits.clone().requires_grad_()
    x_compiled = logits.clone().requires_grad_()
    eager, got = step(x_eager), compiled(x_compiled)
    (eager * GRAD_OUT).backward()
    (got * GRAD_OUT).backward()
    assert torch.equal(eager, got)
    assert torch.equal(x_eager.grad, x_compiled.grad)
