"""DAFormer (udafast/methods/daformer.py) and its rare-class sampling (udafast/data/rare_class.py,
udafast.engine.data.RareClassStream): the label pooling, the feature distance, the class
probabilities and their cache, the stream's draws and resume, the step, the warm-up schedule, a
Trainer run with exact resume and option checks. The authors' figures are in
test_method_daformer_golden.py."""
import json
import math
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import dacs_recipes as R  # noqa: E402
from conftest import assert_bitwise_equal, run_and_resume, tiny_run_config  # noqa: E402

import udafast.methods.daformer as daformer  # noqa: E402
from udafast.config import DEFAULTS, merge  # noqa: E402
from udafast.data import rare_class  # noqa: E402
from udafast.engine.data import BatchStream, RareClassStream, TrainView, UniformDrawStream  # noqa: E402
from udafast.engine.trainer import Trainer, apply_schedule  # noqa: E402
from udafast.methods.base import build_optimizer  # noqa: E402
from udafast.models import build_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

RCS_TINY = {"rcs_min_pixels": 0, "ignore_top": 2, "ignore_bottom": 4}


# -- label pooling and feature distance ---------------------------------------------------------
def test_downscale_label_ratio_keeps_the_majority_above_the_ratio():
    labels = torch.tensor([[[1, 1, 2, 2],
                            [1, 0, 2, 255],
                            [3, 3, 255, 255],
                            [3, 3, 255, 4]]])
    out = daformer.downscale_label_ratio(labels, 2, 0.75, num_classes=5)
    # 1 covers 3/4; 2 covers 3/4 (the ignored pixel counts against it); 3 all; ignore the majority
    assert out.tolist() == [[[1, 2], [3, 255]]]
    assert daformer.downscale_label_ratio(labels, 2, 0.8, 5).tolist() == [[[255, 255], [3, 255]]]
    with pytest.raises(ValueError, match="scale"):
        daformer.downscale_label_ratio(labels, 1, 0.75, 5)


def test_feature_distance_means_the_l2_norm_over_kept_cells():
    g = torch.Generator().manual_seed(0)
    f, r = torch.randn(2, 6, 4, 4, generator=g), torch.randn(2, 6, 4, 4, generator=g)
    labels = torch.full((2, 16, 16), 0)
    labels[0, :4, :4] = 7  # one cell of image 0 is a thing class
    everything = daformer.feature_distance(f, r, labels, None, 0.75, 19)
    assert float(everything) == pytest.approx(float((f - r).norm(dim=1).mean()), rel=1e-6)
    one = daformer.feature_distance(f, r, labels, daformer.THING_CLASSES, 0.75, 19)
    assert float(one) == pytest.approx(float((f[0, :, 0, 0] - r[0, :, 0, 0]).norm()), rel=1e-6)


def test_feature_distance_without_kept_pixels_is_zero_with_zero_gradient():
    f = torch.randn(1, 4, 2, 2, requires_grad=True)
    d = daformer.feature_distance(f, torch.zeros(1, 4, 2, 2), torch.zeros(1, 8, 8, dtype=torch.long), [7], 0.75, 19)
    d.backward()
    assert float(d.detach()) == 0 and torch.equal(f.grad, torch.zeros_like(f))


def test_feature_distance_rejects_a_grid_the_labels_do_not_pool_to():
    with pytest.raises(ValueError, match="feature_distance"):
        daformer.feature_distance(torch.zeros(1, 4, 3, 3), torch.zeros(1, 4, 3, 3),
                                  torch.zeros(1, 16, 9, dtype=torch.long), [7], 0.75, 19)


# -- class probabilities and the cache ----------------------------------------------------------
def test_rcs_probabilities_order_classes_by_total_pixels():
    stats = [{0: 100, 5: 3}, {0: 50, 7: 10}, {5: 2}]
    classes, probs = rare_class.rcs_class_probabilities(stats, 0.1)
    assert classes == [5, 7, 0]
    f = torch.tensor([5.0, 10.0, 150.0], dtype=torch.float64) / 165
    torch.testing.assert_close(probs, torch.softmax((1 - f) / 0.1, 0))
    assert rare_class.samples_with_class(stats, classes, 3) == {5: [], 7: [1], 0: [0, 1]}  # more than 3
    with pytest.raises(ValueError, match="temperature"):
        rare_class.rcs_class_probabilities(stats, 0)


