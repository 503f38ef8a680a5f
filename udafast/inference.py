"""Test-time augmentation: mirror averaging, multi-scale averaging and sliding-window inference,
one function (`infer_probabilities`) for evaluation, prediction and the methods' pseudo-label passes.

It follows mmsegmentation (mmseg/models/segmentors/encoder_decoder.py, `EncoderDecoder.inference`,
`slide_inference` and `aug_test`): every view of an image -- each scale, and with `flip` the mirror
of each -- goes through the network; its softmax at the output size (the mirror's mirrored back) is
summed over the views and divided by their number. With a sliding window, each view is cut into
windows of `crop` = (h, w) every `stride` = (h, w) pixels, the last ones flush with the bottom and
right edges (a window larger than the view is the whole view); each window's logits are resized to
the window, summed into place and divided by the number of windows covering each pixel.

Where udafast differs from mmseg: logits are resized with align_corners=True (SPEC part 3, as the
authors' evaluation code does), and a scale s resizes the image to (round(H s), round(W s)),
bilinear without antialiasing (cv2.resize, as CBST's crst_seg.py `val` does).
"""
import math
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["InferenceOptions", "infer_probabilities", "bilinear_weights", "view_probabilities", "average",
           "slide_windows", "scaled_size", "upsample"]


@dataclass(frozen=True)
class InferenceOptions:
    """What `infer_probabilities` averages over: `flip` (the image and its mirror), `scales` (factors
    of the input size) and, with `crop` and `stride` (h, w), sliding windows instead of whole images."""
    flip: bool = False
    scales: Tuple[float, ...] = (1.0,)
    crop: Optional[Tuple[int, int]] = None
    stride: Optional[Tuple[int, int]] = None

    @property
    def plain(self) -> bool:
        """One view of the whole image: what evaluation did before these options."""
        return not self.flip and self.scales == (1.0,) and self.crop is None

    @classmethod
    def create(cls, flip: bool = False, scales=(1.0,), crop=None, stride=None, *,
               names: Tuple[str, str, str, str] = ("flip", "scales", "crop", "stride")) -> "InferenceOptions":
        """Checked options; a ValueError names the offending one by its entry in `names` (a config
        key's dotted path, a CLI flag) for flip, scales, crop, stride."""
        n_flip, n_scales, n_crop, n_stride = names
        if not isinstance(flip, bool):
            raise ValueError(f"{n_flip}: expected true or false, got {flip!r}")
        if isinstance(scales, (int, float)) and not isinstance(scales, bool):
            scales = [scales]
        if not isinstance(scales, (list, tuple)) or not scales or any(
                isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < math.inf for s in scales):
            raise ValueError(f"{n_scales}: expected a number > 0 or a list of them, got {scales!r}")
        if (crop is None) != (stride is None):
            given, missing = (n_crop, n_stride) if stride is None else (n_stride, n_crop)
            raise ValueError(f"{missing}: needed with {given} (sliding-window inference takes both)")
        crop, stride = _pair(crop, n_crop), _pair(stride, n_stride)
        if crop is not None and (stride[0] > crop[0] or stride[1] > crop[1]):
            raise ValueError(f"{n_stride}: {list(stride)} is larger than the window {n_crop} {list(crop)}, "
                             f"which would leave pixels out")
        return cls(flip, tuple(float(s) for s in scales), crop, stride)

    @classmethod
    def from_config(cls, section, prefix: str = "eval", flip: str = "flip", scales: str = "scales",
                    slide: str = "slide") -> "InferenceOptions":
        """From a config section's keys `flip` (a bool), `scales` (a number or a list) and `slide`
        ({crop: [H, W], stride: [H, W]}, both null for whole images); errors name them under `prefix`."""
        window = section.get(slide) or {}
        if not isinstance(window, dict) or set(window) - {"crop", "stride"}:
            raise ValueError(f"{prefix}.{slide}: expected {{crop: [H, W], stride: [H, W]}}, got {window!r}")
        return cls.create(section.get(flip, False), section.get(scales, (1.0,)), window.get("crop"),
                          window.get("stride"), names=(f"{prefix}.{flip}", f"{prefix}.{scales}",
                                                       f"{prefix}.{slide}.crop", f"{prefix}.{slide}.stride"))

    def as_dict(self) -> dict:
        return {"flip": self.flip, "scales": list(self.scales),
                "slide": None if self.crop is None else {"crop": list(self.crop), "stride": list(self.stride)}}


def _pair(value, name):
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, (list, tuple)) or len(value) != 2 or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
        raise ValueError(f"{name}: expected two positive ints [H, W], got {value!r}")
    return int(value[0]), int(value[1])


#: `upsample` of logits a gradient flows back through as two matrix products; False: F.interpolate
#: throughout (benchmarks/train_speed.py's "before")
UPSAMPLE_BY_MATMUL = True


def bilinear_weights(n_in: int, n_out: int, dtype: torch.dtype = torch.float32,
                     device: Optional[torch.device] = None, align_corners: bool = True) -> torch.Tensor:
    """[n_out, n_in]: the weights of 1-D linear interpolation as F.interpolate places its outputs,
    rows summing to 1: with `align_corners` output i at input position i (n_in - 1) / (n_out - 1);
    without, at max(0, (i + 0.5) n_in / n_out - 0.5), the last input repeated past the edge."""
    if n_in == 1 or (n_out == 1 and align_corners):
        weights = torch.zeros(n_out, n_in, dtype=torch.float64)
        weights[:, 0] = 1
        return weights.to(dtype=dtype, device=device)
    if align_corners:
        pos = torch.arange(n_out, dtype=torch.float64) * ((n_in - 1) / (n_out - 1))
    else:
        pos = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    low = pos.floor().long().clamp(max=n_in - 2)
    frac = (pos - low).clamp(max=1.0)
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    weights[rows, low] = 1 - frac
    weights[rows, low + 1] += frac
    return weights.to(dtype=dtype, device=device)


