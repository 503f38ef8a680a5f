"""The GPU backends (native CUDA kernels and Triton) on a CUDA device.

Every op against the float64 reference on SPEC 1.5's tolerances (odd shapes, non-contiguous
inputs, empty classes, ties, all-ignored pixels, extreme logits); float16/bfloat16 held to twice
the error of the reference run in that precision; outputs bitwise the same from run to run; no host
synchronisation; CUDA-graph capture; torch.compile(fullgraph=True) over every op; at most three
kernel launches for the selections. Runs only where a GPU is present (see benchmarks/README.md
for the GPU run); the CPU machines prove the same kernels through the Triton interpreter and the
CUDA compile step of .ci/run.
"""
import pytest
import torch

import udafast.ops as ops
from conftest import assert_close_spec, assert_grad_close_spec, fast_backends, noncontiguous
from udafast.ops import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
REDUCED = [torch.float16, torch.bfloat16]


def backends(op):
    return fast_backends(op, "cuda") if torch.cuda.is_available() else []


@pytest.fixture
def no_validation():
    before = ops.get_validation()
    ops.set_validation(False)
    yield
    ops.set_validation(before)


def gen(seed=0):
    return torch.Generator(device="cpu").manual_seed(seed)


def labels(shape, num_classes, ignore_fraction=0.2, seed=0, dtype=torch.int64):
    g = gen(seed)
    out = torch.randint(0, num_classes, shape, generator=g)
    out[torch.rand(shape, generator=g) < ignore_fraction] = 255
    return out.to(dtype).to(CUDA)


def softmax_input(shape, seed=0, scale=3.0, dtype=torch.float32):
    return (torch.randn(shape, generator=gen(seed), dtype=torch.float64) * scale).softmax(1).to(dtype).to(CUDA)


def grad_of(fn, x):
    """fn(x) and the gradient of <fn(x), g> for a fixed random g (3.7 for a scalar): softmaxes
    sum to 1 over classes, so a plain sum would have a zero gradient."""
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    g = torch.randn(out.shape, generator=gen(99), dtype=torch.float64).to(out.device) if out.dim() else 3.7
    (out * g).sum().backward()
    return out.detach(), x.grad


# ---- losses ----------------------------------------------------------------------------------

LOSS_SHAPES = [(2, 19, 127, 33), (1, 16, 1, 1), (3, 19, 9, 70)]


