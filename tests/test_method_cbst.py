"""CBST (udafast.methods.cbst): thresholds and pseudo-labels against their definitions on a hand-made
target set, the schedules, the stored labels file, rare-class mining, and short Trainer runs."""
import copy
import json
import math
import os
import types

import numpy as np
import pytest
import torch
import torch.nn as nn

from udafast.config import DEFAULTS, merge
from udafast.engine.context import TrainingContext
from udafast.engine.data import BatchStream, TrainView
from udafast.engine.trainer import Trainer
from udafast.inference import InferenceOptions
from udafast.methods.cbst import CBST, _RoundExtras, mine_classes, portion_schedule, source_fraction, subsample_mask

C = 4


class PixelNet(nn.Module):
    """Per-pixel linear logits at the input's resolution (so the labelling passes need no resampling
    and the test can recompute the probabilities exactly)."""
    normalization = "imagenet"

    def __init__(self, classes=C, scale=2.0):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.backbone = nn.Conv2d(3, classes, 1)
        with torch.no_grad():
            self.backbone.weight.copy_(torch.randn(self.backbone.weight.shape, generator=g) * scale)
            self.backbone.bias.copy_(torch.randn(classes, generator=g) * scale / 2)

    def forward(self, x):
        return {"logits": self.backbone(x)}

    def param_groups(self, lr):
        return [{"params": list(self.parameters()), "lr": lr}]


class FakeContext:
    """The parts of the run context that CBST uses, over a hand-made target set of `n` images h x w."""

    def __init__(self, out_dir, n=5, h=8, w=12, n_source=40, batch_size=2, crop=(4, 8)):
        g = torch.Generator().manual_seed(2)
        self.device, self.backend, self.out_dir = torch.device("cpu"), "reference", str(out_dir)
        self.target = [{"image": torch.rand(3, h, w, generator=g), "name": f"t{i}"} for i in range(n)]
        self.source = [{"image": torch.rand(3, h, w, generator=g), "label": torch.randint(0, C, (h, w), generator=g),
                        "name": f"s{i}"} for i in range(n_source)]
        self.target_view = TrainView(crop=crop, flip=0.0)
        self.source_view = TrainView(crop=crop, flip=0.0)
        self.source_stream = types.SimpleNamespace(batch_size=batch_size, num_workers=0)
        self.target_stream = BatchStream(self.target, 2, self.target_view, seed=5)
        self.mixed_stream, self.seed = None, 0
        self.subsets, self.messages = [], []
        self.rank, self.world = 0, 1
        self.skip_log = None  # bad samples raise

    target_frames, target_frame_size = TrainingContext.target_frames, TrainingContext.target_frame_size
    _target_frame = TrainingContext._target_frame
    shared_array = TrainingContext.shared_array
    all_reduce_ = TrainingContext.all_reduce_

    def set_mixed_stream(self, indices, extras=None, seed=None):
        self.subsets.append(list(indices))
        self.extras = extras
        return TrainingContext.set_mixed_stream(self, indices, extras, seed)

    def log(self, text):
        self.messages.append(text)


def config(**section):
    cfg = merge(DEFAULTS, {"method": "cbst", "model": {"name": "small", "num_classes": C},
                           "optimizer": {"name": "sgd", "lr": 1e-3}, "train": {"iters": 3}})
    cfg["cbst"] = section
    return cfg


def make(tmp_path, ctx=None, **section):
    ctx = ctx or FakeContext(tmp_path)
    return CBST(config(**section), ctx), ctx


def start(method, round_index=0, resume=False, model=None):
    stage = method.stages()[round_index]
    method.start_stage(stage, model or PixelNet(), resume=resume)
    return stage


# -- the definitions, written out ------------------------------------------------------------------
def expected_probs(ctx, model):
    from udafast.data.transforms import normalize
    images = torch.stack([s["image"] for s in ctx.target])
    with torch.no_grad():
        return torch.softmax(model(normalize(images, "imagenet"))["logits"], dim=1)


