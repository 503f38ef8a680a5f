"""CBST: class-balanced self-training (Zou et al., "Unsupervised Domain Adaptation for Semantic
Segmentation via Class-Balanced Self-Training", ECCV 2018).

Training runs in rounds t = 0, 1, ...; each starts from the network the previous one ended with
(the first from a source-trained network: the configs set `init: "@source_only"`). At the start of
a round, with the current network w:

1. Class-balanced thresholds. Every target training image goes through w (eval mode, logits
   upsampled to the resized frame with align_corners=True, softmax p). Per class c, the
   confidences max_k p_k of the pixels predicted c are ranked; k_c is the confidence at the top
   portion p_t of them (SPEC 1.1), with the target portion p_t = min(0.2 + 0.05 t, 0.5).
2. Pseudo-labels (SPEC 1.1, `cbst_pseudo_labels`): y_hat = argmax_c p_c / k_c, ignored (255)
   where max_c p_c / k_c < 1, i.e. pixel i gets class c when its probability reaches that class's
   threshold -- the closed-form solution of the paper's self-training objective with the
   class-normalised -log k_c penalty.
3. Retraining for the round's iterations on a random subset of the source images (a fraction
   min(0.03 + 0.0025 t, 0.06) of them, drawn anew each round) and all pseudo-labelled target images:

       L(w) = CE(w; source, y_s) + CE(w; target, y_hat)        (255 ignored)

   with rare-class patch mining: the `rare_classes` (3) classes with the smallest share of
   pseudo-labelled pixels get, with probability `mine_chance` (0.8), target crops centred on one of
   their pixels.

How udafast differs from the authors' code, which writes every image's 19x1024x2048 float32
probability map (160 MB) to disk and sorts Python lists of confidences: the thresholds come from a
streaming `ClassThresholds` histogram (C x `bins` int64 counts, bounded memory), so the pseudo-
labels need a second forward pass over the target set instead of the stored probabilities; no
probability file is ever written. The only file is the round's pseudo-labels, uint8 [N, H, W]
in the resized frame, `<out_dir>/cbst/round<t>_labels.npy` (a .npy memmap, written under a
temporary name and renamed when complete; a resumed round reuses a complete one).

`subsample` (4): the authors keep every 4th pixel of each class's confidence list (per image,
pixels in raster order). The histogram is fed exactly those pixels: in each image, the pixels of
class c whose rank among that image's class-c pixels (raster order) is a multiple of `subsample`;
the others are left out (given the ignore label). The streaming threshold is then SPEC 1.1's: the
lower edge of the histogram bin holding the exact threshold of the kept pixels.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F

from udafast.data.labels import IGNORE_INDEX
from udafast.methods.base import Method, Stage, build_optimizer, seg_loss, upsample
from udafast.ops import ClassThresholds, cbst_pseudo_labels

__all__ = ["CBST", "portion_schedule", "source_fraction", "subsample_mask", "rare_classes"]

#: the smallest positive normal float32: what a streaming threshold of 0.0 becomes (see `_labels_pass`)
_TINY = torch.finfo(torch.float32).tiny


def portion_schedule(round_index, start=0.2, step=0.05, maximum=0.5):
    """The target portion p_t of round t: min(start + step * t, maximum)."""
    return min(start + step * round_index, maximum)


def source_fraction(round_index, start=0.03, step=0.0025, maximum=0.06):
    """The fraction of the source images trained on in round t: min(start + step * t, maximum)."""
    return min(start + step * round_index, maximum)


def subsample_mask(pred, num_classes, every, ignore_index=IGNORE_INDEX):
    """bool [B, ...]: per image, the pixels of each class whose rank among that image's pixels of
    the class (raster order) is a multiple of `every` (the authors' `conf[::ds_rate]`)."""
    b = pred.shape[0]
    flat = pred.reshape(b, -1).to(torch.int64)
    # one group per (image, class); ignored pixels in an extra group per image
    cls = torch.where((flat >= 0) & (flat < num_classes), flat, num_classes)
    key = (torch.arange(b, device=pred.device).unsqueeze(1) * (num_classes + 1) + cls).reshape(-1)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=b * (num_classes + 1))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(key)
    rank[order] = torch.arange(key.numel(), device=pred.device) - starts[key[order]]
    keep = (rank % every == 0) & (cls.reshape(-1) < num_classes) & (flat.reshape(-1) != ignore_index)
    return keep.reshape(pred.shape)


