"""SPEC's strong view (ProDA's): RandAugment with the SPEC pool, then a horizontal flip and a
cutout square, with the geometry recorded.

`strong_augment(image, generator)` and the transform `StrongView` (after the weak view of
udafast.data.transforms) record the view's geometry in `params` (`theta`: the 2x3 affine matrix,
in the normalised coordinates of `torch.nn.functional.affine_grid` with align_corners=False,
mapping output to input positions; `flip`; `cutout`: the box as fractions of the size), and
`warp_like(tensor, params, mode)` warps labels, soft labels or feature maps of any resolution into
the strong view the same way.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F

from udafast.data.labels import IGNORE_INDEX
from udafast.data.transforms import randint, uniform

__all__ = ["StrongView", "strong_augment", "warp_like", "RANDAUGMENT_OPS"]


def _gray(image):
    r, g, b = image.unbind(-3)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def _blend(image, degenerate, factor):
    return (degenerate + factor * (image - degenerate)).clamp(0.0, 1.0)


def _to_uint8(image):
    return (image * 255.0).round_().clamp_(0, 255).to(torch.int64)


def _autocontrast(image, _):
    lo = image.amin(dim=(-2, -1), keepdim=True)
    hi = image.amax(dim=(-2, -1), keepdim=True)
    scale = torch.where(hi > lo, 1.0 / (hi - lo).clamp_min(1e-12), torch.ones_like(hi))
    lo = torch.where(hi > lo, lo, torch.zeros_like(lo))
    return ((image - lo) * scale).clamp(0.0, 1.0)


def _equalize(image, _):
    """Pillow's ImageOps.equalize per channel, on the image quantised to 8 bits."""
    q = _to_uint8(image)
    out = []
    for c in range(q.shape[0]):
        hist = torch.bincount(q[c].reshape(-1), minlength=256)
        nonzero = hist[hist > 0]
        step = (int(hist.sum()) - int(nonzero[-1])) // 255
        if step == 0:
            out.append(q[c])
            continue
        lut = (torch.cumsum(hist, 0) - hist + step // 2) // step
        out.append(lut.clamp(0, 255)[q[c]])
    return torch.stack(out).to(image.dtype) / 255.0


def _posterize(image, f):
    bits = 8 - int(round(4 * f))
    mask = ~((1 << (8 - bits)) - 1) & 0xFF
    return (_to_uint8(image) & mask).to(image.dtype) / 255.0


def _solarize(image, f):
    threshold = 1.0 - f
    return torch.where(image >= threshold, 1.0 - image, image)


def _sharpness(image, factor):
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], dtype=image.dtype,
                          device=image.device) / 13.0
    h, w = image.shape[-2:]
    if h < 3 or w < 3:
        return image
    smooth = F.conv2d(image[:, None], kernel[None, None])[:, 0]  # [3, H-2, W-2]
    degenerate = image.clone()
    degenerate[:, 1:-1, 1:-1] = smooth
    return _blend(image, degenerate, factor)


def _signed(f, sign):
    return f * (1.0 if sign else -1.0)


# Photometric ops: (image, f, sign) -> image, with f = magnitude / 10 in [0.1, 1).
_PHOTOMETRIC = {
    "AutoContrast": lambda im, f, s: _autocontrast(im, f),
    "Brightness": lambda im, f, s: _blend(im, torch.zeros_like(im), 1.0 + _signed(0.9 * f, s)),
    "Color": lambda im, f, s: _blend(im, _gray(im).expand_as(im), 1.0 + _signed(0.9 * f, s)),
    "Contrast": lambda im, f, s: _blend(im, _gray(im).mean().expand_as(im), 1.0 + _signed(0.9 * f, s)),
    "Equalize": lambda im, f, s: _equalize(im, f),
    "Identity": lambda im, f, s: im,
    "Posterize": lambda im, f, s: _posterize(im, f),
    "Sharpness": lambda im, f, s: _sharpness(im, 1.0 + _signed(0.9 * f, s)),
    "Solarize": lambda im, f, s: _solarize(im, f),
}


def _geometric_matrix(name, f, sign, h, w):
    """The forward 3x3 map of a geometric op in normalised coordinates (u = x / (W/2),
    v = y / (H/2), centred), built in pixel space so rotation and shear are true to the pixels."""
    a = torch.eye(3, dtype=torch.float64)
    if name == "Rotate":
        t = math.radians(_signed(30.0 * f, sign))
        a[:2, :2] = torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]], dtype=torch.float64)
    elif name == "ShearX":
        a[0, 1] = _signed(0.3 * f, sign)
    elif name == "ShearY":
        a[1, 0] = _signed(0.3 * f, sign)
    elif name == "TranslateX":
        a[0, 2] = _signed(0.3 * f, sign) * w
    elif name == "TranslateY":
        a[1, 2] = _signed(0.3 * f, sign) * h
    else:
        raise ValueError(f"unknown geometric op {name!r}")
    d = torch.diag(torch.tensor([w / 2.0, h / 2.0, 1.0], dtype=torch.float64))
    return torch.linalg.inv(d) @ a @ d


