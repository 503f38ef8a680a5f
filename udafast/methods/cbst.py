"""CBST: class-balanced self-training (Zou et al., "Unsupervised Domain Adaptation for Semantic
Segmentation via Class-Balanced Self-Training", ECCV 2018), as the authors' PyTorch code runs it
(yzou2/CRST `crst_seg.py`, run by its `cbst.sh`: `--random-mirror --random-scale --rm-prob
--test-flipping`).

Training runs in rounds t = 0, 1, ... (`rounds` 3: crst_seg.py NUM_ROUNDS 4, whose last round only
evaluates); each starts from the network the previous one ended with (the first from a
source-trained network: the configs set `init: "@source_only"`). At the start of a round, with the
current network w:

1. Labelling pass (crst_seg.py `val`). Every target training image, resized by `label_scale`
   (0.9, crst_seg.py EVAL_SCALE), goes through w in eval mode; the logits are upsampled to the
   target frame (align_corners=True) and softmaxed; with `flip_average` (cbst.sh's
   `--test-flipping`) the softmax of the mirrored image, mirrored back, is averaged in:
   p = (p(x) + flip(p(flip(x)))) / 2. conf = max_c p_c, pred = argmax_c p_c. Beyond the authors'
   code, `label_scale` may be a list (the softmax averaged over those scales and their mirrors) and
   `label_slide: {crop, stride}` runs the network on sliding windows (udafast.inference).
2. Class-balanced thresholds (crst_seg.py `kc_parameters`, SPEC 1.1). Per class c, the
   confidences of the pixels predicted c, keeping every `subsample`-th (4, DS_RATE) of each
   image's list in raster order, are ranked; k_c is the confidence at the top portion p_t of them
   (1.0 where floor(N_c p_t) = 0), p_t = min(p_{t-1} + 0.05, 0.5) from 0.2.
3. Pseudo-labels (crst_seg.py `label_selection`, `cbst_pseudo_labels`): y_hat = argmax_c p_c / k_c,
   ignored (255) where max_c p_c / k_c < 1.
4. Patch mining (crst_seg.py `kc_parameters`: `mine_id`): every class whose share of the argmax-
   predicted target pixels of the labelling pass (all pixels, not subsampled) is below
   `mine_port` (1e-3) is mined; the code computes `rare_id` (the `rare_cls_num` rarest) but never
   uses it. With probability `mine_chance` (0.8) a target crop is centred on a random pixel of a
   random mined class present in the image's pseudo-labels (crst_seg's GTA5StMineDataSet).
5. Retraining (crst_seg.py `train`) for `epochs_per_round` (2, EPR) epochs over ONE shuffled set:
   a random subset of the source images (floor(s_t n) of them, s_t = min(s_{t-1} + 0.0025,
   0.06) from 0.03, drawn anew each round) and every pseudo-labelled target image
   (`RunContext.set_mixed_stream`; crst_seg.py's ConcatDataset + shuffled DataLoader). Each batch
   mixes both domains; the loss is the cross-entropy over all labelled pixels of the batch
   (crst_seg.py `reg_loss_calc` with no regulariser: summed CE / number of labelled pixels), the
   logits upsampled to the crop with align_corners=True. With `freeze_bn` (default) the network
   runs in eval mode while retraining -- BatchNorm uses and keeps its running statistics, dropout
   is off -- and BatchNorm affine parameters are not trained (crst_seg.py calls `model.eval()`
   without `--is-training`; deeplab/model.py sets their requires_grad False). A fresh SGD per
   round, backbone at lr, heads at 10 lr, constant (crst_seg.py: LEARNING_RATE 5e-5, POWER 0,
   MOMENTUM 0.9, WEIGHT_DECAY 5e-4; the configs set these).

Where udafast differs from the authors' code:
- The code writes every image's 19x1024x2048 float32 probability map (160 MB) to disk and sorts
  Python lists of confidences. udafast streams a `ClassThresholds` histogram (C x `bins` int64),
  so a threshold is the lower edge of the bin holding the code's exact threshold (SPEC 1.1), and
  a second forward pass over the target set makes the pseudo-labels instead of reading stored
  probabilities; no probability file is written. The round's pseudo-labels are uint8 [N, H, W] in
  the target frame, `<out_dir>/cbst/round<t>_labels.npy` (a .npy memmap, written under a temporary
  name and renamed when complete; a resumed round reuses a complete one).
- An epoch is floor(|set| / batch) batches (the stream drops the last incomplete batch; the
  code's loader keeps it), and the source subset has at least one image (the code's list
  writer fails on none).
- crst_seg.py's `get_1x_lr_params_NOscale` yields each backbone parameter once per module that
  contains it (layerN, its block, the conv: 3x, a downsample conv 4x) and PyTorch 0.4's SGD then
  steps it that many times per iteration. The paper states one learning rate; udafast steps every
  parameter once.
- Random scaling draws the factor uniformly in the view's `scale_range`; the code draws it from
  {0.5, 0.6, ..., 1.5}.
"""
import math
import os

