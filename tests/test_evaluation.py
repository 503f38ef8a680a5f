"""Evaluation: confusion matrix and mIoU, SYNTHIA subsets, align_corners=True upsampling, the CLI,
and agreement with cityscapesscripts' own evaluator on saved predictions."""
import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from conftest import TinySeg
from udafast import evaluate
from udafast.data.transforms import normalize
from udafast.engine.evaluation import (
    ConfusionMatrix, evaluate_model, format_table, iou_per_class, mean_iou, predict, scores, train_ids_to_label_ids,
    write_json,
)


class FixedLogits(nn.Module):
    """Returns the same logits whatever the input."""
    normalization = "imagenet"

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits, requires_grad=False)

    def forward(self, x):
        return {"logits": self.logits.expand(x.shape[0], -1, -1, -1)}


class ListDataset:
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


# --------------------------------------------------------------------------------------------
# Confusion matrix and IoU, by hand

def test_confusion_matrix_hand_worked():
    gt = torch.tensor([0, 0, 1, 1, 255, 2, 1])
    pred = torch.tensor([0, 1, 1, 1, 0, 255, 3])
    cm = ConfusionMatrix(num_classes=4).update(pred, gt)
    expected = torch.zeros(4, 5, dtype=torch.int64)
    expected[0, 0] = 1
    expected[0, 1] = 1
    expected[1, 1] = 2
    expected[1, 3] = 1
    expected[2, 4] = 1  # predicted 255: a false negative of class 2, a false positive of none
    assert torch.equal(cm.matrix, expected)
    iou = iou_per_class(cm.matrix)
    # class 0: TP 1, FN 1, FP 0; class 1: TP 2, FN 1, FP 1; class 2: TP 0, FN 1; class 3: TP 0, FP 1
    assert iou.tolist() == pytest.approx([1 / 2, 2 / 4, 0.0, 0.0])
    assert mean_iou(iou) == pytest.approx(100 * (0.5 + 0.5) / 4)


def test_absent_class_excluded_and_ignore_pixels_do_not_count():
    gt = torch.tensor([[0, 0], [1, 255]])
    pred = torch.tensor([[0, 1], [1, 2]])  # the 2 sits on an ignored pixel: no false positive
    cm = ConfusionMatrix(num_classes=4).update(pred, gt)
    iou = iou_per_class(cm.matrix)
    assert iou[0] == pytest.approx(0.5) and iou[1] == pytest.approx(0.5)
    assert math.isnan(iou[2]) and math.isnan(iou[3])  # absent from gt and (valid) pred
    assert mean_iou(iou) == pytest.approx(50.0)
    assert cm.matrix.sum() == 3


def test_update_accumulates_and_validates():
    cm = ConfusionMatrix(num_classes=3)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    cm.update(torch.tensor([2]), torch.tensor([2]))
    assert torch.equal(torch.diagonal(cm.matrix[:, :3]), torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="pred"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(num_classes=0)


def test_synthia_subsets_16_and_13():
    g = torch.Generator().manual_seed(1)
    matrix = torch.randint(0, 50, (19, 20), generator=g)
    matrix[16] = 0  # train: absent from gt ...
    matrix[:, 16] = 0  # ... and pred, so NaN (outside the 16 anyway)
    matrix[3] = 0  # wall never in gt, but predicted: IoU 0, still counted in the 16
    iou = iou_per_class(matrix).numpy()
    assert iou[3] == 0.0
    s16 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]
    s13 = [c for c in s16 if c not in (3, 4, 5)]
    res = scores(matrix, classes=16)
    assert res["miou"] == pytest.approx(100 * iou[s16].mean())
    assert res["miou13"] == pytest.approx(100 * iou[s13].mean())
    assert len(res["iou"]) == 16 and "terrain" not in res["iou"] and "wall" in res["iou"]
    res19 = scores(matrix, classes=19)
    assert "miou13" not in res19
    assert res19["miou"] == pytest.approx(100 * np.nanmean(iou))
    with pytest.raises(ValueError, match="classes"):
        scores(matrix, classes=13)
    assert "mIoU (13)" in format_table(res)


def test_iou_matches_a_dense_reference():
    g = torch.Generator().manual_seed(2)
    gt = torch.randint(0, 20, (5, 40, 30), generator=g)
    gt[gt == 19] = 255
    pred = torch.randint(0, 19, (5, 40, 30), generator=g)
    cm = ConfusionMatrix().update(pred, gt)
    valid = gt != 255
    for c in range(19):
        tp = ((pred == c) & (gt == c)).sum().item()
        fp = ((pred == c) & (gt != c) & valid).sum().item()
        fn = ((pred != c) & (gt == c)).sum().item()
        assert iou_per_class(cm.matrix)[c].item() == pytest.approx(tp / (tp + fp + fn))


