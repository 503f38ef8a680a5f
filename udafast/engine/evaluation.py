"""Evaluation (SPEC part 3): the confusion matrix, IoU and mIoU, and running a model over a dataset.

`ConfusionMatrix` accumulates on the tensors' device. Rows are ground-truth train ids; columns
are predicted train ids plus one last column for pixels predicted as no class (255, or a
Cityscapes label id without a train id in a saved prediction): such a pixel is a false negative
of its ground-truth class and a false positive of none, as in `cityscapesscripts`' evaluator.
Pixels whose ground truth is not a class (255) are left out.

`IoU_c = TP / (TP + FP + FN)`; mIoU is the mean over the evaluated classes whose denominator is
not zero, in 0-100. `scores(matrix, classes=19)` gives `miou` over the 19 classes;
`classes=16` (SYNTHIA-trained models) gives `miou` over SYNTHIA's 16 classes and `miou13` without
wall, fence and pole, all from the same 19-class matrix.
"""
import json
import math
import os
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from udafast.data.labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES, SYNTHIA_13, SYNTHIA_16
from udafast.data.transforms import normalize
from udafast.inference import InferenceOptions, infer_probabilities
from udafast.inference import upsample as upsample_logits  # the public name of evaluation's upsampling

__all__ = [
    "ConfusionMatrix", "iou_per_class", "mean_iou", "scores", "class_subsets", "upsample_logits",
    "predict", "evaluate_model", "format_table", "print_table", "write_json", "train_ids_to_label_ids",
    "label_ids_to_train_ids", "find_predictions", "score_predictions",
]


class ConfusionMatrix:
    """Counts of (ground truth, prediction) pixel pairs, int64 [C, C + 1] on `device`."""

    def __init__(self, num_classes: int = NUM_CLASSES, ignore_index: int = IGNORE_INDEX, device=None):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> "ConfusionMatrix":
        """Add the pixels of `pred` and `gt` (integer tensors of the same shape, train ids)."""
        if pred.shape != gt.shape:
            raise ValueError(f"pred: shape {tuple(pred.shape)} does not match gt's {tuple(gt.shape)}")
        if pred.dtype.is_floating_point or gt.dtype.is_floating_point:
            raise ValueError(f"pred, gt: expected integer tensors, got {pred.dtype} and {gt.dtype}")
        c = self.num_classes
        gt = gt.reshape(-1).to(self.matrix.device, torch.int64)
        pred = pred.reshape(-1).to(self.matrix.device, torch.int64)
        valid = (gt >= 0) & (gt < c)
        gt, pred = gt[valid], pred[valid]
        pred = torch.where((pred >= 0) & (pred < c), pred, c)
        self.matrix += torch.bincount(gt * (c + 1) + pred, minlength=c * (c + 1)).view(c, c + 1)
        return self

    def reset(self):
        self.matrix.zero_()

    def all_reduce(self):
        """Sum the counts across processes when torch.distributed is initialised."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.matrix)
        return self


def iou_per_class(matrix: torch.Tensor) -> torch.Tensor:
    """float64 [C] IoU of each class in [0, 1] from a [C, C] or [C, C + 1] matrix (rows ground
    truth); NaN where TP + FP + FN = 0."""
    if matrix.dim() != 2 or matrix.shape[1] not in (matrix.shape[0], matrix.shape[0] + 1):
        raise ValueError(f"matrix: expected [C, C] or [C, C + 1], got {tuple(matrix.shape)}")
    m = matrix.double()
    c = m.shape[0]
    tp = torch.diagonal(m[:, :c])
    denom = m.sum(1) + m[:, :c].sum(0) - tp  # (TP + FN) + (TP + FP) - TP
    return torch.where(denom > 0, tp / denom.clamp_min(1), torch.full_like(tp, float("nan")))


def mean_iou(iou: torch.Tensor, classes: Optional[Sequence[int]] = None) -> float:
    """Mean of `iou` (in [0, 1]) over `classes` (default all) where it is not NaN, in 0-100; NaN
    when none is."""
    if classes is not None:
        iou = iou[list(classes)]
    valid = iou[~torch.isnan(iou)]
    return float(valid.mean() * 100) if valid.numel() else float("nan")


def class_subsets(classes: int):
    """The score names and the train ids each averages over: 19 -> {miou: all 19};
    16 -> {miou: SYNTHIA's 16, miou13: those without wall, fence, pole}."""
    if classes == 19:
        return {"miou": tuple(range(NUM_CLASSES))}
    if classes == 16:
        return {"miou": SYNTHIA_16, "miou13": SYNTHIA_13}
    raise ValueError(f"classes: expected 19 or 16, got {classes!r}")


def scores(matrix: torch.Tensor, classes: int = 19) -> dict:
    """The scores of a 19-class matrix: `miou` (and `miou13` for 16 classes) in 0-100, `iou`
    {class name: IoU in 0-100 or NaN} over the evaluated classes, `classes`, `confusion_matrix`."""
    subsets = class_subsets(classes)
    iou = iou_per_class(matrix.cpu())
    out = {name: mean_iou(iou, ids) for name, ids in subsets.items()}
    out["iou"] = {CLASS_NAMES[c]: float(iou[c]) * 100 for c in subsets["miou"]}
    out["classes"] = classes
    out["confusion_matrix"] = matrix.cpu().tolist()
    return out


# Train id -> Cityscapes label id (255 -> 0 "unlabeled") and back, for the official format.
def _train_to_label_lut():
    from cityscapesscripts.helpers.labels import trainId2label

    lut = np.zeros(256, dtype=np.uint8)
    for c in range(NUM_CLASSES):
        lut[c] = trainId2label[c].id
    return lut


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Train ids -> Cityscapes label ids (uint8); 255 and other non-class values -> 0."""
    ids = np.asarray(train_ids)
    return _train_to_label_lut()[np.where((ids >= 0) & (ids < NUM_CLASSES), ids, 255)]


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Cityscapes label ids -> train ids (int64); ids without a train id -> 255."""
    from udafast.data.labels import CITYSCAPES_ID_TO_TRAIN, lookup_table

    ids = np.asarray(label_ids).astype(np.int64)
    lut = lookup_table(CITYSCAPES_ID_TO_TRAIN, 256)
    return np.where((ids >= 0) & (ids < 256), lut[np.clip(ids, 0, 255)], 255).astype(np.int64)


def _parse_input_size(input_size):
    if input_size is None:
        return None
    try:
        w, h = (int(v) for v in input_size)
    except (TypeError, ValueError):
        raise ValueError(f"input_size: expected (width, height), got {input_size!r}") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"input_size: expected a positive (width, height), got {input_size!r}")
    return w, h