def expected_thresholds(probs, portion, every, bins):
    """SPEC 1.1's streaming threshold over every `every`-th pixel of each class's list per image."""
    conf, pred = probs.amax(1), probs.argmax(1)
    lists = {c: [] for c in range(C)}
    for b in range(probs.shape[0]):
        flat_c, flat_p = conf[b].reshape(-1).tolist(), pred[b].reshape(-1).tolist()
        for c in range(C):
            lists[c].extend([x for x, p in zip(flat_c, flat_p) if p == c][::every])
    out = []
    for c in range(C):
        values = sorted(lists[c], reverse=True)
        n = math.floor(len(values) * portion)
        if n < 1:
            out.append(1.0)
            continue
        exact = values[n - 1]
        out.append(min(math.floor(exact * bins), bins - 1) / bins)
    return torch.tensor(out, dtype=torch.float32)


def expected_labels(probs, thresholds):
    k = thresholds.clamp(min=torch.finfo(torch.float32).tiny)
    p = probs.numpy()
    labels = np.full(p.shape[:1] + p.shape[2:], 255, dtype=np.uint8)
    for b in range(p.shape[0]):
        for y in range(p.shape[2]):
            for x in range(p.shape[3]):
                ratios = [np.float32(p[b, c, y, x]) / np.float32(k[c]) for c in range(C)]
                best = int(np.argmax(ratios))  # first maximum
                if ratios[best] >= 1:
                    labels[b, y, x] = best
    return labels


# -- tests -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("every", [1, 2, 4])
def test_subsample_mask_keeps_every_nth_pixel_of_each_class_per_image(every):
    pred = torch.randint(0, C, (3, 5, 7))
    pred[0, 0, :3] = 255
    keep = subsample_mask(pred, C, every)
    for b in range(3):
        flat, kept = pred[b].reshape(-1), keep[b].reshape(-1)
        for c in range(C):
            positions = torch.nonzero(flat == c).reshape(-1)
            assert kept[positions].tolist() == [i % every == 0 for i in range(positions.numel())]
        assert not kept[flat == 255].any()


@pytest.mark.parametrize("round_index,bins,every,scale", [(0, 65536, 4, 2.0), (2, 64, 1, 2.0), (6, 2, 4, 0.3)])
def test_thresholds_and_labels_equal_the_definition(tmp_path, round_index, bins, every, scale):
    # at scale 1 (a per-pixel network is its own mirror image: the flip average changes nothing)
    method, ctx = make(tmp_path, rounds=7, bins=bins, subsample=every, label_scale=1.0)
    model = PixelNet(scale=scale)
    start(method, round_index, model=model)
    probs = expected_probs(ctx, model)
    portion = portion_schedule(round_index)
    thresholds = expected_thresholds(probs, portion, every, bins)
    assert torch.equal(method.thresholds, thresholds)
    if bins == 2:  # a threshold in the lowest bin is 0.0: labelled as with a tiny positive threshold
        assert (thresholds == 0).any()
    stored = np.load(method.labels_path(round_index))
    labels = expected_labels(probs, thresholds)
    assert stored.dtype == np.uint8 and np.array_equal(stored, labels)
    counts = np.bincount(labels[labels != 255], minlength=C)
    assert method.label_counts.tolist() == counts.tolist()
    assert method.pred_counts.tolist() == torch.bincount(probs.argmax(1).reshape(-1), minlength=C).tolist()
    assert method.mine == mine_classes(method.pred_counts, 1e-3)


def test_portion_and_source_fraction_schedules():
    assert [round(portion_schedule(t), 6) for t in range(8)] == [0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.5]
    assert [round(source_fraction(t), 6) for t in (0, 1, 4, 12, 13, 30)] == [0.03, 0.0325, 0.04, 0.06, 0.06, 0.06]
    assert portion_schedule(3, 0.5, 0.1, 0.6) == pytest.approx(0.6)