class _Labels(torch.utils.data.Dataset):
    """A dataset of given label maps with a root folder (for the cache) and a counter of reads."""

    def __init__(self, root, labels, split="train"):
        self.root, self.split, self.labels = str(root), split, labels
        self.names = [f"s{i}.png" for i in range(len(labels))]
        self.reads = 0

    def __len__(self):
        return len(self.labels)

    def train_label(self, index):
        self.reads += 1
        return self.labels[index]

    def __getitem__(self, index):
        label = torch.from_numpy(self.labels[index].astype(np.int64))
        return {"image": torch.rand(3, *label.shape, generator=torch.Generator().manual_seed(index)),
                "label": label, "name": self.names[index]}


def _label_maps(n=6, h=16, w=16):
    maps = [np.zeros((h, w), np.uint8) for _ in range(n)]
    for i, m in enumerate(maps):
        m[: h // 2] = 2
        m[h - 2:, : 2 + i] = 255
    maps[3][4:8, 4:8] = 11  # the rare class: 16 pixels in one image
    maps[5][0, 0] = 11
    maps[1][0, :5] = 6  # 5 pixels: no image has more than 8
    return maps


def test_class_stats_are_cached_beside_the_dataset_and_checked(tmp_path):
    ds = _Labels(tmp_path, _label_maps())
    lines = []
    first = rare_class.class_stats(ds, lines.append)
    path = tmp_path / "udafast_class_stats_train.json"
    assert path.is_file() and ds.reads == 6 and first[3][11] == 16 and 255 not in first[0]
    assert rare_class.class_stats(ds, lines.append) == first and ds.reads == 6  # read back, not recounted
    ds.names[0] = "other.png"
    rare_class.class_stats(ds, lines.append)
    assert ds.reads == 12 and any("other samples" in line for line in lines)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".partial")]


def test_class_stats_of_an_unwritable_root_are_used_uncached(tmp_path):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    try:
        if os.access(root, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        lines = []
        stats = rare_class.class_stats(_Labels(root, _label_maps()), lines.append)
        assert stats[3][11] == 16 and any("could not cache" in line for line in lines)
    finally:
        root.chmod(0o700)


# -- the stream ---------------------------------------------------------------------------------
def _rcs_stream(ds, seed=0, min_pixels=8, ratio=0.5, crop=None):
    stats = rare_class.class_stats(ds)
    classes, probs = rare_class.rcs_class_probabilities(stats, 0.01)
    keep = [i for i, c in enumerate(classes) if c != 6]  # no image with more than 8 pixels of it
    classes, probs = [classes[i] for i in keep], probs[keep] / probs[keep].sum()
    with_class = rare_class.samples_with_class(stats, classes, min_pixels)
    view = TrainView(crop=crop, flip=0.0)
    return RareClassStream(ds, 2, view, classes, probs, with_class, min_pixels * ratio, seed=seed)


def test_rare_class_stream_draws_rare_classes_from_the_images_that_hold_them(tmp_path):
    ds = _Labels(tmp_path, _label_maps())
    stats = rare_class.class_stats(ds)
    classes, probs = rare_class.rcs_class_probabilities(stats, 0.01)
    with_class = rare_class.samples_with_class(stats, classes, 8)
    assert with_class[6] == []  # the run's context refuses this (DAFormer asserts); drop it here
    del with_class[6]
    keep = [i for i, c in enumerate(classes) if c != 6]
    stream = RareClassStream(ds, 2, TrainView(flip=0.0), [classes[i] for i in keep], probs[keep] / probs[keep].sum(),
                             with_class, 4, seed=0)
    seen = [next(stream) for _ in range(20)]
    drawn = torch.cat([b["rare_class"] for b in seen])
    # 11 (17 pixels) is the rarest class left
    assert set(drawn.tolist()) <= {11, 2, 0} and (drawn == 11).float().mean() > 0.9
    for b in seen:
        for c, index in zip(b["rare_class"].tolist(), b["index"].tolist()):
            assert c != 11 or index == 3  # image 5 holds only 1 pixel of class 11


def test_rare_class_stream_redraws_crops_without_the_class(tmp_path):
    ds = _Labels(tmp_path, _label_maps())
    stream = _rcs_stream(ds, crop=(8, 8))
    batches = [next(stream) for _ in range(10)]
    hits = [int((b["label"][i] == 11).sum()) for b in batches for i in range(2) if b["rare_class"][i] == 11]
    # a random 8x8 crop holds more than 4 pixels of the 4x4 square about half the time; with up to
    # ten re-draws almost always
    assert len(hits) >= 15 and sum(h > 4 for h in hits) >= len(hits) - 1


def test_rare_class_stream_is_seeded_and_resumes(tmp_path):
    ds = _Labels(tmp_path, _label_maps())
    a, b = _rcs_stream(ds, crop=(8, 8)), _rcs_stream(ds, crop=(8, 8))
    first = [next(a) for _ in range(7)]
    b.load_state_dict(_rcs_stream(ds).state_dict())
    for _ in range(4):
        next(b)
    resumed = _rcs_stream(ds, crop=(8, 8))
    resumed.load_state_dict(b.state_dict())
    for x, y in zip(first[4:], [next(resumed) for _ in range(3)]):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["index"], y["index"])
    other = _rcs_stream(ds, seed=1, crop=(8, 8))
    assert not all(torch.equal(x["image"], next(other)["image"]) for x in first)
    assert isinstance(a, BatchStream) and a.state_dict()["position"] == 7 - 3 * a.epoch


