"""DACS (udafast/methods/dacs.py): the teacher, the mixed batch, the flags, a short Trainer run
with exact resume, the recorded pseudo-label quality and option checks. The authors' figures are
in test_method_dacs_golden.py."""
import json
import math
import os
import sys
import types

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import dacs_recipes as R  # noqa: E402
from conftest import assert_bitwise_equal, run_and_resume, tiny_run_config  # noqa: E402

import udafast.methods.dacs as dacs  # noqa: E402
from udafast.engine.trainer import Trainer  # noqa: E402
from udafast.methods.base import ParameterEMATeacher  # noqa: E402
from udafast.models import build_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _method(**section):
    ctx = types.SimpleNamespace(device=torch.device("cpu"), backend="auto")
    m = dacs.DACS(R.config(**section), ctx)
    torch.manual_seed(0)
    m.start_stage(None, build_model(m.config["model"]))
    return m


def _batch(seed=0, b=2, h=32, w=32):
    g = torch.Generator().manual_seed(seed)
    return {"source": {"image": torch.rand(b, 3, h, w, generator=g), "label": torch.randint(0, R.C, (b, h, w), generator=g)},
            "target": {"image": torch.rand(b, 3, h, w, generator=g), "truth": torch.randint(0, R.C, (b, h, w), generator=g)}}