_SIGNED = ("Brightness", "Color", "Contrast", "Sharpness")
_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")

#: SPEC's RandAugment pool (14 ops).
RANDAUGMENT_OPS = ("AutoContrast", "Brightness", "Color", "Contrast", "Equalize", "Identity", "Posterize",
                   "Rotate", "Sharpness", "ShearX", "ShearY", "Solarize", "TranslateX", "TranslateY")


def _strong_one(image, generator, ops, n_ops, op_p, magnitude, flip_p, cutout_p, cutout_fraction, fill):
    h, w = image.shape[-2:]
    forward = torch.eye(3, dtype=torch.float64)
    applied = []
    for _ in range(n_ops):
        # draw everything unconditionally, so the stream of random numbers does not depend on the ops
        name = ops[randint(generator, len(ops))]
        u_apply, u_mag, u_sign = uniform(generator, 3).tolist()
        if not u_apply < op_p:
            continue
        m = magnitude[0] + (magnitude[1] - magnitude[0]) * u_mag
        f, sign = m / 10.0, u_sign < 0.5
        if name in _GEOMETRIC:
            forward = _geometric_matrix(name, f, sign, h, w) @ forward
        else:
            image = _PHOTOMETRIC[name](image, f, sign)
        signed = name in _GEOMETRIC or name in _SIGNED
        applied.append(f"{name}({'-' if signed and not sign else ''}{m:.2f})")
    u_flip, u_cut, u_y, u_x = uniform(generator, 4).tolist()
    flip = u_flip < flip_p
    cut = torch.zeros(4, dtype=torch.float32)
    if cutout_fraction > 0 and u_cut < cutout_p:
        side = max(1, int(min(h, w) * cutout_fraction))
        y0, x0 = int(u_y * (h - side + 1)), int(u_x * (w - side + 1))
        cut = torch.tensor([x0 / w, y0 / h, (x0 + side) / w, (y0 + side) / h], dtype=torch.float32)
    theta = torch.linalg.inv(forward)[:2].to(torch.float32)
    params = {"theta": theta, "flip": torch.tensor(flip), "cutout": cut, "ops": "+".join(applied) or "none"}
    out = warp_like(image, params, mode="bilinear", fill=fill, cutout_fill=fill)
    return out, params


def strong_augment(image, generator: Optional[torch.Generator] = None, *, ops=RANDAUGMENT_OPS, n_ops=2,
                   op_p=0.5, magnitude=(1.0, 10.0), flip_p=0.5, cutout_p=1.0, cutout_fraction=1 / 3,
                   fill=0.5):
    """SPEC's strong view of `image` ([3, H, W] or [B, 3, H, W], RGB in [0, 1]): `n_ops` ops drawn
    (with replacement) from `ops`, each applied with probability `op_p` at a magnitude drawn
    uniformly from `magnitude` (of 10); then a horizontal flip with probability `flip_p` and (with
    probability `cutout_p`) a square of side min(H, W) * `cutout_fraction` filled with `fill`.

    Photometric ops run on the image in order; the geometric ones (Rotate ±30°, ShearX/Y 0.3,
    TranslateX/Y 0.3 of the size) are composed into one affine warp applied after them (one
    resampling, so labels and maps follow exactly); areas from outside the image are `fill`.
    Returns `(strong_image, params)`; `params` (batched along dim 0 for a batch) feeds `warp_like`.
    """
    bad = [o for o in ops if o not in RANDAUGMENT_OPS]
    if bad or not ops:
        raise ValueError(f"ops: expected a non-empty subset of {RANDAUGMENT_OPS}, got {tuple(ops)}")
    if not (1 <= magnitude[0] <= magnitude[1] <= 10):
        raise ValueError(f"magnitude: expected 1 <= low <= high <= 10, got {magnitude}")
    if image.dim() not in (3, 4) or image.shape[-3] != 3 or not image.dtype.is_floating_point:
        raise ValueError(f"image: expected float [3, H, W] or [B, 3, H, W], got {image.dtype} {tuple(image.shape)}")
    cfg = dict(ops=tuple(ops), n_ops=n_ops, op_p=op_p, magnitude=magnitude, flip_p=flip_p, cutout_p=cutout_p,
               cutout_fraction=cutout_fraction, fill=fill)
    if image.dim() == 3:
        return _strong_one(image, generator, **cfg)
    outs, params = zip(*(_strong_one(im, generator, **cfg) for im in image))
    batch = {k: torch.stack([p[k] for p in params]).to(image.device) for k in ("theta", "flip", "cutout")}
    batch["ops"] = [p["ops"] for p in params]
    return torch.stack(outs), batch