def test_uniform_draw_stream_draws_with_replacement_seeded_and_resumes(tmp_path):
    """DAFormer's target under RCS: each image drawn uniformly with replacement (a plain stream's
    epoch is a permutation); reproducible from (seed, epoch, position), with loader workers too."""
    ds = _Labels(tmp_path, _label_maps(n=8))

    def stream(seed=0, workers=0, rank=0, world=1):
        return UniformDrawStream(ds, 2, TrainView(flip=0.5), seed=seed, num_workers=workers, rank=rank, world=world)
    a = stream()
    drawn = [next(a)["index"].tolist() for _ in range(40)]  # 10 epochs of 4 batches
    epochs = [sum(drawn[e * 4:(e + 1) * 4], []) for e in range(10)]
    assert all(0 <= i < 8 for e in epochs for i in e) and a.state_dict() == {"epoch": 9, "position": 4}
    assert any(len(set(e)) < 8 for e in epochs)  # all ten epochs permutations: probability (8!/8^8)^10
    assert sorted(sum(epochs, [])) != sorted(list(range(8)) * 10)
    resumed = stream()
    resumed.load_state_dict({"epoch": 3, "position": 2})
    assert [next(resumed)["index"].tolist() for _ in range(6)] == drawn[14:20]
    loaded = stream(workers=2)
    assert [next(loaded)["index"].tolist() for _ in range(5)] == drawn[:5]
    loaded.close()
    other = stream(seed=1)
    assert [next(other)["index"].tolist() for _ in range(8)] != drawn[:8]
    # processes share the single process's draws, as DistributedSampler shares a permutation
    first, second = stream(rank=0, world=3)._order(0), stream(rank=1, world=3)._order(0)
    assert first == a._order(0)[0:6:3] and second == a._order(0)[1:6:3] and first != second


# -- the method ---------------------------------------------------------------------------------
class _Ctx(types.SimpleNamespace):
    def build_model(self, overrides=None, init=True):
        torch.manual_seed(1)
        return build_model(self.model_config)


def _method(cls=daformer.DAFormer, **section):
    cfg = merge(DEFAULTS, {"method": cls.name, "model": {"name": "small", "num_classes": R.C, "width": 4},
                           "optimizer": {"name": "sgd", "lr": R.LR, "momentum": 0.9, "weight_decay": 5e-4},
                           "data": {"batch_size": 2}})
    cfg[cls.name] = {"rcs": False, "ignore_top": 0, "ignore_bottom": 0, "fd_classes": [4], **section}
    ctx = _Ctx(device=torch.device("cpu"), backend="auto", model_config=cfg["model"], log=lambda text: None)
    m = cls(cfg, ctx)
    torch.manual_seed(0)
    m.start_stage(None, build_model(m.config["model"]))
    return m


def _batch(seed=0, b=2, h=32, w=32):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, R.C, (b, h, w), generator=g)
    label[0, :16, :16] = 4
    return {"source": {"image": torch.rand(b, 3, h, w, generator=g), "label": label},
            "target": {"image": torch.rand(b, 3, h, w, generator=g)}}


@pytest.mark.parametrize("replacement", [True, False])
def test_rare_class_sampling_draws_the_target_with_replacement_as_lhoyer(replacement):
    """lhoyer's get_rare_class_sample draws the target image with np.random.choice; the flag off
    keeps the shuffled passes."""
    calls = []
    m = _method()
    m.ctx.set_rare_class_sampling = lambda *args: calls.append("rcs") or ([4], torch.ones(1))
    m.ctx.draw_target_with_replacement = lambda: calls.append("target")
    m.options.update(rcs=True, rcs_target_replacement=replacement)
    m.start_stage(None, build_model(m.config["model"]))
    assert calls == (["rcs", "target"] if replacement else ["rcs"])