def upsample(logits: torch.Tensor, size: Sequence[int], align_corners: bool = True) -> torch.Tensor:
    """Logits [..., h, w] to `size` (H, W), bilinear with align_corners=True as the authors' code
    does (SPEC part 3); unchanged at their own size. The methods' losses and label passes use it too
    (`align_corners=False`: as mmseg's heads resize them, for lhoyer's DAFormer and MIC).
    When a gradient will flow back, as two matrix products with `bilinear_weights` (the same values
    to float rounding): the backward of F.interpolate's bilinear kernel is the slowest op of a
    training step on the CPU (benchmarks/results/train-speed-*.md), a matrix product's is not."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    grad = UPSAMPLE_BY_MATMUL and torch.is_grad_enabled() and logits.requires_grad
    # float16 / bfloat16 (autocast) keep F.interpolate: it computes its weights in float32
    if not grad or logits.dtype not in (torch.float32, torch.float64):
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=align_corners)
    rows = bilinear_weights(logits.shape[-2], int(size[0]), logits.dtype, logits.device, align_corners)
    cols = bilinear_weights(logits.shape[-1], int(size[1]), logits.dtype, logits.device, align_corners)
    with torch.autocast(logits.device.type, enabled=False):  # the products in the logits' precision
        return torch.matmul(torch.matmul(rows, logits), cols.t())


def scaled_size(size: Sequence[int], scale: float) -> Tuple[int, int]:
    """(H, W) scaled by `scale`, rounded, at least 1 pixel."""
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def slide_windows(size: Sequence[int], crop: Sequence[int], stride: Sequence[int]) -> List[Tuple[int, int, int, int]]:
    """The windows (y1, y2, x1, x2) covering an image of `size` (H, W), as mmseg's
    `slide_inference` lays them: every `stride` from the top left, the last flush with the edge."""
    (h, w), (ch, cw), (sh, sw) = size, crop, stride
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    out = []
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * sh + ch, h), min(j * sw + cw, w)
            out.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return out


def _logits(model, x, options):
    """The network's logits on `x` [B, 3, h, w]: whole, or assembled from sliding windows at x's size."""
    if options.crop is None:
        return model(x)["logits"]
    windows = slide_windows(x.shape[-2:], options.crop, options.stride)
    total = count = None
    for y1, y2, x1, x2 in windows:
        part = upsample(model(x[..., y1:y2, x1:x2])["logits"], (y2 - y1, x2 - x1))
        if total is None:
            total = part.new_zeros(part.shape[:2] + x.shape[-2:])
            count = part.new_zeros((1, 1) + x.shape[-2:])
        total[..., y1:y2, x1:x2] += part
        count[..., y1:y2, x1:x2] += 1
    return total / count


def view_probabilities(logits: torch.Tensor, size, *, mirrored: bool = False,
                       resize_probabilities: bool = False) -> torch.Tensor:
    """The softmax of one view's `logits` at `size` (H, W), float32, mirrored back if the view was
    the mirror. The logits are resized and then softmaxed (mmseg, CBST's crst_seg.py), or with
    `resize_probabilities` softmaxed and then resized (ProDA's generate_pseudo_label.py)."""
    if resize_probabilities:
        probs = upsample(F.softmax(logits.float(), dim=1), size)
    else:
        probs = F.softmax(upsample(logits, size).float(), dim=1)
    return probs.flip(-1) if mirrored else probs


def average(views: Iterable[torch.Tensor]) -> torch.Tensor:
    """The mean of the views' probabilities: summed in order, divided by their number (mmseg's `aug_test`)."""
    total, n = None, 0
    for probs in views:
        total = probs if total is None else total + probs
        n += 1
    return total if n == 1 else total / n


@torch.no_grad()
def infer_probabilities(model, images: torch.Tensor, size, options: InferenceOptions = InferenceOptions(), *,
                        normalize: Optional[Callable] = None, resize_probabilities: bool = False) -> torch.Tensor:
    """Class probabilities [B, C, H, W] at `size` = (H, W), averaged over the views of `options`.

    `images` [B, 3, h, w]: each scale s resizes them to `scaled_size((h, w), s)` (bilinear,
    align_corners=False; s = 1 leaves them), then `normalize` (None: they are the network's input
    already) makes the network input; the mirror is that input flipped left-right. `model` runs as
    it is (the caller sets eval mode) and returns a dict with "logits". `resize_probabilities`: see
    `view_probabilities`."""
    def views():
        for scale in options.scales:
            x = images
            if scale != 1.0:
                x = F.interpolate(images, size=scaled_size(images.shape[-2:], scale), mode="bilinear",
                                  align_corners=False)
            if normalize is not None:
                x = normalize(x)
            yield view_probabilities(_logits(model, x, options), size, resize_probabilities=resize_probabilities)
            if options.flip:
                yield view_probabilities(_logits(model, x.flip(-1), options), size, mirrored=True,
                                         resize_probabilities=resize_probabilities)

    return average(views())
