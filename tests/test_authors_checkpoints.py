"""The authors' released checkpoints load into udafast's networks, heads included.

Key names and shapes: tests/fixtures/authors/<format>_keys.json, the state_dict() of the authors'
model classes (microsoft/ProDA 9ba80c7d models/deeplabv2.py ResNet101; wasidennis/AdaptSegNet
fca9ff0f model/deeplab_multi.py DeeplabMulti; yzou2/CRST f7e4df0f deeplab/model.py Res_Deeplab),
dumped by instantiating them on CPU (provenance in each file). Each test saves a random state dict
with exactly those keys in the authors' container, loads it the way a user does, and checks that
every tensor landed in the udafast parameter the authors' layer maps to.
"""
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from udafast.evaluate import load_model
from udafast.models import build_model, load_model_checkpoint, model_from_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = Path(__file__).parent / "fixtures" / "authors"


def authors_keys(fmt, bn_clr=False):
    data = json.loads((FIXTURES / f"{fmt}_keys.json").read_text())
    keys = [(k, tuple(s)) for k, s in data["keys"]]
    if bn_clr:
        keys += [(k, tuple(s)) for k, s in data["bn_clr_keys"]]
    return keys


# the authors' layer -> udafast's, written out here independently of udafast.models.authors
HEADS = {
    "proda": [("layer5.conv2d_list.", "feature_head.conv2d_list."), ("layer5.bottleneck.", "feature_head.bottleneck."),
              ("layer5.head.1.weight", "classifier.weight"), ("bn_pretrain.", "backbone_norm.")],
    "adaptsegnet": [("layer5.", "aux_classifier."), ("layer6.", "classifier.")],
    "crst": [("layer5.", "classifier.")],
}


def udafast_name(key, fmt):
    for theirs, ours in HEADS[fmt]:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return "backbone." + key


def random_state(keys, seed=0, with_counts=True):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in keys:
        if k.endswith("num_batches_tracked"):
            if with_counts:
                state[k] = torch.tensor(123)
        elif k.endswith("running_var"):
            state[k] = torch.rand(shape, generator=g) + 0.5
        else:
            state[k] = torch.randn(shape, generator=g)
    return state


def save_proda_pkl(path, state, numpy1_names=False):
    """ProDA train.py's container; best_iou is a numpy float64 (metrics.py's np.nanmean)."""
    torch.save({"ResNet101": {"model_state": state, "objective_vectors": torch.zeros(19, 256)}, "iter": 4000,
                "best_iou": np.float64(0.537)}, path)
    if numpy1_names:  # a file pickled under numpy 1 names its scalar numpy.core.multiarray.scalar
        with zipfile.ZipFile(path) as z:
            items = {n: z.read(n) for n in z.namelist()}
        name = next(n for n in items if n.endswith("data.pkl"))
        assert b"numpy._core.multiarray" in items[name]
        items[name] = items[name].replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        with zipfile.ZipFile(path, "w") as z:
            for n, data in items.items():
                z.writestr(n, data)


def assert_all_landed(model, state, fmt):
    own = model.state_dict()
    mapped = {udafast_name(k, fmt): k for k in state}
    assert len(mapped) == len(state)
    missing = [k for k in own if k not in mapped and not k.endswith("num_batches_tracked")]
    assert not missing, missing[:5]
    unexpected = [k for k in mapped if k not in own]
    assert not unexpected, unexpected[:5]
    for ours, theirs in mapped.items():
        assert torch.equal(own[ours], state[theirs]), (ours, theirs)