def test_daformer_defaults_are_its_configs():
    d = daformer.DAFormer.defaults
    assert (d["alpha"], d["ignore_top"], d["ignore_bottom"], d["jitter_strength"]) == (0.999, 15, 120, 0.2)
    assert (d["rcs_temperature"], d["rcs_min_pixels"], d["rcs_min_crop_ratio"]) == (0.01, 3000, 0.5)
    assert (d["fd_lambda"], d["fd_classes"], d["fd_scale_min_ratio"]) == (0.005, [6, 7, 11, 12, 13, 14, 15, 16, 17, 18], 0.75)
    assert d["lhoyer_batch_classes"] and d["lhoyer_ema_offset"] and d["lhoyer_source_mean_all"] and d["lhoyer_align_corners"]
    assert d["rcs"] and d["rcs_target_replacement"]


@pytest.mark.parametrize("lhoyer", [True, False])
def test_lhoyer_align_corners_upsamples_as_mmseg_resize(lhoyer):
    """lhoyer's heads resize logits with align_corners=False (mmseg's `resize`), the DACS code with True:
    the method's upsampling, its gradient included, is F.interpolate's with that alignment."""
    m = _method(lhoyer_align_corners=lhoyer)
    logits = torch.randn(2, 5, 4, 6, dtype=torch.float64, requires_grad=True)
    ours = m.upsample(logits, (32, 40))
    theirs = F.interpolate(logits, size=(32, 40), mode="bilinear", align_corners=not lhoyer)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    weight = torch.randn_like(ours)
    grad, = torch.autograd.grad((ours * weight).sum(), logits)
    ref, = torch.autograd.grad((theirs * weight).sum(), logits)
    torch.testing.assert_close(grad, ref, rtol=0, atol=1e-12)
    # the whole step follows the flag: its teacher pseudo-labels and losses differ between the two
    other = _method(lhoyer_align_corners=not lhoyer)
    assert float(m.step(_batch(), 0, 10)["seg"]) != float(other.step(_batch(), 0, 10)["seg"])


def test_step_adds_the_feature_distance_to_a_frozen_reference():
    m = _method(fd_classes=None, fd_lambda=0.5)
    assert _method(fd_classes=[4]).options["fd_classes"] == [4]
    before = [p.clone() for p in m.reference.parameters()]
    out = m.step(_batch(), 0, 10)
    assert float(out["fd"]) > 0 and not m.reference.training
    assert all(torch.equal(a, b) for a, b in zip(before, m.reference.parameters()))
    assert not any(p.requires_grad for p in m.reference.parameters()) and "imnet" in m.modules


def test_init_reference_is_the_starting_network_and_lambda_zero_builds_none():
    m = _method(fd_classes=None, fd_reference="init")
    start = {k: v.clone() for k, v in m.model.state_dict().items()}
    m.step(_batch(), 0, 10)
    assert_bitwise_equal(m.reference.state_dict(), start, "reference")
    assert not all(torch.equal(v, start[k]) for k, v in m.model.state_dict().items())
    off = _method(fd_lambda=0, fd_classes=None)
    assert off.reference is None and "fd" not in off.step(_batch(), 0, 10)


def test_feature_distance_moves_the_backbone_only_on_thing_class_sources():
    """With no thing class in the source labels the term adds nothing: the step equals fd_lambda 0."""
    a, b = _method(fd_lambda=0.5, fd_classes=[4]), _method(fd_lambda=0.0, fd_classes=[4])
    batch = _batch()
    batch["source"]["label"].clamp_(max=3)  # no pixel of the "thing" class 4
    a.step(batch, 0, 10)
    b.step(batch, 0, 10)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("key,value", [("rcs", 1), ("rcs_temperature", 0), ("rcs_min_pixels", -1),
                                       ("rcs_min_crop_ratio", 1.5), ("rcs_target_replacement", 1), ("fd_lambda", -1), ("fd_classes", [5]),
                                       ("fd_classes", []), ("fd_scale_min_ratio", "x"), ("fd_reference", "coco"),
                                       ("alpha", 2)])
def test_bad_options_raise(key, value):
    with pytest.raises(ValueError, match=f"daformer.{key}"):
        _method(**{key: value})


