"""MIC (udafast/methods/mic.py): the block mask, the masked target view, the step's masked term,
a Trainer run with exact resume and option checks. The authors' mask figures are in
test_method_daformer_golden.py."""
import json
import math
import os
import sys

import pytest
import torch
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from conftest import assert_bitwise_equal, run_and_resume, tiny_run_config  # noqa: E402
from test_method_daformer import _batch, _method  # noqa: E402

import udafast.methods.mic as mic  # noqa: E402
from udafast.engine.trainer import Trainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_block_mask_is_constant_on_blocks_with_the_kept_ratio():
    g = torch.Generator().manual_seed(0)
    mask = mic.block_mask(4, (256, 512), 16, 0.7, g)
    assert mask.shape == (4, 1, 256, 512) and mask.dtype == torch.float32
    assert set(torch.unique(mask).tolist()) <= {0.0, 1.0}
    blocks = mask.view(4, 1, 16, 16, 32, 16)
    assert torch.equal(blocks, blocks[:, :, :, :1, :, :1].expand_as(blocks))
    assert 0.25 < float(mask.mean()) < 0.35  # kept where U > 0.7
    # a size the block does not divide: the grid rounds, nearest resizing covers every pixel
    assert mic.block_mask(1, (100, 150), 64, 0.5, g).shape == (1, 1, 100, 150)
    with pytest.raises(ValueError, match="block_mask"):
        mic.block_mask(1, (31, 200), 64, 0.5, g)


def test_masked_pixels_are_zero_after_normalisation_and_the_rest_is_the_image():
    m = _method(mic.MIC, mask_mode="separatetrg", mask_block_size=8)
    x = _batch()["target"]["image"]
    state = m.generator.get_state()
    out = m.masked_images(x)
    m.generator.set_state(state)
    mask = mic.block_mask(2, (32, 32), 8, 0.7, m.generator).bool().expand_as(out)
    assert bool((out[~mask] == 0).all())
    torch.testing.assert_close(out[mask], m.normalize(x)[mask])


def test_separatetrgaug_colours_the_target_on_its_own():
    plain = _method(mic.MIC, mask_mode="separatetrg", mask_ratio=0.0, mask_block_size=8)
    aug = _method(mic.MIC, mask_ratio=0.0, mask_block_size=8)
    x = _batch()["target"]["image"]
    changed = 0
    for _ in range(5):
        changed += int(not torch.allclose(aug.masked_images(x), plain.masked_images(x)))
    assert changed >= 3


def test_step_trains_on_the_masked_target_with_the_pseudo_label_weight():
    m = _method(mic.MIC, mask_block_size=8, threshold=0.0)
    out = m.step(_batch(), 0, 10)
    assert float(out["masked"]) > 0 and out["pseudo_weight"] == 1.0
    low = _method(mic.MIC, mask_block_size=8, threshold=1.0)  # no confident pixel: weight 0
    assert float(low.step(_batch(), 0, 10)["masked"]) == 0


def test_mask_bn_update_false_keeps_the_running_statistics_of_before_the_masked_pass():
    """The authors' code (true) moves BatchNorm's running statistics in the masked pass; false keeps
    them, with the same losses (the forward normalises with the batch's statistics either way)."""
    def step(update):
        m = _method(mic.MIC, mask_block_size=8, threshold=0.0, mask_bn_update=update)
        norms = [b for b in m.model.modules() if isinstance(b, torch.nn.BatchNorm2d)]
        seen = {}
        losses = m.target_losses

        def before_masked_pass(*args):
            seen["before"] = [(b.running_mean.clone(), b.running_var.clone(), int(b.num_batches_tracked)) for b in norms]
            return losses(*args)
        m.target_losses = before_masked_pass
        out = m.step(_batch(), 0, 10)
        after = [(b.running_mean, b.running_var, int(b.num_batches_tracked)) for b in norms]
        return out, seen["before"], after

    kept, before, after = step(False)
    for (mean0, var0, n0), (mean1, var1, n1) in zip(before, after):
        assert torch.equal(mean0, mean1) and torch.equal(var0, var1) and n0 == n1
    moved, before, after = step(True)
    assert not all(torch.equal(m0, m1) for (m0, _, _), (m1, _, _) in zip(before, after))
    assert all(n1 == n0 + 1 for (_, _, n0), (_, _, n1) in zip(before, after))
    assert {k: float(v) for k, v in kept.items()} == {k: float(v) for k, v in moved.items()}


