"""CBST against the authors' code: figures obtained by running functions of yzou2/CRST `crst_seg.py`
(commit f7e4df0f9310d3a1ce583602a6a2064c4d7a6483), transcribed outside this repository (adapted only
to run on the CPU with current numpy/torch: no files, no logger) and run on the inputs built by the
recipes below. Only the recipes (seeds, shapes) and the resulting figures are in the repository.

- tests/fixtures/authors/cbst_kc_labels.json: `val`'s class-wise confidence collection (every
  `ds_rate`-th confidence of each class per image in raster order; predicted-pixel counts),
  `kc_parameters` (kc_policy "cb": the class thresholds and the mined classes `mine_id`) and
  `label_selection` (the pseudo-labels, with the script's thresholds and with udafast's binned
  ones), for three (portion, mine_port) on `probs_recipe()`.
- tests/fixtures/authors/cbst_one_step.json: one iteration of `train` as `main` sets it up (SGD
  over `get_1x_lr_params_NOscale` at 5e-5 and `get_10x_lr_params` at 5e-4, momentum 0.9, weight
  decay 5e-4, `adjust_learning_rate` with power 0, `model.eval()`, logits upsampled with
  align_corners=True, `reg_loss_calc` with mr_weight_kld 0) on `step_recipe()`'s tiny network in
  deeplab/model.py's layout (conv1, bn1 with requires_grad False, layer1-4, layer5 = a sum of
  dilated convs), in float64: the loss and the change of every weight and buffer.
"""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from test_method_cbst import FakeContext, PixelNet, config
from udafast.engine.trainer import apply_schedule
from udafast.methods.cbst import CBST, mine_classes, subsample_mask
from udafast.models.segmentation import SegmentationModel
from udafast.ops import ClassThresholds, cbst_pseudo_labels, class_thresholds

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "authors")


def fixture(name):
    with open(os.path.join(FIXTURES, name)) as f:
        return json.load(f)


# -- recipe 1: the labelling pass's probabilities ----------------------------------------------------
def probs_recipe():
    g = torch.Generator().manual_seed(0)
    n, c, h, w = 4, 5, 12, 16
    logits = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 2.0
    logits[:, 3] -= 6.0  # never predicted: mined at any mine_port
    logits[:, 4] -= 3.0  # rare
    return torch.softmax(logits, 1).float()


def decode(labels, shape):
    return torch.tensor([255 if ch == "x" else int(ch) for ch in labels], dtype=torch.int64).reshape(shape)


CASES = fixture("cbst_kc_labels.json")["cases"]


@pytest.mark.parametrize("case", CASES, ids=[f"portion{c['portion']}-port{c['mine_port']}" for c in CASES])
def test_thresholds_mining_and_labels_equal_crst_seg(case):
    probs = probs_recipe()
    n, c, h, w = probs.shape
    conf, pred = probs.max(dim=1)
    keep = subsample_mask(pred, c, case["ds_rate"])
    code_thresh = torch.tensor(case["cls_thresh"], dtype=torch.float32)
    # the exact rule on the subsampled pixels is kc_parameters' threshold, bit for bit
    exact = class_thresholds(conf[keep], pred[keep], c, case["portion"], backend="reference")
    assert torch.equal(exact, code_thresh)
    # the streaming histogram: the lower edge of the bin holding it (SPEC 1.1; 1.0 where none is selected)
    hist = ClassThresholds(c, 65536, backend="reference")
    hist.update(conf, torch.where(keep, pred, 255))
    streamed = hist.thresholds(case["portion"])
    binned = torch.floor(code_thresh.double() * 65536).clamp(max=65535).div(65536).float()
    binned[code_thresh == 1.0] = 1.0  # here: class 3, never predicted
    assert torch.equal(streamed, binned)
    # mining: val's predicted-pixel counts and kc_parameters' mine_id (not rare_id)
    counts = torch.bincount(pred.reshape(-1), minlength=c)
    assert counts.tolist() == case["pred_cls_num"]
    assert mine_classes(counts, case["mine_port"]) == case["mine_id"]
    # label_selection: with the script's thresholds, and with udafast's binned ones
    assert torch.equal(cbst_pseudo_labels(probs, code_thresh, backend="reference"), decode(case["labels"], (n, h, w)))
    assert torch.equal(cbst_pseudo_labels(probs, binned, backend="reference"),
                       decode(case["labels_with_binned_thresholds"], (n, h, w)))


