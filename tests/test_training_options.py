"""Trainer options for reliability and scale, in one process: non-finite losses (stop with the last
good checkpoint intact, or skip and count), gradient accumulation, bf16 and fp16 autocast (a grad
scaler: every backward scaled, overflows skipped and counted, exact resume), activation
checkpointing."""
import json
import math

import pytest
import torch

from conftest import assert_bitwise_equal, run_and_resume, tiny_run_config
from udafast.config import merge
from udafast.engine.data import BatchStream
from udafast.engine.trainer import NonFiniteLoss, Trainer
from udafast.methods.base import Method
from udafast.models import build_model
from udafast.models.checkpoint import load_checkpoint


@pytest.fixture
def nan_images_at(monkeypatch):
    """From the given call on, Method.normalize returns NaN images (a numerical fault mid-run)."""
    def install(first_bad_call, last_bad_call=None):
        calls = {"n": 0}
        original = Method.normalize

        def normalize(self, images, model=None):
            calls["n"] += 1
            out = original(self, images, model)
            bad = calls["n"] >= first_bad_call and (last_bad_call is None or calls["n"] <= last_bad_call)
            return out * float("nan") if bad else out
        monkeypatch.setattr(Method, "normalize", normalize)
    return install


def run(tmp_path, method="source_only", **train):
    config = tiny_run_config(method, deterministic=True, train={"iters": 4, "panels": 0, **train})
    return Trainer(config, tmp_path, progress=False, tensorboard=False).run()


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, nan_images_at):
    nan_images_at(3)  # source_only normalises one batch per iteration: iteration 3 goes bad
    with pytest.raises(NonFiniteLoss, match=r"iteration 3.*last good checkpoint is .*last\.pt"):
        run(tmp_path, ckpt_every=1)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["iter"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (tmp_path / "metrics.json").exists()


def test_skip_nonfinite_skips_and_counts_the_bad_updates(tmp_path, nan_images_at):
    nan_images_at(2, 3)
    metrics = run(tmp_path, on_nonfinite="skip")
    assert metrics["nonfinite_steps"] == 2 and math.isfinite(metrics["miou"])
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"]
    # weights and BatchNorm statistics untouched by the skipped steps
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    log = open(tmp_path / "log.csv").read()
    assert "nan" in log.lower()
    assert json.loads((tmp_path / "metrics.json").read_text())["nonfinite_steps"] == 2


def test_the_cli_reports_a_non_finite_loss(tmp_path, nan_images_at, capsys):
    from udafast.train import main
    nan_images_at(1)
    with pytest.raises(SystemExit) as stop:
        main(["--method", "source_only", "--config", "synthetic", "--model", "small", "--iters", "2",
              "--batch-size", "2", "--out", str(tmp_path), "--set", "data.source.options.length=4",
              "--set", "data.val.options.length=2", "--set", "model.width=4", "--set", "train.panels=0"])
    assert "non-finite" in str(stop.value.code) and "no checkpoint was written yet" in str(stop.value.code)


def test_gradient_accumulation_averages_its_micro_batches(tmp_path, monkeypatch):
    """Each batch drawn twice: two micro-batches of the same images must give the update of one
    (the mean of two equal gradients; a sum, or a zero_grad between them, would not)."""
    sgd = {"name": "sgd", "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0}

    def train(folder, **options):
        config = tiny_run_config("source_only", deterministic=True, optimizer=sgd,
                                 train={"iters": 2, "panels": 0, **options})
        Trainer(config, folder, progress=False, tensorboard=False).run()
        return load_checkpoint(folder / "checkpoints" / "last.pt")

    single = train(tmp_path / "single")
    original = BatchStream.__next__

    def each_batch_twice(self):
        repeat = self.__dict__.pop("_repeat", None)
        if repeat is not None:
            return repeat
        self._repeat = original(self)
        return self._repeat
    monkeypatch.setattr(BatchStream, "__next__", each_batch_twice)
    accumulated = train(tmp_path / "accumulated", grad_accum=2)
    params = dict(build_model(single["config"]).named_parameters())
    for name in params:  # BatchNorm statistics saw each batch twice; the weights must not
        assert torch.equal(single["model"][name], accumulated["model"][name]), name


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("method", ["source_only", "contrastive", "proda"])
def test_autocast_trains(tmp_path, method, amp):
    config = tiny_run_config(method, deterministic=True, contrastive={"bank_start": 0, "loss_start": 1,
                                                                      "bank_threshold": 0.0},
                             train={"iters": 3, "stage_iters": 2, "panels": 0, "amp": amp})
    metrics = Trainer(config, tmp_path, progress=False, tensorboard=False).run()
    assert math.isfinite(metrics["miou"])
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    # the weights stay float32
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())
    if amp == "fp16":  # the grad scaler's state travels with the checkpoint; each overflow halved the scale
        assert ckpt["scaler"]["scale"] == 65536.0 / 2 ** metrics["nonfinite_steps"]
    else:
        assert "scaler" not in ckpt


@pytest.fixture
def scaled_backwards(monkeypatch):
    """Counts of the backward passes run on a loss the grad scaler scaled and on any other tensor."""
    counts, scaled = {"scaled": 0, "other": 0}, []
    scale, backward = torch.amp.GradScaler.scale, torch.Tensor.backward

    def record_scale(self, outputs):
        out = scale(self, outputs)
        scaled.append(out)
        return out

    def record_backward(tensor, *args, **kwargs):
        counts["scaled" if any(tensor is t for t in scaled) else "other"] += 1
        return backward(tensor, *args, **kwargs)
    monkeypatch.setattr(torch.amp.GradScaler, "scale", record_scale)
    monkeypatch.setattr(torch.Tensor, "backward", record_backward)
    return counts


@pytest.mark.parametrize("method", ["source_only", "oracle", "dann", "adaptsegnet", "cbst", "contrastive", "proda",
                                    "ssl_source"])
def test_fp16_scales_every_backward_pass_of_every_method(tmp_path, scaled_backwards, method):
    """A loss that skipped the scaler would come out of `unscale_` 65536 times too small."""
    config = tiny_run_config(method, contrastive={"bank_start": 0, "loss_start": 0, "bank_threshold": 0.0},
                             train={"iters": 1, "stage_iters": 1, "panels": 0, "amp": "fp16"}, eval={"max_images": 1})
    Trainer(config, tmp_path, progress=False, tensorboard=False).run()
    assert scaled_backwards["scaled"] > 0 and scaled_backwards["other"] == 0


def overflowing_scaler(monkeypatch, **options):
    """The trainer's GradScaler starts at 2^40 (float16 gradients overflow) and backs off to 2^10."""
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device: real(device, init_scale=2.0 ** 40,
                                                                      backoff_factor=2.0 ** -30, **options))