# floor(n * fraction) as crst_seg.py savelst_SrcTgt, at least one image (the mixed set needs no
# batch of source images: before the mixed set, at least a batch was drawn)
@pytest.mark.parametrize("fraction,n_source,batch,expected", [(0.03, 1000, 8, 30), (0.03, 100, 8, 3),
                                                              (0.5, 10, 2, 5), (0.03, 3, 4, 1),
                                                              (0.0325, 1000, 2, 32)])
def test_source_subset_size_and_seeding(tmp_path, fraction, n_source, batch, expected):
    ctx = FakeContext(tmp_path, n_source=n_source, batch_size=batch)
    method, _ = make(tmp_path, ctx, source_start=fraction, source_max=max(fraction, 0.06), rounds=2)
    a, b = method._draw_subset(0), method._draw_subset(1)
    assert len(a) == expected and len(set(a.tolist())) == expected and max(a.tolist()) < n_source
    assert torch.equal(a, method._draw_subset(0))
    if expected < n_source:
        assert not torch.equal(a, b[:len(a)])
    start(method)
    assert ctx.subsets[-1] == a.tolist()


def test_labels_file_complete_reused_on_resume_and_nothing_else_written(tmp_path, monkeypatch):
    method, ctx = make(tmp_path)
    start(method)
    path = method.labels_path(0)
    assert sorted(os.listdir(os.path.dirname(path))) == ["round0_labels.npy"]  # no probabilities, no temp file
    assert np.load(path).shape == (5, 8, 12)
    state = copy.deepcopy(method.extra_state())
    first = np.load(path).copy()

    def fail(*a, **k):
        raise AssertionError("recomputed")

    resumed, ctx2 = make(tmp_path)
    monkeypatch.setattr(resumed, "_thresholds_pass", fail)
    start(resumed, resume=True)
    resumed.load_extra_state(state)
    assert torch.equal(resumed.thresholds, method.thresholds) and resumed.mine == method.mine
    assert ctx2.subsets[-1] == ctx.subsets[-1]
    assert np.array_equal(np.load(path), first)
    # an incomplete file (wrong shape, as a crash would leave only a temp file) is recomputed on resume
    np.save(path, np.zeros((2, 8, 12), np.uint8))
    again, _ = make(tmp_path)
    start(again, resume=True)
    assert np.array_equal(np.load(path), first)
    # without resume, the labels are always recomputed from the given network
    other, _ = make(tmp_path)
    monkeypatch.setattr(other, "_thresholds_pass", fail)
    with pytest.raises(AssertionError, match="recomputed"):
        start(other)


# crst_seg.py kc_parameters: every class predicted on less than mine_port of the pixels, rarest first
@pytest.mark.parametrize("counts,port,expected", [([5, 0, 2, 993], 1e-3, [1]), ([5, 0, 2, 993], 0.0051, [1, 2, 0]),
                                                  ([1, 1, 1, 1], 0.25, []), ([1, 1, 1, 1], 0.2501, [0, 1, 2, 3]),
                                                  ([3, 2, 1, 0], 0.0, []), ([0, 0, 0, 0], 0.5, [])])
def test_mined_classes_are_those_predicted_below_mine_port(counts, port, expected):
    assert mine_classes(torch.tensor(counts), port) == expected


