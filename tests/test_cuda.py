"""What only a CUDA device shows, over every op on both GPU backends: outputs bitwise the same from
run to run with no host synchronisation; CUDA-graph capture; torch.compile(fullgraph=True) over
every op; at most three kernel launches for the selections; training under bf16 autocast.

Each op against the float64 reference on CUDA (odd shapes, non-contiguous inputs, float16/bfloat16)
is in the op's own test file, on its ("cuda", backend) pairs. Runs only where a GPU is present (see
benchmarks/README.md for the GPU run); the CPU machines prove the same kernels through the Triton
interpreter and the CUDA compile step of .ci/run.
"""
import pytest
import torch

import udafast.ops as ops
from conftest import confidences, gen, random_labels, unavailable_reason

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")


def labels(shape, num_classes, seed=0):
    return random_labels(shape, num_classes, seed=seed).to(CUDA)


def softmax_input(shape, seed=0):
    return (torch.randn(shape, generator=gen(seed), dtype=torch.float64) * 3.0).softmax(1).float().to(CUDA)


def features_and_prototypes(b, c, d, h, w):
    features = torch.randn(b, d, h, w, generator=gen(), dtype=torch.float64)
    prototypes = torch.randn(c, d, generator=gen(1), dtype=torch.float64)
    features[0, :, 0, 0] = prototypes[min(1, c - 1)]  # a feature equal to a prototype: d = 0
    return features.float().to(CUDA), prototypes.float().to(CUDA)


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
    features, prototypes = features_and_prototypes(b, c, d, h, w)
    return {
        "features": features, "prototypes": prototypes,
        "logits": torch.randn(b, c, h, w, generator=gen(5)).to(CUDA),
        "target": labels((b, h, w), c), "soft": softmax_input((b, c, h, w), seed=6),
        "mask": (torch.rand(b, h, w, generator=gen(7)) < 0.8).to(CUDA),
        "scores": torch.rand(4096, generator=gen(8)).to(CUDA), "flat_labels": labels((4096,), c, seed=9),
        "conf": confidences(4096, seed=10).to(CUDA),
        "thresholds": torch.rand(c, generator=gen(11)).clamp_min(0.05).to(CUDA),
    }


def bits(t):
    return t.view({torch.float32: torch.int32, torch.float64: torch.int64}.get(t.dtype, t.dtype))


CUDA_BACKENDS = ["native", "triton"]


def require(backend):
    missing = [op for op in ("sce_loss", "kl_loss", "prototype_softmax", "topk_per_class", "class_thresholds")
               if unavailable_reason(op, "cuda", backend)]
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
    if unavailable_reason("topk_per_class", "cuda", "native"):
        pytest.fail("the native CUDA kernels are not built")
    conf, lab = confidences(n).to(CUDA), labels((n,), 19)
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
