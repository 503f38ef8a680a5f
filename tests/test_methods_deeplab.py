"""Every method trains one iteration per stage with DeepLabV2-ResNet101 (the papers' network), on
tiny synthetic frames: the shapes, heads and options of the real configs fit together."""
import pytest

from conftest import tiny_run_config
from udafast.engine.runs import run_method
from udafast.methods import METHOD_NAMES

# the heads the methods add to the network sit on its 2048-deep stride-8 features; the small
# network of the embedded benchmark never exercises those widths
SECTIONS = {"dann": {"dann": {"hidden": 64}}, "adaptsegnet": {"adaptsegnet": {"ndf": 8}},
            "proda": {"proda": {"disc_ndf": 8}}, "contrastive": {"contrastive": {"bank_start": 0, "loss_start": 0}},
            # tiny scenes: no image holds 3000 pixels of a class; the crop's rows scaled to 32
            "daformer": {"daformer": {"rcs_min_pixels": 0, "ignore_top": 1, "ignore_bottom": 8}},
            "mic": {"mic": {"rcs_min_pixels": 0, "ignore_top": 1, "ignore_bottom": 8, "mask_block_size": 8}}}


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_method_trains_deeplabv2(method, tmp_path, one_thread):
    config = tiny_run_config(method, train={"iters": 1, "stage_iters": 1, "panels": 0}, pretrain={"iters": 1},
                             eval={"max_images": 1}, **SECTIONS.get(method, {}))
    config["model"] = {"name": "deeplabv2_r101", "num_classes": 19}
    if method in ("cbst", "proda", "contrastive"):
        config["init"] = "@source_only"
    metrics = run_method(config, tmp_path, log=lambda *_: None)
    assert 0 <= metrics["miou"] <= 100


@pytest.mark.parametrize("method", ["daformer", "mic"])
def test_method_trains_dlv2red(method, tmp_path, one_thread):
    """lhoyer's DeepLabV2 network of the `_dlv2` configs: ResNet-101-V1c, two ASPP branches, no aux head."""
    config = tiny_run_config(method, train={"iters": 1, "panels": 0}, eval={"max_images": 1}, **SECTIONS[method])
    config["model"] = {"name": "deeplabv2_r101", "num_classes": 19, "weights_format": "v1c", "aspp": "two",
                       "aux_head": False}
    metrics = run_method(config, tmp_path, log=lambda *_: None)
    assert 0 <= metrics["miou"] <= 100
