"""Pixel contrastive learning from a class-wise memory bank, in SPEC part 2's unsupervised form.

I. Alonso, A. Sabater, D. Ferstl, L. Montesano, A. C. Murillo, "Semi-Supervised Semantic
Segmentation with Pixel-Level Contrastive Learning from a Class-wise Memory Bank", ICCV 2021.

The method is the authors' domain-adaptation script (Shathe/SemiSeg-Contrastive
`trainSSL_domain_adaptation_targetCity.py`, "the script" below) with no labelled target image:
"labelled" is the source. Each iteration, as the script runs it:

1. The teacher (an EMA of the student's parameters; its buffers are its own; its forward in train
   mode, batch statistics, as the script's `ema_model.train()`) labels the weak target view, the
   first `target_batch` (default half the batch: the script's `batch_size_unlabeled`) target
   images as the stream gives them: `max_probs, pseudo = max softmax(upsample(logits))` at the
   input size.
2. The source batch gets the script's weak view (`augment_samples(weak=True)`: ClassMix with
   probability 0.25, flip 0.5, colour jitter 0.2 at s = 0.125, random scale 0.5 in [0.75, 1.75]);
   the target images get `target_views` (2) strong views (`augment_samples`: ClassMix with
   probability 0.75 once `it > ramp_up`, flip 0.5, colour jitter 0.8 at s = 0.25, blur 0.2, random
   scale 0.8), the pseudo-labels and max-probabilities warped and mixed with the same masks.
3. Loss (the script's): class-weighted CE on the source view; on the target views the pixel-wise
   CE weighted by `sigmoid_ramp_up(it, ramp_up) * max_prob ** 6` (averaged over every pixel,
   ignored ones as 0), plus `0.01 * entropy` of the student's softmax on the target views,
   normalised by log2(C) as the script's `entropy_loss` computes it (its mask broadcasts over the
   batch: see `entropy_loss`; about the batch size times a masked mean). The class weights are 1 until `ramp_up`,
   then the script's curriculum class balancing (`utils/class_balancing.py`: sqrt of median
   frequency over source labels and a sliding window of pseudo-labels; `class_balance`).
4. Memory bank (`ClassMemoryBank`, 256 entries per class) from `bank_start`: the teacher's
   projections `g'(x)` of source-view pixels (labels nearest-downsampled to the features) that the
   teacher predicts correctly with confidence > 0.95; per class and batch the `per_class x B`
   highest-scored by the teacher's selector `s = sigmoid(S'_c(g'(x)))` (`utils/feature_memory.py`
   `add_features_from_sample_learned`), FIFO.
5. From `loss_start`, for student features `z_i = h(g(x_i))` of the source view (labels) and of the
   target views (warped pseudo-labels), per class c with at least 2 of each:

    L = 1/C sum_c 1/(M_c N_c) sum_i sum_j  w_i v_j (1 - cos(z_i, m_j))
    w_i = s_i M_c / sum_i s_i,   s_i = sigmoid(S_c(z_i.detach()))   (M_c batch features)
    v_j = r_j N_c / sum_j r_j,   r_j = sigmoid(R_c(m_j / |m_j|))    (N_c bank entries)

   `L_total = CE_src + CE_tgt + 0.01 H + weight * (L(source) + L(target))`, weight 0.2 (the script).
6. One SGD group over every trainable parameter at one learning rate (the script's
   `optim_parameters`), then the teacher update with momentum
   `min(1 - 1/(it+1), 1 - (1 - m0) (cos(pi it / T) + 1) / 2)` (`update_ema_variables`).

After the last iteration the script re-estimates BatchNorm statistics on `bn_update_iters` target
batches (`update_BN_weak_unlabeled_data`; `final_bn_update`): the trainer scores the network before
(`miou_before_bn_update` in metrics.json) and after. The script first reloads its best-on-val
checkpoint (and reloads it during training when validation stalls): that uses target labels and is
not done here (the last network is used).

*code:* flags (SPEC part 2). In the released loss the memory-side normalisation divides each
weight by itself (the weights are transposed to a row before `shape[0] / sum(dim=0)`), so `v_j = 1`
and R_c never learns: `code_unit_memory_weights`. The bank update sorts the scores ascending and
keeps the first, the lowest-scored features: `code_ascending_selection`.

The augmentations follow `utils/transformsgpu.py` with kornia 0.4.1 (the script's
requirements.txt): colour jitter with per-image factors, brightness additive (factor - 1), contrast
multiplicative, saturation and hue in HSV, in a random order per batch; the blur is kornia's
`GaussianBlur2d((23, 23), sigma=(0.1, 1.5))`, a fixed kernel with sigma 0.1 along the rows and 1.5
along the columns (the script's (min, max) sigma reaches kornia as (sigma_x, sigma_y)), reflect
border. Flip, scale and blur are drawn once per batch, as the script draws them.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from udafast.data.labels import IGNORE_INDEX
from udafast.inference import bilinear_weights
from udafast.methods.base import (Method, ParameterEMATeacher, build_optimizer, is_count, is_number, nearest_labels,
                                  upsample)
from udafast.methods.context import RunContext
from udafast.methods.mixing import class_mask, color_jitter, gaussian_blur, uniform
from udafast.models.heads import ClassSelectors, PredictionHead, ProjectionHead
from udafast.ops import ClassMemoryBank

__all__ = ["Contrastive", "class_memory_loss", "teacher_momentum", "sigmoid_ramp_up", "self_training_loss",
           "entropy_loss", "ClassBalance", "class_mix_masks", "mix", "random_scale_crop", "augment_samples"]

# trainSSL_domain_adaptation_targetCity.py augment_samples: (weak, strong) probabilities and strengths
WEAK_VIEW = {"flip": 0.5, "jitter": 0.2, "jitter_s": 0.125, "blur": 0.0, "scale": 0.5}
STRONG_VIEW = {"flip": 0.5, "jitter": 0.8, "jitter_s": 0.25, "blur": 0.2, "scale": 0.8}
SCALE_RANGE = (0.75, 1.75)       # augment_samples: random.uniform(0.75, 1.75)
BLUR_KERNEL, BLUR_SIGMA = 23, (0.1, 1.5)  # transformsgpu.gaussian_blur (min_sigma, max_sigma from augment_samples)
SOURCE_CLASSMIX_P, TARGET_CLASSMIX_P = 0.25, 0.75  # the script's main loop


# -- schedules ------------------------------------------------------------------------------------
def teacher_momentum(it, iters, base=0.995):
    """The EMA momentum after iteration `it` of `iters` (the script's `update_ema_variables` with its
    main loop's cosine): `base` -> 1 on a half cosine, and at most `1 - 1/(it+1)` (the "true"
    average over the first iterations: 0 after the first, so the teacher starts as the student)."""
    cosine = 1.0 - (1.0 - base) * (math.cos(math.pi * it / iters) + 1.0) / 2.0
    return min(1.0 - 1.0 / (it + 1), cosine)


def sigmoid_ramp_up(it, ramp_up):
    """The script's `sigmoid_ramp_up`: exp(-5 (1 - it/ramp_up)^2) below `ramp_up`, else 1."""
    if it >= ramp_up:
        return 1.0
    return math.exp(-5.0 * (1.0 - float(it) / float(ramp_up)) ** 2)


