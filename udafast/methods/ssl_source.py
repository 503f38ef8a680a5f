"""SSL source: SimCLR-style self-supervised pretraining of the backbone on the source images.

The embedded benchmark's stand-in for the self-supervised ImageNet weights ProDA's stage-2 student
starts from (the authors: SimCLRv2 ResNet-101, `--student_init simclr --bn_clr`; here
`proda.student_init: "@ssl_source"`, resolved by `udafast.engine.runs.run_method`). No labels are
read: two augmented views of each source image go through the backbone, its last (layer4) features
are globally average-pooled and a projection head maps them to the space where NT-Xent pulls the
two views of an image together and pushes the other 2(N-1) views of the batch away.

Settings, from SimCLR (Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning
of Visual Representations", ICML 2020) and SimCLRv2 (Chen, Kornblith, Swersky, Norouzi, Hinton, "Big
Self-Supervised Models are Strong Semi-Supervised Learners", NeurIPS 2020); where the papers are
silent, google-research/simclr `tf2/` (run.py flags, model.py ProjectionHead, data_util.py,
objective.py add_contrastive_loss) defines them:

- loss: NT-Xent, `l(i, j) = -log exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau)`
  with cosine similarity, averaged over the 2N views (the paper's `1/2N sum_k [l(2k-1, 2k) +
  l(2k, 2k-1)]`); `tau` = `temperature` 0.1 (SimCLRv2; run.py `--temperature 0.1`). objective.py sums
  the two directions and averages over N (twice the paper's value): `code_sum_directions`.
- projection head (SimCLRv2: 3 layers; model.py ProjectionHead, `num_proj_layers 3`, `proj_out_dim
  128`): `proj_layers - 1` times Linear (as wide as its input) -> BatchNorm -> ReLU, then Linear ->
  BatchNorm without bias (`center=False`) to `proj_dim`; weights N(0, 0.01) (model.py LinearLayer).
  It lives in the method's state (`modules["projector"]`), never in the network: the checkpoint's
  network is the segmentation network, its backbone trained, its heads untouched at their init.
- views (SimCLR appendix A; data_util.py, `color_jitter_strength 1.0`, the SimCLRv2 brightness):
  random resized crop (area `crop_scale` (0.08, 1) of the image, aspect ratio `crop_ratio` (3/4, 4/3)
  times the output's, resized bicubic to `view_size`), horizontal flip (0.5), colour jitter with
  probability 0.8 (brightness x U[0.2, 1.8], contrast and saturation U[0.2, 1.8], hue +-0.2 of the
  circle, in random order, clipped after each), grayscale with probability 0.2, Gaussian blur with
  probability 0.5 (sigma U[0.1, 2.0], kernel 10% of the view's height, zero padding as data_util.py's
  'SAME' convolution).
- only the backbone and the projection head train, at the run's `optimizer.lr` (one rate for both,
  as SimCLR); the segmentation heads receive no gradient and no update (nor BatchNorm statistics:
  they never run).

Scaled down for the CPU benchmark (the preset's `ssl_source` section, not defaults): the batch
(SimCLR: 4096 images with global BatchNorm; here `data.batch_size` per process, and under torchrun the
negatives are the process's own views, where objective.py gathers them across cores), LARS with
warm-up and cosine decay (SimCLRv2: lr 0.1 x sqrt(4096), weight decay 1e-4, 800 epochs) replaced by
the run's `optimizer` (the preset: Adam, poly) for a few hundred iterations, and the views' size. The
SimCLRv2 memory buffer of negatives (MoCo-style, ~1% in its paper) is left out.

The run is a method of the trainer (checkpoints, resume, logging) that draws no target batches;
its closing evaluation scores the untrained segmentation head (a meaningless mIoU, kept only
because every run reports one). It is not one of the compared methods (`runs.COMPARED`).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from udafast.methods.base import Method, build_optimizer
from udafast.methods.context import RunContext

__all__ = ["SSLSource", "ProjectionHead", "nt_xent", "simclr_view"]


def nt_xent(z1, z2, temperature, sum_directions=False):
    """NT-Xent of the projections `z1`, `z2` [N, D] of the two views of N images (row i of each is
    the same image): the mean over the 2N views of `-log softmax` of the positive among the 2N - 1
    other views, at cosine similarity / `temperature`. `sum_directions`: objective.py's value (the
    two directions summed, averaged over N: twice the mean)."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.t() / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    loss = F.cross_entropy(logits, positives)
    return 2.0 * loss if sum_directions else loss


