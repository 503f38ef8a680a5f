"""MIC (udafast/methods/mic.py): the block mask, the masked target view, the step's masked term,
a Trainer run with exact resume and option checks. The authors' mask figures are in
test_method_daformer_golden.py."""
import math
import os
import sys

import pytest
import torch

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


@pytest.mark.parametrize("key,value", [("mask_block_size", 0), ("mask_ratio", 1.5), ("mask_weight", -1),
                                       ("mask_mode", "separate"), ("rcs_temperature", -1)])
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