import numpy as np
import torch
import torch.nn as nn

from udafast.data.labels import IGNORE_INDEX
from udafast.inference import InferenceOptions, infer_probabilities
from udafast.methods.base import Method, Stage, build_optimizer, seg_loss
from udafast.methods.context import RunContext
from udafast.ops import ClassThresholds, cbst_pseudo_labels

__all__ = ["CBST", "portion_schedule", "source_fraction", "subsample_mask", "mine_classes", "label_probabilities",
           "freeze_batchnorm"]

#: the smallest positive normal float32: what a streaming threshold of 0.0 becomes (see `_labels_pass`)
_TINY = torch.finfo(torch.float32).tiny


def _stepped(round_index, start, step, maximum):
    """crst_seg.py's portion after `round_index` rounds: `p = min(p + step, max)` from `start`,
    added up in float64 as the script does (so floor(n * p) matches it)."""
    p = float(start)
    for _ in range(int(round_index)):
        p = min(p + step, maximum)
    return p


def portion_schedule(round_index, start=0.2, step=0.05, maximum=0.5):
    """The target portion p_t of round t: min(p_{t-1} + step, maximum) from `start`
    (crst_seg.py: INIT_TGT_PORT, TGT_PORT_STEP, MAX_TGT_PORT)."""
    return _stepped(round_index, start, step, maximum)


def source_fraction(round_index, start=0.03, step=0.0025, maximum=0.06):
    """The fraction of the source images trained on in round t: min(s_{t-1} + step, maximum) from
    `start` (crst_seg.py: INIT_SRC_PORT, SRC_PORT_STEP, MAX_SRC_PORT)."""
    return _stepped(round_index, start, step, maximum)


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


def mine_classes(pred_counts, mine_port):
    """The classes to mine (crst_seg.py `kc_parameters`' `mine_id`): every class whose share of the
    argmax-predicted pixels is below `mine_port`, by ascending share (ties: lower class id) -> list
    of ints. The shares are computed in float32 as the script computes them."""
    size = np.asarray(torch.as_tensor(pred_counts).cpu().numpy(), dtype=np.float64).astype(np.float32)
    total = np.sum(size)
    if not total > 0:
        return []
    share = size / total
    order = np.argsort(share, kind="stable")
    return [int(c) for c in order if share[c] < np.float32(mine_port)]


def freeze_batchnorm(model):
    """BatchNorm affine parameters of `model` stop training (requires_grad False), as the authors'
    deeplab/model.py sets them; returns how many tensors were frozen."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
                n += 1
    return n


def label_probabilities(model, images, normalize, inference: InferenceOptions) -> torch.Tensor:
    """The labelling pass's softmax [B, C, H, W] at the images' size (crst_seg.py `val`): the
    images (in [0, 1]) resized by each of `inference.scales` (bilinear, as cv2.resize), through
    `model` (as it is: the caller sets eval mode), logits upsampled to H x W with
    align_corners=True, softmax; with `inference.flip`, averaged with the softmax of the mirrored
    images mirrored back (`udafast.inference.infer_probabilities`)."""
    return infer_probabilities(model, images, tuple(images.shape[-2:]), inference, normalize=normalize)


class _RoundExtras:
    """The target frames' per-sample extras in a round: the pseudo-label ("label") and a crop
    centre ("crop_center") on a pixel of a mined class present in it, with probability
    `mine_chance`, else None.

    The choice is drawn from a generator seeded by (run seed, round, index, stream epoch): each
    index is drawn once per epoch, so a sample's extras do not depend on loader workers or on
    resuming. Picklable for loader workers: the memmap is reopened there, and the epoch is frozen
    at the value it had when the epoch's loader was made."""

    def __init__(self, path, mine, mine_chance, seed, round_index, stream):
        self.path, self.mine, self.mine_chance = path, list(mine), float(mine_chance)
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
        # crst_seg.py GTA5StMineDataSet: mine with probability mine_chance, one mined class present
        # in the label chosen uniformly, then one of its pixels uniformly
        if self.mine and float(torch.rand((), generator=g)) < self.mine_chance:
            present = [c for c in self.mine if bool((label == c).any())]
            if present:
                c = present[int(torch.randint(len(present), (), generator=g))]
                ys, xs = torch.nonzero(label == c, as_tuple=True)
                k = int(torch.randint(ys.numel(), (), generator=g))
                center = (int(ys[k]), int(xs[k]))
        return {"label": label, "crop_center": center}