def rare_classes(counts, k):
    """The `k` classes with the fewest pseudo-labelled pixels among those with any (ties: lower
    class id first) -> list of ints."""
    counts = torch.as_tensor(counts)
    present = torch.nonzero(counts > 0).reshape(-1)
    order = torch.sort(counts[present], stable=True).indices
    return [int(c) for c in present[order][:k]]


class _RoundExtras:
    """The target stream's per-sample extras in a round: the pseudo-label ("label") and a crop
    centre ("crop_center") on a pixel of a rare class present in it, with probability
    `mine_chance`, else None.

    The choice is drawn from a generator seeded by (run seed, round, index, stream epoch): each
    index is drawn once per epoch, so a sample's extras do not depend on loader workers or on
    resuming. Picklable for loader workers: the memmap is reopened there, and the epoch is frozen
    at the value it had when the epoch's loader was made."""

    def __init__(self, path, rare, mine_chance, seed, round_index, stream):
        self.path, self.rare, self.mine_chance = path, list(rare), float(mine_chance)
        self.seed, self.round_index = int(seed), int(round_index)
        self._stream, self._epoch, self._labels = stream, 0, None

    @property
    def epoch(self):
        return self._stream.epoch if self._stream is not None else self._epoch

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_stream=None, _epoch=self.epoch, _labels=None)
        return state

    def generator(self, index):
        key = self.seed
        for part in (self.round_index, index, self.epoch):
            key = (key * 1_000_003 + int(part)) % 2**63
        return torch.Generator().manual_seed(key)

    def __call__(self, index):
        if self._labels is None:
            self._labels = np.load(self.path, mmap_mode="r")
        label = torch.from_numpy(np.asarray(self._labels[index], dtype=np.int64))
        center = None
        g = self.generator(index)
        if self.rare and float(torch.rand((), generator=g)) < self.mine_chance:
            present = [c for c in self.rare if bool((label == c).any())]
            if present:
                c = present[int(torch.randint(len(present), (), generator=g))]
                ys, xs = torch.nonzero(label == c, as_tuple=True)
                k = int(torch.randint(ys.numel(), (), generator=g))
                center = (int(ys[k]), int(xs[k]))
        return {"label": label, "crop_center": center}