class StrongView:
    """Adds SPEC's strong view of `sample["image"]` (see `strong_augment`) as
    `sample["image_strong"]`, its geometry as `sample["strong_params"]`, and, when the sample has
    a label, `sample["label_strong"] = warp_like(label, params)` (with 255 under the cutout when
    `label_cutout_ignore`). Put it after the weak view and before `Normalize`."""

    def __init__(self, out_key="image_strong", label_cutout_ignore=False, **options):
        self.out_key = out_key
        self.label_cutout_ignore = label_cutout_ignore
        self.options = options
        strong_augment(torch.zeros(3, 4, 4), torch.Generator().manual_seed(0), **options)  # validate options

    def __call__(self, sample, generator=None):
        out = dict(sample)
        out[self.out_key], params = strong_augment(sample["image"], generator, **self.options)
        out["strong_params"] = params
        if "label" in sample:
            out["label_strong"] = warp_like(sample["label"], params, "nearest",
                                            cutout_fill=IGNORE_INDEX if self.label_cutout_ignore else None)
        return out

    def __repr__(self):
        return f"StrongView({self.options})"


def warp_like(tensor, params, mode="nearest", fill=None, cutout_fill=None, return_mask=False):
    """Warp `tensor` into the strong view described by `params` (from `strong_augment` /
    `StrongView`): the recorded affine warp, then the flip, then (when `cutout_fill` is given) the
    cutout box filled with `cutout_fill`.

    `tensor`: with unbatched params ([2, 3] theta) [H, W] or [C, H, W]; with batched params
    ([B, 2, 3]) [B, H, W] or [B, C, H, W]; any resolution (the warp is in normalised coordinates).
    `mode`: "nearest" (hard labels; integer tensors need it) or "bilinear" (soft labels, features).
    `fill`: value where the warp reaches outside the input (default 255 for integer tensors, else 0).
    `return_mask`: also return the bool mask [B?, H, W] of pixels that came from inside the input.
    """
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"mode: expected 'nearest' or 'bilinear', got {mode!r}")
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"tensor: expected a torch.Tensor, got {type(tensor).__name__}")
    theta = params["theta"]
    batched = theta.dim() == 3
    integer = not (tensor.dtype.is_floating_point or tensor.dtype.is_complex)
    if integer and mode != "nearest":
        raise ValueError("mode: integer tensors (hard labels) need mode='nearest'")
    if fill is None:
        fill = IGNORE_INDEX if integer else 0.0
    want = 3 if batched else 2
    if tensor.dim() not in (want, want + 1):
        raise ValueError(f"tensor: expected {'[B, H, W] or [B, C, H, W]' if batched else '[H, W] or [C, H, W]'}, "
                         f"got {tuple(tensor.shape)}")
    no_channel = tensor.dim() == want
    x = tensor.unsqueeze(-3) if no_channel else tensor
    if not batched:
        x = x.unsqueeze(0)
    b, c, h, w = x.shape
    theta = theta.reshape(-1, 2, 3).to(device=x.device, dtype=torch.float32)
    flip = torch.as_tensor(params["flip"], device=x.device).reshape(-1).bool()
    cut = torch.as_tensor(params["cutout"]).reshape(-1, 4).cpu()
    if theta.shape[0] != b or flip.shape[0] != b:
        raise ValueError(f"params: {theta.shape[0]} transforms for a batch of {b}")
    work = x.to(torch.float32) if (integer or x.dtype in (torch.float16, torch.bfloat16)) else x
    identity = torch.eye(2, 3, device=x.device, dtype=torch.float32)
    moved = (theta != identity).flatten(1).any(1)
    out = work.clone()
    mask = torch.ones(b, 1, h, w, dtype=work.dtype, device=x.device)
    if bool(moved.any()):
        idx = moved.nonzero().flatten()
        src = torch.cat([work[idx], torch.ones_like(work[idx, :1])], dim=1)
        grid = F.affine_grid(theta[idx].to(work.dtype), [idx.numel(), c + 1, h, w], align_corners=False)
        warped = F.grid_sample(src, grid, mode=mode, padding_mode="zeros", align_corners=False)
        m = warped[:, c:]
        out[idx] = warped[:, :c] + (1.0 - m) * fill
        mask[idx] = m
    if bool(flip.any()):
        out[flip] = out[flip].flip(-1)
        mask[flip] = mask[flip].flip(-1)
    if cutout_fill is not None:
        for i in range(b):
            x0, y0, x1, y1 = cut[i].tolist()
            if x1 > x0 and y1 > y0:
                xs, ys = round(x0 * w), round(y0 * h)
                xe, ye = max(xs + 1, round(x1 * w)), max(ys + 1, round(y1 * h))
                out[i, :, ys:ye, xs:xe] = cutout_fill
    if integer:
        out = out.round().to(tensor.dtype)
    elif out.dtype != tensor.dtype:
        out = out.to(tensor.dtype)
    if not batched:
        out, mask = out[0], mask[0]
    if no_channel:
        out = out.squeeze(-3)
    if return_mask:
        return out, mask.squeeze(-3) > 0.5
    return out
