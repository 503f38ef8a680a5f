"""Pixel contrastive learning from a class-wise memory bank, in SPEC part 2's unsupervised form.

I. Alonso, A. Sabater, D. Ferstl, L. Montesano, A. C. Murillo, "Semi-Supervised Semantic
Segmentation with Pixel-Level Contrastive Learning from a Class-wise Memory Bank", ICCV 2021.

The student is the segmentation network plus three heads on its stride-8 backbone features:
projection `g` (D -> 256 -> BN -> ReLU -> 256), prediction `h` (256 -> 256 -> BN -> ReLU -> 256)
and, per class, selectors (256 -> 256 -> BN -> LeakyReLU(0.2) -> 1). The teacher is an EMA of all
of it, with a momentum rising from m0 = 0.995 to 1 on a cosine over the T iterations:

    m(it) = 1 - (1 - m0) * (cos(pi * it / T) + 1) / 2          (m(0) = m0, m(T) = 1)

Memory bank (`ClassMemoryBank`, 256 entries per class): from labelled source pixels that the
teacher predicts correctly with confidence > 0.95, the teacher's projections `g'(x)`, ranked per
class by the teacher's selector score `s = sigmoid(S'_c(g'(x)))`; each push takes, per image and
class, the `per_class` (1) highest-scoring ones, FIFO. Filling starts at `bank_start`, the loss at
`loss_start`.

Loss, for batch features `z_i = h(g(x_i))` (student) of class c and bank entries `m_j` of class c,
over the classes with at least 2 of each:

    L = 1/C sum_c 1/(M_c N_c) sum_i sum_j  w_i v_j (1 - cos(z_i, m_j))
    w_i = s_i M_c / sum_i s_i,   s_i = sigmoid(S_c(z_i.detach()))   (M_c batch features)
    v_j = r_j N_c / sum_j r_j,   r_j = sigmoid(R_c(m_j))            (N_c bank entries)

Both sides are weighted by learned per-class selectors and each side's weights are normalised to
mean 1: the feature side by S_c (which also ranks the bank entries, through its EMA copy), the
memory side by a second set of selectors R_c, as the authors' `contrastive_class_selector_memory`
modules. In the authors' released loss the memory-side normalisation divides each weight by itself
(the weights are transposed to a row before `shape[0] / sum(dim=0)`), so `v_j = 1` and R_c never
learns: `code_unit_memory_weights`. Their bank update sorts the scores ascending and keeps the
first, the lowest-scored features: `code_ascending_selection`.

For unsupervised adaptation (ours, SPEC part 2): the bank fills from source pixels only; the loss
applies to source pixels (their labels, nearest-downsampled to the features) and to target pixels
(the teacher's argmax, optionally only where its confidence reaches `pseudo_threshold`). In total

    L_total = CE_src + weight * (L(source) + L(target)).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from udafast.data.labels import IGNORE_INDEX
from udafast.methods.base import EMATeacher, Method, build_optimizer, seg_loss, upsample
from udafast.models.heads import ClassSelectors, PredictionHead, ProjectionHead
from udafast.ops import ClassMemoryBank, topk_per_class

__all__ = ["Contrastive", "class_memory_loss", "teacher_momentum"]


def teacher_momentum(it, iters, base=0.995):
    """The EMA momentum at iteration `it` of `iters`: `base` -> 1 on a half cosine."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * it / iters) + 1.0) / 2.0


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