@pytest.mark.parametrize("key,value", [("mask_block_size", 0), ("mask_ratio", 1.5), ("mask_weight", -1),
                                       ("mask_mode", "separate"), ("rcs_temperature", -1),
                                       ("mask_bn_update", "no")])
def test_bad_options_raise(key, value):
    with pytest.raises(ValueError, match=f"mic.{key}"):
        _method(mic.MIC, **{key: value})


def test_trainer_run_resumes_exactly(tmp_path):
    config = tiny_run_config("mic", train={"iters": 4, "panels": 0},
                             mic={"rcs_min_pixels": 0, "ignore_top": 2, "ignore_bottom": 4, "mask_block_size": 8})
    metrics = Trainer(config, tmp_path / "run", tensorboard=False, progress=False).run()
    assert metrics["method"] == "mic" and math.isfinite(metrics["miou"])
    full, resumed = run_and_resume(config, tmp_path / "resume", at=2)
    assert_bitwise_equal(full["model"], resumed["model"], "model")
    for name in ("teacher", "imnet"):
        assert_bitwise_equal(full["method"]["modules"][name], resumed["method"]["modules"][name], name)
    assert_bitwise_equal(full["method"]["generator"], resumed["method"]["generator"], "generator")


@pytest.mark.slow
def test_cli_trains_mic_on_mit_b5_from_gta5_and_cityscapes_trees(tmp_path):
    """The issue's command, `python -m udafast.train --method mic --config gta5_mic`, on GTA5 and
    Cityscapes trees in their official layouts: one iteration of the full MiT-B5 at 128x128, batch 1."""
    from test_bad_data import GOOD_IDS, ids, make_tree, rgb, save

    from udafast import train
    gta, cs = tmp_path / "gta5", tmp_path / "cityscapes"
    make_tree(gta, "gta5", n=3, bad=())
    make_tree(cs, "cityscapes", n=2, bad=())
    stem = "lindau_000000_000019"
    save(str(cs / "leftImg8bit" / "val" / "lindau" / f"{stem}_leftImg8bit.png"), rgb(10))
    save(str(cs / "gtFine" / "val" / "lindau" / f"{stem}_gtFine_labelIds.png"), ids(10, GOOD_IDS), "L")
    view = "{resize: [128, 192], scale_range: null, crop: [128, 128], flip: 0.5}"
    argv = ["--method", "mic", "--config", "gta5_mic", "--source-root", str(gta), "--target-root", str(cs),
            "--iters", "1", "--batch-size", "1", "--device", "cpu", "--out", str(tmp_path / "out"),
            "--set", "threads=2", "--set", "train.panels=0", "--set", "data.num_workers=0",
            "--set", f"data.source_view={view}", "--set", f"data.target_view={view}",
            "--set", "eval.input_size=[96, 64]", "--set", "mic.rcs_min_pixels=0",
            "--set", "mic.ignore_top=4", "--set", "mic.ignore_bottom=30"]
    train.main(argv)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    config = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert metrics["method"] == "mic" and config["model"]["name"] == "mit_b5_daformer" and math.isfinite(metrics["miou"])
    assert config["mic"]["mask_mode"] == "separatetrgaug" and config["optimizer"]["name"] == "adamw"
    rows = (tmp_path / "out" / "log.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"loss_seg", "loss_fd", "loss_mix", "loss_masked"} <= set(header)