class ProjectionHead(nn.Module):
    """SimCLRv2's projection head (google-research/simclr tf2/model.py ProjectionHead): `layers - 1`
    x (Linear `hidden` wide -> BatchNorm -> ReLU), then Linear -> BatchNorm without bias to `out_dim`;
    the Linear weights N(0, 0.01) and without bias (the BatchNorm's stands in, as LinearLayer drops
    the dense bias under BatchNorm)."""

    def __init__(self, in_dim, hidden=None, out_dim=128, layers=3):
        super().__init__()
        hidden = hidden or in_dim
        blocks, width = [], in_dim
        for _ in range(layers - 1):
            blocks += [nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            width = hidden
        last = nn.BatchNorm1d(out_dim)
        nn.init.zeros_(last.bias)
        last.bias.requires_grad_(False)  # center=False
        blocks += [nn.Linear(width, out_dim, bias=False), last]
        self.net = nn.Sequential(*blocks)
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)

    def forward(self, x):
        return self.net(x)


# -- the views ---------------------------------------------------------------------------------

def _uniform(generator, lo, hi):
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def _rgb_to_hsv(x):
    r, g, b = x.unbind(0)
    maxc, minc = x.max(0).values, x.min(0).values
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    d = delta.clamp_min(1e-12)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(r == maxc, bc - gc, torch.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return h, s, maxc


def _hsv_to_rgb(h, s, v):
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = torch.stack([torch.stack(c) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))])
    return choices.gather(1, i[None, None].expand(3, 1, *i.shape)).squeeze(1)


def _brightness(x, f):   # data_util.py random_brightness, impl 'simclrv2': multiplicative
    return x * f


def _contrast(x, f):     # tf.image.adjust_contrast: about each channel's mean
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return (x - mean) * f + mean


def _saturation(x, f):   # tf.image.adjust_saturation: S scaled in HSV
    h, s, v = _rgb_to_hsv(x)
    return _hsv_to_rgb(h, (s * f).clamp(0.0, 1.0), v)


def _hue(x, delta):      # tf.image.adjust_hue: H shifted, as a fraction of the circle
    h, s, v = _rgb_to_hsv(x)
    return _hsv_to_rgb((h + delta) % 1.0, s, v)


def _gray(x):
    return (0.2989 * x[0] + 0.5870 * x[1] + 0.1140 * x[2]).expand(3, -1, -1).clone()


def _blur(x, sigma, kernel_size):
    """data_util.py gaussian_blur: a separable Gaussian of radius kernel_size // 2, zero padding."""
    radius = kernel_size // 2
    if radius < 1:
        return x
    k = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-k ** 2 / (2.0 * sigma ** 2))
    k = k / k.sum()
    x = F.conv2d(x[:, None], k.view(1, 1, 1, -1), padding=(0, radius))
    return F.conv2d(x, k.view(1, 1, -1, 1), padding=(radius, 0))[:, 0]


def _resized_crop(x, size, scale, ratio, generator):
    """torchvision's RandomResizedCrop sampling (10 tries, else the whole image), the aspect ratio
    relative to the output's as data_util.py crop_and_resize sets it; bicubic resize, clipped."""
    _, height, width = x.shape
    area = height * width
    aspect = size[1] / size[0]
    log_lo, log_hi = math.log(ratio[0] * aspect), math.log(ratio[1] * aspect)
    top, left, h, w = 0, 0, height, width
    for _ in range(10):
        target = area * _uniform(generator, *scale)
        r = math.exp(_uniform(generator, log_lo, log_hi))
        cw, ch = int(round(math.sqrt(target * r))), int(round(math.sqrt(target / r)))
        if 0 < cw <= width and 0 < ch <= height:
            top = int(torch.randint(height - ch + 1, (), generator=generator))
            left = int(torch.randint(width - cw + 1, (), generator=generator))
            h, w = ch, cw
            break
    crop = x[:, top:top + h, left:left + w]
    return F.interpolate(crop[None], size=tuple(size), mode="bicubic", align_corners=False)[0].clamp(0.0, 1.0)


def simclr_view(images, generator, options, size=None):
    """One SimCLR view of each image of `images` [B, 3, H, W] in [0, 1] (CPU), drawn from
    `generator`, at `size` (H, W; default the images' own) -> [B, 3, h, w] in [0, 1]."""
    o = options
    size = tuple(size or images.shape[-2:])
    s = o["jitter_strength"]
    ops = ((_brightness, max(0.0, 1 - 0.8 * s), 1 + 0.8 * s), (_contrast, 1 - 0.8 * s, 1 + 0.8 * s),
           (_saturation, 1 - 0.8 * s, 1 + 0.8 * s), (_hue, -0.2 * s, 0.2 * s))
    out = []
    for image in images:
        x = _resized_crop(image.float(), size, o["crop_scale"], o["crop_ratio"], generator)
        if _uniform(generator, 0, 1) < o["flip"]:
            x = x.flip(-1)
        if _uniform(generator, 0, 1) < o["jitter_p"]:
            for k in torch.randperm(4, generator=generator).tolist():
                op, lo, hi = ops[k]
                x = op(x, _uniform(generator, lo, hi)).clamp(0.0, 1.0)
        if _uniform(generator, 0, 1) < o["gray_p"]:
            x = _gray(x)
        if _uniform(generator, 0, 1) < o["blur_p"]:
            x = _blur(x, _uniform(generator, *o["blur_sigma"]), size[0] // 10).clamp(0.0, 1.0)
        out.append(x)
    return torch.stack(out)


def _pair_option(value, key, lo, hi, lo_open=True):
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        not isinstance(v, bool) and isinstance(v, (int, float)) for v in value)
    if ok:
        a, b = value
        ok = (a > lo if lo_open else a >= lo) and a <= b and (hi is None or b <= hi)
    if not ok:
        bound = f"{lo} {'<' if lo_open else '<='} a <= b" + (f" <= {hi}" if hi is not None else "")
        raise ValueError(f"ssl_source.{key}: expected two numbers [a, b] with {bound}, got {value!r}")