@pytest.mark.parametrize("fmt, bn_clr", [("proda", False), ("proda", True), ("adaptsegnet", False), ("crst", False)])
def test_released_checkpoint_loads_every_tensor(tmp_path, fmt, bn_clr):
    keys = authors_keys(fmt, bn_clr)
    # AdaptSegNet's models were saved by torch 0.3 (no num_batches_tracked); the others by newer torch
    state = random_state(keys, with_counts=fmt != "adaptsegnet")
    path = tmp_path / ("model.pkl" if fmt == "proda" else "model.pth")
    if fmt == "proda":
        save_proda_pkl(path, state, numpy1_names=bn_clr)
    else:
        torch.save(state, path)

    ckpt = load_model_checkpoint(path)   # what `init:` reads
    assert ckpt["authors"] == fmt
    model = load_model(path)             # what `python -m udafast.evaluate --checkpoint` builds
    assert_all_landed(model, state, fmt)
    config = model.config
    assert config["weights_format"] == "deeplab" and model.backbone.layout == "deeplab"
    assert config["normalization"] == {"proda": "unit", "adaptsegnet": "caffe", "crst": "imagenet"}[fmt]
    if fmt == "proda":
        assert config["head"] == "proda" and model.aux_classifier is None and config["bn_clr"] == bn_clr
        assert (model.backbone_norm is not None) == bn_clr
    elif fmt == "adaptsegnet":
        # the network these weights were trained in: the ASPP sums only dilations 6 and 12
        assert model.classifier.mode == "two" and model.aux_classifier.mode == "two"
    else:
        assert model.classifier.mode == "four" and model.aux_classifier is None
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 33, 33))
    assert out["logits"].shape == (1, 19, 5, 5) and ("aux" in out) == (fmt == "adaptsegnet")


def test_module_and_scale_prefixes_are_stripped(tmp_path):
    state = random_state(authors_keys("adaptsegnet"), seed=1, with_counts=False)
    path = tmp_path / "prefixed.pth"
    torch.save({"module.Scale." + k: v for k, v in state.items()}, path)
    assert_all_landed(model_from_checkpoint(path), state, "adaptsegnet")


@pytest.mark.parametrize("fmt, config", [
    ("proda", {"head": "proda", "aux_head": False}),
    ("adaptsegnet", {"aspp": "two"}),
    ("crst", {}),
])
def test_pretrained_loads_the_heads_that_fit(tmp_path, fmt, config):
    state = random_state(authors_keys(fmt), seed=2)
    path = tmp_path / "weights.pkl"
    if fmt == "proda":
        save_proda_pkl(path, state)
    else:
        torch.save(state, path)
    model = build_model({"name": "deeplabv2_r101", "pretrained": path, **config})
    own = model.state_dict()
    assert model.config["weights_format"] == "deeplab"
    if fmt == "proda":
        assert sorted(model.pretrained_heads) == ["classifier", "feature_head"]
        assert torch.equal(own["classifier.weight"], state["layer5.head.1.weight"])
        assert torch.equal(own["feature_head.bottleneck.1.weight"], state["layer5.bottleneck.1.weight"])
    elif fmt == "adaptsegnet":
        assert sorted(model.pretrained_heads) == ["aux_classifier", "classifier"]
        assert torch.equal(own["aux_classifier.conv2d_list.3.bias"], state["layer5.conv2d_list.3.bias"])
        assert torch.equal(own["classifier.conv2d_list.0.weight"], state["layer6.conv2d_list.0.weight"])
    else:  # CRST has no aux head: udafast's keeps its initialisation
        assert model.pretrained_heads == ["classifier"]
        assert torch.equal(own["classifier.conv2d_list.2.weight"], state["layer5.conv2d_list.2.weight"])
    assert torch.equal(own["backbone.layer4.2.conv3.weight"], state["layer4.2.conv3.weight"])


def test_a_key_mismatch_is_one_line_naming_the_keys(tmp_path):
    state = random_state(authors_keys("crst"), seed=3)
    del state["layer5.conv2d_list.1.bias"]
    state["layer5.conv2d_list.4.weight"] = torch.zeros(19, 2048, 3, 3)
    state["layer3.0.conv1.weight"] = torch.zeros(1, 1, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        model_from_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and "bad.pth" in message
    for key in ("missing keys: layer5.conv2d_list.1.bias", "layer5.conv2d_list.4.weight", "layer3.0.conv1.weight"):
        assert key in message, message


def test_foreign_files_still_say_not_a_udafast_checkpoint(tmp_path):
    path = tmp_path / "foreign.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="foreign.pth.*not a udafast checkpoint"):
        model_from_checkpoint(path)
    assert os.path.exists(path)