def test_extras_label_and_crop_centres_on_rare_class_pixels(tmp_path):
    method, ctx = make(tmp_path, mine_chance=1.0, mine_port=0.3)
    start(method)
    stored = np.load(method.labels_path(0))
    extras = ctx.extras
    assert isinstance(extras, _RoundExtras) and extras.mine == method.mine and method.mine
    centred = 0
    for epoch in range(4):
        ctx.mixed_stream.epoch = epoch
        for i in range(len(ctx.target)):
            e = extras(i)
            assert e["label"].dtype == torch.int64 and np.array_equal(e["label"].numpy(), stored[i])
            if any((stored[i] == c).any() for c in method.mine):
                y, x = e["crop_center"]
                assert stored[i][y, x] in method.mine
                centred += 1
            else:
                assert e["crop_center"] is None
            assert e["crop_center"] == extras(i)["crop_center"]  # deterministic per (round, index, epoch)
    assert centred > 0
    # pickled for a loader worker: the same extras for the epoch it was made in
    import pickle
    clone = pickle.loads(pickle.dumps(extras))
    assert clone(2)["crop_center"] == extras(2)["crop_center"]
    # mine_chance 0: no crop centres
    never, ctx0 = make(tmp_path / "never", mine_chance=0.0, mine_port=0.3)
    start(never)
    assert all(ctx0.extras(i)["crop_center"] is None for i in range(5))
    # the stream's batches carry the labels (source) and pseudo-labels (target)
    batch = next(ctx.mixed_stream)
    assert batch["label"].shape == (2, 4, 8)


@pytest.mark.parametrize("option,value", [("rounds", 0), ("iters_per_round", 0), ("subsample", 0),
                                          ("portion_start", 0.6), ("portion_max", 1.5), ("source_start", 0.0),
                                          ("source_step", -0.1), ("mine_chance", 1.5), ("bins", 3),
                                          ("mine_port", 1.5), ("mine_port", "0.001"), ("label_batch_size", 0),
                                          ("rounds", 2.5), ("epochs_per_round", 0), ("label_scale", 0.0),
                                          ("flip_average", 1), ("freeze_bn", "yes"), ("label_scale", [0.9, 0.0]),
                                          ("label_slide", {"crop": [4, 4]}), ("label_slide", [4, 4])])
def test_bad_options_raise(tmp_path, option, value):
    with pytest.raises(ValueError, match=f"cbst.{option}"):
        make(tmp_path, **{option: value})


def test_unknown_option_raises(tmp_path):
    with pytest.raises(ValueError, match="unknown option"):
        make(tmp_path, portion=0.3)


# -- the trainer -----------------------------------------------------------------------------------
def tiny_config(init=None):
    synth = {"name": "synthetic", "split": "train", "options": {"size": [32, 64], "length": 8}}
    return merge(DEFAULTS, {
        "method": "cbst", "threads": 1, "init": init, "model": {"name": "small", "num_classes": 19, "width": 8},
        "data": {"source": merge(synth, {"options": {"domain": "source"}}),
                 "target": merge(synth, {"options": {"domain": "target"}}),
                 "val": {"name": "synthetic", "split": "val", "options": {"domain": "target", "size": [32, 64],
                                                                          "length": 4}},
                 "source_view": {"crop": [16, 32]}, "target_view": {"crop": [16, 32]}, "batch_size": 2},
        "optimizer": {"name": "adam", "lr": 1e-3, "schedule": "constant"},
        "train": {"iters": 2, "panels": 0},
        "cbst": {"rounds": 2, "iters_per_round": 2, "source_start": 0.5, "source_max": 0.5},
    })


@pytest.fixture(scope="module")
def source_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("source_only")
    cfg = tiny_config()
    cfg.update(method="source_only")
    cfg["train"]["iters"] = 3
    Trainer(cfg, folder, tensorboard=False).run()
    return str(folder / "checkpoints" / "last.pt")