def _model_normalization(model):
    mode = getattr(model, "normalization", None)
    if mode is None:
        mode = (getattr(model, "config", None) or {}).get("normalization") or "imagenet"
    return mode


@torch.inference_mode()
def predict(model, image: torch.Tensor, *, input_size=None, normalization=None, output_size=None,
            device=None, inference: Optional[InferenceOptions] = None) -> torch.Tensor:
    """The class scores of one image at `output_size` (default the image's own), float [C, H, W]:
    their argmax is the prediction.

    `image` float [3, H, W] RGB in [0, 1]. It is normalised (`normalization`, default the model's
    `normalization`), resized bilinearly to the network's `input_size` = (width, height) (None:
    as it is), run through `model` (the caller puts it in eval mode; its output dict's "logits"),
    and the logits are upsampled with align_corners=True to `output_size` = (H, W). With
    `inference` options beyond one whole view (mirror, scales of that input, sliding windows),
    the scores are the averaged softmax of `udafast.inference.infer_probabilities` instead.
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image: expected [3, H, W], got {tuple(image.shape)}")
    input_size = _parse_input_size(input_size)
    if device is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    x = normalize(image.to(device, torch.float32), normalization or _model_normalization(model))[None]
    if input_size is not None and (x.shape[-1], x.shape[-2]) != input_size:
        w, h = input_size
        shrink = h < x.shape[-2] or w < x.shape[-1]
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)
    output_size = output_size or tuple(image.shape[-2:])
    if inference is not None and not inference.plain:
        return infer_probabilities(model, x, output_size, inference)[0]
    out = model(x)
    logits = out["logits"] if isinstance(out, dict) else out
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4:
        raise ValueError("model: expected a dict whose 'logits' are [B, C, h, w]")
    return upsample_logits(logits.float(), output_size)[0]


def evaluate_model(model, dataset, *, input_size=None, device=None, classes: int = 19, normalization=None,
                   on_prediction: Optional[Callable] = None, progress: Optional[Callable] = None,
                   all_reduce: bool = False, inference: Optional[InferenceOptions] = None) -> dict:
    """Score `model` on a labelled `dataset` (samples with "image" [3, H, W] in [0, 1], "label"
    train ids, "name"), per SPEC part 3: each image at the network's `input_size` = (width,
    height) (None: native), logits upsampled with align_corners=True to the full label resolution,
    argmax, accumulated into a confusion matrix on `device`. `inference`: mirror, multi-scale and
    sliding-window averaging (see `predict`).

    `on_prediction(index, sample, pred)` receives each prediction (int64 [H, W] train ids, CPU);
    `progress(done, total)` is called after each image. Returns `scores(...)` plus `num_images`.
    `all_reduce`: `dataset` is this process's share; the scores are those of every process's.
    """
    class_subsets(classes)
    input_size = _parse_input_size(input_size)
    if device is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    device = torch.device(device)
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(NUM_CLASSES, device=device)
    try:
        for i in range(len(dataset)):
            sample = dataset[i]
            if "label" not in sample:
                raise ValueError(f"dataset: sample {i} ({sample.get('name')}) has no label; evaluation needs a labelled split")
            label = sample["label"]
            logits = predict(model, sample["image"], input_size=input_size, normalization=normalization,
                             output_size=tuple(label.shape[-2:]), device=device, inference=inference)
            pred = logits.argmax(0)
            cm.update(pred, label.to(device))
            if on_prediction is not None:
                on_prediction(i, sample, pred.cpu())
            if progress is not None:
                progress(i + 1, len(dataset))
    finally:
        model.train(was_training)
    num_images = torch.tensor([len(dataset)], dtype=torch.int64, device=device)
    if all_reduce:
        cm.all_reduce()
        torch.distributed.all_reduce(num_images)
    result = scores(cm.matrix, classes)
    result["num_images"] = int(num_images)
    return result


def find_predictions(folder, names: Sequence[str]) -> list:
    """The prediction PNG under `folder` (searched recursively) for each image file name in
    `names`: `{stem}.png`, or, as `cityscapesscripts` matches, the one PNG whose name starts with
    `{city}_{seq}_{frame}` for a Cityscapes name. FileNotFoundError names the first one missing."""
    folder = str(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"predictions folder not found: {folder}")
    found = {}
    for root, _, files in os.walk(folder):
        for f in files:
            if f.lower().endswith(".png"):
                found.setdefault(f, []).append(os.path.join(root, f))
    out = []
    for name in names:
        stem = os.path.splitext(os.path.basename(name))[0]
        paths = found.get(stem + ".png", [])
        if not paths and stem.endswith("_leftImg8bit"):
            prefix = "_".join(stem.split("_")[:3])
            paths = [p for f, ps in found.items() if f.startswith(prefix) for p in ps]
        if not paths:
            raise FileNotFoundError(f"prediction file not found: {os.path.join(folder, stem + '.png')}")
        if len(paths) > 1:
            raise ValueError(f"predictions: several files for {name}: {', '.join(sorted(paths))}")
        out.append(paths[0])
    return out


def score_predictions(folder, dataset, *, classes: int = 19, progress: Optional[Callable] = None) -> dict:
    """Score saved predictions in the official Cityscapes format (label-id PNGs, see
    `find_predictions`) against a labelled `dataset`'s labels; the same numbers as
    `cityscapesscripts`' evaluator on the same files. Returns `scores(...)` plus `num_images`."""
    from udafast.data.io import read_label

    class_subsets(classes)
    if not getattr(dataset, "labelled", False):
        raise ValueError("dataset: scoring predictions needs a labelled split")
    paths = find_predictions(folder, dataset.names)
    cm = ConfusionMatrix(NUM_CLASSES)
    for i, path in enumerate(paths):
        gt = dataset.train_label(i)
        pred = read_label(path)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {path} is {pred.shape} (H, W) but its label is {gt.shape}")
        cm.update(torch.from_numpy(label_ids_to_train_ids(pred)), torch.from_numpy(gt.astype(np.int64)))
        if progress is not None:
            progress(i + 1, len(paths))
    result = scores(cm.matrix, classes)
    result["num_images"] = len(paths)
    return result


def format_table(result: dict) -> str:
    """The per-class IoU table (class name, IoU in 0-100) and the mIoU lines."""
    lines = [f"{'class':<16}{'IoU':>8}", "-" * 24]
    for name, value in result["iou"].items():
        lines.append(f"{name:<16}{_fmt(value):>8}")
    lines.append("-" * 24)
    for key in ("miou", "miou13"):
        if key in result:
            label = f"mIoU ({result['classes']})" if key == "miou" else "mIoU (13)"
            lines.append(f"{label:<16}{_fmt(result[key]):>8}")
    return "\n".join(lines)


def _fmt(value):
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}"


def print_table(result: dict, file=None):
    print(format_table(result), file=file)


def write_json(result: dict, path, **extra):
    """Write `result` (and `extra` keys) as JSON to `path`; NaN scores become null."""
    def clean(v):
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(clean({**result, **extra}), f, indent=2)
        f.write("\n")
