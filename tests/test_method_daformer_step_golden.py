"""One DAFormer / MIC iteration against the authors' code (lhoyer/DAFormer and lhoyer/MIC:
repositories, commits, files and functions in each fixture's "provenance"): the figures in
tests/fixtures/authors/daformer_step.json and mic_step.json came from running lhoyer's
DACS.forward_train (and MIC's masking consistency module), transcribed outside this repository,
on the inputs of tests/daformer_step_recipes.py (seeds inside) with udafast's small network as the
model (its logits upsampled as udafast does: the one adaptation, see the fixtures' notes), SGD and
the EMA update. Compared, for `DAFormer.step` / `MIC.step(batch, it, iters)`: each loss term
(source CE, thing-class feature distance to the frozen reference, mixed CE, MIC's masked CE), the
pseudo-label weight, the teacher's pseudo-labels, the mixed image, labels and weights (ClassMix
with the authors' classes), MIC's masked image and its pixel weights, and the student's weights and
BatchNorm statistics and the teacher's after the SGD step and the EMA update."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import daformer_step_recipes as R  # noqa: E402

import udafast.methods.dacs as dacs  # noqa: E402
import udafast.methods.mic as mic  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "authors")
NAMES = ("daformer", "mic")
REPOSITORIES = {"daformer": "lhoyer/DAFormer", "mic": "lhoyer/MIC"}


def _load(name):
    with open(os.path.join(FIXTURES, f"{name}_step.json")) as f:
        return json.load(f)


GOLDEN = {name: _load(name) for name in NAMES}

pytestmark = pytest.mark.usefixtures("one_thread")

# float32 steps: the authors' separate backward passes per loss term and udafast's one backward of
# their sum accumulate gradients in another order (the probes agree to ~1e-8)
REL = 1e-6


def close(a, b, rel=REL, abs_=1e-12):
    return a == pytest.approx(b, rel=rel, abs=abs_)


@pytest.mark.parametrize("name", NAMES)
def test_provenance_and_settings(name):
    g = GOLDEN[name]
    assert g["provenance"] and all(set(p) >= {"repository", "commit", "file", "function"} for p in g["provenance"])
    assert {p["repository"] for p in g["provenance"]} == {REPOSITORIES[name]}
    assert all(len(p["commit"]) == 40 and int(p["commit"], 16) >= 0 for p in g["provenance"])
    path, functions = g["recipe"].split(":")
    assert path == "tests/daformer_step_recipes.py"
    assert all(hasattr(R, f.strip()) for f in functions.split(","))
    assert "align_corners=True" in g["notes"]
    s = g["settings"]
    it, iters = R.STEPS[name]
    assert (s["it"], s["iters"]) == (it, iters)
    o = R.config(name)[name]
    assert (s["alpha"], s["pseudo_threshold"], s["pseudo_weight_ignore_top"], s["pseudo_weight_ignore_bottom"]) == \
        (o["alpha"], o["threshold"], o["ignore_top"], o["ignore_bottom"])
    assert (s["imnet_feature_dist_lambda"], s["imnet_feature_dist_classes"],
            s["imnet_feature_dist_scale_min_ratio"]) == (o["fd_lambda"], o["fd_classes"], o["fd_scale_min_ratio"])
    assert not o["jitter"] and not o["blur"] and not s["blur"] and s["color_jitter_probability"] == 1.0
    # lhoyer's _update_ema(it + 1) at the top of the next iteration = udafast's update after step(it)
    assert dacs.teacher_alpha(it + 1, o["alpha"]) == s["alpha_used"]
    if name == "mic":
        assert (s["mask_mode"], s["mask_lambda"], s["mask_ratio"], s["mask_block_size"]) == \
            (o["mask_mode"], o["mask_weight"], o["mask_ratio"], o["mask_block_size"]) == ("separatetrg", 1.0, 0.7, 8)


def test_recipe_exercises_the_terms():
    """The inputs reach every branch: thing-class cells kept and rejected by the 0.75 pooling
    ratio, the ignore label among the drawn classes, a pseudo-label weight strictly in (0, 1),
    blocks both kept and masked."""
    _, batch = R.step_setup("daformer")
    labels = batch["source"]["label"]
    pooled = R.pooled_labels(labels)
    kept = torch.isin(pooled, torch.tensor(R.FD_CLASSES))
    loose = torch.isin(R.downscale_label_ratio(labels, 8, 0.0, R.C), torch.tensor(R.FD_CLASSES))
    assert int(kept.sum()) == GOLDEN["daformer"]["outputs"]["fd_kept_cells"] == 4 < int(loose.sum())
    for name in NAMES:
        out = GOLDEN[name]["outputs"]
        assert any(255 in p for p in out["picked"]) and 0 < out["pseudo_weight"] < 1
        assert out["mixed_weight_values"] == [0.0, out["pseudo_weight"], 1.0]
    mask = R.fixed_mask()
    assert 0 < float(mask.mean()) < 1 and set(mask.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("name", NAMES)
def test_one_iteration(name, monkeypatch):
    """lhoyer's DACS.forward_train (+ MIC's masked pass): source CE and the thing-class feature
    distance to the eval-mode reference, the teacher's pseudo-labels (train mode, the crop's rows at
    weight 0), ClassMix with the authors' classes, the weighted CE on the mixed batch, (MIC) the
    weighted CE of the masked normalised target images against the unmixed pseudo-label weight,
    SGD (heads x10), then the EMA at alpha(it + 1)."""
    g = GOLDEN[name]
    expected = g["outputs"]
    it, iters = R.STEPS[name]
    picked = [torch.tensor(p) for p in expected["picked"]]
    calls = {}

    def classes(labels, generator, batch_classes=False):
        calls["batch_classes"] = batch_classes
        return picked

    def fixed_block_mask(batch, size, block_size, ratio, generator, device=None):
        calls["mask"] = (batch, tuple(size), block_size, ratio)
        return R.fixed_mask().to(device)

    monkeypatch.setattr(dacs, "mix_classes", classes)
    monkeypatch.setattr(mic, "block_mask", fixed_block_mask)
    m, batch = R.step_setup(name)
    reference = {k: v.clone() for k, v in m.reference.state_dict().items()}
    seen = {}
    mix_loss, target_losses = m.mix_loss, m.target_losses

    def mix_spy(x_m, y_m, w_m):
        seen.update(mixed_image=m.normalize(x_m), mixed_label=y_m.tolist(), mixed_weight=w_m.clone())
        return mix_loss(x_m, y_m, w_m)

    def target_spy(x_t, pseudo, weight_t):
        seen.update(pseudo_label=pseudo.tolist(), target_weight=weight_t.clone())
        return target_losses(x_t, pseudo, weight_t)

    m.mix_loss, m.target_losses = mix_spy, target_spy
    if name == "mic":
        masked_images = m.masked_images

        def masked_spy(x_t):
            seen["masked_image"] = masked_images(x_t)
            return seen["masked_image"]
        m.masked_images = masked_spy

    losses = m.step(batch, it, iters)

    assert set(losses) == {"seg", "fd", "mix", "pseudo_weight"} | ({"masked"} if name == "mic" else set())
    assert calls["batch_classes"] is True
    for key in ("seg", "fd", "mix") + (("masked",) if name == "mic" else ()):
        assert close(float(losses[key]), expected[key]), key
    assert close(float(losses["fd"]) * m.options["fd_lambda"], expected["fd_weighted"])
    assert losses["pseudo_weight"] == pytest.approx(expected["pseudo_weight"], rel=1e-12)
    assert seen["pseudo_label"] == expected["pseudo_label"]
    assert seen["mixed_label"] == expected["mixed_label"]
    assert close(R.probe(seen["mixed_image"], 7), expected["mixed_image_probe"])
    assert sorted(seen["mixed_weight"].unique().tolist()) == expected["mixed_weight_values"]
    assert close(R.probe(seen["mixed_weight"], 8), expected["mixed_weight_probe"])
    if name == "mic":
        assert calls["mask"] == (2, (R.H, R.W), R.MASK_BLOCK, R.MASK_RATIO)
        assert close(R.probe(seen["masked_image"], 9), expected["masked_image_probe"])
        # the masked pass learns with the pseudo-label weight as cloned before the mixing
        assert close(R.probe(seen["target_weight"], 10), expected["masked_weight_probe"])
    def probes(tensors, seed):  # the i-th tensor (integer ones counted, not probed) at seed + i
        return sum(R.probe(t, seed + i) for i, t in enumerate(tensors) if t.is_floating_point())

    got = {"student_params_probe": probes(m.model.parameters(), 100),
           "student_buffers_probe": probes(m.model.buffers(), 200),
           "teacher_params_probe": probes(m.teacher.model.parameters(), 300),
           "teacher_buffers_probe": probes(m.teacher.model.buffers(), 400)}
    for key, value in got.items():
        assert close(value, expected[key]), key
    for k, v in m.reference.state_dict().items():
        assert torch.equal(v, reference[k]), k