def test_teacher_is_a_train_mode_ema_of_parameters_with_dropout_off():
    student = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Dropout2d(0.5))
    m = _method()
    m.teacher = ParameterEMATeacher(student, dropout=False)
    t = m.teacher.model
    assert t[1].training and not t[2].training and not any(p.requires_grad for p in t.parameters())
    before = [p.clone() for p in t.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.add_(5.0)
    m.teacher.update(student, 0.75)
    for p0, p, s in zip(before, t.parameters(), student.parameters()):
        torch.testing.assert_close(p, 0.75 * p0 + 0.25 * s)
    assert torch.equal(t[1].running_mean, torch.zeros(4))  # buffers: the teacher's own


def test_teacher_equals_student_after_the_first_step_and_alpha_caps():
    m = _method()
    m.step(_batch(), 0, 10)
    for t, s in zip(m.teacher.model.parameters(), m.model.parameters()):
        assert torch.equal(t, s)
    assert dacs.teacher_alpha(10**6, 0.99) == 0.99 and dacs.teacher_alpha(1, 0.99) == 0.5


def test_lhoyer_ema_offset_uses_the_next_iterations_alpha():
    m = _method(lhoyer_ema_offset=True)
    m.step(_batch(), 0, 10)  # alpha(1) = 0.5: halfway between the initial weights and the student
    assert not all(torch.equal(t, s) for t, s in zip(m.teacher.model.parameters(), m.model.parameters()))


def test_mixed_batch_pastes_source_classes_with_weight_one():
    m = _method(jitter=False, blur=False)
    batch = _batch()
    x_s, y_s, x_t = batch["source"]["image"], batch["source"]["label"], batch["target"]["image"]
    pseudo = torch.randint(0, R.C, y_s.shape, generator=torch.Generator().manual_seed(1))
    w_t = torch.full(y_s.shape, 0.25)
    x_m, y_m, w_m = m.mixed_batch(x_s, y_s, x_t, pseudo, w_t)
    for i in range(2):
        from_source = w_m[i] == 1
        # the pasted classes: ceil(5/2) = 3 of the image's 5
        assert len(torch.unique(y_s[i][from_source])) == 3
        assert torch.equal(y_m[i][from_source], y_s[i][from_source])
        assert torch.equal(y_m[i][~from_source], pseudo[i][~from_source])
        assert bool((w_m[i][~from_source] == 0.25).all())
        assert torch.equal(x_m[i][:, from_source], x_s[i][:, from_source])
        assert torch.equal(x_m[i][:, ~from_source], x_t[i][:, ~from_source])


def test_colour_views_change_only_the_images():
    """The classes are drawn first: from the same generator state, the views with and without colour
    share the masks, labels and weights; jitter (p 0.8) or blur (p 0.5) change the images."""
    on, off = _method(), _method(jitter=False, blur=False)
    changed = 0
    for seed in range(8):
        batch = _batch(seed)
        x_s, y_s, x_t = batch["source"]["image"], batch["source"]["label"], batch["target"]["image"]
        args = (x_s, y_s, x_t, batch["target"]["truth"], torch.full(y_s.shape, 0.5))
        off.generator.set_state(on.generator.get_state())
        x_on, y_on, w_on = on.mixed_batch(*args)
        x_off, y_off, w_off = off.mixed_batch(*args)
        assert torch.equal(y_on, y_off) and torch.equal(w_on, w_off)
        assert float(x_on.min()) >= 0 and float(x_on.max()) <= 1 + 1e-6
        changed += int(not torch.equal(x_on, x_off))
    assert changed >= 5


def test_pseudo_label_crop_zeroes_the_rows():
    w = dacs.pseudo_weight(torch.ones(2, 10, 4), 0.968, ignore_top=2, ignore_bottom=3)
    assert bool((w[:, :2] == 0).all()) and bool((w[:, -3:] == 0).all()) and bool((w[:, 2:7] == 1).all())


def test_lhoyer_source_mean_all_counts_ignored_pixels():
    a, b = _method(), _method(lhoyer_source_mean_all=True)
    batch = _batch()
    batch["source"]["label"][:, :16] = 255
    la, lb = a.step(batch, 0, 10), b.step(batch, 0, 10)
    assert float(lb["seg"]) == pytest.approx(float(la["seg"]) / 2, rel=1e-5)


def test_teacher_labels_are_recorded_against_truth():
    m = _method()
    m.step(_batch(), 0, 10)
    counts = m.label_quality["teacher"].counts()
    assert counts[-2] == 2 * 32 * 32 and counts[-1] == 1  # every pixel labelled, truth given


@pytest.mark.parametrize("key,value", [("alpha", 1.5), ("threshold", -0.1), ("weight", "x"), ("ignore_top", -1),
                                       ("ignore_bottom", 1.5), ("jitter", 1), ("lhoyer_batch_classes", "yes"),
                                       ("nonsense", 1)])
def test_bad_options_raise(key, value):
    with pytest.raises(ValueError, match=key):
        _method(**{key: value})


def test_trainer_run_records_labels_and_resumes_exactly(tmp_path):
    config = tiny_run_config("dacs", train={"iters": 4, "panels": 0})
    metrics = Trainer(config, tmp_path / "run", tensorboard=False, progress=False).run()
    assert metrics["method"] == "dacs" and math.isfinite(metrics["miou"])
    assert "teacher" in json.loads((tmp_path / "run" / "metrics.json").read_text())["pseudo_labels"]["train"]
    full, resumed = run_and_resume(config, tmp_path / "resume", at=2)
    assert_bitwise_equal(full["model"], resumed["model"], "model")
    assert_bitwise_equal(full["method"]["modules"]["teacher"], resumed["method"]["modules"]["teacher"], "teacher")
    assert_bitwise_equal(full["method"]["generator"], resumed["method"]["generator"], "generator")
    assert_bitwise_equal(full["method"]["optimizers"], resumed["method"]["optimizers"], "optimizers")


def test_shipped_configs_carry_the_papers_setting():
    """gta5_dacs / synthia_dacs: configUDA.json's SGD schedule, batch 2 of 512x512 crops, the code's
    frozen BatchNorm affines, every DACS option set (the DAFormer flags off)."""
    from udafast.config import read_config
    from udafast.engine.runs import resolve_config
    for name in ("gta5_dacs", "synthia_dacs"):
        config = resolve_config(read_config(name), "dacs")
        assert config["method"] == "dacs" and config["model"]["name"] == "deeplabv2_r101"
        assert config["model"]["freeze_bn_affine"] is True and config["train"]["iters"] == 250000
        assert config["optimizer"] == {**config["optimizer"], "name": "sgd", "lr": 2.5e-4, "momentum": 0.9,
                                       "weight_decay": 5.0e-4, "schedule": "poly", "power": 0.9}
        assert config["data"]["batch_size"] == 2 and config["data"]["source_view"]["crop"] == [512, 512]
        assert config["dacs"] == dacs.DACS.defaults
