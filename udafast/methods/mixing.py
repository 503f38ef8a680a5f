"""The pieces of ClassMix and of the strong colour views that the mean-teacher methods share.

ClassMix's class mask is `utils/transformmasks.generate_class_mask` of vikolss/DACS (and of
Shathe/SemiSeg-Contrastive, which took it from there). The colour jitter is kornia's
`ColorJitter` as kornia 0.4.1 (the contrastive script) and 0.5.8 (lhoyer/DAFormer's pin) both run
it: per image factors, brightness additive (factor - 1), contrast multiplicative, saturation and
hue in HSV, the four in a random order, each result clamped to [0, 1]. The blur is kornia's
`GaussianBlur2d` with a reflect border. Every draw comes from the caller's generator.
"""
import math

import torch
import torch.nn.functional as F

__all__ = ["uniform", "class_mask", "jitter_images", "color_jitter", "gaussian_blur"]


def uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0, n: int | None = None):
    """A float U(low, high) from `generator` (or a float64 tensor of `n` of them)."""
    u = torch.rand(() if n is None else (n,), generator=generator, dtype=torch.float64)
    return low + (high - low) * (u.item() if n is None else u)


def class_mask(labels: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """`utils/transformmasks.generate_class_mask`: 1 where `labels` [H, W] is one of `classes`."""
    return (labels[None] == classes.to(labels.device)[:, None, None]).sum(0)


def _rgb_to_hsv(x):
    r, g, b = x.unbind(1)
    maxc, argmax = x.max(1)
    minc = x.min(1).values
    delta = maxc - minc
    v = maxc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    safe = delta.clamp_min(1e-12)
    h = torch.stack([((g - b) / safe) % 6, (b - r) / safe + 2, (r - g) / safe + 4], 1).gather(1, argmax[:, None])[:, 0]
    h = torch.where(delta > 0, h, torch.zeros_like(h)) * (math.pi / 3)  # radians in [0, 2 pi)
    return h, s, v


def _hsv_to_rgb(h, s, v):
    h6 = (h / (math.pi / 3)) % 6
    k = torch.stack([(5 + h6) % 6, (3 + h6) % 6, (1 + h6) % 6], 1)
    return v[:, None] - (v * s)[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def jitter_images(data: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                  saturation: torch.Tensor, hue: torch.Tensor, order: list) -> torch.Tensor:
    """kornia's `ColorJitter.apply_transform` on images [B, 3, H, W] in [0, 1] with drawn factors
    ([B] each; `hue` in turns, times 2 pi inside) applied in `order` (0 brightness, 1 contrast,
    2 saturation, 3 hue)."""
    brightness, contrast = brightness[:, None, None, None], contrast[:, None, None, None]
    saturation, hue = saturation[:, None, None], hue[:, None, None]
    for k in order:
        if k == 0:
            data = (data + (brightness - 1)).clamp(0, 1)
        elif k == 1:
            data = (data * contrast).clamp(0, 1)
        else:
            h, sat, v = _rgb_to_hsv(data)
            if k == 2:
                sat = (sat * saturation).clamp(0, 1)
            else:
                h = (h + hue * 2 * math.pi) % (2 * math.pi)
            data = _hsv_to_rgb(h, sat, v).clamp(0, 1)
    return data


def color_jitter(data: torch.Tensor, strengths: tuple, generator: torch.Generator) -> torch.Tensor:
    """kornia `ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)` for `strengths` (b, c, s, h)
    on images [B, 3, H, W] in [0, 1]: per image factors U(max(0, 1 - x), 1 + x) (hue U(-h, h)),
    drawn in that order, then one random order for the batch."""
    b, c, s, h = strengths
    B = data.shape[0]

    def factors(low, high):
        return uniform(generator, low, high, B).to(data.device, data.dtype)
    brightness = factors(max(0.0, 1 - b), 1 + b)
    contrast = factors(max(0.0, 1 - c), 1 + c)
    saturation = factors(max(0.0, 1 - s), 1 + s)
    hue = factors(-h, h)
    order = torch.randperm(4, generator=generator).tolist()
    return jitter_images(data, brightness, contrast, saturation, hue, order)


def _gaussian_1d(size, sigma, dtype, device):
    x = torch.arange(size, dtype=dtype, device=device) - size // 2
    g = torch.exp(-x ** 2 / (2.0 * sigma ** 2))
    return g / g.sum()


def gaussian_blur(data: torch.Tensor, kernel, sigma: tuple) -> torch.Tensor:
    """kornia `GaussianBlur2d(kernel, sigma)` (odd sizes), reflect border: `kernel` an int or
    (along H, along W), sigma[0] along the rows (H), sigma[1] along the columns (W)."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    C = data.shape[1]
    ky = _gaussian_1d(kh, sigma[0], data.dtype, data.device)
    kx = _gaussian_1d(kw, sigma[1], data.dtype, data.device)
    # in the images' precision under autocast too: an augmentation, not the network (and a
    # depth-wise float16 convolution can take minutes on a CPU without float16 kernels)
    with torch.autocast(data.device.type, enabled=False):
        out = F.pad(data, (kw // 2, kw // 2, kh // 2, kh // 2), mode="reflect")
        out = F.conv2d(out, ky.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)
        return F.conv2d(out, kx.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