def test_write_json_nan_as_null(tmp_path):
    matrix = torch.zeros(19, 20, dtype=torch.int64)
    matrix[0, 0] = 5
    res = scores(matrix)
    write_json(res, tmp_path / "sub" / "r.json", split="val")
    doc = json.loads((tmp_path / "sub" / "r.json").read_text())
    assert doc["miou"] == 100.0 and doc["iou"]["sidewalk"] is None and doc["split"] == "val"


# --------------------------------------------------------------------------------------------
# evaluate_model

def test_upsampling_uses_align_corners_true():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 19, 4, 5, generator=g)
    H, W = 13, 17
    label = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=True)[0].argmax(0)
    other = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)[0].argmax(0)
    assert (label != other).any(), "fixture must tell the two modes apart"
    sample = {"image": torch.rand(3, H, W), "label": label, "name": "a.png"}
    res = evaluate_model(FixedLogits(logits), ListDataset([sample]), device="cpu")
    assert res["miou"] == pytest.approx(100.0)


def test_input_size_and_normalisation():
    model = TinySeg()
    image = torch.rand(3, 24, 40)
    label = torch.zeros(24, 40, dtype=torch.int64)
    calls = []
    res = evaluate_model(model, ListDataset([{"image": image, "label": label, "name": "x"}]), input_size=(32, 16),
                         on_prediction=lambda i, s, p: calls.append(p.shape))
    assert model.inputs == [(1, 3, 16, 32)]  # (width, height) = (32, 16)
    assert calls == [torch.Size([24, 40])]  # predictions at the label's full resolution
    assert res["num_images"] == 1 and model.training  # the model's mode is restored
    x = torch.rand(3, 8, 8)
    model.normalization = "caffe"
    predict(model, x)
    assert torch.allclose(model.last, normalize(x, "caffe")[None])


def test_unlabelled_dataset_rejected():
    with pytest.raises(ValueError, match="label"):
        evaluate_model(TinySeg(), ListDataset([{"image": torch.rand(3, 8, 8), "name": "x"}]))


# --------------------------------------------------------------------------------------------
# A tiny Cityscapes tree, the CLI, and cityscapesscripts' evaluator

LABEL_IDS = [0, 1, 4, 5, 7, 8, 11, 17, 21, 23, 24, 26, 33]  # classes and ignored ids (0, 1, 4, 5)