# -- losses ---------------------------------------------------------------------------------------
def class_memory_loss(features, labels, scores, memory, memory_scores, num_classes):
    """The module docstring's L. `features` [N, D] (z_i), `labels` [N], `scores` [N] (s_i in
    (0, 1)); `memory[c]` [N_c, D] bank entries of class c (or None) and `memory_scores[c]` [N_c]
    their r_j (`memory_scores=None`: v_j = 1). Classes with fewer than 2 batch features or bank
    entries add 0; the sum is divided by `num_classes` all the same."""
    total = features.sum() * 0.0
    for c in range(num_classes):
        bank = memory[c]
        rows = (labels == c).nonzero().squeeze(1)
        if bank is None or bank.shape[0] < 2 or rows.numel() < 2:
            continue
        distances = 1.0 - F.normalize(features[rows], dim=1) @ F.normalize(bank, dim=1).T  # [M_c, N_c]
        s = scores[rows]
        distances = distances * (s * (s.numel() / s.sum()))[:, None]
        if memory_scores is not None:
            r = memory_scores[c]
            distances = distances * (r * (r.numel() / r.sum()))[None, :]
        total = total + distances.mean()
    return total / num_classes


def self_training_loss(logits, pseudo, max_probs, ramp, class_weights=None, power=6, ignore_index=IGNORE_INDEX):
    """The script's target CE (`CrossEntropyLoss2dPixelWiseWeighted`): per pixel
    `w[y] * -log p_y * ramp * max_prob ** power`, 0 where `pseudo` is ignored, averaged over every
    pixel. `logits` [B, C, H, W] at the labels' size."""
    ce = F.cross_entropy(logits, pseudo, weight=class_weights, ignore_index=ignore_index, reduction="none")
    return (ce * (ramp * max_probs.detach() ** power)).mean()


