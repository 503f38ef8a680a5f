"""DAFormer and MIC against the authors' code (lhoyer/DAFormer, lhoyer/MIC and mmcv v1.3.7, the
version DAFormer pins; repositories, commits, files and functions in each fixture's "provenance"):
the figures in tests/fixtures/authors/daformer_rcs.json, daformer_fdist.json, mic_mask.json and
daformer_schedule.json came from running the authors' functions, transcribed outside this
repository, on the inputs of tests/daformer_recipes.py (seeds inside). Compared: rare-class
sampling's class order and probabilities (get_rcs_class_probs) and per-class sample lists
(UDADataset's min_pixels filter), the label pooling and the thing-class feature distance with its
gradient (downscale_label_ratio, calc_feat_dist), MIC's block mask (generate_mask) and the
learning rates of mmcv's poly schedule with linear warm-up for DAFormer's two param groups."""
import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import daformer_recipes as R  # noqa: E402

from udafast.data.rare_class import rcs_class_probabilities, samples_with_class  # noqa: E402
from udafast.engine.trainer import apply_schedule  # noqa: E402
from udafast.methods.base import build_optimizer  # noqa: E402
from udafast.methods.daformer import downscale_label_ratio, feature_distance  # noqa: E402
from udafast.methods.mic import block_mask  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "authors")


def _load(name):
    with open(os.path.join(FIXTURES, name)) as f:
        return json.load(f)


RCS, FDIST = _load("daformer_rcs.json"), _load("daformer_fdist.json")
MASK, SCHEDULE = _load("mic_mask.json"), _load("daformer_schedule.json")
ALL = {"daformer_rcs.json": RCS, "daformer_fdist.json": FDIST, "mic_mask.json": MASK,
       "daformer_schedule.json": SCHEDULE}

pytestmark = pytest.mark.usefixtures("one_thread")

FLOAT32_TINY = 2.0 ** -126  # float32's smallest normal number
FLOAT32_SUBNORMAL = 2.0 ** -149  # its spacing below FLOAT32_TINY


@pytest.mark.parametrize("name", sorted(ALL))
def test_provenance(name):
    g = ALL[name]
    assert g["provenance"] and all(set(p) >= {"repository", "commit", "file", "function"} for p in g["provenance"])
    assert all(len(p["commit"]) == 40 and int(p["commit"], 16) >= 0 for p in g["provenance"])
    path, functions = g["recipe"].split(":")
    assert path == "tests/daformer_recipes.py"
    assert all(hasattr(R, f.strip()) for f in functions.split(","))


# rare-class sampling ------------------------------------------------------------------------------

RCS_CASES = [("rcs_stats", t) for t in R.RCS_TEMPERATURES] + \
            [("rcs_stats_dominant", t) for t in R.RCS_DOMINANT_TEMPERATURES]


@pytest.mark.parametrize("recipe, temperature", RCS_CASES)
def test_rcs_class_order_and_probabilities(recipe, temperature):
    """The authors compute in float32 (int64 counts / their sum, softmax of (1 - f) / T), udafast
    in float64: rtol 1e-5 at T >= 0.01; at 0.005 the arguments reach ~196, where half a float32
    ulp is 7.6e-6 on each side of a difference, so 2e-5. Below float32's normal range (the
    dominant class) theirs are subnormals, within 2 subnormal steps, or exact zeros, where ours
    must round to 0 in float32 too."""
    expected = RCS["outputs"][recipe][str(temperature)]
    classes, probs = rcs_class_probabilities(getattr(R, recipe)(), temperature)
    assert list(classes) == expected["classes"]
    assert probs.dtype == torch.float64 and probs.shape == (len(expected["classes"]),)
    rtol = 1e-5 if temperature >= 0.01 else 2e-5
    for c, got, want in zip(classes, probs.tolist(), expected["probs"]):
        if want == 0.0:
            assert torch.tensor(got, dtype=torch.float32).item() == 0.0, (c, got)
        elif want < FLOAT32_TINY:
            assert abs(got - want) <= 2 * FLOAT32_SUBNORMAL, (c, got, want)
        else:
            assert got == pytest.approx(want, rel=rtol, abs=0), (c, got, want)


def test_rcs_ties_keep_first_appearance():
    """Equal totals keep the order in which the classes first appear over the samples (DAFormer's
    stable sort over an insertion-ordered dict): 17 (sample 2) before 12 (sample 6), 3 before 4."""
    classes, probs = rcs_class_probabilities(R.rcs_stats(), 0.01)
    classes = list(classes)
    assert classes.index(17) + 1 == classes.index(12) and classes.index(3) + 1 == classes.index(4)
    assert probs[classes.index(17)] == probs[classes.index(12)]
    assert 9 not in classes and 16 not in classes  # absent everywhere: not drawn at all
    assert classes == RCS["outputs"]["rcs_stats"]["0.01"]["classes"]


