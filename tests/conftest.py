"""Shared test helpers and fixtures: the (device, backend) pairs to hold against the reference,
SPEC 1.5's tolerances, tiny run configs."""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hypothesis import settings

from udafast.ops.backend import native_unavailable_reason, triton_unavailable_reason

# Property tests draw the same examples on every run, so that a CI run is reproducible; pass
# --hypothesis-profile=explore to search new ones.
settings.register_profile("reproducible", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("reproducible")


def pytest_configure(config):
    """UDAFAST_TRITON_AOT=<file> in the TRITON_INTERPRET=1 run: record every Triton kernel variant
    launched, for `python tests/triton_aot.py <file>` to compile for sm_90 (see that module)."""
    path = os.environ.get("UDAFAST_TRITON_AOT")
    if path:
        import triton_aot
        config.pluginmanager.register(triton_aot.Recorder(path), "udafast-triton-aot")


def unavailable_reason(op, device, backend):
    """Why `backend` cannot run `op` on `device` in this process, or None."""
    if device == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA device"
    if backend == "native":
        return native_unavailable_reason(op, device)
    if device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "Triton runs on CPU tensors only in the interpreter process (TRITON_INTERPRET=1)"
    return triton_unavailable_reason(op, device)


def backend_params(op, devices=("cpu", "cuda"), backends=("native", "triton")):
    """pytest params (device, backend) for the fast backends of `op`, to parametrize "device, backend".

    ("cpu", "native") where the extension has a CPU kernel; ("cpu", "triton") only in the
    interpreter process, TRITON_INTERPRET=1 (marked `triton`: `-m triton` selects it there);
    ("cuda", "native") and ("cuda", "triton") always, marked `cuda` and skipped without a GPU
    or where the backend has no CUDA path for `op`. `devices` and `backends` narrow the list."""
    params = []
    if "cpu" in devices:
        for backend in backends:
            if unavailable_reason(op, "cpu", backend) is None:
                marks = [pytest.mark.triton] if backend == "triton" else []
                params.append(pytest.param("cpu", backend, marks=marks, id=f"cpu-{backend}"))
    if "cuda" in devices:
        for backend in backends:
            reason = unavailable_reason(op, "cuda", backend)
            marks = [pytest.mark.cuda] + ([pytest.mark.skip(reason=reason)] if reason else [])
            params.append(pytest.param("cuda", backend, marks=marks, id=f"cuda-{backend}"))
    return params


def on(device, *tensors):
    """The tensors moved to `device` (None stays None)."""
    return tuple(None if t is None else t.to(device) for t in tensors)


def compiled_ops(backend):
    """The namespace of the backend's compiled ops (the same signatures and outputs)."""
    return torch.ops.udafast if backend == "native" else torch.ops.udafast_triton


def gen(seed=0):
    """A seeded CPU generator: the same draws on every run and device (move the result after)."""
    return torch.Generator().manual_seed(seed)


def random_labels(shape, num_classes, ignore_fraction=0.2, seed=0, dtype=torch.int64):
    """Labels in [0, num_classes), a share of them ignored (255), drawn from gen(seed), on the CPU."""
    g = gen(seed)
    out = torch.randint(0, num_classes, shape, generator=g)
    out[torch.rand(shape, generator=g) < ignore_fraction] = 255
    return out.to(dtype)


def confidences(n, seed=0, dtype=torch.float32):
    """n confidences in [0, 1] from gen(seed), on the CPU; a third quantised to sixteenths (many
    exact ties, exact 0 and 1)."""
    conf = torch.rand(n, generator=gen(seed), dtype=torch.float64)
    conf[: n // 3] = torch.round(conf[: n // 3] * 16) / 16
    return conf.to(dtype)


@pytest.fixture
def no_validation():
    """The ops' input validation off for one test (bad values reach the kernels)."""
    import udafast.ops
    before = udafast.ops.get_validation()
    udafast.ops.set_validation(False)
    yield
    udafast.ops.set_validation(before)


def assert_close_spec(actual, expected, what="value"):
    """SPEC 1.5 for float results: |x - ref| <= 1e-5 |ref| + 1e-6 max|ref|, elementwise (on any
    devices: compared on the CPU).

    Plus four of the smallest subnormals of the result's dtype: a float32 result cannot hold a
    reference value below them (gradients of saturated logits reach 1e-50)."""
    # a few subnormals: float32 gradients near 1e-45 round to a neighbouring subnormal
    smallest = 4 * torch.finfo(actual.dtype).tiny * torch.finfo(actual.dtype).eps if actual.is_floating_point() else 0.0
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if expected.numel() == 0:
        return
    bound = 1e-5 * expected.abs() + 1e-6 * expected.abs().max() + smallest
    error = (actual - expected).abs()
    worst = int(torch.argmax(error - bound))
    assert bool((error <= bound).all()), (
        f"{what}: |x - ref| = {error.reshape(-1)[worst].item():.3e} > bound "
        f"{bound.reshape(-1)[worst].item():.3e} at flat index {worst}"
    )


def max_error(x, ref):
    """max |x - ref| in float64 (on the CPU)."""
    return (x.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item()


def assert_grad_close_spec(actual, expected, what="gradient"):
    """SPEC 1.5 for gradients: elementwise as values, and ||x - ref||_2 <= 1e-5 ||ref||_2."""
    assert_close_spec(actual, expected, what)
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    diff = torch.linalg.vector_norm(actual - expected)
    assert diff <= 1e-5 * torch.linalg.vector_norm(expected), f"{what}: L2 error {diff:.3e}"


def assert_grad_close_spec_representable(grad, ref_grad):
    """assert_grad_close_spec, with the L2 bound widened by what the gradient's dtype cannot hold,
    as the elementwise bound is (the smallest subnormal per element): the gradient of a saturated
    pixel with a one-hot target on its top class is about exp(-gap), below float32's smallest
    subnormal from a gap of about 104, so a one-pixel case cannot meet a purely relative L2 bound
    (nor can a loss gradient whose reference values are float32 subnormals)."""
    smallest = torch.finfo(grad.dtype).tiny * torch.finfo(grad.dtype).eps
    assert_close_spec(grad, ref_grad, "gradient")
    grad, ref_grad = grad.detach().double().cpu(), ref_grad.detach().double().cpu()
    diff = torch.linalg.vector_norm(grad - ref_grad)
    bound = 1e-5 * torch.linalg.vector_norm(ref_grad) + smallest * grad.numel() ** 0.5
    assert diff <= bound, f"gradient: L2 error {diff:.3e} > {bound:.3e}"


_SAME_SIZE_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


def assert_reproducible(run):
    """run() twice, then once on a single thread: every tensor it returns is bitwise equal
    (floats compared by their bits, so -0.0 against +0.0 or a changed NaN would fail)."""
    first, second = run(), run()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)

    def tensors(out):
        return [out] if isinstance(out, torch.Tensor) else [t for item in out for t in tensors(item)]

    for other in (second, single):
        for x, y in zip(tensors(first), tensors(other), strict=True):
            bits = _SAME_SIZE_INT.get(x.dtype, x.dtype)
            assert x.dtype == y.dtype and torch.equal(x.view(bits), y.view(bits))


def assert_bitwise_equal(a, b, where="value"):
    """`a` and `b` (tensors, or dicts / lists / tuples of them and plain values, e.g. two checkpoints)
    are equal, floats bit for bit; `where` names the first difference."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        bits = _SAME_SIZE_INT.get(a.dtype, a.dtype)
        assert torch.equal(a.view(bits), b.view(bits)), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def noncontiguous(x):
    """The same values in a non-contiguous layout (a strided view into a larger buffer)."""
    if x.dim() == 0:
        return x
    wide = torch.zeros(*x.shape[:-1], x.shape[-1] * 2, dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    view = wide[..., ::2]
    assert not view.is_contiguous() or x.numel() <= 1
    return view


class TinySeg(nn.Module):
    """A stand-in for udafast.models: per-pixel linear head on 8x average-pooled input (stride 8)."""
    normalization = "imagenet"

    def __init__(self, num_classes=19):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.head = nn.Conv2d(3, num_classes, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g) * 3)
            self.head.bias.copy_(torch.randn(num_classes, generator=g))
        self.inputs = []

    def forward(self, x):
        self.inputs.append(tuple(x.shape))
        self.last = x
        return {"logits": self.head(F.avg_pool2d(x, 8, ceil_mode=True))}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module: on a shared 2-core machine OpenMP's second thread mostly
    waits (ResNet-101 forwards run ~5x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_run_config(method="source_only", **sections):
    """A run config for a few iterations of `method` on 32x64 synthetic scenes with a narrow small
    network on one thread (seconds per run); `sections` are merged over it."""
    from udafast.engine.runs import resolve_config
    return resolve_config(tiny_config_file(**sections), method)


@pytest.fixture
def tiny_yaml(tmp_path):
    """The path (str) of a config file for a 2-iteration tiny run (tiny_config_file)."""
    import yaml
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config_file(train={"iters": 2, "panels": 0})))
    return str(path)


def tiny_config_file(**sections):
    """The config-file form of `tiny_run_config` (before a method is resolved)."""
    from udafast.config import merge
    scenes = {"size": [32, 64], "cache": True}
    base = {
        "threads": 1,
        "model": {"name": "small", "num_classes": 19, "width": 4, "feature_dim": 32},
        "data": {"source": {"name": "synthetic", "split": "train", "options": {"domain": "source", "length": 8, **scenes}},
                 "target": {"name": "synthetic", "split": "train", "options": {"domain": "target", "length": 8, **scenes}},
                 "val": {"name": "synthetic", "split": "val", "options": {"domain": "target", "length": 3, **scenes}},
                 "batch_size": 2},
        "optimizer": {"name": "adam", "lr": 1e-3, "weight_decay": 0.0},
        "train": {"iters": 2, "panels": 1},
    }
    return merge(base, sections)


def run_and_resume(config, tmp_path, at=2):
    """Run `config` with a checkpoint every `at` iterations, then a second run resumed from its
    iter_<at>.pt -> the last checkpoints of both (dicts), for bit-exact resume tests."""
    from udafast.engine.trainer import Trainer
    from udafast.models.checkpoint import load_checkpoint
    config = dict(config, train=dict(config["train"], ckpt_every=at))
    Trainer(config, tmp_path / "full", tensorboard=False, progress=False).run()
    Trainer(config, tmp_path / "resumed", resume=tmp_path / "full" / "checkpoints" / f"iter_{at}.pt",
            tensorboard=False, progress=False).run()
    return (load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt"),
            load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt"))


def tiny_domain_batch(seed=0):
    """A step's batch of 2 random 32x64 source images with labels and 2 target images."""
    g = torch.Generator().manual_seed(seed)
    return {"source": {"image": torch.rand(2, 3, 32, 64, generator=g),
                       "label": torch.randint(0, 19, (2, 32, 64), generator=g)},
            "target": {"image": torch.rand(2, 3, 32, 64, generator=g)}}
