"""SPEC 1.1: class_thresholds, ClassThresholds.update and cbst_pseudo_labels."""
import torch

import udafast.ops as ops
from udafast.ops import reference
from benchmarks.harness import Case, class_labels, generator, nbytes

C = 19
PORTION = 0.5
IGNORE = 255
BINS = 65536
PIXELS_SHAPE = (1024, 2048)  # 2M pixels: one full-resolution Cityscapes image
PROBS_SHAPE = (4, C, 256, 512)


# ---- best pure PyTorch ----------------------------------------------------------------------


def pytorch_class_thresholds(conf, pred, num_classes, portion, ignore_index=255):
    """One composite-key sort: class in the high 32 bits, confidence descending in the low 32."""
    conf = conf.reshape(-1)
    pred = pred.reshape(-1).long()
    cls = torch.where(pred == ignore_index, num_classes, pred)  # ignored pixels sort last
    # conf >= 0, so its float32 bits order like its value; & drops the sign of a -0.0
    bits = conf.contiguous().view(torch.int32).long() & 0x7FFFFFFF
    keys = torch.sort((cls << 32) | (0x7FFFFFFF - bits)).values
    counts = torch.bincount(cls, minlength=num_classes + 1)[:num_classes]
    n = torch.floor(counts.double() * portion).long()  # float64, as SPEC 1.1 says
    at = (torch.cumsum(counts, 0) - counts + n - 1).clamp(min=0)
    values = (0x7FFFFFFF - (keys[at] & 0xFFFFFFFF)).int().view(torch.float32)
    return torch.where(n >= 1, values, torch.ones_like(values)).to(conf.dtype)


def pytorch_histogram_add_(counts, conf, pred, ignore_index=255):
    """One bincount over class * bins + bin; ignored pixels fall in an extra row that is dropped."""
    num_classes, bins = counts.shape
    pred = pred.reshape(-1).long()
    cls = torch.where(pred == ignore_index, num_classes, pred)
    b = (conf.reshape(-1) * bins).long().clamp_(max=bins - 1)  # exact: bins is a power of two
    hist = torch.bincount(cls * bins + b, minlength=(num_classes + 1) * bins)
    counts.view(-1).add_(hist[: num_classes * bins])
    return counts


def pytorch_cbst_pseudo_labels(probs, thresholds, ignore_index=255):
    best, labels = (probs / thresholds.view(1, -1, 1, 1)).max(dim=1)  # first maximum wins
    return labels.masked_fill_(best < 1, ignore_index)


# ---- inputs ---------------------------------------------------------------------------------


def conf_pred(device):
    g = generator(11)
    pred = class_labels(PIXELS_SHAPE, C, g)
    u = torch.rand(PIXELS_SHAPE, generator=g)
    conf = 1.0 - (1.0 - 1.0 / C) * u * u  # max softmax probabilities in [1/C, 1], skewed high
    return {"conf": conf.to(device), "pred": pred.to(device)}


def probs_thresholds(device):
    g = generator(12)
    probs = torch.softmax(3.0 * torch.randn(PROBS_SHAPE, generator=g), dim=1)
    thresholds = 0.4 + 0.55 * torch.rand(C, generator=g)
    return {"probs": probs.to(device), "thresholds": thresholds.to(device)}


# ---- cases ----------------------------------------------------------------------------------


def _thresholds_api(x, backend):
    return lambda: ops.class_thresholds(x["conf"], x["pred"], C, PORTION, ignore_index=IGNORE, backend=backend)


def _thresholds_ref_call(x, impl):
    return lambda: impl(x["conf"], x["pred"], C, PORTION, IGNORE)


def _update_api(x, backend):
    state = ops.ClassThresholds(C, BINS, ignore_index=IGNORE, device=x["conf"].device, backend=backend)
    return lambda: state.update(x["conf"], x["pred"]).counts


def _update_ref_call(x, impl):
    counts = torch.zeros(C, BINS, dtype=torch.int64, device=x["conf"].device)
    return lambda: impl(counts, x["conf"], x["pred"], IGNORE)


def _cbst_api(x, backend):
    return lambda: ops.cbst_pseudo_labels(x["probs"], x["thresholds"], ignore_index=IGNORE, backend=backend)


def _cbst_ref_call(x, impl):
    return lambda: impl(x["probs"], x["thresholds"], IGNORE)


CASES = [
    Case(
        name="class_thresholds",
        op="class_thresholds",
        kernels=("class_thresholds",),
        shapes=f"conf float32 + pred int64 {list(PIXELS_SHAPE)} (2M pixels), C={C}, portion={PORTION}",
        make_inputs=conf_pred,
        api=_thresholds_api,
        ref_call=_thresholds_ref_call,
        reference_fn=reference.class_thresholds,
        pytorch_fn=pytorch_class_thresholds,
        bytes_min=lambda x: nbytes(x["conf"], x["pred"]) + 4 * C,
        bytes_note="read conf and pred once, write C thresholds",
    ),
    Case(
        name="ClassThresholds.update",
        op="ClassThresholds",
        kernels=("class_histogram_add_",),
        shapes=f"conf float32 + pred int64 {list(PIXELS_SHAPE)} (2M pixels) into C={C} x {BINS} int64 counts",
        make_inputs=conf_pred,
        api=_update_api,
        ref_call=_update_ref_call,
        reference_fn=reference.class_histogram_add_,
        pytorch_fn=pytorch_histogram_add_,
        bytes_min=lambda x: nbytes(x["conf"], x["pred"]) + 2 * C * BINS * 8,
        bytes_note="read conf and pred once, read and write the count table once",
    ),
    Case(
        name="cbst_pseudo_labels",
        op="cbst_pseudo_labels",
        kernels=("cbst_pseudo_labels",),
        shapes=f"probs float32 {list(PROBS_SHAPE)}, thresholds [{C}]",
        make_inputs=probs_thresholds,
        api=_cbst_api,
        ref_call=_cbst_ref_call,
        reference_fn=reference.cbst_pseudo_labels,
        pytorch_fn=pytorch_cbst_pseudo_labels,
        bytes_min=lambda x: nbytes(x["probs"], x["thresholds"]) + 8 * x["probs"][:, 0].numel(),
        bytes_note="read probs once, write int64 labels",
        label_tolerance=1e-4,
    ),
]