class CBST(Method):
    name = "cbst"
    defaults = {
        "rounds": 3,               # crst_seg.py NUM_ROUNDS 4: rounds 0-2 train, the last only evaluates
        "epochs_per_round": 2,     # crst_seg.py EPR: epochs over source subset + target per round
        "iters_per_round": None,   # an int: iterations per round instead of epochs_per_round
        # target portion p_t = min(p_{t-1} + step, max) from start (crst_seg.py)
        "portion_start": 0.2, "portion_step": 0.05, "portion_max": 0.5,
        # source subset fraction s_t = min(s_{t-1} + step, max) from start (crst_seg.py)
        "source_start": 0.03, "source_step": 0.0025, "source_max": 0.06,
        "subsample": 4,            # crst_seg.py DS_RATE: every n-th pixel of each class's list per image
        "bins": 65536,             # ClassThresholds histogram bins
        "mine_port": 1.0e-3,       # crst_seg.py MINE_PORT (kc_parameters): mine classes predicted below this share
        "mine_chance": 0.8,        # crst_seg.py MINE_CHANCE
        "flip_average": True,      # cbst.sh --test-flipping: label passes average the image and its mirror
        # crst_seg.py EVAL_SCALE: label passes see the frame resized by this (a list: averaged over them)
        "label_scale": 0.9,
        # label passes by sliding windows: crop [H, W] every stride [H, W] (udafast.inference)
        "label_slide": {"crop": None, "stride": None},
        "freeze_bn": True,         # crst_seg.py model.eval() while retraining; deeplab/model.py BN affine frozen
        "label_batch_size": None,  # images per forward while pseudo-labelling (None: data.batch_size)
    }

    def __init__(self, config: dict, ctx: RunContext):
        super().__init__(config, ctx)
        o = self.options
        _check_int("rounds", o["rounds"], 1)
        _check_int("epochs_per_round", o["epochs_per_round"], 1)
        if o["iters_per_round"] is not None:
            _check_int("iters_per_round", o["iters_per_round"], 1)
        _check_int("subsample", o["subsample"], 1)
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
        for key in ("mine_chance", "mine_port"):
            v = o[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"cbst.{key}: expected a number in [0, 1], got {v!r}")
        self.inference = InferenceOptions.from_config(o, "cbst", flip="flip_average", scales="label_scale",
                                                      slide="label_slide")
        if not isinstance(o["freeze_bn"], bool):
            raise ValueError(f"cbst.freeze_bn: expected true or false, got {o['freeze_bn']!r}")
        data = config.get("data") or {}
        crops = [(data.get(f"{d}_view") or {}).get("crop") for d in ("source", "target")]
        if _crop_size(crops[0]) != _crop_size(crops[1]):
            raise ValueError(f"data.source_view.crop: CBST trains on one mixed set of source and target crops "
                             f"(crst_seg.py crops both to --input-size), so it must equal data.target_view.crop; "
                             f"got {crops[0]!r} and {crops[1]!r}")
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
        self.pred_counts = None    # int64 [C]: argmax-predicted pixels per class in the labelling pass
        self.mine = []

    # -- rounds ---------------------------------------------------------------------------------
    @classmethod
    def stage_names(cls, config: dict) -> list:
        rounds = (config.get(cls.name) or {}).get("rounds", cls.defaults["rounds"])
        _check_int("rounds", rounds, 1)
        return [f"round{r}" for r in range(rounds)]

    def stages(self):
        o = self.options
        if o["iters_per_round"] is not None:
            return [Stage(f"round{r}", int(o["iters_per_round"])) for r in range(o["rounds"])]
        return [Stage(f"round{r}", o["epochs_per_round"] * self.batches_per_epoch(r)) for r in range(o["rounds"])]

    def subset_size(self, round_index):
        """floor(s_t * n) source images (crst_seg.py savelst_SrcTgt), at least one."""
        n = len(self.ctx.source)
        return min(n, max(1, math.floor(n * self.source_fraction(round_index))))

    def batches_per_epoch(self, round_index):
        """Batches in one epoch of round t's set (source subset + target), every process's share."""
        world = getattr(self.ctx, "world", 1)
        size = self.subset_size(round_index) + len(self.ctx.target)
        return max(1, size // world // self.ctx.source_stream.batch_size)

    def labels_path(self, round_index):
        return os.path.join(self.folder, f"round{round_index}_labels.npy")

    def start_stage(self, stage, model, resume=False):
        self.model = model
        if self.options["freeze_bn"]:
            freeze_batchnorm(model)
        opt = self.config["optimizer"]
        self.optimizers = {"model": build_optimizer(model.param_groups(opt["lr"]), opt)}
        self.round = [s.name for s in self.stages()].index(stage.name)
        path = self.labels_path(self.round)
        if resume and self._complete(path):
            # thresholds, subset and class counts come with the checkpoint (load_extra_state)
            self.ctx.log(f"cbst round {self.round}: reusing {path}")
            return
        self.subset = self._draw_subset(self.round)
        self.thresholds, self.pred_counts = self._thresholds_pass(self.portion(self.round))
        self.label_counts = self._labels_pass(self.thresholds, path)
        self.mine = mine_classes(self.pred_counts, self.options["mine_port"])
        self.ctx.log(f"cbst round {self.round}: portion {self.portion(self.round):.3f}, "
                     f"{len(self.subset)} source images, {self.labelled_share():.1%} of target pixels "
                     f"labelled, mined classes {self.mine}")
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
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + round_index)
        return torch.sort(torch.randperm(n, generator=g)[:self.subset_size(round_index)]).values

    def _attach(self):
        """The round's training set: source subset + pseudo-labelled target as one shuffled stream."""
        extras = _RoundExtras(self.labels_path(self.round), self.mine, self.options["mine_chance"],
                              self.seed, self.round, None)
        seed = (self.seed * 1_000_003 + 7919 * (self.round + 1)) % 2**31
        extras._stream = self.ctx.set_mixed_stream(self.subset.tolist(), extras, seed=seed)

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
        """(indices, softmax [B, C, H, W] in the target frame, the frames' true labels or None) over
        the target training set (this process's share of it under several processes), as
        `label_probabilities`."""
        was_training = self.model.training
        self.model.eval()
        o = self.options
        try:
            for batch in self.ctx.target_frames(o["label_batch_size"], shard=True):
                images = batch["image"].to(self.device)
                yield batch["index"], label_probabilities(self.model, images, self.normalize,
                                                          self.inference), batch.get("truth")
        finally:
            self.model.train(was_training)

    def _thresholds_pass(self, portion):
        """First pass: the streaming class-balanced thresholds k_c at `portion` -> (float32 [C],
        argmax-predicted pixels per class int64 [C])."""
        hist = ClassThresholds(self.num_classes, self.options["bins"], device=self.device, backend=self.backend)
        predicted = torch.zeros(self.num_classes, dtype=torch.int64)
        for _, probs, _ in self._probabilities():
            conf, pred = probs.max(dim=1)  # one reduction (4x faster than amax + argmax); first max wins
            predicted += torch.bincount(pred.reshape(-1).cpu(), minlength=self.num_classes)[:self.num_classes]
            keep = subsample_mask(pred, self.num_classes, self.options["subsample"])
            hist.update(conf, torch.where(keep, pred, IGNORE_INDEX))
        hist.all_reduce(self.ctx.all_reduce_)
        return hist.thresholds(portion).cpu(), self.ctx.all_reduce_(predicted)

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
            for index, probs, truth in self._probabilities():
                labels = cbst_pseudo_labels(probs, k, backend=self.backend).cpu()
                self.record_labels("pseudo", labels, truth)  # issue 12 item 3: coverage, precision, recall
                counts += torch.bincount(labels[labels != IGNORE_INDEX], minlength=self.num_classes)[:self.num_classes]
                stored[index.numpy()] = labels.to(torch.uint8).numpy()
                written[index.numpy()] = True
            # frames left out as bad (data.skip_bad_samples) get no pseudo-labels
            stored[own[~written[own]]] = IGNORE_INDEX
        return self.ctx.all_reduce_(counts)

    # -- the step -------------------------------------------------------------------------------
    def step(self, batch, it, iters):
        """One SGD step on a batch of the round's mixed set: cross-entropy over every labelled pixel
        of the batch, source and target alike (crst_seg.py `train` / `reg_loss_calc`)."""
        mixed = batch["mixed"]
        if self.options["freeze_bn"]:
            self.model.eval()  # crst_seg.py: running BatchNorm statistics, used and kept
        loss = seg_loss(self.model(self.normalize(mixed["image"]))["logits"], mixed["label"].to(self.device))
        opt = self.optimizers["model"]
        opt.zero_grad(set_to_none=True)
        self.backward(loss)
        opt.step()
        return {"seg": loss.detach()}

    # -- state ----------------------------------------------------------------------------------
    def extra_state(self):
        return {"round": self.round, "thresholds": self.thresholds, "subset": self.subset,
                "label_counts": self.label_counts, "pred_counts": self.pred_counts, "mine": list(self.mine)}

    def load_extra_state(self, state):
        if state["round"] != self.round:
            raise ValueError(f"cbst: the checkpoint is of round {state['round']}, this stage is round {self.round}")
        self.thresholds, self.subset = state["thresholds"], state["subset"]
        self.label_counts, self.pred_counts = state["label_counts"], state["pred_counts"]
        self.mine = list(state["mine"])
        self._attach()


def _crop_size(crop):
    return None if crop is None else tuple(crop) if isinstance(crop, (list, tuple)) else (crop, crop)


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"cbst.{name}: expected an int >= {low}, got {value!r}")