def test_warmup_then_poly_as_mmcv():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([{"params": [p], "lr": 6e-5}], {"name": "adamw", "lr": 6e-5, "weight_decay": 0.01,
                                                          "warmup_iters": 10, "warmup_ratio": 1e-6, "power": 1.0})
    assert isinstance(opt, torch.optim.AdamW)
    lr = [apply_schedule({"m": opt}, it, 100)["m"] for it in (0, 5, 10, 50)]
    assert lr[0] == pytest.approx(6e-5 * 1e-6)
    assert lr[1] == pytest.approx(6e-5 * 0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert lr[2] == pytest.approx(6e-5 * 0.9) and lr[3] == pytest.approx(6e-5 * 0.5)
    with pytest.raises(ValueError, match="optimizer.warmup_iters"):
        build_optimizer([{"params": [p]}], {"lr": 1e-3, "warmup_iters": -1})


def test_trainer_run_with_rare_class_sampling_resumes_exactly(tmp_path):
    config = tiny_run_config("daformer", train={"iters": 4, "panels": 0}, daformer=RCS_TINY)
    metrics = Trainer(config, tmp_path / "run", tensorboard=False, progress=False).run()
    assert metrics["method"] == "daformer" and math.isfinite(metrics["miou"])
    assert "teacher" in json.loads((tmp_path / "run" / "metrics.json").read_text())["pseudo_labels"]["train"]
    full, resumed = run_and_resume(config, tmp_path / "resume", at=2)
    assert_bitwise_equal(full["model"], resumed["model"], "model")
    for name in ("teacher", "imnet"):
        assert_bitwise_equal(full["method"]["modules"][name], resumed["method"]["modules"][name], name)
    assert_bitwise_equal(full["method"]["generator"], resumed["method"]["generator"], "generator")
    assert full["streams"]["source"] == resumed["streams"]["source"]
    assert full["streams"]["target"] == resumed["streams"]["target"]


def test_a_class_without_images_is_an_error_naming_the_option(tmp_path):
    config = tiny_run_config("daformer", train={"iters": 1, "panels": 0}, daformer={"rcs_min_pixels": 3000})
    with pytest.raises(ValueError, match=r"daformer\.rcs_min_pixels: no source image has more than 3000 pixels"):
        Trainer(config, tmp_path / "run", tensorboard=False, progress=False).run()


@pytest.mark.parametrize("name", ["gta5_daformer", "synthia_daformer", "gta5_daformer_dlv2", "synthia_daformer_dlv2",
                                  "gta5_mic", "synthia_mic", "gta5_mic_dlv2", "synthia_mic_dlv2"])
def test_shipped_configs_carry_the_authors_settings(name):
    """DAFormer's config (AdamW 6e-5, warm-up 1500, poly 1.0, 40k iterations, batch 2 of 512x512
    crops, every DAFormer option) on MiT-B5 or the DeepLabV2 stand-in; MIC's id 81 masking."""
    from udafast.config import read_config
    from udafast.engine.runs import resolve_config
    method = name.split("_")[1]
    config = resolve_config(read_config(name), method)
    assert config["method"] == method
    if name.endswith("dlv2"):  # DAFormer's dlv2red on open-mmlab's ResNet-101-V1c
        assert config["model"] == {"name": "deeplabv2_r101", "pretrained": "imagenet_v1c", "aspp": "two",
                                   "aux_head": False, "num_classes": 19}
    else:
        assert config["model"]["name"] == "mit_b5_daformer"
    assert config["optimizer"] == {**config["optimizer"], "name": "adamw", "lr": 6.0e-5, "weight_decay": 0.01,
                                   "schedule": "poly", "power": 1.0, "warmup_iters": 1500, "warmup_ratio": 1.0e-6}
    assert config["train"]["iters"] == 40000 and config["data"]["batch_size"] == 2
    assert config["data"]["source_view"]["crop"] == [512, 512] == config["data"]["target_view"]["crop"]
    assert config["data"]["source_view"]["cat_max_ratio"] == 0.75 and config["data"]["target_view"]["cat_max_ratio"] == 1.0
    section = dict(config[method])
    if method == "mic":
        assert (section.pop("mask_block_size"), section.pop("mask_ratio"), section.pop("mask_mode")) == (32, 0.7, "separatetrgaug")
        assert section.pop("mask_weight") == 1.0
    assert section == daformer.DAFormer.defaults


def test_rare_class_stream_is_the_same_with_loader_workers(tmp_path):
    ds = _Labels(tmp_path, _label_maps())
    stats = rare_class.class_stats(ds)
    classes, probs = rare_class.rcs_class_probabilities(stats, 0.01)
    keep = [i for i, c in enumerate(classes) if c != 6]
    classes, probs = [classes[i] for i in keep], probs[keep] / probs[keep].sum()
    with_class = rare_class.samples_with_class(stats, classes, 8)

    def stream(workers):
        return RareClassStream(ds, 2, TrainView(crop=(8, 8), flip=0.5), classes, probs, with_class, 4, seed=3,
                               num_workers=workers)
    plain, loaded = stream(0), stream(2)
    for _ in range(4):
        a, b = next(plain), next(loaded)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["rare_class"], b["rare_class"])
    loaded.close()