def entropy_loss(probs, valid):
    """The script's `entropy_loss(softmax, valid_mask)` on softmax `probs` [B, C, H, W] and the
    pixels with a pseudo-label `valid` [B, H, W], as it computes it: its mask [B, 1, H, W] times the
    per-pixel entropies [B, H, W] broadcasts to [B, B, H, W], so each image's entropy at a pixel
    counts once per image of the batch valid at that position, over every image (ignored pixels
    included), divided by the number of valid pixels and log2(C):

        sum_b sum_p H_b(p) V(p) / (sum_p V(p) log2 C),   H = -sum_c p log2 p,  V(p) = #{b: valid_b(p)}

    (with every pixel valid: B times the mean normalised entropy). 0 with a gradient path when
    nothing is valid (the script divides by 0 there)."""
    entropy = -(probs * torch.log2(probs + 1e-30)).sum(1)          # [B, H, W]
    per_position = valid.to(entropy.dtype).sum(0)                   # V(p) [H, W]
    n = per_position.sum()
    if float(n) == 0:
        return entropy.sum() * 0.0
    return (entropy * per_position).sum() / (n * math.log2(probs.shape[1]))


class ClassBalance:
    """The script's curriculum class balancing (`utils/class_balancing.py` `ClassBalancing`): pixel
    counts per class of the first `labelled_iters` labelled batches and of the last
    `unlabelled_iters` pseudo-label batches; once `max(labelled_iters, unlabelled_iters)` batches
    were added, weights `sqrt(median(f) / f)` (classes with no pixel: the largest weight), else 1."""

    def __init__(self, num_classes, labelled_iters, unlabelled_iters, sync=None):
        self.num_classes = num_classes
        # sums a tensor over the run's processes in place (the caller's; None: one process), so that
        # every process weighs the classes by everyone's counts
        self.sync = sync
        self.labelled_iters, self.unlabelled_iters = int(labelled_iters), int(unlabelled_iters)
        self.labelled = torch.zeros(num_classes, dtype=torch.float64)
        self.window = torch.zeros(max(self.unlabelled_iters, 1), num_classes, dtype=torch.float64)
        self.iter = 0

    def _counts(self, labels):
        labels = labels.reshape(-1)
        labels = labels[(labels >= 0) & (labels < self.num_classes)]
        return torch.bincount(labels.cpu(), minlength=self.num_classes).to(torch.float64)

    def add(self, labelled, pseudo):
        counts = torch.stack([self._counts(labelled), self._counts(pseudo)])
        if self.sync is not None:
            self.sync(counts)
        if self.iter < self.labelled_iters:
            self.labelled += counts[0]
        if self.unlabelled_iters > 0:
            self.window[self.iter % self.unlabelled_iters] = counts[1]
        self.iter += 1

    def weights(self):
        if self.iter < max(self.labelled_iters, self.unlabelled_iters):
            return torch.ones(self.num_classes, dtype=torch.float64)
        freqs = self.labelled + (self.window.sum(0) if self.unlabelled_iters > 0 else 0.0)
        w = torch.quantile(freqs, 0.5) / freqs  # np.median: the mean of the middle two for an even count
        inf = torch.isinf(w)
        w[inf] = 1.0
        w[inf] = w.max()
        return w.sqrt()

    def state_dict(self):
        return {"labelled": self.labelled.clone(), "window": self.window.clone(), "iter": self.iter}

    def load_state_dict(self, state):
        self.labelled = state["labelled"].clone()
        self.window = state["window"].clone()
        self.iter = int(state["iter"])