@pytest.mark.parametrize("min_pixels", R.RCS_MIN_PIXELS)
def test_rcs_samples_with_class(min_pixels):
    """The samples holding strictly more than min_pixels pixels of each class, in sample order."""
    stats = R.rcs_stats()
    classes = RCS["outputs"]["rcs_stats"][str(RCS["settings"]["samples_with_class_temperature"])]["classes"]
    expected = {int(c): v for c, v in RCS["outputs"]["samples_with_class"][str(min_pixels)].items()}
    got = samples_with_class(stats, classes, min_pixels)
    assert {int(c): list(v) for c, v in got.items()} == expected


# feature distance ---------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [8, 4])
def test_downscale_label_ratio(scale):
    labels, _ = R.fdist_inputs()
    got = downscale_label_ratio(labels, scale, R.FDIST_MIN_RATIO, R.NUM_CLASSES)
    assert got.dtype == torch.int64 and got.shape == (2, 64 // scale, 64 // scale)
    assert got.tolist() == FDIST["outputs"]["downscaled"][str(scale)]


@pytest.mark.parametrize("classes", ["things", "none"])
@pytest.mark.parametrize("size", [8, 16])
def test_feature_distance(classes, size):
    """The mean pixel-wise L2 distance (before lambda) and its gradient in the student's features."""
    labels, feats = R.fdist_inputs()
    f, ref = feats[size]
    f = f.clone().requires_grad_(True)
    key = f"{classes}_scale{64 // size}"
    d = feature_distance(f, ref, labels, FDIST["settings"]["classes"][classes], R.FDIST_MIN_RATIO, R.NUM_CLASSES)
    assert d.dim() == 0
    assert d.item() == pytest.approx(FDIST["outputs"]["distance"][key], rel=1e-6, abs=0)
    d.backward()
    assert R.probe(f.grad, FDIST["settings"]["grad_probe_seed"]) == pytest.approx(
        FDIST["outputs"]["grad_probe"][key], rel=1e-6, abs=0)
    assert ref.grad is None


@pytest.mark.parametrize("case", ["stuff_only", "all_ignore"])
@pytest.mark.parametrize("size", [8, 16])
def test_feature_distance_nothing_kept(case, size):
    """No thing pixel survives the pooling: the authors' torch.mean of an empty tensor is NaN (its
    gradient all zeros); udafast returns 0 with a zero gradient."""
    expected = FDIST["outputs"]["empty"][f"{case}_scale{64 // size}"]
    assert expected["kept"] == 0 and expected["distance"] == "nan" and expected["grad_abs_sum"] == 0.0
    labels = R.fdist_empty_labels()[case]
    _, feats = R.fdist_inputs()
    f, ref = feats[size]
    f = f.clone().requires_grad_(True)
    d = feature_distance(f, ref, labels, R.THING_CLASSES, R.FDIST_MIN_RATIO, R.NUM_CLASSES)
    assert d.dim() == 0 and d.item() == 0.0 and not math.isnan(d.item())
    d.backward()
    assert f.grad is not None and torch.count_nonzero(f.grad) == 0


# MIC's block mask ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", MASK["outputs"]["cases"], ids=lambda c: f"{c['size'][0]}x{c['size'][1]}-b{c['block']}")
def test_block_mask(case):
    """The authors' generate_mask after torch.manual_seed(seed) == block_mask with
    torch.Generator().manual_seed(seed): the same draws, the same nearest resize."""
    h, w = case["size"]
    mask = block_mask(case["batch"], (h, w), case["block"], case["ratio"], torch.Generator().manual_seed(case["seed"]))
    assert mask.dtype == torch.float32 and mask.shape == (case["batch"], 1, h, w)
    assert int(mask.sum()) == case["ones"]
    assert "".join(str(int(v)) for v in mask[0, 0, :, 0]) == case["first_column"]
    assert "".join(str(int(v)) for v in mask[0, 0, 0, :]) == case["first_row"]
    assert "".join(str(int(v)) for v in mask[-1, 0, -1, :]) == case["last_image_last_row"]
    assert R.probe(mask) == pytest.approx(case["probe"], rel=1e-6, abs=0)


# schedule -----------------------------------------------------------------------------------------

def test_schedule_poly_with_linear_warmup():
    """The lr mmcv's PolyLrUpdaterHook (linear warm-up) sets before iteration `it`, for the base
    (6e-5) and head (6e-4) groups."""
    S = R.SCHEDULE
    p1, p2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    spec = {"name": "adamw", "lr": S["base_lr"], "weight_decay": 0.01, "schedule": "poly", "power": S["power"],
            "warmup_iters": S["warmup_iters"], "warmup_ratio": S["warmup_ratio"]}
    opt = build_optimizer([{"params": [p1], "lr": S["base_lr"]}, {"params": [p2], "lr": S["head_lr"]}], spec)
    out = SCHEDULE["outputs"]
    assert out["iters"] == S["iters"]
    for it, base, head in zip(out["iters"], out["base_lr"], out["head_lr"]):
        apply_schedule({"model": opt}, it, S["max_iters"])
        assert opt.param_groups[0]["lr"] == pytest.approx(base, rel=1e-6, abs=0), it
        assert opt.param_groups[1]["lr"] == pytest.approx(head, rel=1e-6, abs=0), it
