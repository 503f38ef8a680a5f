"""ssl_source (udafast.methods.ssl_source): NT-Xent against a hand computation, the step trains the
backbone and the projection head only, "@ssl_source" as ProDA's stage-2 student, options."""
import math
import os

import pytest
import torch

from conftest import tiny_run_config
from udafast.config import merge
from udafast.engine.context import TrainingContext
from udafast.engine.runs import COMPARED, compare_methods, run_method, summarize
from udafast.engine.trainer import Trainer
from udafast.methods.base import Stage
from udafast.methods.proda import ProDA
from udafast.methods.ssl_source import ProjectionHead, SSLSource, nt_xent, simclr_view
from udafast.models.checkpoint import load_checkpoint
from conftest import tiny_config_file


class _Log:
    def message(self, text):
        pass


def make_method(tmp_path, **sections):
    torch.manual_seed(0)
    config = tiny_run_config("ssl_source", **sections)
    ctx = TrainingContext(config, str(tmp_path), "cpu", _Log(), SSLSource)
    return SSLSource(config, ctx), ctx


def _hand_nt_xent(z1, z2, tau):
    """SimCLR's eq. 1 written out: l(i, j) = -log exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau),
    averaged over the 2N ordered positive pairs."""
    z = [list(map(float, v)) for v in list(z1) + list(z2)]
    n = len(z1)

    def sim(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))

    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        den = sum(math.exp(sim(z[i], z[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(sim(z[i], z[j]) / tau) / den)
    return total / (2 * n)


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_nt_xent_equals_the_hand_computation(tau):
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    expected = _hand_nt_xent(z1, z2, tau)
    assert nt_xent(z1, z2, tau).item() == pytest.approx(expected, rel=1e-6)
    # objective.py: the two directions summed, averaged over N (twice the paper's mean)
    assert nt_xent(z1, z2, tau, sum_directions=True).item() == pytest.approx(2 * expected, rel=1e-6)
    # two views of two images, identical and orthogonal to the other image: near-zero loss at 0.1
    e = torch.eye(2)
    assert nt_xent(e, e, 0.1).item() == pytest.approx(math.log(1 + 2 * math.exp(-10)), rel=1e-3)


def test_projection_head_is_simclrv2s():
    head = ProjectionHead(16, out_dim=8, layers=3)
    linears = [m for m in head.net if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(16, 16), (16, 16), (8, 16)]
    assert len([m for m in head.net if isinstance(m, torch.nn.ReLU)]) == 2
    assert not head.net[-1].bias.requires_grad and torch.equal(head.net[-1].bias, torch.zeros(8))
    assert head(torch.randn(5, 16)).shape == (5, 8)


def test_views_are_in_range_sized_and_drawn_from_the_generator():
    images = torch.rand(3, 3, 32, 64)
    a = simclr_view(images, torch.Generator().manual_seed(1), SSLSource.defaults, (16, 32))
    b = simclr_view(images, torch.Generator().manual_seed(1), SSLSource.defaults, (16, 32))
    c = simclr_view(images, torch.Generator().manual_seed(2), SSLSource.defaults, (16, 32))
    assert a.shape == (3, 3, 16, 32) and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    # no augmentation at all: a crop of the whole image, resized back, is the image
    off = dict(SSLSource.defaults, crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], flip=0, jitter_p=0, gray_p=0,
               blur_p=0)
    assert torch.allclose(simclr_view(images, torch.Generator().manual_seed(0), off), images, atol=1e-6)


def test_step_trains_the_backbone_and_projector_not_the_segmentation_heads(tmp_path):
    method, ctx = make_method(tmp_path)
    model = ctx.build_model()
    method.start_stage(Stage("train", 1), model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    proj_before = {k: v.clone() for k, v in method.projector.state_dict().items()}
    batch = {"source": next(ctx.source_stream)}
    losses = method.step(batch, 0, 1)
    assert math.isfinite(float(losses["ntxent"]))
    after = model.state_dict()
    backbone = [k for k in before if k.startswith("backbone.")]
    heads = [k for k in before if not k.startswith("backbone.")]
    assert heads and all(torch.equal(before[k], after[k]) for k in heads)
    changed = [k for k in backbone if not torch.equal(before[k], after[k])]
    assert any(k.endswith("weight") and "running" not in k for k in changed)
    assert any(not torch.equal(proj_before[k], v) for k, v in method.projector.state_dict().items())
    assert "ssl_source" not in COMPARED and SSLSource.uses_target is False


def _proda_config(**sections):
    return tiny_run_config("proda", **merge({
        "init": "@source_only", "pretrain": {"iters": 1},
        "data": {"target": {"options": {"length": 4}}, "val": {"options": {"length": 2}}},
        "train": {"iters": 2, "stage_iters": 2, "panels": 0}, "eval": {"max_images": 1},
        "proda": {"student_init": "@ssl_source", "disc_ndf": 8}}, sections))


def test_ssl_source_init_resolves_to_a_trained_checkpoint_and_starts_the_student(tmp_path, monkeypatch):
    students = {}
    start = ProDA.start_stage

    def recording(self, stage, model, resume=False):
        start(self, stage, model, resume)
        if stage.name in ("stage2", "stage3"):
            students[stage.name] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    monkeypatch.setattr(ProDA, "start_stage", recording)
    lines = []
    metrics = run_method(_proda_config(), tmp_path, log=lines.append)
    ssl_run = tmp_path / "pretrain_ssl_source"
    ckpt = load_checkpoint(ssl_run / "checkpoints" / "last.pt")
    assert ckpt["method_name"] == "ssl_source" and ckpt["iter"] == 2
    assert "projector" in ckpt["method"]["modules"] and not any(k.startswith("projector") for k in ckpt["model"])
    assert metrics["pretrain_s"] > 0 and any("ssl_source pretraining" in line for line in lines)
    source = load_checkpoint(tmp_path / "pretrain_source_only" / "checkpoints" / "last.pt")["model"]
    student = students["stage2"]
    backbone = [k for k in student if k.startswith("backbone.")]
    assert backbone and all(torch.equal(student[k], ckpt["model"][k]) for k in backbone)
    assert any(not torch.equal(student[k], source[k]) for k in backbone)  # not the run's init
    # the pretraining changed the backbone from its own init; the heads it holds are untrained
    assert ckpt["method"]["optimizers"]["model"]["state"]
    # stage 3 continues from stage 2's network, not from the pretraining
    assert any(not torch.equal(students["stage3"][k], ckpt["model"][k]) for k in backbone)
    # a second run reuses the pretraining
    again = run_method(_proda_config(), tmp_path / "again", ssl_run=str(ssl_run), log=lines.append)
    assert again["pretrain_s"] == 0.0 and any("(reused)" in line for line in lines)


def test_null_student_init_starts_from_the_runs_init(tmp_path, monkeypatch):
    students = {}
    start = ProDA.start_stage

    def recording(self, stage, model, resume=False):
        start(self, stage, model, resume)
        if stage.name == "stage2":
            students["stage2"] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    monkeypatch.setattr(ProDA, "start_stage", recording)
    metrics = run_method(_proda_config(proda={"student_init": None}), tmp_path, log=lambda *_: None)
    assert "pretrain_s" not in metrics and not (tmp_path / "pretrain_ssl_source").exists()
    source = load_checkpoint(tmp_path / "pretrain_source_only" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(v, source[k]) for k, v in students["stage2"].items())


def test_comparison_trains_the_pretraining_under_its_folder_and_counts_it(tmp_path):
    file_config = tiny_config_file(**{"data": {"target": {"options": {"length": 4}}, "val": {"options": {"length": 2}}},
                                      "train": {"iters": 2, "panels": 0}, "eval": {"max_images": 1},
                                      "methods": {"proda": {"proda": {"student_init": "@ssl_source", "disc_ndf": 8,
                                                                      "warmup_iters": 1, "stage1_iters": 1,
                                                                      "stage2_iters": 1, "stage3_iters": 1}},
                                                  "ssl_source": {"train": {"iters": 3}}}})
    runs = compare_methods(file_config, tmp_path, [0], methods=("proda",), log=lambda *_: None)
    ckpt = load_checkpoint(tmp_path / "ssl_source" / "checkpoints" / "last.pt")
    assert ckpt["iter"] == 3  # the file's ssl_source section
    assert summarize(runs)["methods"]["proda"]["pretrain_s"] > 0


def test_a_trainer_alone_cannot_resolve_ssl_source(tmp_path):
    config = _proda_config(init=None)
    with pytest.raises(ValueError, match="proda.student_init"):
        Trainer(config, tmp_path, progress=False, tensorboard=False).run()


@pytest.mark.parametrize("option, value", [
    ("temperature", 0), ("temperature", True), ("proj_layers", 0), ("proj_dim", 1.5), ("proj_hidden", -1),
    ("view_size", [0, 4]), ("view_size", 32), ("crop_scale", [0.5, 1.5]), ("crop_scale", [0.0, 1.0]),
    ("crop_ratio", [2.0, 1.0]), ("blur_sigma", [0.1]), ("flip", 2), ("jitter_p", -0.1), ("jitter_strength", -1),
    ("code_sum_directions", "yes"), ("nonsense", 1),
])
def test_bad_options_raise_naming_the_key(tmp_path, option, value):
    with pytest.raises(ValueError, match=f"ssl_source.*{option}") as info:
        make_method(tmp_path, ssl_source={option: value})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", ["@bogus", "@source_only", 3, ""])
def test_bad_student_init_raises_naming_the_key(tmp_path, value):
    config = _proda_config(proda={"student_init": value})
    ctx = TrainingContext(config, str(tmp_path), "cpu", _Log(), ProDA)
    with pytest.raises(ValueError, match=r"^proda\.student_init: ") as info:
        ProDA(config, ctx)
    assert "\n" not in str(info.value)


def test_resume_is_bitwise(tmp_path):
    from conftest import assert_bitwise_equal, run_and_resume
    config = tiny_run_config("ssl_source", deterministic=True, train={"iters": 4, "panels": 0})
    full, resumed = run_and_resume(config, tmp_path, at=2)
    assert_bitwise_equal(full["model"], resumed["model"], "model")
    assert_bitwise_equal(full["method"]["modules"], resumed["method"]["modules"], "projector")
