"""Transforms applied consistently to an image and its label, on torch tensors.

A transform is a callable `t(sample, generator=None) -> sample` on the dataset's sample dicts:
`"image"` float [3, H, W] in [0, 1] and, when present, `"label"` int64 [H, W] train ids. Images are
resampled bilinearly, labels with nearest neighbour (pixel centres, as the image), and any area
outside the source gets 0 in images and 255 (ignore) in labels. Randomness comes from `generator`
(a torch.Generator; None = torch's global generator, which DataLoader seeds per worker), so a
pipeline is deterministic given the generator's seed.

The weak view of SPEC's glossary, `weak_view(...)` (resize, random scale, crop, flip), and
`frame_to_view`, which takes maps of whole frames into the training views. The strong view
(RandAugment, flip, cutout) is udafast.data.strong_view.
"""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from udafast.data.labels import IGNORE_INDEX

__all__ = [
    "Compose", "Resize", "RandomScale", "RandomCrop", "RandomHorizontalFlip", "Normalize", "normalize",
    "denormalize", "weak_view", "frame_to_view", "IMAGENET_MEAN", "IMAGENET_STD", "CAFFE_MEAN_BGR",
    "uniform", "randint", "size_pair", "resize_image", "resize_label",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: DeepLab's Caffe convention: BGR order, 0-255 scale, minus this mean (B, G, R).
CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)


def uniform(generator: Optional[torch.Generator], n: Optional[int] = None) -> Union[float, torch.Tensor]:
    """A draw of U[0, 1) from `generator` (None: torch's global one) on its device: a float, or
    with `n`, a CPU tensor of `n` draws."""
    device = generator.device if generator is not None else "cpu"
    r = torch.rand(() if n is None else (n,), generator=generator, device=device)
    return r.item() if n is None else r.cpu()


def randint(generator: Optional[torch.Generator], high: int) -> int:
    """A draw of {0, ..., high - 1} from `generator` (None: torch's global one)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(high, (), generator=generator, device=device).item())


def size_pair(size: Union[int, Sequence[int]], what: str) -> Tuple[int, int]:
    """`size` as a (height, width) of positive ints (an int: a square); ValueError naming `what`."""
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"{what}: expected a positive (height, width), got {size}")
    return size


def resize_image(image: torch.Tensor, size: Sequence[int], antialias: bool = True) -> torch.Tensor:
    """`image` [..., 3, H, W] resized bilinearly to `size` (antialiased when it shrinks and
    `antialias`), clamped to [0, 1] when floating point."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    down = size[0] < image.shape[-2] or size[1] < image.shape[-1]
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False,
                        antialias=bool(antialias and down))[0]
    return out.clamp_(0.0, 1.0) if image.dtype.is_floating_point else out