def make_cityscapes(root, size=(64, 32)):
    w, h = size
    rng = np.random.default_rng(0)
    gts = []
    for city, frame in (("aachen", "000019"), ("bremen", "000029")):
        name = f"{city}_000000_{frame}"
        img_dir = root / "leftImg8bit" / "val" / city
        gt_dir = root / "gtFine" / "val" / city
        img_dir.mkdir(parents=True)
        gt_dir.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img_dir / f"{name}_leftImg8bit.png")
        blocks = rng.choice(LABEL_IDS, size=(h // 8, w // 8))
        gt = np.kron(blocks, np.ones((8, 8), dtype=np.int64)).astype(np.uint8)
        Image.fromarray(gt, mode="L").save(gt_dir / f"{name}_gtFine_labelIds.png")
        gts.append(str(gt_dir / f"{name}_gtFine_labelIds.png"))
    return gts


def official_miou(predictions, gts):
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev

    args = copy.copy(ev.args)
    args.evalInstLevelScore = False
    args.evalPixelAccuracy = False
    args.JSONOutput = False
    args.quiet = True
    res = ev.evaluateImgLists(list(predictions), list(gts), args)
    return 100 * res["averageScoreClasses"], {k: 100 * v for k, v in res["classScores"].items()}


def check_against_official(json_path, pred_paths, gts):
    ours = json.loads(open(json_path).read())
    miou, per_class = official_miou(pred_paths, gts)
    assert ours["miou"] == pytest.approx(miou, abs=1e-6)
    for name, value in ours["iou"].items():
        if value is None:
            assert math.isnan(per_class[name])
        else:
            assert value == pytest.approx(per_class[name], abs=1e-6)


def test_scoring_predictions_equals_cityscapesscripts(tmp_path, capsys):
    root = tmp_path / "cs"
    gts = make_cityscapes(root)
    rng = np.random.default_rng(1)
    preds = []
    for gt_path in gts:
        gt = np.array(Image.open(gt_path))
        noise = rng.choice([0, 4, 7, 8, 11, 12, 17, 19, 21, 26, 28], size=gt.shape).astype(np.uint8)
        pred = np.where(rng.random(gt.shape) < 0.6, gt, noise)  # wall (12), bus (28): predicted, never in gt
        city = os.path.basename(os.path.dirname(gt_path))
        stem = os.path.basename(gt_path).replace("_gtFine_labelIds.png", "_leftImg8bit.png")
        out = tmp_path / "pred" / city / stem
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pred, mode="L").save(out)
        preds.append(str(out))
    result = evaluate.main(["--predictions", str(tmp_path / "pred"), "--dataset", "cityscapes", "--root", str(root),
                            "--split", "val", "--json", str(tmp_path / "r.json"), "--quiet"])
    assert result["iou"]["wall"] == 0.0 and math.isnan(result["iou"]["train"])
    assert "mIoU (19)" in capsys.readouterr().out
    check_against_official(tmp_path / "r.json", preds, gts)


@pytest.fixture
def tiny_model(monkeypatch):
    model = TinySeg()
    loaded = []

    def load(path, device="cpu"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        loaded.append(path)
        return model.to(device).eval()

    monkeypatch.setattr(evaluate, "load_model", load)
    return model


def test_evaluate_checkpoint_saves_official_format(tmp_path, tiny_model):
    root = tmp_path / "cs"
    gts = make_cityscapes(root)
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"stand-in")
    out = tmp_path / "out"
    result = evaluate.main(["--checkpoint", str(ckpt), "--dataset", "cityscapes", "--root", str(root),
                            "--input-size", "32x16", "--device", "cpu", "--save-predictions", str(out),
                            "--json", str(tmp_path / "a.json"), "--quiet"])
    assert tiny_model.inputs == [(1, 3, 16, 32)] * 2
    names = [os.path.basename(g).replace("_gtFine_labelIds.png", "_leftImg8bit.png") for g in gts]
    preds = [str(out / n.split("_")[0] / n) for n in names]
    for p in preds:
        arr = np.array(Image.open(p))
        assert arr.shape == (32, 64) and set(np.unique(arr)) <= set(train_ids_to_label_ids(np.arange(19)).tolist())
        assert (out / "panels" / os.path.basename(p).replace(".png", ".jpg")).is_file()
    panel = Image.open(out / "panels" / names[0].replace(".png", ".jpg"))
    assert panel.size == (3 * 64, 32)
    check_against_official(tmp_path / "a.json", preds, gts)
    rescored = evaluate.main(["--predictions", str(out), "--root", str(root), "--quiet"])
    assert rescored["miou"] == pytest.approx(result["miou"], abs=1e-9)
    assert rescored["confusion_matrix"] == result["confusion_matrix"]


def test_classes_16_prints_miou13(tmp_path, tiny_model, capsys):
    root = tmp_path / "cs"
    make_cityscapes(root)
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"stand-in")
    result = evaluate.main(["--checkpoint", str(ckpt), "--root", str(root), "--classes", "16", "--device", "cpu",
                            "--quiet"])
    assert {"miou", "miou13"} <= set(result) and len(result["iou"]) == 16
    out = capsys.readouterr().out
    assert "mIoU (16)" in out and "mIoU (13)" in out


def test_missing_paths_are_one_line_errors(tmp_path, tiny_model):
    root = tmp_path / "cs"
    make_cityscapes(root)
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"stand-in")
    missing = tmp_path / "nope.pth"
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", str(missing), "--root", str(root), "--quiet"])
    assert str(missing) in str(e.value.code) and "\n" not in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", str(ckpt), "--root", str(tmp_path / "noroot"), "--quiet"])
    assert str(tmp_path / "noroot") in str(e.value.code)
    (tmp_path / "pred" / "aachen").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(tmp_path / "pred" / "aachen" / "aachen_000000_000019_leftImg8bit.png")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--predictions", str(tmp_path / "pred"), "--root", str(root), "--quiet"])
    assert "bremen_000000_000029" in str(e.value.code) and str(tmp_path / "pred") in str(e.value.code)


def test_cli_process_exit_status(tmp_path):
    missing = tmp_path / "nope.pth"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-m", "udafast.evaluate", "--checkpoint", str(missing), "--root",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and str(missing) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_checkpoint_carries_the_evaluation_input_size(tmp_path):
    """A real small-model checkpoint saved with eval_input_size: the CLI evaluates at that size
    unless --input-size overrides it."""
    from udafast.models import build_model, save_checkpoint

    root = tmp_path / "cs"
    make_cityscapes(root)
    ckpt = tmp_path / "small.pt"
    save_checkpoint(ckpt, build_model({"name": "small", "num_classes": 19}), iter=3, eval_input_size=[48, 24])
    model = evaluate.load_model(ckpt)
    assert model.eval_input_size == (48, 24)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    from unittest import mock

    with mock.patch.object(evaluate, "load_model", lambda path, device="cpu": model):
        evaluate.main(["--checkpoint", str(ckpt), "--root", str(root), "--device", "cpu", "--quiet"])
        assert seen == [(24, 48)] * 2
        seen.clear()
        evaluate.main(["--checkpoint", str(ckpt), "--root", str(root), "--device", "cpu", "--quiet",
                       "--input-size", "32x16"])
        assert seen == [(16, 32)] * 2