@pytest.mark.parametrize("backend", backends("sce_loss"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", LOSS_SHAPES)
@pytest.mark.parametrize("scale", [4.0, 200.0])
def test_sce_loss(backend, dtype, shape, scale):
    logits = (torch.randn(shape, generator=gen(), dtype=torch.float64) * scale).to(CUDA)
    target = labels((shape[0], shape[2], shape[3]), shape[1])
    kw = dict(alpha=0.1, beta=1.0, reg_weight=0.1)
    loss, grad = grad_of(lambda x: ops.sce_loss(x, target, backend=backend, **kw), logits.to(dtype))
    ref_loss, ref_grad = grad_of(lambda x: ops.sce_loss(x, target, backend="reference", **kw), logits)
    assert_close_spec(loss, ref_loss, "loss")
    assert_grad_close_spec(grad, ref_grad)


@pytest.mark.parametrize("backend", backends("sce_loss"))
def test_sce_loss_all_ignored_and_noncontiguous(backend):
    logits = noncontiguous(torch.randn(2, 19, 13, 17, device=CUDA))
    target = torch.full((2, 13, 17), 255, device=CUDA, dtype=torch.uint8)
    loss, grad = grad_of(lambda x: ops.sce_loss(x, target, backend=backend), logits)
    assert loss.item() == 0.0 and not grad.any()
    loss, grad = grad_of(lambda x: ops.sce_loss(x, target, reg_weight=0.5, backend=backend), logits)
    ref_loss, ref_grad = grad_of(lambda x: ops.sce_loss(x, target, reg_weight=0.5, backend="reference"), logits.double())
    assert_close_spec(loss, ref_loss)
    assert_grad_close_spec(grad, ref_grad)


@pytest.mark.parametrize("backend", backends("kl_loss"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", LOSS_SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_kl_loss(backend, dtype, shape, masked):
    b, c, h, w = shape
    logits = (torch.randn(shape, generator=gen(), dtype=torch.float64) * 4).to(CUDA)
    target = softmax_input(shape, seed=1)
    target[:, 0][torch.rand(b, h, w, generator=gen(2)).to(CUDA) < 0.3] = 0.0  # t log t = 0
    mask = (torch.rand(b, h, w, generator=gen(3)) < 0.7).to(CUDA) if masked else None
    loss, grad = grad_of(lambda x: ops.kl_loss(x, target, valid_mask=mask, backend=backend), logits.to(dtype))
    ref_loss, ref_grad = grad_of(lambda x: ops.kl_loss(x, target.double(), valid_mask=mask, backend="reference"), logits)
    assert_close_spec(loss, ref_loss, "loss")
    assert_grad_close_spec(grad, ref_grad)


@pytest.mark.parametrize("backend", backends("kl_loss"))
def test_kl_loss_no_valid_pixel(backend):
    logits = torch.randn(2, 19, 5, 6, device=CUDA)
    mask = torch.zeros(2, 5, 6, dtype=torch.bool, device=CUDA)
    loss, grad = grad_of(lambda x: ops.kl_loss(x, softmax_input((2, 19, 5, 6)), valid_mask=mask, backend=backend), logits)
    assert loss.item() == 0.0 and not grad.any()


# ---- prototypes ------------------------------------------------------------------------------

PROTO_SHAPES = [(2, 19, 64, 17, 23), (1, 16, 256, 1, 1), (2, 7, 33, 9, 70)]  # B, C, D, H, W


def features_and_prototypes(b, c, d, h, w, dtype=torch.float64):
    features = torch.randn(b, d, h, w, generator=gen(), dtype=torch.float64)
    prototypes = torch.randn(c, d, generator=gen(1), dtype=torch.float64)
    features[0, :, 0, 0] = prototypes[min(1, c - 1)]  # a feature equal to a prototype: d = 0
    return features.to(dtype).to(CUDA), prototypes.to(dtype).to(CUDA)


@pytest.mark.parametrize("backend", backends("prototype_softmax"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", PROTO_SHAPES)
@pytest.mark.parametrize("log", [False, True])
def test_prototype_softmax(backend, dtype, shape, log):
    features, prototypes = features_and_prototypes(*shape)
    out, grad = grad_of(lambda x: ops.prototype_softmax(x, prototypes.to(dtype), 0.7, log=log, backend=backend), features.to(dtype))
    ref, ref_grad = grad_of(lambda x: ops.prototype_softmax(x, prototypes, 0.7, log=log, backend="reference"), features)
    assert_close_spec(out, ref)
    assert_grad_close_spec(grad, ref_grad)


@pytest.mark.parametrize("backend", backends("prototype_softmax"))
def test_prototype_softmax_noncontiguous(backend):
    features, prototypes = features_and_prototypes(2, 19, 32, 11, 13, torch.float32)
    out = ops.prototype_softmax(noncontiguous(features), prototypes, backend=backend)
    assert_close_spec(out, ops.prototype_softmax(features.double(), prototypes.double(), backend="reference"))
    out = ops.prototype_softmax(features.to(memory_format=torch.channels_last), prototypes, backend=backend)
    assert_close_spec(out, ops.prototype_softmax(features.double(), prototypes.double(), backend="reference"))


@pytest.mark.parametrize("backend", backends("prototype_rectify"))
@pytest.mark.parametrize("shape", PROTO_SHAPES)
def test_prototype_rectify(backend, shape):
    b, c, d, h, w = shape
    features, prototypes = features_and_prototypes(*shape, dtype=torch.float32)
    soft = softmax_input((b, c, h, w))
    got = ops.prototype_rectify(features, prototypes, soft, 0.5, backend=backend)
    weighted = reference.prototype_softmax(features.double(), prototypes.double(), 0.5) * soft.double()
    top2 = weighted.topk(min(2, c), dim=1).values
    close = (top2[:, 0] - top2[:, -1]).abs() <= 1e-6 * top2[:, 0].abs() if c > 1 else torch.zeros_like(got, dtype=torch.bool)
    assert torch.equal(got[~close], weighted.argmax(1)[~close])


@pytest.mark.parametrize("backend", backends("class_feature_sums"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", PROTO_SHAPES)
def test_class_feature_sums(backend, dtype, shape):
    b, c, d, h, w = shape
    features, _ = features_and_prototypes(*shape)
    lab = labels((b, h, w), c - 1, dtype=torch.int32)  # class c-1 stays empty
    sums, counts = ops.class_feature_sums(features.to(dtype), lab, c, backend=backend)
    ref_sums, ref_counts = ops.class_feature_sums(features, lab, c, backend="reference")
    assert torch.equal(counts, ref_counts) and not counts[:, c - 1].any()
    assert_close_spec(sums, ref_sums)


# ---- selections ------------------------------------------------------------------------------


def confidences(n, seed=0, dtype=torch.float32, ties=True):
    g = gen(seed)
    conf = torch.rand(n, generator=g, dtype=torch.float64)
    if ties:  # many exact ties, exact 0 and 1
        conf[: n // 3] = torch.round(conf[: n // 3] * 16) / 16
    return conf.to(dtype).to(CUDA)


@pytest.mark.parametrize("backend", backends("class_thresholds"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 1000, 100_003])
@pytest.mark.parametrize("portion", [0.0, 0.2, 0.5, 1.0])
def test_class_thresholds_exact(backend, dtype, n, portion):
    conf = confidences(n, dtype=dtype)
    pred = labels((n,), 18, ignore_fraction=0.1, seed=1, dtype=torch.uint8)  # class 18 empty
    got = ops.class_thresholds(conf, pred, 19, portion, backend=backend)
    want = reference.class_thresholds(conf.cpu(), pred.cpu(), 19, portion)
    assert got.dtype == dtype and torch.equal(got.cpu(), want)


@pytest.mark.parametrize("backend", backends("class_histogram_add_"))
def test_streaming_thresholds(backend):
    stream = ops.ClassThresholds(19, bins=1024, device=CUDA, backend=backend)
    cpu = ops.ClassThresholds(19, bins=1024, backend="reference")
    for seed in range(3):
        conf = confidences(5000, seed=seed).view(2, 50, 50)
        pred = labels((2, 50, 50), 19, seed=seed)
        stream.update(noncontiguous(conf), pred)
        cpu.update(conf.cpu(), pred.cpu())
    assert torch.equal(stream.state_dict()["counts"].cpu(), cpu.state_dict()["counts"])
    assert torch.equal(stream.thresholds(0.3).cpu(), cpu.thresholds(0.3))


@pytest.mark.parametrize("backend", backends("cbst_pseudo_labels"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cbst_pseudo_labels(backend, dtype):
    probs = softmax_input((2, 19, 37, 41), dtype=dtype)
    thresholds = torch.rand(19, generator=gen(4), dtype=torch.float64).clamp_min(0.05).to(dtype).to(CUDA)
    thresholds[3] = 1.0
    got = ops.cbst_pseudo_labels(probs, thresholds, backend=backend)
    assert torch.equal(got.cpu(), reference.cbst_pseudo_labels(probs.cpu(), thresholds.cpu()))


@pytest.mark.parametrize("backend", backends("topk_per_class"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, k", [(1, 1), (1000, 7), (65_536, 256), (40_000, 5000)])
def test_topk_per_class_exact(backend, dtype, n, k):
    scores = torch.randn(n, generator=gen(), dtype=torch.float64)
    scores[: n // 4] = torch.round(scores[: n // 4] * 4) / 4  # ties, and -0.0 beside +0.0
    scores[: n // 8 : 2] = -0.0
    scores = scores.to(dtype).to(CUDA)
    lab = labels((n,), 18, ignore_fraction=0.1, seed=1)
    index, count = ops.topk_per_class(scores, lab, 19, k, backend=backend)
    want_index, want_count = reference.topk_per_class(scores.cpu(), lab.cpu(), 19, k)
    assert torch.equal(count.cpu(), want_count) and torch.equal(index.cpu(), want_index)


@pytest.mark.parametrize("backend", backends("topk_per_class"))
def test_memory_bank_push(backend):
    bank = ops.ClassMemoryBank(19, 64, 8, device=CUDA, backend=backend)
    cpu = ops.ClassMemoryBank(19, 64, 8, backend="reference")
    for seed in range(3):
        feats = torch.randn(3000, 8, generator=gen(seed)).to(CUDA)
        lab = labels((3000,), 19, seed=seed)
        scores = torch.rand(3000, generator=gen(seed + 10)).to(CUDA)
        bank.push(feats, lab, scores, 20)
        cpu.push(feats.cpu(), lab.cpu(), scores.cpu(), 20)
    for c in range(19):
        assert torch.equal(bank.get(c).cpu(), cpu.get(c))


# ---- float16 / bfloat16 ------------------------------------------------------------------------


def max_error(x, ref):
    return (x.double() - ref.double()).abs().max().item()


@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize("op", ["sce_loss", "kl_loss", "prototype_softmax"])
def test_reduced_precision_within_twice_the_reference_error(op, dtype):
    shape = (2, 19, 45, 61)
    if op == "prototype_softmax":
        features, prototypes = features_and_prototypes(2, 19, 64, 45, 61)

        def run(backend, x_dtype):
            return grad_of(lambda x: ops.prototype_softmax(x, prototypes.to(x_dtype), backend=backend), features.to(x_dtype))
    else:
        logits = (torch.randn(shape, generator=gen(), dtype=torch.float64) * 4).to(CUDA)
        if op == "sce_loss":
            target = labels((2, 45, 61), 19)

            def call(x, backend):
                return ops.sce_loss(x, target, reg_weight=0.1, backend=backend)
        else:
            target = softmax_input(shape, seed=1)

            def call(x, backend):
                return ops.kl_loss(x, target.to(x.dtype), backend=backend)

        def run(backend, x_dtype):
            return grad_of(lambda x: call(x, backend), logits.to(x_dtype))

    exact_out, exact_grad = run("reference", torch.float64)
    ref_out, ref_grad = run("reference", dtype)
    for backend in backends(op):
        backend = getattr(backend, "values", [backend])[0]
        out, grad = run(backend, dtype)
        assert max_error(out, exact_out) <= 2 * max_error(ref_out, exact_out), (backend, "value")
        assert max_error(grad, exact_grad) <= 2 * max_error(ref_grad, exact_grad), (backend, "gradient")


# ---- determinism, no host sync, CUDA graphs, torch.compile, launch counts --------------------


def forward_ops(backend, x, feats, logits):
    """Every op once, forward; `feats` and `logits` are the differentiable leaves."""
    w = ops.prototype_softmax(feats, x["prototypes"], 0.5, backend=backend)
    loss = ops.sce_loss(logits, x["target"], reg_weight=0.1, backend=backend) + ops.kl_loss(
        logits, x["soft"], valid_mask=x["mask"], backend=backend
    )
    index, count = ops.topk_per_class(x["scores"], x["flat_labels"], 19, 64, backend=backend)
    sums, counts = ops.class_feature_sums(x["features"], x["target"], 19, backend=backend)
    return [
        w, loss, index, count, sums, counts,
        ops.class_thresholds(x["conf"], x["flat_labels"], 19, 0.5, backend=backend),
        ops.cbst_pseudo_labels(x["soft"], x["thresholds"], backend=backend),
        ops.prototype_rectify(x["features"], x["prototypes"], x["soft"], 0.5, backend=backend),
    ]


def every_op(backend, inputs, forward=forward_ops):
    """Every op once, with the backward of the losses and of the prototype softmax: the outputs
    and the two gradients."""
    feats = inputs["features"].detach().clone().requires_grad_()
    logits = inputs["logits"].detach().clone().requires_grad_()
    outputs = forward(backend, inputs, feats, logits)
    w, loss = outputs[0], outputs[1]
    (loss + (w * inputs["soft"]).sum()).backward()
    return [t.detach() for t in outputs] + [feats.grad, logits.grad]


def make_inputs():
    b, c, d, h, w = 2, 19, 32, 24, 40
    features, prototypes = features_and_prototypes(b, c, d, h, w, torch.float32)
    return {
        "features": features, "prototypes": prototypes,
        "logits": torch.randn(b, c, h, w, generator=gen(5)).to(CUDA),
        "target": labels((b, h, w), c), "soft": softmax_input((b, c, h, w), seed=6),
        "mask": (torch.rand(b, h, w, generator=gen(7)) < 0.8).to(CUDA),
        "scores": torch.rand(4096, generator=gen(8)).to(CUDA), "flat_labels": labels((4096,), c, seed=9),
        "conf": confidences(4096, seed=10),
        "thresholds": torch.rand(c, generator=gen(11)).clamp_min(0.05).to(CUDA),
    }


def bits(t):
    return t.view({torch.float32: torch.int32, torch.float64: torch.int64}.get(t.dtype, t.dtype))


CUDA_BACKENDS = ["native", "triton"]


def require(backend):
    missing = [op for op in ("sce_loss", "kl_loss", "prototype_softmax", "topk_per_class", "class_thresholds") if backend not in [getattr(b, "values", [b])[0] for b in backends(op)]]
    if missing:
        pytest.fail(f"{backend} has no CUDA path for {missing} in this build")


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_bitwise_deterministic_and_no_host_sync(backend, no_validation):
    require(backend)
    inputs = make_inputs()
    first = every_op(backend, inputs)  # warm-up: Triton compiles, caches fill
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call inside an op raises
    try:
        second = every_op(backend, inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(first, second, strict=True):
        assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_graph_capture(backend, no_validation):
    require(backend)
    inputs = make_inputs()
    eager = [t.clone() for t in every_op(backend, inputs)]
    torch.cuda.synchronize()
    static = {k: v.clone() for k, v in inputs.items()}
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        every_op(backend, static)  # warm-up on the side stream, as CUDA graphs require
        with torch.cuda.graph(graph):
            captured = [t for t in every_op(backend, static) if t is not None]
    torch.cuda.current_stream().wait_stream(stream)
    for value in static.values():
        value.zero_()
    for key, value in inputs.items():
        static[key].copy_(value)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured, strict=True):
        assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_compile_fullgraph_over_every_op(backend, no_validation):
    require(backend)
    torch._dynamo.reset()
    inputs = make_inputs()
    eager = every_op(backend, inputs)
    compiled_forward = torch.compile(forward_ops, fullgraph=True)
    compiled = every_op(backend, inputs, forward=compiled_forward)
    for a, b in zip(eager, compiled, strict=True):
        assert torch.equal(bits(a), bits(b))


def kernel_launches(fn):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("n", [65_536, 2_097_152])
def test_selections_take_at_most_three_launches(n, no_validation):
    if "native" not in backends("topk_per_class"):
        pytest.fail("the native CUDA kernels are not built")
    conf, lab = confidences(n), labels((n,), 19)
    launches = kernel_launches(lambda: ops.class_thresholds(conf, lab, 19, 0.5, backend="native"))
    assert 1 <= len(launches) <= 3, launches
    launches = kernel_launches(lambda: ops.topk_per_class(conf, lab, 19, 256, backend="native"))
    assert 1 <= len(launches) <= 3, launches


@pytest.mark.parametrize("method", ["contrastive", "proda"])
def test_training_under_bf16_autocast_with_activation_checkpointing(tmp_path, method):
    """The trainer on CUDA with bf16 autocast and a recomputed backbone: the custom ops get bf16
    inputs and the run ends with finite float32 weights."""
    import math

    from conftest import tiny_run_config
    from udafast.engine.trainer import Trainer
    from udafast.models.checkpoint import load_checkpoint
    config = tiny_run_config(method, device="cuda", contrastive={"bank_start": 0, "loss_start": 1, "bank_threshold": 0.0},
                             train={"iters": 3, "stage_iters": 2, "panels": 0, "amp": "bf16",
                                    "activation_checkpointing": True})
    metrics = Trainer(config, tmp_path, progress=False, tensorboard=False).run()
    assert math.isfinite(metrics["miou"])
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"]
    assert all(torch.isfinite(v).all() and v.dtype != torch.bfloat16 for v in state.values() if v.is_floating_point())