@pytest.mark.parametrize("case", CASES, ids=[f"portion{c['portion']}-port{c['mine_port']}" for c in CASES])
def test_a_cbst_round_labels_as_crst_seg(tmp_path, case):
    """Through CBST.start_stage, fed the recipe's probabilities as its labelling pass: thresholds,
    stored pseudo-labels and mined classes as the script's (with the binned thresholds)."""
    probs = probs_recipe()
    n, c, h, w = probs.shape
    ctx = FakeContext(tmp_path, n=n, h=h, w=w)
    cfg = config(rounds=1, portion_start=case["portion"], portion_max=max(case["portion"], 0.5),
                 mine_port=case["mine_port"], subsample=case["ds_rate"])
    cfg["model"]["num_classes"] = c
    method = CBST(cfg, ctx)
    method._probabilities = lambda: iter([(torch.arange(n), probs, None)])
    method.start_stage(method.stages()[0], PixelNet(classes=c))
    binned = torch.floor(torch.tensor(case["cls_thresh"]).double() * 65536).clamp(max=65535).div(65536).float()
    binned[torch.tensor(case["cls_thresh"]) == 1.0] = 1.0
    assert torch.equal(method.thresholds, binned)
    stored = torch.from_numpy(np.load(method.labels_path(0)).astype(np.int64))
    assert torch.equal(stored, decode(case["labels_with_binned_thresholds"], (n, h, w)))
    assert method.mine == case["mine_id"] and method.pred_counts.tolist() == case["pred_cls_num"]


# -- recipe 2: one retraining step ---------------------------------------------------------------------
STEP_SHAPES = {"conv1.weight": (2, 3, 3, 3), "layer5.conv2d_list.0.weight": (3, 2, 3, 3),
               "layer5.conv2d_list.1.weight": (3, 2, 3, 3), "layer5.conv2d_list.0.bias": (3,),
               "layer5.conv2d_list.1.bias": (3,)}
STEP_NAMES = (["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"]
              + [f"layer{i}.weight" for i in range(1, 5)]
              + [f"layer5.conv2d_list.{j}.{k}" for j in range(2) for k in ("weight", "bias")])


def step_recipe():
    """(the authors' state dict by name, images [2, 3, 8, 8], labels [2, 8, 8]), float64."""
    g = torch.Generator().manual_seed(1)
    state = {}
    for name in STEP_NAMES:
        shape = STEP_SHAPES.get(name, (2, 2, 1, 1) if name.startswith("layer") else (2,))
        if name in ("bn1.weight", "bn1.running_var"):
            state[name] = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
        else:
            state[name] = torch.randn(shape, generator=g, dtype=torch.float64) * 0.5
    images = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 8, 8), generator=g)
    labels[torch.rand(2, 8, 8, generator=g) < 0.25] = 255
    return state, images, labels


class _Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(2)
        self.layer1, self.layer2, self.layer3, self.layer4 = (nn.Conv2d(2, 2, 1, bias=False) for _ in range(4))

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = torch.relu(layer(x))
        return x


class TinyDeepLab(SegmentationModel):
    """The recipe's network as a udafast model: backbone at lr, classifier (the authors' layer5) at 10 lr."""

    def __init__(self):
        super().__init__()
        self.backbone = _Backbone()
        self.classifier = nn.ModuleList(nn.Conv2d(2, 3, 3, padding=d, dilation=d) for d in (1, 2))

    def forward(self, x):
        f = self.backbone(x)
        return {"logits": self.classifier[0](f) + self.classifier[1](f)}


def _ours(name):
    return name.replace("layer5.conv2d_list.", "classifier.") if name.startswith("layer5") else "backbone." + name


def test_one_retraining_step_equals_crst_seg(tmp_path):
    golden = fixture("cbst_one_step.json")
    state, images, labels = step_recipe()
    model = TinyDeepLab().double()
    model.load_state_dict({_ours(k): v for k, v in state.items()}, strict=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = config(rounds=1, iters_per_round=100)
    cfg["model"]["num_classes"] = 3
    cfg["optimizer"] = {"name": "sgd", "lr": 5.0e-5, "momentum": 0.9, "weight_decay": 5.0e-4, "schedule": "constant"}
    method = CBST(cfg, FakeContext(tmp_path))
    # the round's set-up passes are not under test here
    method._thresholds_pass = lambda portion: (torch.ones(3), torch.ones(3, dtype=torch.int64))
    method._labels_pass = lambda thresholds, path: torch.zeros(3, dtype=torch.int64)
    method._attach = lambda: None
    method.start_stage(method.stages()[0], model)
    method.normalize = lambda x, model=None: x  # the recipe's images are the network's input
    model.train()  # as the trainer leaves it; CBST's step runs it in eval mode (freeze_bn)
    apply_schedule(method.optimizers, 0, 100)
    groups = method.optimizers["model"].param_groups
    assert [g["lr"] for g in groups] == [5.0e-5, 5.0e-4]
    losses = method.step({"mixed": {"image": images, "label": labels}}, 0, 100)
    assert float(losses["seg"]) == pytest.approx(golden["loss"], rel=1e-12)
    after = model.state_dict()
    for name, delta in golden["delta"].items():
        ours = (after[_ours(name)] - before[_ours(name)]).reshape(-1)
        expected = torch.tensor(delta, dtype=torch.float64)
        assert torch.allclose(ours, expected, rtol=1e-9, atol=1e-22), name
    assert after["backbone.bn1.num_batches_tracked"] == before["backbone.bn1.num_batches_tracked"]
