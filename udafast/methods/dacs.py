"""DACS: domain adaptation via cross-domain mixed sampling.

W. Tranheden, V. Olsson, J. Pinto, L. Svensson, "DACS: Domain Adaptation via Cross-domain Mixed
Sampling", WACV 2021 (52.1 mIoU on GTA5 -> Cityscapes, DeepLabV2, SGD). The paper is the
definition; where it is silent, the authors' code (vikolss/DACS `trainUDA.py`,
`utils/transformmasks.py`, `utils/transformsgpu.py`, `configs/configUDA.json`) is. Each iteration:

1. The student trains on the source batch: cross-entropy over the labelled pixels.
2. The teacher (`ParameterEMATeacher`: an EMA of the student's parameters, its own buffers, its
   forward in train mode with Dropout/DropPath off) labels the target batch: `max_probs, pseudo =
   max softmax(upsample(logits))` at the input size.
3. Pseudo-label weight: the fraction of the batch's pixels with `max_probs >= 0.968` (one number
   for the batch, as both codes compute it: `np.size` of the whole batch), optionally 0 on the
   top `ignore_top` and bottom `ignore_bottom` rows (DAFormer's pseudo-label crop; off in DACS).
4. ClassMix, per image i: the classes of source label i (the ignore label counts as a class, as
   the code's `torch.unique` keeps it), ceil(n/2) of them drawn without replacement; the mask
   pastes those source pixels onto target image i: image, label (source label / pseudo-label) and
   weight (1 / the pseudo-label weight) alike.
5. Strong colour on each mixed image: with probability 0.8 (`U > 0.2`, drawn once per batch)
   kornia's `ColorJitter(s, s, s, s)` with its own factors and order per image (s = 0.25, the
   code's `colorJitter` default); with probability 0.5 (`U > 0.5`, once per batch) a Gaussian
   blur with sigma U(0.15, 1.15) per image and a kernel of about a tenth of each side (odd).
6. Loss `CE_src + weight * mean(CE(mixed logits, mixed labels) * mixed weights)` (the mean over
   every pixel, ignored ones as 0: `CrossEntropyLoss2dPixelWiseWeighted`), one SGD step, then the
   teacher update with `alpha = min(1 - 1/(it + 1), 0.99)` (`update_ema_variables` after step
   `it`: the teacher equals the student after the first step).

The draws (from the method's generator, in this order): the classes per image, the jitter and
blur coins, then per image its jitter factors and order and its blur sigma.

lhoyer/DAFormer reimplements DACS (`mmseg/models/uda/dacs.py`, `mmseg/models/utils/
dacs_transforms.py`, `configs/_base_/uda/dacs.py`). Where it differs from vikolss/DACS, a flag:
- `lhoyer_batch_classes`: its `get_class_masks` takes `torch.unique(labels)` of the whole source
  batch for every image (the classes of image i may be absent from it);
- `lhoyer_ema_offset`: it updates the teacher at the start of iteration it + 1 with
  `alpha(it + 1)`, where vikolss updates after step it with `alpha(it)`;
- `lhoyer_source_mean_all`: its mmseg cross-entropy averages the source loss over every pixel,
  ignored ones included;
- `jitter_strength` 0.2 (its `color_jitter_strength`; vikolss 0.25); the probabilities agree.
- `lhoyer_align_corners`: its decode heads (mmseg's `resize`) upsample the logits of the teacher's
  pseudo-labels and of every loss with `align_corners=False`; the DACS code with `align_corners=True`.
"""
import math

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from udafast.data.labels import IGNORE_INDEX
from udafast.methods.base import Method, ParameterEMATeacher, is_count, is_number, seg_loss, upsample
from udafast.methods.mixing import class_mask, color_jitter, gaussian_blur, uniform

__all__ = ["DACS", "teacher_alpha", "mix_classes", "pseudo_weight", "one_mix", "blur_kernel_size", "BLUR_SIGMA"]

JITTER_THRESHOLD = 0.2          # transformsgpu.colorJitter: applied when U > 0.2
BLUR_THRESHOLD = 0.5            # transformsgpu.gaussian_blur: applied when U > 0.5
BLUR_SIGMA = (0.15, 1.15)       # transformsgpu.gaussian_blur: np.random.uniform(0.15, 1.15)


def teacher_alpha(it: int, alpha: float) -> float:
    """`update_ema_variables`: the "true" average until the EMA's `alpha` is the smaller."""
    return min(1.0 - 1.0 / (it + 1), alpha)


