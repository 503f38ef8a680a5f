"""ProDA (udafast.methods.proda): soft labels, initial prototypes, the stage-1 and distillation losses
against the ops and hand computations, stage selection, state, options."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_run_config
from udafast.config import merge
from udafast.data.labels import IGNORE_INDEX
from udafast.data.strong_view import strong_augment, warp_like
from udafast.data.transforms import frame_to_view
from udafast.engine.context import TrainingContext
from udafast.engine.data import TrainView
from udafast.engine.trainer import Trainer
from udafast.methods import method_class
from udafast.methods.base import Stage
from udafast.methods.proda import ProDA, distillation_labels, initial_prototypes
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
    ctx = TrainingContext(config, str(tmp_path), "cpu", _Log(), ProDA)
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


def _pass_sums(method, ctx, model):
    """Per frame and class: feature sums and counts of the eval-mode network, by hand."""
    model.eval()
    sums, counts = torch.zeros(len(ctx.target), 19, 32, dtype=torch.float64), torch.zeros(len(ctx.target), 19)
    with torch.no_grad():
        for i in range(len(ctx.target)):
            out = model(method.normalize(ctx.target_view.resized(ctx.target[i])["image"][None]))
            f = out["features"][0].flatten(1).double()   # [D, hw]
            pred = out["logits"][0].argmax(0).flatten()
            for c in range(19):
                sel = pred == c
                sums[i, c] = f[:, sel].sum(1)
                counts[i, c] = sel.sum()
    return sums, counts


def test_initial_prototypes_pixel_mean(tmp_path):
    method, ctx = make_method(tmp_path, proda={"proto_init": "pixel_mean"})
    model = ctx.build_model()
    method.start_stage(Stage("stage1", 2), model)
    sums, counts = _pass_sums(method, ctx, model)
    sums, counts = sums.sum(0), counts.sum(0)
    expected = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], 0).float()
    assert torch.allclose(method.prototypes, expected, atol=1e-5)
    assert (counts == 0).any() and (method.prototypes[counts == 0] == 0).all()  # never predicted: zeros
    assert method.teacher is not None and method.modules["teacher"] is method.teacher


def test_initial_prototypes_average_image_means_as_calc_prototype(tmp_path):
    """calc_prototype.py: per image the class mean (classes at >= 10 pixels), then per class the
    running mean of image means over 4 epochs with the count capped (here at 5, to reach it)."""
    method, ctx = make_method(tmp_path, proda={"proto_init_cap": 5})
    model = ctx.build_model()
    method.start_stage(Stage("stage1", 2), model)
    sums, counts = _pass_sums(method, ctx, model)
    proto, seen = torch.zeros(19, 32, dtype=torch.float64), [0] * 19
    for _ in range(4):
        for i in range(len(ctx.target)):
            for c in range(19):
                if counts[i, c] >= 10:
                    proto[c] = (proto[c] * seen[c] + sums[i, c] / counts[i, c]) / (seen[c] + 1)
                    seen[c] = min(seen[c] + 1, 5)
    assert max(seen) == 5 and any(0 < n < 5 for n in seen) or max(seen) == 5
    assert torch.allclose(method.prototypes, proto.float(), atol=1e-5)
    pixel, _ = make_method(tmp_path / "p", proda={"proto_init": "pixel_mean"})
    pixel.start_stage(Stage("stage1", 2), model)
    assert not torch.allclose(pixel.prototypes, method.prototypes, atol=1e-4)


def test_initial_prototypes_function_by_hand():
    sums = torch.tensor([[[10.0, 0.0], [9.0, 9.0]], [[0.0, 30.0], [1.0, 1.0]]])   # [N=2, C=2, D=2]
    counts = torch.tensor([[10, 9], [10, 1]])
    # class 0: image means (1, 0) then (0, 3); class 1 never reaches 10 pixels
    one = initial_prototypes(sums, counts, min_pixels=10, epochs=1, cap=3000)
    assert one.tolist() == [[0.5, 1.5], [0.0, 0.0]]
    # epochs 2, cap 1: each update is then (eta + v) / 2
    capped = initial_prototypes(sums, counts, min_pixels=10, epochs=2, cap=1)
    eta = torch.tensor([1.0, 0.0])
    for v in ([0.0, 3.0], [1.0, 0.0], [0.0, 3.0]):
        eta = (eta + torch.tensor(v)) / 2
    assert torch.allclose(capped[0].float(), eta)


def _stage1_method(tmp_path, **options):
    method, ctx = make_method(tmp_path, proda=options)
    method.start_stage(Stage("stage1", 2), ctx.build_model())
    method.model.train()
    return method, ctx


def test_stage1_targets_and_structure_loss_by_hand(tmp_path):
    method, ctx = make_method(tmp_path, proda={"tau": 2.0})
    torch.manual_seed(1)
    b, c, d, h, w = 2, 19, 32, 8, 12
    method.prototypes = torch.randn(c, d)
    feats = torch.randn(b, d, h, w)
    soft = F.softmax(torch.randn(b, c, h // 2, w // 2), 1)
    y, z = method.stage1_targets(feats, soft, (h, w))
    up = lambda x: F.interpolate(x, size=(h, w), mode="bilinear", align_corners=True)  # noqa: E731
    dist = torch.cdist(feats.permute(0, 2, 3, 1).reshape(-1, d), method.prototypes).reshape(b, h, w, c).permute(0, 3, 1, 2)
    weights = F.softmax(-dist / 2.0, 1)
    assert torch.equal(y, (weights * up(soft)).argmax(1))
    assert torch.allclose(z, weights, atol=1e-5)
    # without denoising: the argmax of the soft labels
    plain, _ = make_method(tmp_path, proda={"rectify": False, "kl_weight": 0.0})
    plain.prototypes = method.prototypes
    y_plain, z_plain = plain.stage1_targets(feats, soft, (h, w))
    assert torch.equal(y_plain, up(soft).argmax(1)) and z_plain is None
    # KL_struct: the teacher's w warped into the strong view against the student's strong view
    _, params = strong_augment(torch.rand(b, 3, 4 * h, 4 * w), torch.Generator().manual_seed(3))
    student = {"features": torch.randn(b, d, h // 2, w // 2, requires_grad=True)}
    kl = method.structure_loss(student, z, params, (h, w))
    z_strong = warp_like(z, params, "bilinear")
    valid = warp_like(torch.ones(b, h, w), params, "nearest", fill=0.0, cutout_fill=0.0) > 0.5
    log_w = prototype_softmax(up(student["features"]), method.prototypes, 2.0, log=True, backend="reference")
    hand = (torch.xlogy(z_strong, z_strong) - z_strong * log_w).sum(1)[valid].sum() / (valid.sum() * c)
    assert torch.allclose(kl, hand, atol=1e-6)
    for i in range(b):  # the cutout box is not valid
        x0, y0, x1, y1 = params["cutout"][i].tolist()
        if x1 > x0 and y1 > y0:
            assert not valid[i, round(y0 * h):round(y1 * h), round(x0 * w):round(x1 * w)].any()
    kl.backward()
    assert student["features"].grad.abs().sum() > 0


def test_rectify_threshold_ignores_unsure_pixels(tmp_path):
    method, _ = make_method(tmp_path, proda={"rectify_threshold": 0.99})
    method.prototypes = torch.randn(19, 32)
    soft = torch.full((1, 19, 4, 4), 1 / 19)
    y, _ = method.stage1_targets(torch.randn(1, 32, 4, 4), soft, (4, 4))
    assert (y == IGNORE_INDEX).all()  # uniform soft labels, random prototypes: nothing is 99% sure


def _bn_modes(network):
    """Records, per forward of `network`, whether its BatchNorm layers ran in training mode and the input's shape."""
    calls = []
    bns = [m for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    network.register_forward_pre_hook(lambda mod, args: calls.append(
        {"bn_training": [m.training for m in bns], "shape": tuple(args[0].shape), "input": args[0].detach().clone()}))
    return calls


def test_stage1_teacher_sees_the_frame_with_batch_statistics(tmp_path):
    """adaptation_modelv2.py: BaseNet_ema runs in train mode on target_image_full."""
    method, ctx = _stage1_method(tmp_path)
    calls = _bn_modes(method.teacher.model)
    batch = {"source": next(ctx.source_stream), "target": next(ctx.target_stream)}
    assert "frame" in batch["target"] and batch["target"]["geometry"].shape == (2, 5)
    method.step(batch, 0, 2)
    assert len(calls) == 1 and all(calls[0]["bn_training"])
    assert torch.equal(calls[0]["input"], method.normalize(batch["target"]["frame"]))
    assert not method.teacher.model.training  # back in eval mode after its forward
    # the code's flags off: eval mode on the weak view
    other, ctx2 = _stage1_method(tmp_path / "o", teacher_batch_stats=False, teacher_full_frame=False)
    calls = _bn_modes(other.teacher.model)
    batch = {"source": next(ctx2.source_stream), "target": next(ctx2.target_stream)}
    other.step(batch, 0, 2)
    assert not any(calls[0]["bn_training"]) and torch.equal(calls[0]["input"], other.normalize(batch["target"]["image"]))


def test_stage1_sce_on_the_weak_view_kl_on_the_strong(tmp_path):
    """The stage-1 command runs S_pseudo 0: the SCE + REG terms take the student's weak view."""
    method, ctx = _stage1_method(tmp_path)
    calls = _bn_modes(method.model)
    batch = {"source": next(ctx.source_stream), "target": next(ctx.target_stream)}
    method.step(batch, 0, 2)
    inputs = [c["input"] for c in calls]
    assert len(inputs) == 3  # source, strong view (KL), weak view (SCE + REG)
    assert torch.equal(inputs[0], method.normalize(batch["source"]["image"]))
    assert torch.equal(inputs[2], method.normalize(batch["target"]["image"]))
    assert not torch.equal(inputs[1], inputs[2])
    # without the KL term the strong view is not run at all
    plain, ctx2 = _stage1_method(tmp_path / "p", kl_weight=0.0)
    calls = _bn_modes(plain.model)
    plain.step({"source": next(ctx2.source_stream), "target": next(ctx2.target_stream)}, 0, 2)
    assert len(calls) == 2


def test_stage1_prototypes_follow_the_teachers_frame(tmp_path):
    method, ctx = _stage1_method(tmp_path, proto_momentum=0.5, proto_min_pixels=1)
    batch = {"source": next(ctx.source_stream), "target": next(ctx.target_stream)}
    before = method.prototypes.clone()
    teacher = method.teacher.model
    teacher.train()
    with torch.no_grad():
        out = teacher(method.normalize(batch["target"]["frame"]))
    teacher.eval()
    q = tuple(s // 4 for s in batch["target"]["frame"].shape[-2:])
    up = lambda x: F.interpolate(x, size=q, mode="bilinear", align_corners=True)  # noqa: E731
    feats, pred = up(out["features"]), up(out["logits"]).argmax(1)
    expected = before.clone()
    for i in range(feats.shape[0]):
        for c in range(19):
            sel = pred[i] == c
            if sel.sum() >= 1:
                expected[c] = 0.5 * expected[c] + 0.5 * feats[i][:, sel].mean(1)
    method.step(batch, 0, 2)
    assert torch.allclose(method.prototypes, expected, atol=1e-5)


def test_frame_to_view_follows_the_view():
    """full2weak: the frame's map resized to the scaled frame, cropped, flipped -- the same as
    viewing a map of the frame with the view's geometry."""
    frame = torch.rand(1, 3, 32, 48)
    view = TrainView(scale_range=(0.75, 1.5), crop=(16, 24), flip=0.5, align=4)
    for seed in range(5):
        # a map at the image's own resolution resized like the image: nearest-exact on a coordinate map
        ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(48.0), indexing="ij")
        out = view({"image": frame[0], "label": (ys * 100 + xs).long()}, torch.Generator().manual_seed(seed))
        g = out["geometry"][None]
        mapped = frame_to_view(frame, g, (32, 48), (16, 24))
        sh, sw, y0, x0, flipped = g[0].tolist()
        resized = F.interpolate(frame, size=(sh, sw), mode="bilinear", align_corners=True)[..., y0:y0 + 16, x0:x0 + 24]
        assert torch.equal(mapped, resized.flip(-1) if flipped else resized)
        # and the geometry says where the view's pixels come from: the label holds the frame's pixel ids
        lab = out["label"].flip(-1) if flipped else out["label"]
        rows = (torch.arange(16.0)[:, None] + y0 + 0.5) * 32 / sh - 0.5
        cols = (torch.arange(24.0)[None, :] + x0 + 0.5) * 48 / sw - 0.5
        assert ((lab // 100).float() - rows).abs().max() <= 1 and ((lab % 100).float() - cols).abs().max() <= 1


@pytest.mark.parametrize("threshold", [0.5, 0.95])
def test_distillation_hard_labels_threshold(threshold):
    logits = torch.full((1, 19, 2, 2), -10.0)
    logits[0, 4, 0, 0] = 10.0                          # confident 4
    logits[0, 7, 0, 1], logits[0, 8, 0, 1] = 0.0, -0.5  # 7 at p = 0.62
    logits[0, 2, 1, :] = 2.0                            # confident 2
    logits[0, 3, 1, 0] = 1.0                            # ... but 2 at p = 0.73 here
    labels = distillation_labels(logits, None, (2, 2), threshold)
    probs = F.softmax(logits, 1)
    expected = torch.where(probs.max(1).values > threshold, probs.argmax(1), IGNORE_INDEX)
    assert torch.equal(labels, expected)
    kept = threshold < 0.6
    assert labels.tolist() == [[[4, 7 if kept else IGNORE_INDEX], [2 if kept else IGNORE_INDEX, 2]]]


def test_distillation_labels_average_the_mirror():
    """generate_pseudo_label.py --flip: softmax of both, upsampled (align_corners), mirror flipped back, averaged."""
    torch.manual_seed(4)
    logits, mirrored = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    labels = distillation_labels(logits, mirrored, (6, 8), 0.3)
    up = lambda x: F.interpolate(F.softmax(x, 1), size=(6, 8), mode="bilinear", align_corners=True)  # noqa: E731
    probs = (up(logits) + up(mirrored).flip(-1)) / 2
    expected = torch.where(probs.max(1).values > 0.3, probs.argmax(1), IGNORE_INDEX)
    assert torch.equal(labels, expected)
    assert not torch.equal(labels, distillation_labels(logits, None, (6, 8), 0.3))


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


@pytest.mark.parametrize("next_from", ["best", "last"])
def test_each_stage_starts_from_the_previous_best_on_val_network(tmp_path, next_from):
    """README.md's commands pass each stage's *_best_model.pkl on (proda.next_from: best); "last"
    takes the final weights. Validation within each stage (train.eval_every 1) keeps <stage>_best.pt."""
    seen = {}
    original = ProDA.start_stage

    def spy(self, stage, model, resume=False):
        seen[stage.name] = {k: v.clone() for k, v in model.state_dict().items()}
        return original(self, stage, model, resume)

    config = tiny_config(train={"eval_every": 1}, proda={"next_from": next_from})
    ProDA.start_stage = spy
    try:
        metrics = Trainer(config, tmp_path, progress=False, tensorboard=False).run()
    finally:
        ProDA.start_stage = original
    for previous, stage in (("warmup", "stage1"), ("stage1", "stage2"), ("stage2", "stage3")):
        best = tmp_path / "checkpoints" / f"{previous}_best.pt"
        assert best.is_file() is (next_from == "best")
        kept = load_checkpoint(best if next_from == "best" else tmp_path / "checkpoints" / f"{previous}.pt")
        assert all(torch.equal(seen[stage][k], v) for k, v in kept["model"].items()), (previous, stage)
        if next_from == "best":
            chosen = kept["trainer"]["stage_best"][previous]
            assert chosen == metrics["stages"][previous]["best"] and 1 <= chosen["iter"] <= 2
    assert not (tmp_path / "checkpoints" / "stage3_best.pt").exists()  # no stage after it


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
    ("code_kl_softmax", "yes"), ("proto_min_pixels", 0), ("nonsense", 1), ("next_from", "first"),
    ("distill_flip", "yes"), ("distill_scales", [0]), ("distill_slide", {"stride": [8, 8]}),
])
def test_bad_options_raise(tmp_path, option, value):
    with pytest.raises(ValueError, match=option):
        make_method(tmp_path, proda={option: value})


def test_full_run_scores_its_pseudo_labels(full_run):
    out, _ = full_run
    quality = json.loads((out / "metrics.json").read_text())["pseudo_labels"]
    assert set(quality["stage1"]) == {"p_t0", "y_hat"} and set(quality["stage2"]) == {"distill"}
    for stage in ("stage1", "stage2", "stage3"):
        for summary in quality[stage].values():
            assert len(summary["coverage"]) == 19 and 0 <= summary["coverage_total"] <= 1
            # the embedded target has truth (a few untrained iterations may label nothing at 0.95)
            assert summary["recall"] is not None and any(r is not None for r in summary["recall"])
    assert 0 <= quality["stage1"]["y_hat"]["accuracy"] <= 1 and quality["stage1"]["y_hat"]["coverage_total"] == 1
    for stage in ("stage2", "stage3"):
        labels = np.load(out / "proda" / f"{stage}_labels.npy", mmap_mode="r")
        assert labels.dtype == np.uint8 and labels.shape == (6, 32, 64)


def _distill_students(tmp_path, **options):
    """The networks stage 2 and stage 3 start their students from, given a stage-1 (resp. stage-2) network."""
    method, ctx = make_method(tmp_path, proda=options)
    previous = ctx.build_model()
    with torch.no_grad():
        for p in previous.parameters():
            p.add_(1.0)
    students = {}
    for name in ("stage2", "stage3"):
        torch.manual_seed(123)  # what a fresh network draws
        method.start_stage(Stage(name, 2), previous)
        students[name] = method.model
        assert method.model is not previous and all(p.requires_grad for p in method.model.parameters())
        assert all(not p.requires_grad for p in method.teacher.parameters())
    return previous, students, ctx


def test_stage3_continues_from_stage2_and_stage2_from_the_init(tmp_path):
    previous, students, ctx = _distill_students(tmp_path)
    torch.manual_seed(123)
    fresh = ctx.build_model().state_dict()
    s2, s3 = students["stage2"].state_dict(), students["stage3"].state_dict()
    assert all(torch.equal(s2[k], fresh[k]) for k in fresh)
    assert all(torch.equal(s3[k], v) for k, v in previous.state_dict().items())
    # the code's other choice: stage 3 as stage 2
    _, students, ctx = _distill_students(tmp_path / "o", stage3_from_stage2=False)
    assert all(torch.equal(students["stage3"].state_dict()[k], fresh[k]) for k in fresh)


def test_stage2_student_from_student_init(tmp_path):
    method, ctx = make_method(tmp_path)
    pretrained = ctx.build_model()
    with torch.no_grad():
        for p in pretrained.parameters():
            p.mul_(-2.0)
    from udafast.models.checkpoint import save_checkpoint
    path = tmp_path / "ssl.pt"
    save_checkpoint(path, pretrained, iter=0)
    _, students, _ = _distill_students(tmp_path / "run", student_init=str(path))
    assert all(torch.equal(students["stage2"].state_dict()[k], v) for k, v in pretrained.state_dict().items())


def test_warmup_discriminator_loss_is_summed(tmp_path):
    """adaptation_modelv2.py step_adv: loss_D = L(source, 0) + L(target, 1), not halved."""
    method, ctx = make_method(tmp_path)
    method.start_stage(Stage("warmup", 2), ctx.build_model())
    assert method.adversary.disc_weights == (1.0, 1.0)
    d = method.adversary.discriminators["main"]
    src, tgt = torch.randn(1, 19, 32, 32), torch.randn(1, 19, 32, 32)
    with torch.no_grad():
        hand = (F.mse_loss(d(F.softmax(src, 1)), torch.zeros(1)) + F.mse_loss(d(F.softmax(tgt, 1)), torch.ones(1)))
    loss = method.adversary.discriminator_step({"main": src}, {"main": tgt}, (32, 32), (32, 32))["main"]
    assert torch.allclose(loss, hand)


def test_distillation_pass_with_scales_mirror_and_windows_by_hand(tmp_path):
    """distill_scales, distill_flip and distill_slide: the labels from the softmax (at the output
    stride, then upsampled) averaged over each scale of the frame and its mirror, each view in windows."""
    opts = {"distill_scales": [0.5, 1.0], "distill_slide": {"crop": [16, 32], "stride": [16, 16]},
            "distill_threshold": 0.23}
    method, ctx = make_method(tmp_path, proda=opts)
    assert method.distill_inference.scales == (0.5, 1.0) and method.distill_inference.flip
    network = ctx.build_model().eval()

    class Sharper(torch.nn.Module):  # an untrained network's softmax is nearly flat: sharpen it
        normalization = network.normalization

        def forward(self, x):
            return {"logits": network(x)["logits"] * 3000}

    teacher = Sharper()
    path = method._distill_pass(teacher, "stage2")
    got = torch.from_numpy(np.load(path)).long()

    # the windows of each view by hand: 16x32 every 16 rows and columns (a 16x32 view is one window)
    windows = {(32, 64): [(y, y + 16, x, x + 32) for y in (0, 16) for x in (0, 16, 32)], (16, 32): [(0, 16, 0, 32)]}

    def logits(x):
        h, w = x.shape[-2:]
        total, count = 0, torch.zeros(h, w)
        for y1, y2, x1, x2 in windows[(h, w)]:
            part = F.interpolate(teacher(x[..., y1:y2, x1:x2])["logits"], size=(y2 - y1, x2 - x1),
                                 mode="bilinear", align_corners=True)
            total = total + F.pad(part, (x1, w - x2, y1, h - y2))
            count[y1:y2, x1:x2] += 1
        return total / count

    def probs(z, mirrored):
        p = F.interpolate(F.softmax(z, 1), size=(32, 64), mode="bilinear", align_corners=True)
        return p.flip(-1) if mirrored else p

    with torch.no_grad():
        frames = torch.stack([ctx.target_view.resized(ctx.target[i])["image"] for i in range(len(ctx.target))])
        expected = []
        for batch in frames.split(2):
            total = 0
            for size in ((16, 32), (32, 64)):
                x = method.normalize(F.interpolate(batch, size=size, mode="bilinear", align_corners=False)
                                     if size != (32, 64) else batch, teacher)
                total = total + probs(logits(x), False) + probs(logits(x.flip(-1)), True)
            conf, labels = (total / 4).max(1)
            expected.append(labels.masked_fill(conf <= 0.23, IGNORE_INDEX))
    expected = torch.cat(expected)
    assert 0.05 < (expected != IGNORE_INDEX).float().mean() < 0.95  # the threshold bites
    assert torch.equal(got, expected)
    # the soft labels (and so the initial prototypes) stay the plain network's, without these options
    method.start_stage(Stage("stage1", 2), network)
    soft = torch.from_numpy(np.load(method.soft_labels_path).astype(np.float32))
    with torch.no_grad():
        plain = F.softmax(network(method.normalize(frames, network))["logits"], 1)
        mirror = F.softmax(network(method.normalize(frames.flip(-1), network))["logits"], 1).flip(-1)
    assert torch.allclose(soft, plain, rtol=1e-3, atol=0)  # float16
    assert not torch.allclose(soft, (plain + mirror) / 2, rtol=1e-3, atol=0)