class SSLSource(Method):
    name = "ssl_source"
    uses_target = False
    defaults = {
        "temperature": 0.1,            # SimCLRv2 (tf2/run.py --temperature 0.1)
        "proj_layers": 3,              # SimCLRv2's 3-layer head (run.py num_proj_layers 3)
        "proj_dim": 128,               # run.py proj_out_dim 128
        "proj_hidden": None,           # None = the pooled backbone width (model.py: mid layers as wide as their input)
        "view_size": None,             # [H, W] of each view; None = the source images' own size
        "crop_scale": [0.08, 1.0],     # SimCLR appendix A (data_util.py area_range)
        "crop_ratio": [0.75, 1.3333333333333333],  # times the view's aspect ratio (data_util.py crop_and_resize)
        "flip": 0.5,
        "jitter_p": 0.8, "jitter_strength": 1.0,   # run.py color_jitter_strength 1.0
        "gray_p": 0.2,
        "blur_p": 0.5, "blur_sigma": [0.1, 2.0],   # SimCLR appendix A; data_util.py batch_random_blur
        "code_sum_directions": False,  # *code:* objective.py's loss, twice the paper's mean
    }

    def __init__(self, config: dict, ctx: RunContext):
        super().__init__(config, ctx)
        o = self.options
        t = o["temperature"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(f"ssl_source.temperature: expected a number > 0, got {t!r}")
        for key, allow_none in (("proj_layers", False), ("proj_dim", False), ("proj_hidden", True)):
            v = o[key]
            if not (v is None and allow_none) and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"ssl_source.{key}: expected a positive int{' or null' if allow_none else ''}, "
                                 f"got {v!r}")
        v = o["view_size"]
        if v is not None and not (isinstance(v, (list, tuple)) and len(v) == 2 and all(
                not isinstance(s, bool) and isinstance(s, int) and s > 0 for s in v)):
            raise ValueError(f"ssl_source.view_size: expected null or [height, width] (positive ints), got {v!r}")
        _pair_option(o["crop_scale"], "crop_scale", 0, 1)
        _pair_option(o["crop_ratio"], "crop_ratio", 0, None)
        _pair_option(o["blur_sigma"], "blur_sigma", 0, None)
        for key in ("flip", "jitter_p", "gray_p", "blur_p"):
            p = o[key]
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
                raise ValueError(f"ssl_source.{key}: expected a probability in [0, 1], got {p!r}")
        s = o["jitter_strength"]
        if isinstance(s, bool) or not isinstance(s, (int, float)) or s < 0:
            raise ValueError(f"ssl_source.jitter_strength: expected a number >= 0, got {s!r}")
        if not isinstance(o["code_sum_directions"], bool):
            raise ValueError(f"ssl_source.code_sum_directions: expected a bool, got {o['code_sum_directions']!r}")
        self.projector = None

    def start_stage(self, stage, model, resume=False):
        self.model = model
        o = self.options
        width = model.backbone.out_channels[-1]  # of the layer4 features the head pools
        self.projector = ProjectionHead(width, o["proj_hidden"], o["proj_dim"], o["proj_layers"]).to(self.device)
        self.modules = {"projector": self.projector}
        spec = self.config["optimizer"]
        groups = [{"params": model.backbone_parameters(), "lr": spec["lr"], "name": "backbone"},
                  {"params": [p for p in self.projector.parameters() if p.requires_grad], "lr": spec["lr"],
                   "name": "projector"}]
        self.optimizers = {"model": build_optimizer(groups, spec)}

    def project(self, images):
        """The projections [B, proj_dim] of `images` (the network's input): the backbone's last
        features, globally average-pooled, through the projection head."""
        features = self.model.backbone(images)[-1]
        return self.projector(features.mean(dim=(2, 3)))

    def step(self, batch, it, iters):
        o = self.options
        images = batch["source"]["image"]
        size = o["view_size"]
        views = torch.cat([simclr_view(images, self.generator, o, size), simclr_view(images, self.generator, o, size)])
        self.projector.train()
        z = self.project(self.normalize(views))
        n = images.shape[0]
        loss = nt_xent(z[:n], z[n:], o["temperature"], o["code_sum_directions"])
        opt = self.optimizers["model"]
        opt.zero_grad(set_to_none=True)
        self.backward(loss)
        opt.step()
        return {"ntxent": loss.detach()}