# -- augmentations (the script's augment_samples over utils/transformsgpu.py) ---------------------
def class_mix_masks(labels, generator, ignore_index=IGNORE_INDEX):
    """Per image, ClassMix's mask over floor(n/2) + 1 of its n classes (the ignore label left out
    when another class is there), drawn without replacement (`augment_samples`)."""
    masks = []
    for lab in labels:
        classes = torch.unique(lab)
        if len(classes) > 1 and bool((classes == ignore_index).any()):
            classes = classes[classes != ignore_index]
        n = classes.numel()
        pick = torch.randperm(n, generator=generator)[: (n - n % 2) // 2 + 1]
        masks.append(class_mask(lab, classes[pick.to(classes.device)]))
    return torch.stack(masks)


def mix(mask, data=None, target=None, probs=None):
    """`transformsgpu.mix`: image i takes image i+1's pixels where mask i+1 is set (cyclic)."""
    def one(x, i):
        j = (i + 1) % x.shape[0]
        m = mask[j] if x.dim() == mask.dim() else mask[j][None]
        return (1 - m) * x[i] + m * x[j]
    out = []
    for x in (data, target, probs):
        out.append(None if x is None else torch.stack([one(x, i) for i in range(x.shape[0])]).to(x.dtype))
    return tuple(out)


def random_scale_crop(scale, data, target=None, probs=None, generator=None, ignore_index=IGNORE_INDEX):
    """`transformsgpu.random_scale_crop`: rescale by `scale` (bilinear with align_corners for images
    and probabilities, nearest for labels), then back to the input size: below 1 centred padding
    (images and probabilities 0, labels `ignore_index`; an odd remainder goes to the top and the
    right, as the script pads square crops), above 1 a random crop. (The script swaps height and
    width in its offsets, which only square crops hide; here each axis uses its own.)"""
    if scale == 1:
        return data, target, probs
    H, W = data.shape[-2:]
    data = F.interpolate(data, scale_factor=scale, mode="bilinear", align_corners=True, recompute_scale_factor=True)
    if target is not None:
        target = F.interpolate(target[:, None].float(), scale_factor=scale, mode="nearest",
                               recompute_scale_factor=True)[:, 0].long()
    if probs is not None:
        probs = F.interpolate(probs[:, None], scale_factor=scale, mode="bilinear", align_corners=True,
                              recompute_scale_factor=True)[:, 0]
    h, w = data.shape[-2:]
    if scale < 1:
        dh, dw = H - h, W - w
        pad = (dw // 2, dw - dw // 2, dh - dh // 2, dh // 2)  # left, right, top, bottom
        data = F.pad(data, pad, value=0.0)
        if probs is not None:
            probs = F.pad(probs, pad, value=0.0)
        if target is not None:
            target = F.pad(target, pad, value=ignore_index)
    else:
        y = int(torch.randint(0, h - H + 1, (), generator=generator))
        x = int(torch.randint(0, w - W + 1, (), generator=generator))
        data = data[..., y:y + H, x:x + W]
        probs = None if probs is None else probs[..., y:y + H, x:x + W]
        target = None if target is None else target[..., y:y + H, x:x + W]
    return data, target, probs


def augment_samples(images, labels, probs, do_classmix, weak, generator, ignore_index=IGNORE_INDEX):
    """The script's `augment_samples` (the draws in its order): ClassMix masks from `labels` when
    `do_classmix`, then mix, random scale-crop, flip, colour jitter, blur. `images` [B, 3, H, W] in
    [0, 1], `labels` [B, H, W], `probs` [B, H, W] or None -> the three, augmented."""
    view = WEAK_VIEW if weak else STRONG_VIEW
    masks = class_mix_masks(labels, generator, ignore_index) if do_classmix else None
    flip = uniform(generator) < view["flip"]
    jitter = uniform(generator) < view["jitter"]
    blur = uniform(generator) < view["blur"]
    scale = uniform(generator, *SCALE_RANGE) if uniform(generator) < view["scale"] else 1.0
    if masks is not None:
        images, labels, probs = mix(masks, images, labels, probs)
    images, labels, probs = random_scale_crop(scale, images, labels, probs, generator, ignore_index)
    if flip:
        images, labels = images.flip(3), labels.flip(2)
        probs = None if probs is None else probs.flip(2)
    if jitter:
        s = view["jitter_s"]  # transformsgpu.colorJitter: ColorJitter(brightness=s, contrast=s, saturation=s/2, hue=s/3)
        images = color_jitter(images, (s, s, s / 2, s / 3), generator)
    if blur:
        images = gaussian_blur(images, BLUR_KERNEL, BLUR_SIGMA)
    return images, labels, probs


# -- the method -----------------------------------------------------------------------------------
def _upsample_at(logits, size, down):
    """`upsample(logits, size)` then nearest-downsampled to `down`, computed at the kept positions
    only: `interpolate(mode="nearest")` keeps output row floor(i * H / h) of each size."""
    (H, W), (h, w) = tuple(size), tuple(down)
    if tuple(logits.shape[-2:]) == (H, W):
        return _downsample_float(logits, down)
    rows = torch.floor(torch.arange(h, dtype=torch.float64) * (H / h)).long().clamp(max=H - 1)
    cols = torch.floor(torch.arange(w, dtype=torch.float64) * (W / w)).long().clamp(max=W - 1)
    ry = bilinear_weights(logits.shape[-2], H, logits.dtype, logits.device)[rows.to(logits.device)]
    rx = bilinear_weights(logits.shape[-1], W, logits.dtype, logits.device)[cols.to(logits.device)]
    return torch.einsum("yi,bcij,xj->bcyx", ry, logits, rx)


def _downsample_float(x, size):
    return F.interpolate(x, size=tuple(size), mode="nearest")


def _pixels(features):
    """[B, D, h, w] -> [B * h * w, D] rows."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


class Contrastive(Method):
    name = "contrastive"
    defaults = {
        "weight": 0.2,               # of each contrastive term (trainSSL_domain_adaptation_targetCity.py: * 0.2)
        "momentum": 0.995,           # teacher EMA momentum at the start, -> 1 on a cosine (the script's main loop)
        "dim": 256,                  # projection / prediction width
        "bank_size": 256,            # entries per class (the script's FeatureMemory(memory_per_class=256))
        "per_class": 1,              # features per class per source image of a batch per push
                                     # (feature_memory.py: max(1, round(256 / labelled images)) = 1 for GTA5)
        "ramp_up": 2000,             # the script's RAMP_UP_ITERS: the CE ramp, ClassMix and class weights after it
        "bank_start": 1001,          # first iteration that fills the bank (the script: it > RAMP_UP_ITERS - 1000)
        "loss_start": 2001,          # first iteration with the contrastive loss (the script: it > RAMP_UP_ITERS)
        "bank_threshold": 0.95,      # teacher confidence above which a correct source pixel may enter (the script)
        "target_batch": None,        # target images per step (None: half the batch, the script's batch_size_unlabeled)
        "target_views": 2,           # strong views per target image (the script: two augment_samples calls)
        "confidence_power": 6,       # pixel weight max_prob ** 6 (the script's pixelWiseWeight)
        "entropy_weight": 0.01,      # the script's entropy_loss(...) * 0.01
        "class_balance": True,       # the script's ClassBalancing weights after ramp_up
        "final_bn_update": True,     # the script's update_BN_weak_unlabeled_data after training
        "bn_update_iters": 1000,     # its iterations (the script's default iters=1000)
        # *code:* the script's reload of its best-on-val network (target labels): during training once
        # no validation has improved for a fifth of the iterations (the teacher restarts as its copy),
        # and before the final BatchNorm update. Needs train.eval_every
        "code_reload_best": False,
        "max_pixels_per_class": None,  # random subset per class and domain in the loss (None: all, the script)
        "code_ascending_selection": False,
        "code_unit_memory_weights": False,
    }

    def __init__(self, config: dict, ctx: RunContext):
        super().__init__(config, ctx)
        self._check_options()
        self.num_classes = int(config["model"]["num_classes"])
        self.heads = None
        self.teacher = None
        self.bank = None
        self.balance = None
        # code_reload_best: the best-on-val student (net + heads) and the validations since it
        self.best = None

    def _check_options(self):
        o = self.options
        for key in ("weight", "entropy_weight", "confidence_power"):
            if not (is_number(o[key]) and o[key] >= 0):
                raise self.option_error(key, "a number >= 0")
        if not (is_number(o["momentum"]) and 0 <= o["momentum"] <= 1):
            raise self.option_error("momentum", "a number in [0, 1]")
        for key in ("dim", "bank_size", "per_class", "target_views"):
            if not is_count(o[key], 1):
                raise self.option_error(key, "a positive integer")
        for key in ("ramp_up", "bank_start", "loss_start", "bn_update_iters"):
            if not is_count(o[key], 0):
                raise self.option_error(key, "an integer >= 0")
        if not (is_number(o["bank_threshold"]) and 0 <= o["bank_threshold"] < 1):
            raise self.option_error("bank_threshold", "a number in [0, 1)")
        if o["target_batch"] is not None and not is_count(o["target_batch"], 1):
            raise self.option_error("target_batch", "None or a positive integer")
        if o["max_pixels_per_class"] is not None and not is_count(o["max_pixels_per_class"], 2):
            raise self.option_error("max_pixels_per_class", "None or an integer >= 2")
        for key in ("class_balance", "final_bn_update", "code_ascending_selection", "code_unit_memory_weights",
                    "code_reload_best"):
            if not isinstance(o[key], bool):
                raise self.option_error(key, "true or false")
        if o["code_reload_best"] and not int(self.config.get("train", {}).get("eval_every") or 0):
            raise ValueError(f"{self.name}.code_reload_best: reloads the best-on-val network, which needs "
                             f"train.eval_every > 0 (validation within training)")

    # -- set-up ---------------------------------------------------------------------------------
    def _target_batch(self, batch_size):
        n = self.options["target_batch"]
        return max(1, batch_size // 2) if n is None else min(n, batch_size)

    def start_stage(self, stage, model, resume=False):
        o = self.options
        self.model = model
        channels = model.backbone.out_channels[-1]
        self.heads = nn.ModuleDict({
            "projection": ProjectionHead(channels, o["dim"]),
            "prediction": PredictionHead(o["dim"]),
            "selectors": ClassSelectors(self.num_classes, o["dim"]),          # S_c: feature side, ranks the bank
            "memory_selectors": ClassSelectors(self.num_classes, o["dim"]),   # R_c: memory side
        }).to(self.device).train()
        # one module for the EMA: the network and its heads (the script's model holds both)
        self.student = nn.ModuleDict({"net": model, "heads": self.heads})
        self.teacher = ParameterEMATeacher(self.student, dropout=True)  # the script: ema_model.train()
        self.bank = ClassMemoryBank(self.num_classes, o["bank_size"], o["dim"], device=self.device,
                                    backend=self.backend, all_gather=getattr(self.ctx, "all_gather", None))
        # the script: ClassBalancing(labelled images / labelled batch, unlabelled images / unlabelled batch)
        source, target = getattr(self.ctx, "source", None), getattr(self.ctx, "target", None)
        batch = int(self.config.get("data", {}).get("batch_size", 1) or 1)
        labelled = len(source) // batch if source is not None else 0
        unlabelled = len(target) // self._target_batch(batch) if target is not None else 0
        self.balance = ClassBalance(self.num_classes, labelled, unlabelled, sync=getattr(self.ctx, "all_reduce_", None))
        # the script's optim_parameters: one group, every trainable parameter, one learning rate
        params = [p for p in self.student.parameters() if p.requires_grad]
        spec = self.config["optimizer"]
        self.optimizers = {"model": build_optimizer([{"params": params, "lr": spec["lr"], "name": "all"}], spec)}
        self.modules = {"heads": self.heads, "teacher": self.teacher, "bank": self.bank}

    def extra_state(self):
        state = {"balance": self.balance.state_dict()} if self.balance is not None else {}
        if self.best is not None:
            state["best"] = self.best
        return state

    def load_extra_state(self, state):
        if "balance" in state and self.balance is not None:
            self.balance.load_state_dict(state["balance"])
        self.best = state.get("best")

    # -- the step -------------------------------------------------------------------------------
    def step(self, batch, it, iters):
        o = self.options
        g = self.generator
        x_s = batch["source"]["image"].to(self.device)
        y_s = batch["source"]["label"].to(self.device)
        x_t = batch["target"]["image"][: self._target_batch(x_s.shape[0])].to(self.device)
        size_t = x_t.shape[-2:]
        teacher = self.teacher.model

        # 1. pseudo-labels: the teacher (train mode) on the weak target view, at the input size
        with torch.no_grad():
            probs = F.softmax(upsample(teacher["net"](self.normalize(x_t))["logits"], size_t), dim=1)
            max_probs, pseudo = probs.max(1)
        truth = batch["target"].get("truth")
        self.record_labels("teacher", pseudo, None if truth is None else truth[: x_t.shape[0]].to(self.device))
        if o["class_balance"]:
            self.balance.add(y_s, pseudo)

        # 2. the views
        x_s2, y_s2, _ = augment_samples(x_s, y_s, None, uniform(g) < SOURCE_CLASSMIX_P, True, g)
        views = []
        for _ in range(o["target_views"]):
            do_mix = it > o["ramp_up"] and uniform(g) < TARGET_CLASSMIX_P
            views.append(augment_samples(x_t, pseudo, max_probs, do_mix, False, g))
        x_u = torch.cat([v[0] for v in views])
        y_u = torch.cat([v[1] for v in views])
        p_u = torch.cat([v[2] for v in views])
        return self._train_step(x_s2, y_s2, x_u, y_u, p_u, it, iters)

    def _train_step(self, x_s, y_s, x_u, y_u, p_u, it, iters):
        """The script's losses and update on the augmented views (source `x_s`, `y_s`; target `x_u`
        with warped pseudo-labels `y_u` and max-probabilities `p_u`)."""
        o = self.options
        out_u = self.model(self.normalize(x_u), return_backbone=True)
        logits_u = upsample(out_u["logits"], y_u.shape[-2:])
        out_s = self.model(self.normalize(x_s), return_backbone=True)
        logits_s = upsample(out_s["logits"], y_s.shape[-2:])

        weights = None
        if o["class_balance"] and it > o["ramp_up"]:
            weights = self.balance.weights().to(logits_s.device, logits_s.dtype)
        if bool((y_s != IGNORE_INDEX).any()):
            l_src = F.cross_entropy(logits_s, y_s, weight=weights, ignore_index=IGNORE_INDEX)
        else:
            l_src = logits_s.sum() * 0.0
        l_tgt = self_training_loss(logits_u, y_u, p_u, sigmoid_ramp_up(it, o["ramp_up"]), weights,
                                   o["confidence_power"])
        l_ent = entropy_loss(F.softmax(logits_u, dim=1), y_u != IGNORE_INDEX)
        loss = l_src + l_tgt + o["entropy_weight"] * l_ent
        losses = {"seg": l_src.detach(), "self_training": l_tgt.detach(), "entropy": l_ent.detach()}

        if it >= o["bank_start"]:
            self._fill_bank(x_s, y_s)
        if it >= o["loss_start"]:
            memory, memory_scores = self._memory()
            feats_s, feats_u = out_s["backbone"], out_u["backbone"]
            c_src = self._contrastive(feats_s, nearest_labels(y_s, feats_s.shape[-2:]), memory, memory_scores)
            c_tgt = self._contrastive(feats_u, nearest_labels(y_u, feats_u.shape[-2:]), memory, memory_scores)
            loss = loss + o["weight"] * (c_src + c_tgt)
            losses.update(contrast_src=c_src.detach(), contrast_tgt=c_tgt.detach())
        opt = self.optimizers["model"]
        opt.zero_grad(set_to_none=True)
        self.backward(loss)
        opt.step()
        self.teacher.update(self.student, teacher_momentum(it, iters, o["momentum"]))
        losses["bank"] = float(self.bank.counts.sum())
        return losses

    def _ranking(self, scores):
        # the authors' ascending sort keeps the lowest scores: rank by -s
        return -scores if self.options["code_ascending_selection"] else scores

    @torch.no_grad()
    def _fill_bank(self, x_s, y_s):
        """Push the teacher's projections of correctly and confidently predicted source-view pixels:
        per class the `per_class x B` best by the teacher's selector over the batch (feature_memory.py)."""
        teacher = self.teacher.model
        out = teacher["net"](self.normalize(x_s), return_backbone=True)
        feats = out["backbone"]
        B, _, h, w = feats.shape
        # the script: softmax of the logits upsampled to the input size, then prediction and confidence
        # nearest-downsampled to the features: computed at the kept positions only (the same values)
        conf, pred = F.softmax(_upsample_at(out["logits"], y_s.shape[-2:], (h, w)), dim=1).max(1)
        labels = nearest_labels(y_s, (h, w))
        keep = ((pred == labels) & (labels != IGNORE_INDEX) & (conf > self.options["bank_threshold"])).reshape(-1)
        n = int(keep.sum())
        if n < 2 and getattr(self.ctx, "world", 1) == 1:
            return  # the teacher's projection head normalises over the rows: it needs 2 (the script fails on 1)
        rows = keep.nonzero().squeeze(1)
        labels = labels.reshape(-1)[rows]
        z = teacher["heads"]["projection"](_pixels(feats)[rows]) if n >= 2 else feats.new_zeros(0, self.options["dim"])
        self._push(z, labels, B)

    @torch.no_grad()
    def _push(self, z, labels, batch_size):
        """Per class, the `per_class x batch_size` teacher projections `z` [N, D] of class `labels`
        [N] best ranked by the teacher's selector enter the bank, all of them where there are fewer."""
        selectors = self.teacher.model["heads"]["selectors"]
        rank = self._ranking(torch.sigmoid(selectors(z, labels))) if z.shape[0] else z.new_zeros(0)
        self.bank.push(z, labels, rank, batch_size * self.options["per_class"])

    def _memory(self):
        """Per class, the bank's entries (None below 2) and their memory-side scores r_j (None with
        `code_unit_memory_weights`), the memory selector seeing L2-normalised entries (the script)."""
        memory = [self.bank.get(c) if int(self.bank.counts[c]) >= 2 else None for c in range(self.num_classes)]
        if self.options["code_unit_memory_weights"]:
            return memory, None
        present = [c for c in range(self.num_classes) if memory[c] is not None]
        if not present:
            return memory, None
        entries = F.normalize(torch.cat([memory[c] for c in present]), dim=1)
        labels = torch.cat([torch.full((memory[c].shape[0],), c, dtype=torch.int64, device=entries.device)
                            for c in present])
        r = torch.sigmoid(self.heads["memory_selectors"](entries, labels))
        scores = [None] * self.num_classes
        for c, part in zip(present, torch.split(r, [memory[c].shape[0] for c in present])):
            scores[c] = part
        return memory, scores

    def _sample(self, labels):
        """Positions of the labelled pixels, at most `max_pixels_per_class` per class (a random
        subset drawn from the method's generator)."""
        limit = self.options["max_pixels_per_class"]
        valid = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        if limit is None:
            return valid
        parts = []
        for c in torch.unique(labels[valid]).tolist():
            rows = valid[labels[valid] == c]
            if rows.numel() > limit:
                rows = rows[torch.randperm(rows.numel(), generator=self.generator)[:limit].to(rows.device)]
            parts.append(rows)
        return torch.cat(parts) if parts else valid

    def _contrastive(self, feats, labels, memory, memory_scores):
        labels = labels.reshape(-1)
        rows = self._sample(labels)
        if rows.numel() < 2 or all(m is None for m in memory):  # BatchNorm needs 2 rows; no bank, no loss
            return feats.sum() * 0.0
        labels = labels[rows]
        z = self.heads["prediction"](self.heads["projection"](_pixels(feats)[rows]))
        s = torch.sigmoid(self.heads["selectors"](z.detach(), labels))
        return class_memory_loss(z, labels, s, memory, memory_scores, self.num_classes)

    # -- best-on-val reload (code_reload_best) ----------------------------------------------------
    def observe_validation(self, stage, miou, done):
        """trainSSL_domain_adaptation_targetCity.py: a better validation keeps the student; after
        more than iters / 5 iterations of validations without one, the student goes back to the kept
        network, the teacher restarts as its copy (create_ema_model) and the count restarts. The
        end-of-training validation only competes for the best."""
        if not self.options["code_reload_best"]:
            return
        if self.best is None or miou > self.best["miou"]:
            weights = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
            self.best = {"miou": float(miou), "weights": weights, "stale": 0, "seen": done}
            return
        self.best["stale"] += done - self.best["seen"]
        self.best["seen"] = done
        if done < stage.iters and self.best["stale"] > stage.iters / 5:
            self._reload_best()
            self.teacher.model.load_state_dict(self.student.state_dict())
            self.best["stale"] = 0
            self.ctx.log(f"contrastive: no better validation for {stage.iters // 5}+ iterations; back to the "
                         f"best-on-val network (mIoU {self.best['miou']:.2f}) at iteration {done}")

    def _reload_best(self):
        self.student.load_state_dict(self.best["weights"])

    # -- after training -------------------------------------------------------------------------
    @torch.no_grad()
    def finish_stage(self, stage):
        """The script's `update_BN_weak_unlabeled_data`: `bn_update_iters` forwards of the network in
        train mode on target batches (the training stream's, `target_batch` images each), so its
        BatchNorm statistics are re-estimated on the target. With `code_reload_best`, first the
        best-on-val network comes back, as the script loads best_model.pth. Returns "bn_update" (or
        "best_reload_bn_update"; None when neither runs)."""
        o = self.options
        stream = getattr(self.ctx, "target_stream", None)
        reloaded = o["code_reload_best"] and self.best is not None
        if reloaded:
            self._reload_best()
        if not o["final_bn_update"] or o["bn_update_iters"] == 0 or stream is None:
            return "best_reload" if reloaded else None
        was_training = self.model.training
        self.model.train()
        for _ in range(o["bn_update_iters"]):
            x = next(stream)["image"]
            self.model(self.normalize(x[: self._target_batch(x.shape[0])]))
        self.model.train(was_training)
        return "best_reload_bn_update" if reloaded else "bn_update"