def mix_classes(labels: torch.Tensor, generator: torch.Generator, batch_classes: bool = False) -> list:
    """Per image of `labels` [B, H, W], ceil(n/2) of its n classes (the ignore label included),
    drawn without replacement (trainUDA.py: `np.random.choice(n, int((n + n % 2) / 2), False)`).
    `batch_classes`: from the classes of the whole batch (DAFormer's `get_class_masks`)."""
    picked = []
    whole = torch.unique(labels) if batch_classes else None  # once: the same classes for every image
    for lab in labels:
        classes = whole if batch_classes else torch.unique(lab)
        n = classes.numel()
        pick = torch.randperm(n, generator=generator)[: (n + n % 2) // 2]
        picked.append(classes[pick.to(classes.device)])
    return picked


def pseudo_weight(max_probs: torch.Tensor, threshold: float, ignore_top: int = 0, ignore_bottom: int = 0) -> torch.Tensor:
    """The pseudo-labels' pixel weights [B, H, W]: the fraction of the batch's pixels whose
    confidence `max_probs` [B, H, W] is at least `threshold` (trainUDA.py `threshold_uniform`),
    0 on the top `ignore_top` and bottom `ignore_bottom` rows (DAFormer's crop)."""
    fraction = float((max_probs >= threshold).sum()) / max_probs.numel()
    weight = torch.full(max_probs.shape, fraction, dtype=torch.float32, device=max_probs.device)
    if ignore_top > 0:
        weight[:, :ignore_top] = 0
    if ignore_bottom > 0:
        weight[:, -ignore_bottom:] = 0
    return weight


def one_mix(mask: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`transformsgpu.oneMix`: `source` where `mask` [H, W] is set, else `target` (images [C, H, W]
    or maps [H, W]; integer labels stay integers)."""
    m = mask.bool()
    return torch.where(m if source.dim() == mask.dim() else m[None], source, target)


def blur_kernel_size(n: int) -> int:
    """`transformsgpu.gaussian_blur`'s kernel side for an image side `n`: the odd integer near n / 10."""
    return int(math.floor(math.ceil(0.1 * n) - 0.5 + math.ceil(0.1 * n) % 2))


class DACS(Method):
    name = "dacs"
    defaults = {
        "alpha": 0.99,               # trainUDA.py: alpha_teacher = 0.99
        "threshold": 0.968,          # trainUDA.py: max_probs.ge(0.968)
        "weight": 1.0,               # configUDA.json consistency_weight
        "ignore_top": 0,             # DAFormer's pseudo_weight_ignore_top (DACS: none)
        "ignore_bottom": 0,          # DAFormer's pseudo_weight_ignore_bottom (DACS: none)
        "jitter": True,              # configUDA.json color_jitter
        "jitter_strength": 0.25,     # transformsgpu.colorJitter s (DAFormer: 0.2)
        "blur": True,                # configUDA.json blur
        "lhoyer_batch_classes": False,
        "lhoyer_ema_offset": False,
        "lhoyer_source_mean_all": False,
        "lhoyer_align_corners": False,
    }

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self._check_options()
        self.teacher = None

    def _check_options(self):
        o = self.options
        if not (is_number(o["alpha"]) and 0 <= o["alpha"] <= 1):
            raise self.option_error("alpha", "a number in [0, 1]")
        if not (is_number(o["threshold"]) and 0 <= o["threshold"] <= 1):
            raise self.option_error("threshold", "a number in [0, 1]")
        for key in ("weight", "jitter_strength"):
            if not (is_number(o[key]) and o[key] >= 0):
                raise self.option_error(key, "a number >= 0")
        for key in ("ignore_top", "ignore_bottom"):
            if not is_count(o[key], 0):
                raise self.option_error(key, "an integer >= 0")
        for key in ("jitter", "blur", "lhoyer_batch_classes", "lhoyer_ema_offset", "lhoyer_source_mean_all",
                    "lhoyer_align_corners"):
            if not isinstance(o[key], bool):
                raise self.option_error(key, "true or false")

    def start_stage(self, stage, model, resume=False):
        super().start_stage(stage, model, resume)
        self.teacher = ParameterEMATeacher(model, dropout=False)
        self.modules = {"teacher": self.teacher}

    # -- the step -------------------------------------------------------------------------------
    def step(self, batch, it, iters):
        o = self.options
        x_s = batch["source"]["image"].to(self.device)
        y_s = batch["source"]["label"].to(self.device)
        x_t = batch["target"]["image"].to(self.device)

        # the teacher's pseudo-labels and their weight (profiler labels: benchmarks/profile_step.py)
        with torch.no_grad():
            with record_function("udafast::teacher_forward"):
                logits = self.upsample(self.teacher.model(self.normalize(x_t))["logits"], x_t.shape[-2:])
            with record_function("udafast::pseudo_labels"):
                max_probs, pseudo = F.softmax(logits.float(), dim=1).max(1)
                weight_t = pseudo_weight(max_probs, o["threshold"], o["ignore_top"], o["ignore_bottom"])
        truth = batch["target"].get("truth")
        self.record_labels("teacher", pseudo, None if truth is None else truth.to(self.device))

        with record_function("udafast::class_mix"):
            x_m, y_m, w_m = self.mixed_batch(x_s, y_s, x_t, pseudo, weight_t)
        fraction = float((max_probs >= o["threshold"]).sum()) / max_probs.numel()
        terms = self.source_losses(x_s, y_s)
        terms["mix"] = (self.mix_loss(x_m, y_m, w_m), o["weight"])
        terms.update(self.target_losses(x_t, pseudo, weight_t))
        loss = sum(weight * value for value, weight in terms.values())
        opt = self.optimizers["model"]
        opt.zero_grad(set_to_none=True)
        self.backward(loss)
        opt.step()
        self.teacher.update(self.model, teacher_alpha(it + 1 if o["lhoyer_ema_offset"] else it, o["alpha"]))
        return {**{name: value.detach() for name, (value, _) in terms.items()}, "pseudo_weight": fraction}

    def mixed_batch(self, x_s, y_s, x_t, pseudo, weight_t):
        """ClassMix of the source batch onto the target batch (images [B, 3, H, W] in [0, 1], labels,
        pseudo-labels, weights [B, H, W]) and the strong colour views -> mixed images, labels, weights."""
        o, g = self.options, self.generator
        classes = mix_classes(y_s, g, o["lhoyer_batch_classes"])
        jitter = uniform(g) > JITTER_THRESHOLD
        blur = uniform(g) > BLUR_THRESHOLD
        images, labels, weights = [], [], []
        for i in range(x_s.shape[0]):
            mask = class_mask(y_s[i], classes[i])
            images.append(self.strong_colour(one_mix(mask, x_s[i], x_t[i])[None], jitter, blur))
            labels.append(one_mix(mask, y_s[i], pseudo[i]))
            weights.append(one_mix(mask, torch.ones_like(weight_t[i]), weight_t[i]))
        return torch.cat(images), torch.stack(labels), torch.stack(weights)

    def strong_colour(self, images: torch.Tensor, jitter: bool, blur: bool) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] through the colour jitter (its factors drawn per image) and
        the blur (one sigma for the call) where the batch's coins `jitter` / `blur` and the options
        say so (`transformsgpu.colorJitter` / `gaussian_blur`, DAFormer's `strong_transform`)."""
        o, g = self.options, self.generator
        if o["jitter"] and jitter:
            s = o["jitter_strength"]
            images = color_jitter(images, (s, s, s, s), g)
        if o["blur"] and blur:
            sigma = uniform(g, *BLUR_SIGMA)
            H, W = images.shape[-2:]
            images = gaussian_blur(images, (blur_kernel_size(H), blur_kernel_size(W)), (sigma, sigma))
        return images

    # -- the loss terms: {name: (unweighted value, weight)}; subclasses add theirs ---------------
    def source_losses(self, x_s: torch.Tensor, y_s: torch.Tensor) -> dict:
        """{"seg": the source cross-entropy}."""
        logits_s = self.upsample(self.model(self.normalize(x_s))["logits"], y_s.shape[-2:])
        return {"seg": (self.source_ce(logits_s, y_s), 1.0)}

    def source_ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The source cross-entropy over the labelled pixels (`lhoyer_source_mean_all`: over all)."""
        if self.options["lhoyer_source_mean_all"]:
            return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none").mean()
        return seg_loss(logits, labels)

    def mix_loss(self, x_m: torch.Tensor, y_m: torch.Tensor, w_m: torch.Tensor) -> torch.Tensor:
        """`CrossEntropyLoss2dPixelWiseWeighted`: the mean over every pixel of CE times its weight."""
        return self.weighted_ce(self.model(self.normalize(x_m))["logits"], y_m, w_m)

    def upsample(self, logits: torch.Tensor, size) -> torch.Tensor:
        """The logits at `size`, bilinear, aligned as the method's code aligns them (`lhoyer_align_corners`)."""
        return upsample(logits, size, align_corners=not self.options["lhoyer_align_corners"])

    def weighted_ce(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """mean(CE(upsampled logits, labels) * weights) over every pixel (ignored ones as 0)."""
        logits = self.upsample(logits, labels.shape[-2:])
        ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
        return (ce * weights.to(ce.dtype)).mean()

    def target_losses(self, x_t: torch.Tensor, pseudo: torch.Tensor, weight_t: torch.Tensor) -> dict:
        """Further terms on the target batch (MIC's masked image); none in DACS."""
        return {}