def _downsample_labels(labels, size):
    """Hard labels [B, H, W] to `size` by nearest neighbour (the authors' code)."""
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def _pixels(features):
    """[B, D, h, w] -> [B * h * w, D] rows."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


class Contrastive(Method):
    name = "contrastive"
    defaults = {
        "weight": 0.1,               # of each contrastive term (paper 0.1 to 0.2)
        "momentum": 0.995,           # teacher EMA momentum at the start, -> 1 on a cosine
        "dim": 256,                  # projection / prediction width
        "bank_size": 256,            # entries per class
        "per_class": 1,              # features per class per image per push
        "bank_start": 1000,          # iteration at which the bank starts filling
        "loss_start": 2000,          # iteration at which the contrastive loss starts
        "bank_threshold": 0.95,      # teacher confidence above which a correct source pixel may enter
        "pseudo_threshold": 0.0,     # teacher confidence a target pixel needs to enter the loss (0: all)
        "max_pixels_per_class": None,  # random subset per class and domain in the loss (None: all)
        "heads_lr_mult": 10.0,       # the contrastive heads' lr over the optimiser's lr
        "code_ascending_selection": False,
        "code_unit_memory_weights": False,
    }

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self._check_options()
        self.num_classes = int(config["model"]["num_classes"])
        self.heads = None
        self.teacher = None
        self.bank = None

    def _check_options(self):
        o = self.options

        def fail(key, expected):
            raise ValueError(f"{self.name}.{key}: expected {expected}, got {o[key]!r}")

        def number(key):
            return not isinstance(o[key], bool) and isinstance(o[key], (int, float))

        def count(key, low):
            return not isinstance(o[key], bool) and isinstance(o[key], int) and o[key] >= low

        if not (number("weight") and o["weight"] >= 0):
            fail("weight", "a number >= 0")
        if not (number("momentum") and 0 <= o["momentum"] <= 1):
            fail("momentum", "a number in [0, 1]")
        for key in ("dim", "bank_size", "per_class"):
            if not count(key, 1):
                fail(key, "a positive integer")
        for key in ("bank_start", "loss_start"):
            if not count(key, 0):
                fail(key, "an integer >= 0")
        for key in ("bank_threshold", "pseudo_threshold"):
            if not (number(key) and 0 <= o[key] < 1):
                fail(key, "a number in [0, 1)")
        if o["max_pixels_per_class"] is not None and not count("max_pixels_per_class", 2):
            fail("max_pixels_per_class", "None or an integer >= 2")
        if not (number("heads_lr_mult") and o["heads_lr_mult"] > 0):
            fail("heads_lr_mult", "a number > 0")
        for key in ("code_ascending_selection", "code_unit_memory_weights"):
            if not isinstance(o[key], bool):
                fail(key, "true or false")

    # -- set-up ---------------------------------------------------------------------------------
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
        # one module for the EMA: the network and its heads
        self.student = nn.ModuleDict({"net": model, "heads": self.heads})
        self.teacher = EMATeacher(self.student)
        self.bank = ClassMemoryBank(self.num_classes, o["bank_size"], o["dim"], device=self.device,
                                    backend=self.backend)
        spec = self.config["optimizer"]
        groups = model.param_groups(spec["lr"]) + [
            {"params": list(self.heads.parameters()), "lr": o["heads_lr_mult"] * spec["lr"], "name": "contrastive"}]
        self.optimizers = {"model": build_optimizer(groups, spec)}
        self.modules = {"heads": self.heads, "teacher": self.teacher, "bank": self.bank}

    # -- the step -------------------------------------------------------------------------------
    def step(self, batch, it, iters):
        o = self.options
        x_s = self.normalize(batch["source"]["image"])
        y_s = batch["source"]["label"].to(self.device)
        out_s = self.model(x_s, return_backbone=True)
        loss = seg_loss(out_s["logits"], y_s)
        losses = {"seg": loss.detach()}
        if it >= o["bank_start"]:
            self._fill_bank(x_s, y_s)
        if it >= o["loss_start"]:
            x_t = self.normalize(batch["target"]["image"])
            out_t = self.model(x_t, return_backbone=True)
            memory, memory_scores = self._memory()
            feats_s, feats_t = out_s["backbone"], out_t["backbone"]
            l_src = self._contrastive(feats_s, _downsample_labels(y_s, feats_s.shape[-2:]), memory, memory_scores)
            l_tgt = self._contrastive(feats_t, self._pseudo_labels(x_t, feats_t.shape[-2:]), memory, memory_scores)
            loss = loss + o["weight"] * (l_src + l_tgt)
            losses.update(contrast_src=l_src.detach(), contrast_tgt=l_tgt.detach())
        opt = self.optimizers["model"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        self.teacher.update(self.student, teacher_momentum(it, iters, o["momentum"]))
        losses["bank"] = float(self.bank.counts.sum())
        return losses

    def _ranking(self, scores):
        # the authors' ascending sort keeps the lowest scores: rank by -s
        return -scores if self.options["code_ascending_selection"] else scores

    @torch.no_grad()
    def _fill_bank(self, x_s, y_s):
        """Push the teacher's projections of correctly and confidently predicted source pixels,
        `per_class` per class per image, highest teacher-selector score first."""
        teacher = self.teacher.model
        out = teacher["net"](x_s, return_backbone=True)
        feats = out["backbone"]
        B, _, h, w = feats.shape
        conf, pred = F.softmax(upsample(out["logits"], (h, w)), dim=1).max(1)
        labels = _downsample_labels(y_s, (h, w))
        keep = ((pred == labels) & (conf > self.options["bank_threshold"])).reshape(-1)
        if not bool(keep.any()) and getattr(self.ctx, "world", 1) == 1:
            return  # (under torch.distributed every process takes part in the push, with or without pixels)
        rows = keep.nonzero().squeeze(1)
        labels = labels.reshape(-1)[rows]
        image = torch.div(rows, h * w, rounding_mode="floor")
        z = teacher["heads"]["projection"](_pixels(feats)[rows])
        rank = self._ranking(torch.sigmoid(teacher["heads"]["selectors"](z, labels)))
        # per (image, class): its own top `per_class`, then one push of them all
        k = self.options["per_class"]
        index, _ = topk_per_class(rank, image * self.num_classes + labels, B * self.num_classes, k,
                                  backend=self.backend)
        chosen = index[index >= 0]
        self.bank.push(z[chosen], labels[chosen], rank[chosen], B * k)

    def _memory(self):
        """Per class, the bank's entries (None below 2) and their memory-side scores r_j (None with
        `code_unit_memory_weights`)."""
        memory = [self.bank.get(c) if int(self.bank.counts[c]) >= 2 else None for c in range(self.num_classes)]
        if self.options["code_unit_memory_weights"]:
            return memory, None
        present = [c for c in range(self.num_classes) if memory[c] is not None]
        if not present:
            return memory, None
        entries = torch.cat([memory[c] for c in present])
        labels = torch.cat([torch.full((memory[c].shape[0],), c, dtype=torch.int64, device=entries.device)
                            for c in present])
        r = torch.sigmoid(self.heads["memory_selectors"](entries, labels))
        scores = [None] * self.num_classes
        for c, part in zip(present, torch.split(r, [memory[c].shape[0] for c in present])):
            scores[c] = part
        return memory, scores

    @torch.no_grad()
    def _pseudo_labels(self, x_t, size):
        """The teacher's argmax at the features' resolution; below `pseudo_threshold`, ignored."""
        logits = upsample(self.teacher.model["net"](x_t)["logits"], size)
        conf, labels = F.softmax(logits, dim=1).max(1)
        labels[conf < self.options["pseudo_threshold"]] = IGNORE_INDEX
        return labels

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