class CBST(Method):
    name = "cbst"
    defaults = {
        "rounds": 3,
        "iters_per_round": None,   # None: train.iters
        # target portion p_t = min(start + step * t, max)
        "portion_start": 0.2, "portion_step": 0.05, "portion_max": 0.5,
        # source subset fraction = min(start + step * t, max), at least batch_size images
        "source_start": 0.03, "source_step": 0.0025, "source_max": 0.06,
        "subsample": 4,            # every n-th pixel of each class's confidence list
        "bins": 65536,             # ClassThresholds histogram bins
        "rare_classes": 3,
        "mine_chance": 0.8,
        "label_batch_size": None,  # images per forward while pseudo-labelling (None: data.batch_size)
    }

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        o = self.options
        _check_int("rounds", o["rounds"], 1)
        if o["iters_per_round"] is not None:
            _check_int("iters_per_round", o["iters_per_round"], 1)
        _check_int("subsample", o["subsample"], 1)
        _check_int("rare_classes", o["rare_classes"], 0)
        if o["label_batch_size"] is not None:
            _check_int("label_batch_size", o["label_batch_size"], 1)
        bins = o["bins"]
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1 or bins & (bins - 1) or bins > 2**24:
            raise ValueError(f"cbst.bins: expected a power of two in [1, 2**24], got {bins!r}")
        for prefix in ("portion", "source"):
            start, step, top = (o[f"{prefix}_{k}"] for k in ("start", "step", "max"))
            for k, v in (("start", start), ("step", step), ("max", top)):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                    raise ValueError(f"cbst.{prefix}_{k}: expected a number in [0, 1], got {v!r}")
            if start > top:
                raise ValueError(f"cbst.{prefix}_start: {start} is above {prefix}_max {top}")
        if o["source_start"] <= 0:
            raise ValueError(f"cbst.source_start: expected a fraction > 0, got {o['source_start']!r}")
        mc = o["mine_chance"]
        if isinstance(mc, bool) or not isinstance(mc, (int, float)) or not 0.0 <= mc <= 1.0:
            raise ValueError(f"cbst.mine_chance: expected a probability, got {mc!r}")
        self.num_classes = int(config["model"]["num_classes"])
        if self.num_classes >= IGNORE_INDEX:
            raise ValueError(f"model.num_classes: CBST stores labels as uint8 with {IGNORE_INDEX} ignored, "
                             f"so at most {IGNORE_INDEX - 1} classes; got {self.num_classes}")
        self.seed = int(config.get("seed", 0))
        self.folder = os.path.join(ctx.out_dir, "cbst")
        self.round = None
        self.thresholds = None     # float32 [C], as used for the round's labels
        self.subset = None         # int64: the round's source indices
        self.label_counts = None   # int64 [C]: pseudo-labelled pixels per class
        self.rare = []

    # -- rounds ---------------------------------------------------------------------------------
    def stages(self):
        iters = self.options["iters_per_round"] or int(self.config["train"]["iters"])
        return [Stage(f"round{r}", int(iters)) for r in range(self.options["rounds"])]

    def labels_path(self, round_index):
        return os.path.join(self.folder, f"round{round_index}_labels.npy")

    def start_stage(self, stage, model, resume=False):
        self.model = model
        opt = self.config["optimizer"]
        self.optimizers = {"model": build_optimizer(model.param_groups(opt["lr"]), opt)}
        self.round = [s.name for s in self.stages()].index(stage.name)
        path = self.labels_path(self.round)
        if resume and self._complete(path):
            # thresholds, subset and class counts come with the checkpoint (load_extra_state)
            self.ctx.log(f"cbst round {self.round}: reusing {path}")
            return
        self.subset = self._draw_subset(self.round)
        self.thresholds = self._thresholds_pass(self.portion(self.round))
        self.label_counts = self._labels_pass(self.thresholds, path)
        self.rare = rare_classes(self.label_counts, self.options["rare_classes"])
        self.ctx.log(f"cbst round {self.round}: portion {self.portion(self.round):.3f}, "
                     f"{len(self.subset)} source images, {self.labelled_share():.1%} of target pixels "
                     f"labelled, rare classes {self.rare}")
        self._attach()

    def portion(self, round_index):
        o = self.options
        return portion_schedule(round_index, o["portion_start"], o["portion_step"], o["portion_max"])

    def source_fraction(self, round_index):
        o = self.options
        return source_fraction(round_index, o["source_start"], o["source_step"], o["source_max"])

    def labelled_share(self):
        total = self._frame_pixels() * len(self.ctx.target)
        return float(self.label_counts.sum()) / max(total, 1)

    def _draw_subset(self, round_index):
        """A random subset of the source images, from a generator of (run seed, round)."""
        n = len(self.ctx.source)
        at_least = self.ctx.source_stream.batch_size * getattr(self.ctx, "world", 1)  # a batch per process
        size = min(n, max(at_least, round(self.source_fraction(round_index) * n)))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + round_index)
        return torch.sort(torch.randperm(n, generator=g)[:size]).values

    def _attach(self):
        self.ctx.set_source_subset(self.subset.tolist())
        stream = self.ctx.target_stream
        stream.set_extras(_RoundExtras(self.labels_path(self.round), self.rare, self.options["mine_chance"],
                                       self.seed, self.round, stream))

    # -- pseudo-labelling -----------------------------------------------------------------------
    def _frame_pixels(self):
        h, w = self._frame_size()
        return h * w

    def _frame_size(self):
        return self.ctx.target_frame_size()

    def _complete(self, path):
        if not os.path.isfile(path):
            return False
        try:
            stored = np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            return False
        return stored.dtype == np.uint8 and stored.shape == (len(self.ctx.target), *self._frame_size())

    @torch.no_grad()
    def _probabilities(self):
        """(indices, softmax [B, C, H, W] in the resized frame) over the target training set (this
        process's share of it under several processes)."""
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in self.ctx.target_frames(self.options["label_batch_size"], shard=True):
                logits = self.model(self.normalize(batch["image"]))["logits"]
                yield batch["index"], F.softmax(upsample(logits, batch["image"].shape[-2:]).float(), dim=1)
        finally:
            self.model.train(was_training)

    def _thresholds_pass(self, portion):
        """First pass: the streaming class-balanced thresholds k_c at `portion` -> float32 [C]."""
        hist = ClassThresholds(self.num_classes, self.options["bins"], device=self.device, backend=self.backend)
        for _, probs in self._probabilities():
            conf, pred = probs.max(dim=1)  # one reduction (4x faster than amax + argmax); first max wins
            keep = subsample_mask(pred, self.num_classes, self.options["subsample"])
            hist.update(conf, torch.where(keep, pred, IGNORE_INDEX))
        hist.all_reduce()
        return hist.thresholds(portion).cpu()

    def _labels_pass(self, thresholds, path):
        """Second pass: the pseudo-labels into `path` (uint8 [N, H, W]) -> pixels per class, int64 [C].

        A streaming threshold is the lower edge of a histogram bin, so 0.0 where a class's exact
        threshold lies in the lowest bin; `cbst_pseudo_labels` needs thresholds in (0, 1] (p / 0 is
        inf or NaN). It becomes the smallest normal float32 instead: every pixel whose probability
        reaches it is still selected, as with 0.0, and p / tiny <= 1 / tiny stays finite, so the
        ratios of such classes still compare by their probabilities."""
        counts = torch.zeros(self.num_classes, dtype=torch.int64)
        k = thresholds.clamp(min=_TINY).to(self.device)
        own = np.arange(self.ctx.rank, len(self.ctx.target), self.ctx.world)  # this process's frames
        written = np.zeros(len(self.ctx.target), dtype=bool)
        with self.ctx.shared_array(path, np.uint8, (len(self.ctx.target), *self._frame_size())) as stored:
            for index, probs in self._probabilities():
                labels = cbst_pseudo_labels(probs, k, backend=self.backend).cpu()
                counts += torch.bincount(labels[labels != IGNORE_INDEX], minlength=self.num_classes)[:self.num_classes]
                stored[index.numpy()] = labels.to(torch.uint8).numpy()
                written[index.numpy()] = True
            # frames left out as bad (data.skip_bad_samples) get no pseudo-labels
            stored[own[~written[own]]] = IGNORE_INDEX
        return self.ctx.all_reduce_(counts)

    # -- the step -------------------------------------------------------------------------------
    def step(self, batch, it, iters):
        source, target = batch["source"], batch["target"]
        loss_src = seg_loss(self.model(self.normalize(source["image"]))["logits"], source["label"].to(self.device))
        loss_tgt = seg_loss(self.model(self.normalize(target["image"]))["logits"], target["label"].to(self.device))
        opt = self.optimizers["model"]
        opt.zero_grad(set_to_none=True)
        (loss_src + loss_tgt).backward()
        opt.step()
        return {"seg": loss_src.detach(), "pseudo": loss_tgt.detach()}

    # -- state ----------------------------------------------------------------------------------
    def extra_state(self):
        return {"round": self.round, "thresholds": self.thresholds, "subset": self.subset,
                "label_counts": self.label_counts, "rare": list(self.rare)}

    def load_extra_state(self, state):
        if state["round"] != self.round:
            raise ValueError(f"cbst: the checkpoint is of round {state['round']}, this stage is round {self.round}")
        self.thresholds, self.subset = state["thresholds"], state["subset"]
        self.label_counts, self.rare = state["label_counts"], list(state["rare"])
        self._attach()


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"cbst.{name}: expected an int >= {low}, got {value!r}")
