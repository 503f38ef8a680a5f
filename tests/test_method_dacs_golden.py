"""DACS against the authors' code (vikolss/DACS and lhoyer/DAFormer; repositories, commits, files
and functions in each fixture's "provenance"): the figures in tests/fixtures/authors/dacs_*.json
came from running the authors' functions, transcribed outside this repository, on the inputs of
tests/dacs_recipes.py (seeds inside). Compared: the ClassMix masks (both codes' choice of
classes), the mixed image, label and pixel weight, the pseudo-label weight (with DAFormer's crop),
the EMA rule, kornia 0.5.8's colour jitter and blur with the code's kernel sizes, and one whole
iteration of trainUDA.py's main loop (losses, pseudo-labels, mixed labels, the student's weights
and buffers and the teacher's after the SGD step and the EMA update)."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import dacs_recipes as R  # noqa: E402

import udafast.methods.dacs as dacs  # noqa: E402
from udafast.methods.mixing import class_mask, gaussian_blur, jitter_images  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "authors")


def _load(name):
    with open(os.path.join(FIXTURES, name)) as f:
        return json.load(f)


MIX, COLOUR, STEP = _load("dacs_classmix.json"), _load("dacs_colour.json"), _load("dacs_step.json")

pytestmark = pytest.mark.usefixtures("one_thread")


def close(a, b, rel=1e-9, abs_=1e-12):
    return a == pytest.approx(b, rel=rel, abs=abs_)


def test_provenance():
    for g in (MIX, COLOUR):
        assert set(g["provenance"]["repositories"]) == {"vikolss/DACS", "lhoyer/DAFormer"}
        assert all(len(c) == 40 for c in g["provenance"]["repositories"].values())
    assert STEP["provenance"]["repository"] == "vikolss/DACS" and len(STEP["provenance"]["commit"]) == 40


def test_classmix_masks_from_the_picked_classes():
    labels = R.mix_inputs()[0]
    for i in range(2):
        assert class_mask(labels[i], torch.tensor(MIX["vikolss_picked"][i])).tolist() == MIX["vikolss_masks"][i]
        assert class_mask(labels[i], torch.tensor(MIX["lhoyer_picked"][i])).tolist() == MIX["lhoyer_masks"][i]


@pytest.mark.parametrize("batch_classes", [False, True])
def test_classmix_draws_half_the_classes_ignore_included(batch_classes):
    """ceil(n/2) of the image's classes (DACS) or of the batch's (DAFormer), 255 among them, as the
    authors' draws (same sizes, same candidate sets)."""
    labels = R.mix_inputs()[0]
    picked = MIX["lhoyer_picked" if batch_classes else "vikolss_picked"]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ours = dacs.mix_classes(labels, g, batch_classes)
        for i in range(2):
            pool = set(torch.unique(labels if batch_classes else labels[i]).tolist())
            assert len(ours[i]) == len(picked[i]) and set(ours[i].tolist()) <= pool
            assert set(picked[i]) <= pool
    assert 255 in torch.unique(labels).tolist()
    seen = set()
    for _ in range(50):
        seen |= set(dacs.mix_classes(labels, g, batch_classes)[0].tolist())
    assert 255 in seen


def test_mixed_image_label_and_weight():
    labels, pseudo, source, target, weights = R.mix_inputs()
    for i in range(2):
        mask = torch.tensor(MIX["vikolss_masks"][i])
        expected = MIX["mixed"][i]
        assert close(R.probe(dacs.one_mix(mask, source[i], target[i])), expected["image_probe"])
        assert dacs.one_mix(mask, labels[i], pseudo[i]).tolist() == expected["label"]
        assert dacs.one_mix(mask, torch.ones_like(weights[i]), weights[i]).tolist() == expected["weight"]


