"""ProDA (udafast.methods.proda): soft labels, initial prototypes, the stage-1 and distillation losses
against the ops and hand computations, stage selection, state, options."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_run_config
from udafast.data.labels import IGNORE_INDEX
from udafast.data.transforms import strong_augment, warp_like
from udafast.engine.config import merge
from udafast.engine.trainer import RunContext, Trainer
from udafast.methods import method_class
from udafast.methods.base import Stage
from udafast.methods.proda import ProDA
from udafast.models.checkpoint import load_checkpoint
from udafast.ops import kl_loss, prototype_softmax, sce_loss


def tiny_config(**sections):
    """A few iterations of each stage on 32x64 synthetic scenes with a narrow small network."""
    return tiny_run_config("proda", **merge({"data": {"target": {"options": {"length": 6}}, "val": {"options": {"length": 2}}},
                                              "train": {"panels": 0}}, sections))


class _Log:
    def message(self, text):
        pass


def make_method(tmp_path, **sections):
    torch.manual_seed(0)
    config = tiny_config(**sections)
    ctx = RunContext(config, str(tmp_path), "cpu", _Log(), ProDA)
    return ProDA(config, ctx), ctx


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("proda_run")
    metrics = Trainer(tiny_config(), out, progress=False, tensorboard=False).run()
    return out, metrics


def test_full_run_writes_the_four_stages(full_run):
    out, metrics = full_run
    on_disk = json.loads((out / "metrics.json").read_text())
    assert list(on_disk["stages"]) == ["warmup", "stage1", "stage2", "stage3"]
    assert all(np.isfinite(s["miou"]) and s["iters"] == 2 for s in on_disk["stages"].values())
    assert on_disk["iters"] == 8
    for stage in ("warmup", "stage1", "stage2", "stage3"):
        assert (out / "checkpoints" / f"{stage}.pt").is_file()
    # the soft labels stay outside the checkpoints; the stage-1 state carries teacher and prototypes
    s1 = load_checkpoint(out / "checkpoints" / "stage1.pt")["method"]
    assert set(s1["modules"]) == {"teacher"} and s1["extra"]["prototypes"].shape == (19, 32)
    assert "soft" not in json.dumps(list(s1["extra"]))
    warm = load_checkpoint(out / "checkpoints" / "warmup.pt")["method"]
    assert set(warm["modules"]) == {"disc_main"} and set(warm["optimizers"]) == {"model", "disc"}


def test_soft_labels_written_once_float16_at_output_resolution(tmp_path):
    method, ctx = make_method(tmp_path)
    model = ctx.build_model()
    method.start_stage(Stage("stage1", 2), model)
    path = method.soft_labels_path
    soft = np.load(path, mmap_mode="r")
    assert soft.dtype == np.float16 and soft.shape == (6, 19, 4, 8)  # 32x64 frames at stride 8
    model.eval()
    with torch.no_grad():
        frame = ctx.target_view.resized(ctx.target[3])["image"]
        expected = F.softmax(model(method.normalize(frame[None]))["logits"], 1)[0]
    assert torch.allclose(torch.from_numpy(np.asarray(soft[3], np.float32)), expected, atol=1e-3)
    assert not os.path.exists(path + ".tmp.npy")
    # reused: a later stage-1 start (another network) leaves the file alone
    mtime = os.stat(path).st_mtime_ns
    other, _ = make_method(tmp_path)
    other.start_stage(Stage("stage1", 2), ctx.build_model())
    assert os.stat(path).st_mtime_ns == mtime
    # an incomplete file (wrong shape) is rewritten
    np.save(path, np.zeros((2, 19, 4, 8), np.float16))
    other.start_stage(Stage("stage1", 2), model)
    assert np.load(path, mmap_mode="r").shape == (6, 19, 4, 8)
    # the target batches carry the map, cropped/flipped with the image
    batch = next(ctx.target_stream)
    assert batch["maps"]["soft"].shape == (2, 19, 4, 8) and batch["maps"]["soft"].dtype == torch.float32


def test_initial_prototypes_are_class_means(tmp_path):
    method, ctx = make_method(tmp_path)
    model = ctx.build_model()
    method.start_stage(Stage("stage1", 2), model)
    model.eval()
    sums, counts = torch.zeros(19, 32, dtype=torch.float64), torch.zeros(19)
    with torch.no_grad():
        for i in range(len(ctx.target)):
            out = model(method.normalize(ctx.target_view.resized(ctx.target[i])["image"][None]))
            f = out["features"][0].flatten(1).double()   # [D, hw]
            pred = out["logits"][0].argmax(0).flatten()
            for c in range(19):
                sel = pred == c
                sums[c] += f[:, sel].sum(1)
                counts[c] += sel.sum()
    expected = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], 0).float()
    assert torch.allclose(method.prototypes, expected, atol=1e-5)
    assert (counts == 0).any() and (method.prototypes[counts == 0] == 0).all()  # never predicted: zeros
    assert method.teacher is not None and method.modules["teacher"] is method.teacher


def test_stage1_loss_terms_match_the_ops(tmp_path):
    method, ctx = make_method(tmp_path, proda={"ce_weight": 0.3, "rce_weight": 0.7, "reg_weight": 0.2, "tau": 2.0})
    torch.manual_seed(1)
    b, c, d, h, w = 2, 19, 32, 8, 12
    method.prototypes = torch.randn(c, d)
    teacher_out = {"features": torch.randn(b, d, h // 2, w // 2), "logits": torch.randn(b, c, h // 2, w // 2)}
    soft = F.softmax(torch.randn(b, c, h // 2, w // 2), 1)
    _, params = strong_augment(torch.rand(b, 3, 4 * h, 4 * w), torch.Generator().manual_seed(3))
    y, z, valid, feats, pred = method.stage1_targets(teacher_out, soft, params, (h, w))
    # by hand: rectified argmax, warped; teacher prototype softmax, warped bilinearly
    up = lambda x: F.interpolate(x, size=(h, w), mode="bilinear", align_corners=True)  # noqa: E731
    f = up(teacher_out["features"])
    dist = torch.cdist(f.permute(0, 2, 3, 1).reshape(-1, d), method.prototypes).reshape(b, h, w, c).permute(0, 3, 1, 2)
    weights = F.softmax(-dist / 2.0, 1)
    y_hand = (weights * up(soft)).argmax(1)
    assert torch.equal(y, warp_like(y_hand, params, "nearest", cutout_fill=IGNORE_INDEX))
    assert torch.allclose(z, warp_like(weights, params, "bilinear"), atol=1e-5)
    assert torch.equal(pred, up(teacher_out["logits"]).argmax(1))
    for i in range(b):  # the cutout box is not valid
        x0, y0, x1, y1 = params["cutout"][i].tolist()
        if x1 > x0 and y1 > y0:
            assert not valid[i, round(y0 * h):round(y1 * h), round(x0 * w):round(x1 * w)].any()
    assert (y[~valid] == IGNORE_INDEX).all()
    student = {"logits": torch.randn(b, c, h // 2, w // 2, requires_grad=True),
               "features": torch.randn(b, d, h // 2, w // 2, requires_grad=True)}
    losses = method.stage1_losses(student, y, z, valid, (h, w))
    logits, sf = up(student["logits"]), up(student["features"])
    assert torch.allclose(losses["pl"], sce_loss(logits, y, alpha=0.3, beta=0.7, reg_weight=0.2, backend="reference"))
    log_w = prototype_softmax(sf, method.prototypes, 2.0, log=True, backend="reference")
    assert torch.allclose(losses["kl"], kl_loss(log_w, z, valid_mask=valid, backend="reference"))
    # the KL by hand: sum_valid sum_c z (log z - log w) / (n C)
    hand = (torch.xlogy(z, z) - z * log_w).sum(1)[valid].sum() / (valid.sum() * c)
    assert torch.allclose(losses["kl"], hand, atol=1e-6)
    (losses["pl"] + losses["kl"]).backward()
    assert student["features"].grad.abs().sum() > 0


def test_rectify_threshold_ignores_unsure_pixels(tmp_path):
    method, _ = make_method(tmp_path, proda={"rectify_threshold": 0.99})
    method.prototypes = torch.randn(19, 32)
    out = {"features": torch.randn(1, 32, 4, 4), "logits": torch.randn(1, 19, 4, 4)}
    soft = torch.full((1, 19, 4, 4), 1 / 19)
    params = {"theta": torch.eye(2, 3)[None], "flip": torch.zeros(1, dtype=torch.bool), "cutout": torch.zeros(1, 4)}
    y, *_ = method.stage1_targets(out, soft, params, (4, 4))
    assert (y == IGNORE_INDEX).all()  # uniform soft labels, random prototypes: nothing is 99% sure


@pytest.mark.parametrize("threshold", [0.5, 0.95])
def test_distillation_hard_labels_threshold(tmp_path, threshold):
    method, _ = make_method(tmp_path, proda={"distill_threshold": threshold})
    logits = torch.full((1, 19, 2, 2), -10.0)
    logits[0, 4, 0, 0] = 10.0                          # confident 4
    logits[0, 7, 0, 1], logits[0, 8, 0, 1] = 0.0, -0.5  # 7 at p = 0.62
    logits[0, 2, 1, :] = 2.0                            # confident 2
    logits[0, 3, 1, 0] = 1.0                            # ... but 2 at p = 0.73 here
    params = {"theta": torch.eye(2, 3)[None], "flip": torch.zeros(1, dtype=torch.bool), "cutout": torch.zeros(1, 4)}
    labels = method.distill_targets(logits, params, (2, 2))
    probs = F.softmax(logits, 1)
    expected = torch.where(probs.max(1).values > threshold, probs.argmax(1), IGNORE_INDEX)
    assert torch.equal(labels, expected)
    kept = threshold < 0.6
    assert labels.tolist() == [[[4, 7 if kept else IGNORE_INDEX], [2 if kept else IGNORE_INDEX, 2]]]


def test_code_kl_softmax_changes_the_loss(tmp_path):
    torch.manual_seed(2)
    student = torch.randn(2, 19, 3, 5, requires_grad=True)
    teacher = F.softmax(torch.randn(2, 19, 3, 5), 1)
    labels = torch.randint(0, 19, (2, 3, 5))
    paper, _ = make_method(tmp_path)
    code, _ = make_method(tmp_path, proda={"code_kl_softmax": True})
    a, b = paper.distill_losses(student, teacher, labels), code.distill_losses(student, teacher, labels)
    assert torch.allclose(a["ce"], F.cross_entropy(student, labels))
    assert torch.allclose(a["kd"], kl_loss(student, teacher, backend="reference"))
    quirk = F.kl_div(F.softmax(student, 1), teacher, reduction="none").mean()
    assert torch.allclose(b["kd"], quirk) and not torch.allclose(a["kd"], b["kd"])


def test_stage_option_starts_from_previous_checkpoint(full_run, tmp_path):
    out, _ = full_run
    config = tiny_config()
    # missing: the error names the file
    with pytest.raises(FileNotFoundError, match=r"stage1\.pt"):
        Trainer(config, tmp_path / "empty", stage="stage2", progress=False, tensorboard=False).run()
    # present: stage 2 alone distils the stage-1 network, and only stage 2 runs
    run = tmp_path / "alone"
    os.makedirs(run / "checkpoints")
    for name in ("stage1.pt",):
        (run / "checkpoints" / name).write_bytes((out / "checkpoints" / name).read_bytes())
    seen = {}
    original = ProDA.start_stage

    def spy(self, stage, model, resume=False):
        seen[stage.name] = {k: v.clone() for k, v in model.state_dict().items()}
        return original(self, stage, model, resume)

    ProDA.start_stage = spy
    try:
        metrics = Trainer(config, run, stage="stage2", progress=False, tensorboard=False).run()
    finally:
        ProDA.start_stage = original
    assert list(metrics["stages"]) == ["stage2"]
    stage1 = load_checkpoint(run / "checkpoints" / "stage1.pt")["model"]
    assert all(torch.equal(seen["stage2"][k], stage1[k]) for k in stage1)


def test_state_round_trip(tmp_path):
    method, ctx = make_method(tmp_path)
    method.start_stage(Stage("stage1", 2), ctx.build_model())
    method.model.train()
    batch = {"source": next(ctx.source_stream), "target": next(ctx.target_stream)}
    method.step(batch, 0, 2)
    state = method.state_dict()
    other, _ = make_method(tmp_path)
    other.start_stage(Stage("stage1", 2), ctx.build_model(), resume=True)
    assert other.prototypes is None  # resuming: the checkpoint holds them
    other.load_state_dict(state)
    assert torch.equal(other.prototypes, method.prototypes)
    for k, v in method.teacher.state_dict().items():
        assert torch.equal(other.teacher.state_dict()[k], v)
    assert torch.equal(other.generator.get_state(), method.generator.get_state())


def test_model_overrides_by_model_name():
    assert ProDA.model_overrides({"name": "deeplabv2_r101"}) == {"head": "proda"}
    assert ProDA.model_overrides({"name": "small"}) == {}
    assert method_class("proda") is ProDA


@pytest.mark.parametrize("option, value", [
    ("gan", "wgan"), ("stage1_iters", 0), ("disc_ndf", 0), ("adv_scale", 0), ("adv_scale", 1.5), ("tau", 0), ("kl_weight", -1), ("distill_threshold", 1.5),
    ("code_kl_softmax", "yes"), ("proto_min_pixels", 0), ("nonsense", 1),
])
def test_bad_options_raise(tmp_path, option, value):
    with pytest.raises(ValueError, match=option):
        make_method(tmp_path, proda={option: value})