def test_fp16_overflow_skips_the_update_and_counts_it(tmp_path, monkeypatch, capsys):
    overflowing_scaler(monkeypatch)
    metrics = run(tmp_path, method="adaptsegnet", iters=3, amp="fp16")  # on_nonfinite "stop": no stop
    assert metrics["nonfinite_steps"] == 1 and math.isfinite(metrics["miou"])
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["scaler"]["scale"] == 1024.0
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert ("iteration 1: non-finite gradients (fp16 loss scale now 1024); update skipped (1 such iterations so far)"
            in capsys.readouterr().err)


def test_fp16_resumes_exactly(tmp_path, monkeypatch):
    """The scale moves at every iteration (an overflow, then growth after each finite step): a
    resumed run that started its scaler afresh would overflow again and end elsewhere."""
    overflowing_scaler(monkeypatch, growth_interval=1)
    config = tiny_run_config("adaptsegnet", deterministic=True, train={"iters": 4, "panels": 0, "amp": "fp16"})
    full, resumed = run_and_resume(config, tmp_path, at=2)
    # 2^10 after the overflow, doubled after each of the three finite iterations
    assert full["scaler"] == resumed["scaler"] and full["scaler"]["scale"] == 2.0 ** 13
    assert full["trainer"]["nonfinite_steps"] == resumed["trainer"]["nonfinite_steps"] == 1
    for k, v in full["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    for name, opt in full["method"]["optimizers"].items():
        assert str(opt) == str(resumed["method"]["optimizers"][name]), name


def test_activation_checkpointing_gives_the_same_run(tmp_path):
    plain = run(tmp_path / "plain", iters=3)
    recomputed = run(tmp_path / "recomputed", iters=3, activation_checkpointing=True)
    a = load_checkpoint(tmp_path / "plain" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "recomputed" / "checkpoints" / "last.pt")["model"]
    for k in a:  # parameters and BatchNorm statistics (counted once per batch) alike
        assert torch.equal(a[k], b[k]), k
    assert plain["miou"] == recomputed["miou"]


def test_channels_last_trains_the_same_run_to_rounding_and_resumes_exactly(tmp_path):
    """The networks (the EMA teacher and the feature-distance reference too) are channels-last; the
    run equals the contiguous one up to the kernels' summation order; a resumed run ends bit for bit."""
    config = tiny_run_config("mic", deterministic=True, train={"iters": 3, "panels": 0},
                             mic={"rcs_min_pixels": 0, "ignore_bottom": 8, "mask_block_size": 8})
    seen = {}
    trainer = Trainer(merge(config, {"train": {"channels_last": True}}), tmp_path / "last", progress=False,
                  tensorboard=False)
    trainer.run()
    for name, net in (("student", trainer.method.model), ("teacher", trainer.method.teacher.model),
                      ("reference", trainer.method.reference)):
        weights = [p for p in net.parameters() if p.dim() == 4]
        seen[name] = all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert seen == {"student": True, "teacher": True, "reference": True}
    Trainer(config, tmp_path / "plain", progress=False, tensorboard=False).run()
    a = load_checkpoint(tmp_path / "plain" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "last" / "checkpoints" / "last.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    full, resumed = run_and_resume(merge(config, {"train": {"channels_last": True}}), tmp_path / "resume", at=2)
    assert_bitwise_equal(full["model"], resumed["model"], "model")
    assert_bitwise_equal(full["method"]["modules"]["teacher"], resumed["method"]["modules"]["teacher"], "teacher")


@pytest.mark.parametrize("key, value", [("grad_accum", 0), ("amp", "fp8"), ("on_nonfinite", "ignore"),
                                        ("sync_bn", "yes"), ("activation_checkpointing", 1), ("channels_last", "on")])
def test_bad_training_options_name_the_key(tmp_path, key, value):
    with pytest.raises(ValueError, match=f"train.{key}"):
        run(tmp_path, **{key: value})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_reduced_precision_ops_on_the_cpu_compute_in_float32(dtype, backend):
    """What CPU autocast hands the ops: the result is the float32 op on the widened input (in the
    input's dtype where the op returns a map), the gradient comes back in the input's dtype."""
    import udafast.ops as ops
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 5, 3, 4, generator=g) * 3).to(dtype).requires_grad_()
    target = torch.randint(0, 5, (2, 3, 4), generator=g)
    feats = torch.randn(2, 6, 3, 4, generator=g).to(dtype).requires_grad_()
    protos = torch.randn(5, 6, generator=g)
    soft = torch.softmax(torch.randn(2, 5, 3, 4, generator=g), 1).to(dtype)
    cases = {
        "sce": (lambda x: ops.sce_loss(x, target, reg_weight=0.1, backend=backend), logits),
        "kl": (lambda x: ops.kl_loss(x, soft, backend=backend), logits),
        "softmax": (lambda x: ops.prototype_softmax(x, protos, backend=backend), feats),
    }
    for name, (op, x) in cases.items():
        out = op(x)
        wide = x.detach().float().requires_grad_()
        expected = op(wide)
        assert out.dtype == (torch.float32 if out.dim() == 0 else dtype), name
        assert torch.equal(out, expected.to(out.dtype)), name
        (out.float() * 1.5).sum().backward()
        (expected * 1.5).sum().backward()
        assert x.grad.dtype == dtype and torch.equal(x.grad, wide.grad.to(dtype)), name
        x.grad = None
    scores = torch.rand(50, generator=g).to(dtype)
    labels = torch.randint(0, 5, (50,), generator=g)
    for a, b in zip(ops.topk_per_class(scores, labels, 5, 3, backend=backend),
                    ops.topk_per_class(scores.float(), labels, 5, 3, backend=backend)):
        assert torch.equal(a, b)
    thresholds = ops.class_thresholds(scores, labels, 5, 0.3, backend=backend)
    assert thresholds.dtype == dtype
    assert torch.equal(thresholds, ops.class_thresholds(scores.float(), labels, 5, 0.3, backend=backend).to(dtype))
    assert torch.equal(ops.prototype_rectify(feats.detach(), protos, soft, backend=backend),
                       ops.prototype_rectify(feats.detach().float(), protos, soft.float(), backend=backend))