def test_pseudo_weight():
    conf = R.confidence_inputs()
    g = MIX["pseudo_weight"]
    plain = dacs.pseudo_weight(conf, g["threshold"])
    torch.testing.assert_close(plain, torch.tensor(g["plain"]), rtol=1e-7, atol=0)
    assert float(plain[0, 0, 0]) == pytest.approx(g["vikolss_unlabeled_weight"], rel=1e-7)
    cropped = dacs.pseudo_weight(conf, g["threshold"], 1, 2)
    torch.testing.assert_close(cropped, torch.tensor(g["cropped_top1_bottom2"]), rtol=1e-7, atol=0)


def test_teacher_alpha():
    g = MIX["alpha"]
    assert [dacs.teacher_alpha(i, g["alpha"]) for i in g["iters"]] == pytest.approx(g["values"], rel=1e-12)


def test_colour_jitter_as_kornia():
    images, b, c, s, h, orders = R.jitter_inputs()
    for i, expected in enumerate(COLOUR["jitter"]):
        out = jitter_images(images[i:i + 1], b[i:i + 1], c[i:i + 1], s[i:i + 1], h[i:i + 1], orders[i])
        # float32 HSV round trips: kornia's formulas and ours differ in rounding
        assert close(R.probe(out), expected["probe"], rel=1e-4, abs_=1e-4), i
        assert close(float(out.double().sum()), expected["sum"], rel=1e-5), i
        assert out[0, :, 0, 0].tolist() == pytest.approx(expected["corner"], abs=1e-5), i


def test_blur_as_kornia_with_the_codes_kernel():
    g = COLOUR["blur"]
    image, sigma = R.blur_inputs()
    kernel = (dacs.blur_kernel_size(image.shape[2]), dacs.blur_kernel_size(image.shape[3]))
    assert list(kernel) == g["kernel"]
    out = gaussian_blur(image, kernel, (sigma, sigma))
    # kornia builds its Gaussian in float32 (ours in the image's float64): ~1e-8 apart
    assert close(R.probe(out), g["probe"], rel=1e-6) and close(float(out.sum()), g["sum"], rel=1e-6)
    k = COLOUR["kernel_sizes"]
    assert [dacs.blur_kernel_size(n) for n in k["sizes"]] == k["kernels"]


def test_one_iteration(monkeypatch):
    """trainUDA.py's main loop body: source CE, the teacher's pseudo-labels, ClassMix with the
    authors' classes, the weighted CE on the mixed batch, SGD (heads x10, poly), EMA."""
    picked = [torch.tensor(p) for p in STEP["picked"]]
    monkeypatch.setattr(dacs, "mix_classes", lambda labels, generator, batch_classes=False: picked)
    m, batch = R.step_setup()
    seen = {}
    real = m.mix_loss

    def spy(x_m, y_m, w_m):
        seen["mixed_label"] = y_m.tolist()
        return real(x_m, y_m, w_m)
    m.mix_loss = spy
    losses = m.step(batch, R.ITER, R.ITERS)
    assert close(float(losses["seg"]), STEP["loss_l"], rel=1e-6)
    assert close(float(losses["mix"]), STEP["loss_u"], rel=1e-6)
    assert losses["pseudo_weight"] == pytest.approx(STEP["unlabeled_weight"], rel=1e-12)
    assert seen["mixed_label"] == STEP["mixed_label"]
    got = {
        "student_params_probe": sum(R.probe(p, 100 + i) for i, p in enumerate(m.model.parameters())),
        "student_buffers_probe": sum(R.probe(b, 200 + i) for i, b in enumerate(m.model.buffers()) if b.is_floating_point()),
        "teacher_params_probe": sum(R.probe(p, 300 + i) for i, p in enumerate(m.teacher.model.parameters())),
        "teacher_buffers_probe": sum(R.probe(b, 400 + i) for i, b in enumerate(m.teacher.model.buffers()) if b.is_floating_point()),
    }
    for key, value in got.items():
        assert close(value, STEP[key], rel=1e-6), key