def test_trainer_two_rounds_and_resume_mid_round(tmp_path, source_checkpoint):
    cfg = tiny_config(init=source_checkpoint)
    cfg["train"]["ckpt_every"] = 1
    metrics = Trainer(cfg, tmp_path / "run", tensorboard=False).run()
    assert set(metrics["stages"]) == {"round0", "round1"} and math.isfinite(metrics["miou"])
    with open(tmp_path / "run" / "metrics.json") as f:
        assert json.load(f)["stages"]["round1"]["iters"] == 2
    assert sorted(os.listdir(tmp_path / "run" / "cbst")) == ["round0_labels.npy", "round1_labels.npy"]
    final = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    # iteration 1 of round 1 (iteration 3 of the run)
    mid = torch.load(tmp_path / "run" / "checkpoints" / "iter_3.pt", weights_only=True)
    assert mid["method"]["extra"]["round"] == 1

    resumed = Trainer(cfg, tmp_path / "run", resume=str(tmp_path / "run" / "checkpoints" / "iter_3.pt"),
                      tensorboard=False).run()
    again = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert resumed["miou"] == metrics["miou"]
    for k, v in final["model"].items():
        assert torch.equal(v, again["model"][k]), k
    for k in ("thresholds", "subset", "label_counts"):
        assert torch.equal(final["method"]["extra"][k], again["method"]["extra"][k])


# -- issue 12: as crst_seg.py runs it ---------------------------------------------------------------
def test_mixed_set_unions_parts_with_their_own_views_and_extras():
    from udafast.engine.data import MixedSet
    a = [{"image": torch.full((1, 2, 2), float(i)), "label": torch.zeros(2, 2, dtype=torch.int64)} for i in range(3)]
    b = [{"image": torch.full((1, 2, 2), 10.0 + i)} for i in range(2)]

    def tag(value):
        return lambda sample, generator, extras=None: dict(sample, image=sample["image"] + value,
                                                           label=(extras or {}).get("label", sample.get("label")))

    mixed = MixedSet([(a, tag(100), None), ([], tag(0), None),
                      (b, tag(200), lambda j: {"label": torch.full((2, 2), j, dtype=torch.int64)})])
    assert len(mixed) == 5 and [mixed.locate(i) for i in range(5)] == [(0, 0), (0, 1), (0, 2), (2, 0), (2, 1)]
    out = [mixed.view(mixed[i], None, mixed.extras(i)) for i in range(5)]
    assert [float(o["image"][0, 0, 0]) for o in out] == [100, 101, 102, 210, 211]
    assert [int(o["label"][0, 0]) for o in out] == [0, 0, 0, 0, 1]
    with pytest.raises(IndexError):
        mixed.locate(5)


def test_one_epoch_visits_each_selected_source_and_target_image_once_in_a_shuffled_mixed_order(tmp_path):
    ctx = FakeContext(tmp_path, n=5, n_source=40, batch_size=2)
    method, _ = make(tmp_path, ctx, source_start=0.075, source_max=0.075)  # floor(40 * 0.075) = 3 source images
    start(method)
    stream = ctx.mixed_stream
    assert ctx.subsets[-1] == method.subset.tolist() and len(method.subset) == 3
    assert stream.batches_per_epoch == 4 and method.stages()[0].iters == 2 * 4  # epochs_per_round 2
    epochs = []
    for _ in range(2):
        order = []
        for _ in range(stream.batches_per_epoch):
            batch = next(stream)
            assert batch["image"].shape == (2, 3, 4, 8) and batch["label"].shape == (2, 4, 8)
            order += batch["index"].tolist()
        epochs.append(order)
    for order in epochs:
        assert sorted(order) == list(range(8))  # 3 source (0-2) + 5 target (3-7), each once
        sources = [p for p, i in enumerate(order) if i < 3]
        assert sources != [0, 1, 2] and sources != [5, 6, 7]  # not one domain then the other
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    # batches mix the domains
    assert any((a < 3) != (b < 3) for a, b in zip(epochs[0][::2], epochs[0][1::2]))


def test_trainer_steps_the_method_on_the_mixed_stream(tmp_path, source_checkpoint, monkeypatch):
    seen = []
    original = CBST.step

    def spy(self, batch, it, iters):
        seen.append(sorted(batch))
        return original(self, batch, it, iters)

    monkeypatch.setattr(CBST, "step", spy)
    cfg = tiny_config(init=source_checkpoint)
    cfg["cbst"] = {"rounds": 1, "source_start": 0.5, "source_max": 0.5}  # 4 + 8 images: 6 batches, 2 epochs
    metrics = Trainer(cfg, tmp_path / "run", tensorboard=False).run()
    assert metrics["stages"]["round0"]["iters"] == 12 and seen == [["mixed"]] * 12