def resize_label(label: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A label map [H, W] resized to `size` by nearest neighbour (pixel centres), in its dtype."""
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    out = F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")[0, 0]
    return out.to(label.dtype)


def _resize_sample(sample, size, antialias=True):
    out = dict(sample)
    out["image"] = resize_image(sample["image"], size, antialias)
    for key in ("label", "truth"):  # "truth": a target's true labels kept to score pseudo-labels
        if key in sample:
            out[key] = resize_label(sample[key], size)
    return out


class Compose:
    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, sample, generator=None):
        for t in self.transforms:
            sample = t(sample, generator=generator)
        return sample

    def __repr__(self):
        return "Compose([" + ", ".join(repr(t) for t in self.transforms) + "])"


class Resize:
    """Resize to `size` = (height, width); an int resizes the shorter side to it, keeping the
    aspect ratio. Images bilinear (antialiased when shrinking), labels nearest."""

    def __init__(self, size, antialias=True):
        if isinstance(size, int):
            if size <= 0:
                raise ValueError(f"size: expected a positive size, got {size}")
            self.size = size
        else:
            self.size = size_pair(size, "size")
        self.antialias = antialias

    def output_size(self, h, w):
        if isinstance(self.size, int):
            s = self.size / min(h, w)
            return max(1, round(h * s)), max(1, round(w * s))
        return self.size

    def __call__(self, sample, generator=None):
        h, w = sample["image"].shape[-2:]
        return _resize_sample(sample, self.output_size(h, w), self.antialias)

    def __repr__(self):
        return f"Resize({self.size})"


class RandomScale:
    """Rescale by a factor drawn uniformly from `scale_range` (of the sample's size, or of
    `base_size` = (height, width) when given)."""

    def __init__(self, scale_range=(0.5, 1.5), base_size=None, antialias=True):
        lo, hi = (float(s) for s in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range: expected 0 < low <= high, got {scale_range}")
        self.scale_range = (lo, hi)
        self.base_size = None if base_size is None else size_pair(base_size, "base_size")
        self.antialias = antialias

    def __call__(self, sample, generator=None):
        lo, hi = self.scale_range
        s = lo + (hi - lo) * uniform(generator)
        h, w = self.base_size or tuple(sample["image"].shape[-2:])
        return _resize_sample(sample, (max(1, round(h * s)), max(1, round(w * s))), self.antialias)

    def __repr__(self):
        return f"RandomScale({self.scale_range})"


class RandomCrop:
    """A random (height, width) window; a sample smaller than it is first padded at the bottom and
    right (0 in images, 255 in labels)."""

    def __init__(self, size):
        self.size = size_pair(size, "size")

    def __call__(self, sample, generator=None):
        ch, cw = self.size
        image = sample["image"]
        label = sample.get("label")
        h, w = image.shape[-2:]
        if h < ch or w < cw:
            pad = (0, max(0, cw - w), 0, max(0, ch - h))
            image = F.pad(image, pad, value=0.0)
            if label is not None:
                label = F.pad(label, pad, value=IGNORE_INDEX)
            h, w = image.shape[-2:]
        y0 = randint(generator, h - ch + 1)
        x0 = randint(generator, w - cw + 1)
        out = dict(sample)
        out["image"] = image[..., y0:y0 + ch, x0:x0 + cw]
        if label is not None:
            out["label"] = label[..., y0:y0 + ch, x0:x0 + cw]
        return out

    def __repr__(self):
        return f"RandomCrop({self.size})"


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p: expected a probability, got {p}")
        self.p = p

    def __call__(self, sample, generator=None):
        if not uniform(generator) < self.p:
            return sample
        out = dict(sample)
        out["image"] = sample["image"].flip(-1)
        if "label" in sample:
            out["label"] = sample["label"].flip(-1)
        return out

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


def normalize(image, mode="imagenet"):
    """Images [..., 3, H, W] RGB in [0, 1] -> network input. `imagenet`: (x - mean) / std per RGB
    channel; `caffe`: DeepLab's Caffe convention, BGR order, 0-255 scale, minus CAFFE_MEAN_BGR;
    `unit`: RGB in [0, 1] as is (microsoft/ProDA data/cityscapes_dataset.py: mean 0, / 255)."""
    if image.dim() < 3 or image.shape[-3] != 3:
        raise ValueError(f"image: expected [..., 3, H, W], got {tuple(image.shape)}")
    shape = (3, 1, 1)
    if mode == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(shape)
        std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(shape)
        return (image - mean) / std
    if mode == "caffe":
        mean = torch.tensor(CAFFE_MEAN_BGR, dtype=image.dtype, device=image.device).view(shape)
        return image.flip(-3) * 255.0 - mean
    if mode == "unit":
        return image
    raise ValueError(f"mode: expected 'imagenet', 'caffe' or 'unit', got {mode!r}")


def denormalize(image, mode="imagenet"):
    """The inverse of `normalize`: network input -> RGB in [0, 1] (e.g. to view or re-augment)."""
    shape = (3, 1, 1)
    if mode == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(shape)
        std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(shape)
        return image * std + mean
    if mode == "caffe":
        mean = torch.tensor(CAFFE_MEAN_BGR, dtype=image.dtype, device=image.device).view(shape)
        return ((image + mean) / 255.0).flip(-3)
    if mode == "unit":
        return image
    raise ValueError(f"mode: expected 'imagenet', 'caffe' or 'unit', got {mode!r}")


class Normalize:
    """`normalize` on every image of the sample (`keys`, those present); the last transform."""

    def __init__(self, mode="imagenet", keys=("image", "image_strong")):
        if mode not in ("imagenet", "caffe"):
            raise ValueError(f"mode: expected 'imagenet' or 'caffe', got {mode!r}")
        self.mode = mode
        self.keys = tuple(keys)

    def __call__(self, sample, generator=None):
        out = dict(sample)
        for k in self.keys:
            if k in out:
                out[k] = normalize(out[k], self.mode)
        return out

    def __repr__(self):
        return f"Normalize({self.mode!r})"


def weak_view(crop_size=None, resize=None, scale_range=None, flip_p=0.5):
    """SPEC's weak view: optional resize (see `Resize`), optional random scale, optional random
    crop of `crop_size` = (height, width), horizontal flip with probability `flip_p`."""
    ts = []
    if resize is not None:
        ts.append(Resize(resize))
    if scale_range is not None:
        ts.append(RandomScale(scale_range))
    if crop_size is not None:
        ts.append(RandomCrop(crop_size))
    if flip_p > 0:
        ts.append(RandomHorizontalFlip(flip_p))
    return Compose(ts)


def frame_to_view(maps: torch.Tensor, geometry: torch.Tensor, frame_size, view_size) -> torch.Tensor:
    """Maps of whole frames [B, C, h, w] (any resolution r = h / frame height) taken into the
    training views that `geometry` [B, 5] describes (scaled height and width, crop top and left,
    flipped; what `udafast.engine.data.TrainView` records): per sample, resized bilinearly
    (align_corners=True) to the scaled frame at resolution r, cropped at the view's offset to
    `view_size` (h, w at resolution r; zeros where the crop passes the scaled frame), flipped.
    ProDA's `full2weak` (microsoft/ProDA models/adaptation_modelv2.py) on its teacher's features."""
    fh = int(frame_size[0])
    r = maps.shape[-2] / fh
    vh, vw = (int(v) for v in view_size)
    out = []
    for m, (sh, sw, y0, x0, flipped) in zip(maps, geometry.tolist()):
        m = F.interpolate(m[None], size=(int(sh * r), int(sw * r)), mode="bilinear", align_corners=True)[0]
        top, left = int(y0 * r), int(x0 * r)
        m = m[..., top:top + vh, left:left + vw]
        if tuple(m.shape[-2:]) != (vh, vw):  # the crop reaches past the scaled frame (it was padded)
            m = F.pad(m, (0, vw - m.shape[-1], 0, vh - m.shape[-2]))
        out.append(m.flip(-1) if flipped else m)
    return torch.stack(out)