@pytest.mark.parametrize("freeze", [True, False])
def test_batchnorm_is_frozen_while_retraining(tmp_path, freeze):
    from udafast.models import build_model
    model = build_model({"name": "small", "num_classes": C, "width": 4, "feature_dim": 16})
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn
    method, ctx = make(tmp_path, freeze_bn=freeze, label_scale=1.0)
    start(method, model=model)
    model.train()  # as the trainer leaves it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method.step({"mixed": next(ctx.mixed_stream)}, 0, 10)
    after = model.state_dict()
    bn_keys = [k for k in after if any(k.startswith(n + ".") for n, m in model.named_modules()
                                         if isinstance(m, nn.BatchNorm2d))]
    assert any(k.endswith("running_mean") for k in bn_keys) and any(k.endswith(".weight") for k in bn_keys)
    changed = {k for k in bn_keys if not torch.equal(before[k], after[k])}
    if freeze:  # running statistics used and kept, affine parameters not trained
        assert not changed
        assert all(not p.requires_grad for m in bn for p in m.parameters())
    else:
        assert any(k.endswith("running_mean") for k in changed) and any(k.endswith(".weight") for k in changed)
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])  # the step did train


class MirrorNet(nn.Module):
    """Logits of a 1x3 convolution (asymmetric kernel): not its own mirror image."""
    normalization = "imagenet"

    def __init__(self, classes=3):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.conv = nn.Conv2d(2, classes, (1, 3), padding=(0, 1)).double()
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g, dtype=torch.float64))
            self.conv.bias.copy_(torch.randn(classes, generator=g, dtype=torch.float64))
        self.sizes = []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return {"logits": self.conv(x)}


def _hand_logits(weight, bias, image):
    """The 1x3 convolution (zero padding) pixel by pixel: [C, H, W]."""
    ch, h, w = image.shape
    out = np.zeros((weight.shape[0], h, w))
    for c in range(weight.shape[0]):
        for y in range(h):
            for x in range(w):
                total = bias[c]
                for i in range(ch):
                    for k in range(3):
                        xx = x + k - 1
                        if 0 <= xx < w:
                            total += weight[c, i, 0, k] * image[i, y, xx]
                out[c, y, x] = total
    return out


def _softmax(z):
    e = np.exp(z - z.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)


def test_labelling_pass_averages_the_image_and_its_mirror_by_hand():
    from udafast.methods.cbst import label_probabilities
    net = MirrorNet()
    image = torch.randn(1, 2, 3, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    w, b, x = net.conv.weight.detach().numpy(), net.conv.bias.detach().numpy(), image[0].numpy()
    plain = _softmax(_hand_logits(w, b, x))
    mirrored = _softmax(_hand_logits(w, b, x[:, :, ::-1]))[:, :, ::-1]  # the mirror's prediction, mirrored back
    expected = 0.5 * (plain + mirrored)
    identity = lambda t: t  # noqa: E731
    got = label_probabilities(net, image, identity, InferenceOptions(flip=True))
    assert got.dtype == torch.float32 and np.allclose(got[0].numpy(), expected, rtol=1e-6, atol=1e-7)
    assert not np.allclose(plain, expected, atol=1e-3)  # the mirror matters for this network
    assert np.allclose(label_probabilities(net, image, identity, InferenceOptions())[0].numpy(), plain,
                       rtol=1e-6, atol=1e-7)


def test_labelling_pass_runs_at_the_code_eval_scale_with_flips_in_both_passes(tmp_path):
    import torch.nn.functional as F
    from udafast.methods.cbst import label_probabilities
    net = MirrorNet()
    image = torch.rand(1, 2, 20, 30, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    got = label_probabilities(net, image, lambda t: t, InferenceOptions(scales=(0.9,)))
    assert net.sizes == [(18, 27)] and got.shape == (1, 3, 20, 30)
    small = F.interpolate(image, size=(18, 27), mode="bilinear", align_corners=False)
    expected = torch.softmax(F.interpolate(net.conv(small), size=(20, 30), mode="bilinear", align_corners=True), 1)
    assert torch.allclose(got, expected.float(), rtol=1e-6, atol=1e-7)
    # through CBST: both passes (thresholds, labels) see the frame at 0.9 and its mirror
    seen = []

    class Spy(PixelNet):
        def forward(self, x):
            seen.append(tuple(x.shape))
            return super().forward(x)

    method, ctx = make(tmp_path)
    assert method.options["label_scale"] == 0.9 and method.options["flip_average"] is True
    start(method, model=Spy())
    frames = len(ctx.target)
    assert len(seen) == 2 * 2 * math.ceil(frames / 2)  # 2 passes x (image, mirror) x batches of 2
    assert {s[-2:] for s in seen} == {(round(8 * 0.9), round(12 * 0.9))}


def test_labelling_pass_takes_several_scales_and_sliding_windows(tmp_path):
    """label_scale as a list and label_slide reach both passes (udafast.inference, tested there
    against hand computations): each frame at 0.5 and 1.0, each view in 4x4 windows every 4x4 pixels."""
    seen = []

    class Spy(PixelNet):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return super().forward(x)

    method, ctx = make(tmp_path, label_scale=[0.5, 1.0], label_slide={"crop": [4, 4], "stride": [4, 4]})
    start(method, model=Spy())
    batches = math.ceil(len(ctx.target) / 2)
    # per batch: (4x6 frame: 2 windows, 8x12: 6 windows) x (image, mirror); two passes
    assert len(seen) == 2 * batches * 2 * (2 + 6) and set(seen) == {(4, 4)}


def test_rounds_last_epochs_of_the_mixed_set_and_fractions_add_up_as_the_script(tmp_path):
    ctx = FakeContext(tmp_path, n=5, n_source=200, batch_size=2)
    method, _ = make(tmp_path, ctx, rounds=3)
    p = 0.03
    for t in range(3):
        assert method.subset_size(t) == math.floor(200 * p)  # crst_seg.py: src_portion += step, floor(n * portion)
        assert method.stages()[t].iters == 2 * ((math.floor(200 * p) + 5) // 2)
        p = min(p + 0.0025, 0.06)
    assert [s.iters for s in make(tmp_path, ctx, iters_per_round=7)[0].stages()] == [7, 7, 7]


def test_source_and_target_crops_must_match(tmp_path):
    cfg = config()
    cfg["data"] = {"source_view": {"crop": [4, 8]}, "target_view": {"crop": [4, 6]}}
    with pytest.raises(ValueError, match="data.source_view.crop"):
        CBST(cfg, FakeContext(tmp_path))
    cfg["data"]["target_view"]["crop"] = (4, 8)
    CBST(cfg, FakeContext(tmp_path))


def test_round_pseudo_labels_are_recorded_against_the_target_truth(tmp_path, monkeypatch):
    ctx = FakeContext(tmp_path)
    g = torch.Generator().manual_seed(9)
    for s in ctx.target:
        s["truth"] = torch.randint(0, C, s["image"].shape[-2:], generator=g)
    calls = []
    method, _ = make(tmp_path, ctx)
    monkeypatch.setattr(method, "record_labels", lambda name, labels, truth=None: calls.append((name, labels, truth)))
    start(method)
    stored = torch.from_numpy(np.load(method.labels_path(0)).astype(np.int64))
    assert [c[0] for c in calls] == ["pseudo"] * 3  # batches of 2 of the 5 frames
    assert torch.equal(torch.cat([c[1] for c in calls]), stored)
    assert torch.equal(torch.cat([c[2] for c in calls]), torch.stack([s["truth"] for s in ctx.target]))
