"""ProDA: prototypical pseudo-label denoising and target structure learning.

Zhang, Zhang, Zhang, Chen, Wang, Wen, "Prototypical Pseudo Label Denoising and Target Structure
Learning for Domain Adaptive Semantic Segmentation", CVPR 2021 (SPEC part 2), run as the authors'
code (microsoft/ProDA: `models/adaptation_modelv2.py`, `calc_prototype.py`,
`generate_pseudo_label.py` and the README's commands) runs it where the paper is silent. Four stages:

- `warmup`: `L = CE_src + 0.01 L_adv`, single-level output-space adversarial training (LS-GAN) with
  ProDA's own discriminator (`models/discriminator.py` FCDiscriminator: `ProDADiscriminator`); it
  learns `L(source, 0) + L(target, 1)`, summed as `step_adv` sums it.
- start of `stage1`, with the warm-up network in eval mode, one pass over the target training frames:
  the fixed soft labels `p_{t,0}` (its softmax at the output stride, float16 in
  `<out_dir>/proda/soft_labels.npy`, outside the checkpoints) and the initial prototypes `eta_c`
  averaged as `calc_prototype.py` averages them: per image, the mean feature of each class predicted
  at >= 10 pixels; per class, the running mean of those image means over 4 epochs of the frames, its
  count capped at 3000 (`proto_init: pixel_mean` = the plain pixel mean instead). The EMA teacher is
  a copy of the warm-up network.
- `stage1` (`step` with the stage-1 command's flags): the teacher runs on the whole target frame in
  train mode (batch statistics: the code never puts `BaseNet_ema` in eval mode), its outputs at a
  quarter of the frame, its features then taken into the weak view (`full2weak`:
  `udafast.data.transforms.frame_to_view`). With `w = prototype_softmax(those features)`,
  `y_hat = argmax_c(w_c p_{t,0,c})` on the weak view (the soft labels follow the weak view), and
      `L = CE_src + (0.1 CE + 1.0 RCE + 0.1 REG)(student's weak view; y_hat)
           + 10 KL(w warped into the strong view || softmax(-d_student(strong view) / tau))`,
  every target term at a quarter of the crop (stride-8 outputs upsampled). After each step the
  prototypes move towards the teacher's per-image class means on the whole frame (SPEC 1.3), the
  teacher's parameters towards the student's (0.999) and its buffers are copied from the student.
- `stage2`, `stage3`: self-distillation of the previous stage's network (frozen, eval mode). At the
  start of the stage, one pass of that network over the target frames makes hard labels as
  `generate_pseudo_label.py --flip` does (softmax of the image and of its mirror, upsampled to the
  frame, averaged; the argmax where the confidence exceeds 0.95, else ignored; `distill_scales` and
  `distill_slide` add multi-scale and sliding-window inference), stored as uint8 in
  `<out_dir>/proda/<stage>_labels.npy`. The student, on the strong view, learns
  `CE(labels) + KL(teacher(strong view) || student)` (the labels follow the weak view, are taken to
  a quarter of the crop and warped into the strong view). Stage 2's student starts from
  `proda.student_init` where given (the authors: SimCLRv2 ImageNet weights, `--student_init simclr
  --bn_clr`: adaptation_modelv2.py loads them into the backbone, the heads at their init), else the
  run's init; stage 3's continues from stage 2's network, as the README's stage-3 command restores it.
  With no ImageNet network in the embedded benchmark, `student_init: "@ssl_source"` is the issue's
  substitute: `udafast.methods.ssl_source`, SimCLR(v2)-style self-supervised pretraining of the
  backbone on the SOURCE images (no labels), which `udafast.engine.runs.run_method` trains first (in
  the comparison once per seed, under `<comparison>/ssl_source`, reused) and whose checkpoint it puts
  in place of the value; its backbone is the student's, its segmentation heads untrained (the
  projection head is not part of the network), and its time counts in the ProDA run's (`pretrain_s`).
  `student_init: null` (the run's init: the source-only network on the preset) reports stage 2 the
  other way.

Each stage hands on its best-on-val network, as the README's commands pass each stage's
`*_best_model.pkl` on: with validation within a stage (`train.eval_every`), the trainer keeps it as
`checkpoints/<stage>_best.pt` and the next stage (its labels, its teacher, stage 3's student) starts
from it; without, the final weights are the best-on-val ones (`next_from: last` always takes them).

Each pseudo-label map is scored against the target's true labels where the run has them
(`Method.record_labels`): `p_t0` (the warm-up argmax) and `y_hat` in stage 1, the distillation labels
in stages 2 and 3.
"""
import contextlib
import copy
import os

import numpy as np
import torch
import torch.nn.functional as F

from udafast.config import merge
from udafast.data.labels import IGNORE_INDEX
from udafast.data.strong_view import strong_augment, warp_like
from udafast.data.transforms import frame_to_view
from udafast.inference import InferenceOptions, average, infer_probabilities, view_probabilities
from udafast.methods.adversarial import GANS, OutputSpaceAdversary, check_scale, scaled_size
from udafast.methods.base import EMATeacher, Method, Stage, build_optimizer, nearest_labels, seg_loss, upsample
from udafast.methods.context import RunContext
from udafast.models.heads import ProDADiscriminator
from udafast.ops import class_feature_sums, kl_loss, prototype_rectify, prototype_softmax, sce_loss, update_prototypes

__all__ = ["ProDA", "SoftLabels", "HardLabels", "initial_prototypes", "distillation_labels"]

STAGES = ("warmup", "stage1", "stage2", "stage3")
#: `student_init`: the self-supervised source pretraining (udafast.methods.ssl_source), resolved by run_method
SSL_INIT = "@ssl_source"
SOFT_LABELS = "soft_labels.npy"


class SoftLabels:
    """The stored `p_{t,0}` [N, C, h, w] (float16 memmap) as a stream's extras: frame `i` -> {"soft":
    float32 [C, h, w]}. Opens the file lazily, so it pickles to loader workers as its path."""

    def __init__(self, path):
        self.path = path
        self._array = None

    def __call__(self, index):
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return {"soft": torch.from_numpy(np.asarray(self._array[index], dtype=np.float32)), "frame": True}

    def __getstate__(self):
        return {"path": self.path, "_array": None}


class HardLabels(SoftLabels):
    """A stage's stored distillation labels [N, H, W] (uint8 memmap, 255 = ignored, in the frame of
    the target view's resize) as a stream's extras: frame `i` -> {"label": int64 [H, W]}."""

    def __call__(self, index):
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return {"label": torch.from_numpy(np.asarray(self._array[index], dtype=np.int64))}


def initial_prototypes(sums, counts, min_pixels=10, epochs=4, cap=3000):
    """The initial prototypes [C, D] as `calc_prototype.py` averages them, from per-image class
    feature sums [N, C, D] and pixel counts [N, C] in frame order: for `epochs` passes over the
    images, each class with at least `min_pixels` pixels in an image moves its prototype to the
    running mean `(eta * n + v) / (n + 1)` of the image's class mean `v`, `n` capped at `cap`
    (`update_objective_SingleVector(..., 'mean')`). A class no image has stays 0."""
    sums = sums.to(torch.float64)
    n_images, num_classes, dim = sums.shape
    proto = torch.zeros(num_classes, dim, dtype=torch.float64, device=sums.device)
    seen = torch.zeros(num_classes, dtype=torch.float64, device=sums.device)
    kept = counts >= min_pixels
    means = sums / counts.clamp(min=1).unsqueeze(-1).to(torch.float64)
    for _ in range(epochs):
        for i in range(n_images):
            ok = kept[i]
            if not bool(ok.any()):
                continue
            n = seen[ok].unsqueeze(1)
            proto[ok] = (proto[ok] * n + means[i, ok]) / (n + 1)
            seen[ok] = (seen[ok] + 1).clamp(max=cap)
    return proto


@torch.no_grad()
def distillation_labels(logits, flipped_logits, size, threshold):
    """Hard labels [B, H, W] as `generate_pseudo_label.py --flip` makes them and the code's dataset
    thresholds them: the softmax of `logits` and of `flipped_logits` (the network on the mirrored
    images; None = no mirror averaging), upsampled bilinearly (align_corners=True) to `size`, the
    mirror's flipped back, averaged; the argmax, ignored (255) where the confidence is <= `threshold`."""
    views = [view_probabilities(logits, size, resize_probabilities=True)]
    if flipped_logits is not None:
        views.append(view_probabilities(flipped_logits, size, mirrored=True, resize_probabilities=True))
    return confident_labels(average(views), threshold)


def confident_labels(probs, threshold):
    """The argmax of `probs` [B, C, H, W], ignored (255) where the top probability is <= `threshold`."""
    conf, labels = probs.max(1)
    return labels.masked_fill(conf <= threshold, IGNORE_INDEX)


class ProDA(Method):
    name = "proda"
    defaults = {
        # iterations of each stage; None = train.iters
        "warmup_iters": None, "stage1_iters": None, "stage2_iters": None, "stage3_iters": None,
        # warm-up: output-space adversarial training
        "adv_weight": 0.01, "gan": "lsgan", "disc_lr": 1.0e-4,
        "disc_ndf": 64,              # discriminator width (models/discriminator.py FCDiscriminator: 64, 128, 256, 512, 1)
        "adv_scale": 1.0,            # the discriminator sees predictions at this fraction of the input size
        "disc_weights": [1.0, 1.0],  # of L(source, 0), L(target, 1): adaptation_modelv2.py step_adv sums them
        # initial prototypes: calc_prototype.py's running mean of per-image class means ("image_mean",
        # over proto_init_epochs passes, count capped at proto_init_cap) or "pixel_mean"
        "proto_init": "image_mean", "proto_init_epochs": 4, "proto_init_cap": 3000,
        # stage 1 (the authors' code trains every layer at this lr here: no heads x10)
        "stage1_lr": 1.0e-4,
        "tau": 1.0,                  # prototype softmax temperature
        "rectify": True,             # prototype denoising (--proto_rectify); false: y_hat = argmax p_{t,0}
        "ce_weight": 0.1,            # alpha of the symmetric CE on y_hat
        "rce_weight": 1.0,           # beta
        "reg_weight": 0.1,           # the REG term of sce_loss
        "kl_weight": 10.0,           # structure learning (0: off, and the student's strong view is not run)
        "rectify_threshold": 0.0,    # y_hat ignored where the normalised rectified score is below (code: train_thred, 0)
        # the view the SCE + REG terms see: "weak" (the stage-1 command runs S_pseudo 0:
        # adaptation_modelv2.py step takes them on BaseNet(target_x)) or "strong"
        "pl_view": "weak",
        # the EMA teacher's forward: in train mode with batch statistics (adaptation_modelv2.py never
        # puts BaseNet_ema in eval mode), on the whole frame taken into the weak view (target_image_full,
        # full2weak); false, false = eval mode on the weak view
        "teacher_batch_stats": True, "teacher_full_frame": True,
        "ema_momentum": 0.999,
        "proto_momentum": 0.9999,
        "proto_min_pixels": 10,
        # stages 2 and 3
        "distill_lr": 6.0e-4,        # heads x10
        "distill_threshold": 0.95,
        "distill_flip": True,        # generate_pseudo_label.py --flip: labels from the image and its mirror
        # beyond the authors' code: the labels averaged over these scales of the frame (and their mirrors),
        # and made by sliding windows crop [H, W] every stride [H, W] (udafast.inference)
        "distill_scales": [1.0], "distill_slide": {"crop": None, "stride": None},
        "distill_kl_weight": 1.0,
        "distill_source_ce": False,  # the authors' code also back-propagates source CE here
        "code_kl_softmax": False,    # *code:* its KL takes the student's softmax where log-softmax belongs
        # stage 2's student: a checkpoint or weights path (the authors: SimCLRv2, --student_init simclr);
        # "@ssl_source" = the SimCLR pretraining of the backbone on the source images (ssl_source, the
        # embedded benchmark's stand-in, trained first by run_method); None = the run's init. Stage 3's
        # continues from stage 2's network (the README's stage-3 command restores it) unless
        # stage3_from_stage2 is false (then as stage 2's)
        "student_init": None,
        "stage3_from_stage2": True,
        # the network each stage hands on (its soft / distillation labels, stage 3's student): the
        # best-on-val one, as README.md's commands pass each stage's *_best_model.pkl on; "last" takes
        # the stage's final weights. Without validation within a stage (train.eval_every 0) they agree
        "next_from": "best",
        # batch size of the passes over the target set (None = data.batch_size)
        "pass_batch_size": None,
    }

    def __init__(self, config: dict, ctx: RunContext):
        super().__init__(config, ctx)
        o = self.options
        for key in ("warmup_iters", "stage1_iters", "stage2_iters", "stage3_iters", "pass_batch_size", "disc_ndf",
                    "proto_init_epochs", "proto_init_cap"):
            v = o[key]
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"proda.{key}: expected a positive int or None, got {v!r}")
        for key in ("adv_weight", "ce_weight", "rce_weight", "reg_weight", "kl_weight", "distill_kl_weight",
                    "rectify_threshold"):
            if isinstance(o[key], bool) or not isinstance(o[key], (int, float)) or o[key] < 0:
                raise ValueError(f"proda.{key}: expected a number >= 0, got {o[key]!r}")
        for key in ("disc_lr", "stage1_lr", "distill_lr", "tau"):
            if isinstance(o[key], bool) or not isinstance(o[key], (int, float)) or not o[key] > 0:
                raise ValueError(f"proda.{key}: expected a number > 0, got {o[key]!r}")
        for key in ("ema_momentum", "proto_momentum", "distill_threshold"):
            if isinstance(o[key], bool) or not isinstance(o[key], (int, float)) or not 0 <= o[key] <= 1:
                raise ValueError(f"proda.{key}: expected a number in [0, 1], got {o[key]!r}")
        if isinstance(o["proto_min_pixels"], bool) or not isinstance(o["proto_min_pixels"], int) \
                or o["proto_min_pixels"] < 1:
            raise ValueError(f"proda.proto_min_pixels: expected a positive int, got {o['proto_min_pixels']!r}")
        check_scale(o["adv_scale"], "proda.adv_scale")
        if o["gan"] not in GANS:
            raise ValueError(f"proda.gan: expected one of {GANS}, got {o['gan']!r}")
        for key in ("distill_source_ce", "code_kl_softmax", "rectify", "teacher_batch_stats", "teacher_full_frame",
                    "stage3_from_stage2"):
            if not isinstance(o[key], bool):
                raise ValueError(f"proda.{key}: expected a bool, got {o[key]!r}")
        for key, choices in (("proto_init", ("image_mean", "pixel_mean")), ("pl_view", ("weak", "strong")),
                             ("next_from", ("best", "last"))):
            if o[key] not in choices:
                raise ValueError(f"proda.{key}: expected one of {choices}, got {o[key]!r}")
        weights = o["disc_weights"]
        if not isinstance(weights, (list, tuple)) or len(weights) != 2 or any(
                isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 for w in weights):
            raise ValueError(f"proda.disc_weights: expected two numbers >= 0, got {weights!r}")
        init = o["student_init"]
        if init is not None and (not isinstance(init, str) or not init or (init.startswith("@") and init != SSL_INIT)):
            raise ValueError(f"proda.student_init: expected a checkpoint path, {SSL_INIT!r} or null, got {init!r}")
        # the distillation labels' test-time augmentation; the soft labels and initial prototypes have
        # none (the authors make them from the plain image)
        self.distill_inference = InferenceOptions.from_config(o, "proda", flip="distill_flip",
                                                              scales="distill_scales", slide="distill_slide")
        self.num_classes = int(config["model"].get("num_classes", 19))
        self.stage = None
        self.prototypes = None
        self.teacher = None      # stage 1: EMATeacher; stages 2/3: the frozen previous network
        self.adversary = None

    @staticmethod
    def model_overrides(model_config):
        """ProDA's 256-d feature head where the network has a choice (the small model always has one)."""
        return {"head": "proda"} if model_config.get("name") == "deeplabv2_r101" else {}

    @property
    def soft_labels_path(self):
        return os.path.join(self.ctx.out_dir, "proda", SOFT_LABELS)

    # -- stages ---------------------------------------------------------------------------------
    @classmethod
    def stage_names(cls, config: dict) -> list:
        return list(STAGES)

    def stages(self):
        default = int(self.config["train"]["iters"])
        return [Stage(s, self.options[f"{s}_iters"] or default, next_from=self.options["next_from"]) for s in STAGES]

    def start_stage(self, stage, model, resume=False):
        self.stage = stage.name
        self.modules, self.optimizers = {}, {}
        self.prototypes = self.teacher = self.adversary = None
        self.ctx.target_stream.set_extras(None)
        spec = self.config["optimizer"]
        o = self.options
        if stage.name == "warmup":
            self.model = model
            self.optimizers["model"] = build_optimizer(model.param_groups(spec["lr"]), spec)
            self.adversary = OutputSpaceAdversary(("main",), self.num_classes, o["gan"],
                                                  optimizer={"lr": o["disc_lr"]}, device=self.device,
                                                  ndf=o["disc_ndf"], disc_weights=o["disc_weights"],
                                                  discriminator=ProDADiscriminator)
            self.adversary.register(self)
        elif stage.name == "stage1":
            self.model = model
            lr = o["stage1_lr"]
            groups = [dict(g, lr=lr) for g in model.param_groups(lr)]  # every layer at lr
            self.optimizers["model"] = build_optimizer(groups, merge(spec, {"lr": lr}))
            self.prototypes = self._target_pass(model, need_prototypes=not resume)
            self.teacher = EMATeacher(model)
            self.modules["teacher"] = self.teacher
            self.ctx.target_stream.set_extras(SoftLabels(self.soft_labels_path))
        else:
            self.teacher = model.eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            path = self._distill_pass(self.teacher, stage.name)
            self.ctx.target_stream.set_extras(HardLabels(path))
            if stage.name == "stage3" and o["stage3_from_stage2"]:
                self.model = copy.deepcopy(model)
                for p in self.model.parameters():
                    p.requires_grad_(True)
                start = "stage 2's network"
            elif o["student_init"] == SSL_INIT:
                raise ValueError(f"proda.student_init: {SSL_INIT!r} becomes the pretraining's checkpoint in "
                                 f"udafast.engine.runs.run_method (python -m udafast.train); a Trainer alone needs "
                                 f"a checkpoint path")
            elif o["student_init"]:
                # a checkpoint's fitting weights (its heads of another shape start fresh); from ssl_source,
                # the self-supervised backbone with the segmentation heads as that run initialised them
                self.model = self.ctx.build_model(init=o["student_init"])
                start = o["student_init"]
            else:
                self.model = self.ctx.build_model()
                start = f"the run's init ({self.config.get('init') or 'none: the model config weights'})"
            self.model.train()
            lr = o["distill_lr"]
            self.optimizers["model"] = build_optimizer(self.model.param_groups(lr), merge(spec, {"lr": lr}))
            self.ctx.log(f"proda {stage.name}: distilling into a student from {start}")

    def _truth_at(self, batch, size):
        """The batch's true target labels at `size` (nearest), or None where the run has none."""
        truth = batch.get("truth")
        if truth is None:
            return None
        return nearest_labels(truth, size)

    @torch.no_grad()
    def _target_pass(self, model, need_prototypes=True):
        """One pass of the warm-up network (eval mode) over the target training frames: writes the
        soft labels (unless a complete file is there), scores their argmax (`p_t0`) and returns the
        initial prototypes [C, D] (or None). Under several processes each takes its share of the
        frames; the soft labels go into one shared file and the class sums are added up."""
        o = self.options
        path = self.soft_labels_path
        n_frames = len(self.ctx.target)
        have_soft = _complete(path, np.float16, (n_frames, self.num_classes), ndim=4)
        if have_soft and not need_prototypes:
            self.ctx.log(f"proda: reusing the soft labels in {path}")
            return None
        was_training = model.training
        model.eval()
        try:
            size, dim = self._output_shape(model)
            # per image and class: feature sums and pixel counts (calc_prototype.py averages image means)
            sums = torch.zeros(n_frames, self.num_classes, dim, dtype=torch.float64, device=self.device)
            counts = torch.zeros(n_frames, self.num_classes, dtype=torch.int64, device=self.device)
            with contextlib.ExitStack() as stack:
                soft = None
                if not have_soft:
                    soft = stack.enter_context(self.ctx.shared_array(
                        path, np.float16, (n_frames, self.num_classes) + size))
                for batch in self.ctx.target_frames(o["pass_batch_size"], shard=True):
                    out = model(self.normalize(batch["image"], model))
                    logits, features = out["logits"], out["features"]
                    if tuple(logits.shape[-2:]) != size:
                        raise ValueError(f"proda: target frames of different sizes ({tuple(logits.shape[-2:])} "
                                         f"against {size} at the output stride); set data.target_view.resize")
                    pred = logits.argmax(1)
                    self.record_labels("p_t0", pred, self._truth_at(batch, size))
                    if soft is not None:
                        soft[batch["index"].numpy()] = F.softmax(logits, dim=1).to(torch.float16).cpu().numpy()
                    if need_prototypes:
                        s, c = class_feature_sums(features.float(), pred, self.num_classes, backend=self.backend)
                        index = batch["index"].to(self.device)
                        sums[index] = s.double()
                        counts[index] = c
            if soft is not None:
                self.ctx.log(f"proda: soft labels of {n_frames} target frames written to {path}")
        finally:
            model.train(was_training)
        if not need_prototypes:
            return None
        self.ctx.all_reduce_(sums)   # each frame's row comes from one process, zeros elsewhere
        self.ctx.all_reduce_(counts)
        if o["proto_init"] == "image_mean":
            prototypes = initial_prototypes(sums, counts, o["proto_min_pixels"], o["proto_init_epochs"],
                                            o["proto_init_cap"])
            present = counts >= o["proto_min_pixels"]
        else:
            total = counts.sum(0)
            prototypes = torch.where(total[:, None] > 0, sums.sum(0) / total.clamp(min=1)[:, None].double(),
                                     torch.zeros_like(sums[0]))
            present = counts > 0
        missing = [c for c in range(self.num_classes) if not bool(present[:, c].any())]
        if missing:
            self.ctx.log(f"proda: classes {missing} never predicted on the target set; their prototypes start at 0")
        return prototypes.float()

    @torch.no_grad()
    def _distill_pass(self, teacher, stage_name):
        """The stage's distillation labels from `teacher` over the target frames (`distillation_labels`,
        mirror-averaged with `distill_flip`, over `distill_scales`, by `distill_slide` windows), written
        once to `<out_dir>/proda/<stage>_labels.npy` (uint8, reused when complete) and scored
        (`distill`) -> the file's path."""
        o = self.options
        path = os.path.join(self.ctx.out_dir, "proda", f"{stage_name}_labels.npy")
        n_frames = len(self.ctx.target)
        frame = self.ctx.target_frame_size()
        if _complete(path, np.uint8, (n_frames,) + frame, ndim=3):
            self.ctx.log(f"proda {stage_name}: reusing the labels in {path}")
            stored = np.load(path, mmap_mode="r")
            for batch in self.ctx.target_frames(o["pass_batch_size"], shard=True):
                self.record_labels("distill", torch.from_numpy(np.asarray(stored[batch["index"].numpy()])),
                                   batch.get("truth"))
            return path
        with self.ctx.shared_array(path, np.uint8, (n_frames,) + frame) as labels_file:
            for batch in self.ctx.target_frames(o["pass_batch_size"], shard=True):
                probs = infer_probabilities(teacher, batch["image"].to(self.device), frame, self.distill_inference,
                                            normalize=lambda x: self.normalize(x, teacher), resize_probabilities=True)
                labels = confident_labels(probs, o["distill_threshold"])
                labels_file[batch["index"].numpy()] = labels.to(torch.uint8).cpu().numpy()
                self.record_labels("distill", labels, batch.get("truth"))
        self.ctx.log(f"proda {stage_name}: labels of {n_frames} target frames written to {path}")
        return path

    def _output_shape(self, model):
        """((h, w) of the logits, feature channels) for the first target frame (that reads, under
        data.skip_bad_samples)."""
        batch = next(self.ctx.target_frames(1))
        out = model(self.normalize(batch["image"], model))
        return tuple(out["logits"].shape[-2:]), out["features"].shape[1]

    # -- the steps ------------------------------------------------------------------------------
    def step(self, batch, it, iters):
        return {"warmup": self._step_warmup, "stage1": self._step_stage1}.get(self.stage, self._step_distill)(batch)

    def _source_ce(self, source):
        out = self.model(self.normalize(source["image"]))
        return out, seg_loss(out["logits"], source["label"].to(self.device))

    def _step_warmup(self, batch):
        source, target = batch["source"], batch["target"]
        opt = self.optimizers["model"]
        opt.zero_grad(set_to_none=True)
        src_out, loss_src = self._source_ce(source)
        tgt_out = self.model(self.normalize(target["image"]))
        scale = self.options["adv_scale"]
        adv = self.adversary.generator_loss({"main": tgt_out["logits"]}, scaled_size(target["image"], scale))["main"]
        self.backward(loss_src + self.options["adv_weight"] * adv)
        opt.step()
        disc = self.adversary.discriminator_step({"main": src_out["logits"]}, {"main": tgt_out["logits"]},
                                                 scaled_size(source["image"], scale),
                                                 scaled_size(target["image"], scale))["main"]
        return {"seg": loss_src.detach(), "adv": adv.detach(), "disc": disc}

    def _views(self, images):
        """The strong view of the weak `images` (CPU) and its params."""
        return strong_augment(images, self.generator)

    def teacher_outputs(self, target, size):
        """The EMA teacher on the target batch -> (its features taken into the weak view at `size`, its
        features and logits on what it saw at a quarter of that size). It sees the whole frames
        (`teacher_full_frame`) in train mode (`teacher_batch_stats`), as adaptation_modelv2.py runs
        `BaseNet_ema` on `target_image_full` and `full2weak` takes its features into the weak view."""
        o = self.options
        full = o["teacher_full_frame"]
        images = target["frame"] if full else target["image"]
        teacher = self.teacher.model
        teacher.train(o["teacher_batch_stats"])
        try:
            with torch.no_grad():
                out = teacher(self.normalize(images, teacher))
        finally:
            teacher.eval()
        quarter = (images.shape[-2] // 4, images.shape[-1] // 4)
        feats, logits = upsample(out["features"].float(), quarter), upsample(out["logits"].float(), quarter)
        weak = frame_to_view(feats, target["geometry"], images.shape[-2:], size) if full else feats
        return weak, feats, logits

    def stage1_targets(self, weak_feats, soft, size):
        """From the teacher's features on the weak view [B, D, h, w] and the weak view's soft labels
        (any size, resized to `size`): (y_hat [B, h, w], w = the teacher's prototype softmax or None
        when nothing needs it). y_hat = argmax_c(w_c p_{t,0,c}) with `rectify`, else argmax p_{t,0}."""
        o = self.options
        soft = upsample(soft.to(weak_feats.device, torch.float32), size)
        z = None
        if o["kl_weight"] > 0 or (o["rectify"] and o["rectify_threshold"] > 0):
            z = prototype_softmax(weak_feats, self.prototypes, o["tau"], backend=self.backend)
        if not o["rectify"]:
            return soft.argmax(1), z
        y_hat = prototype_rectify(weak_feats, self.prototypes, soft, o["tau"], backend=self.backend)
        if o["rectify_threshold"] > 0:
            rectified = z * soft
            score = rectified.max(1).values / rectified.sum(1).clamp_min(1e-12)
            y_hat = y_hat.masked_fill(score < o["rectify_threshold"], IGNORE_INDEX)
        return y_hat, z

    def structure_loss(self, student_strong_out, z, params, size):
        """KL_struct: the teacher's prototype softmax `z` (weak view) warped into the strong view
        (cutout and out-of-image pixels left out) against the student's prototype log-softmax on the
        strong view, at `size`."""
        o = self.options
        z_strong = warp_like(z, params, "bilinear").to(self.device)
        valid = (warp_like(torch.ones(z.shape[:1] + z.shape[2:], dtype=torch.float32, device=z.device), params,
                           "nearest", fill=0.0, cutout_fill=0.0) > 0.5).to(self.device)
        feats = upsample(student_strong_out["features"], size)
        # kl_loss takes logits: the log-softmax -d/tau - logsumexp is one (log_softmax is idempotent)
        log_w = prototype_softmax(feats, self.prototypes, o["tau"], log=True, backend=self.backend)
        return kl_loss(log_w, z_strong, valid_mask=valid, backend=self.backend)

    def _step_stage1(self, batch):
        o = self.options
        source, target = batch["source"], batch["target"]
        weak = target["image"]
        size = (weak.shape[-2] // 4, weak.shape[-1] // 4)
        weak_feats, seen_feats, seen_logits = self.teacher_outputs(target, size)
        y_hat, z = self.stage1_targets(weak_feats, target["maps"]["soft"], size)
        self.record_labels("y_hat", y_hat, self._truth_at(target, size))
        opt = self.optimizers["model"]
        opt.zero_grad(set_to_none=True)
        _, loss_src = self._source_ce(source)
        strong_out = params = None
        if o["kl_weight"] > 0 or o["pl_view"] == "strong":
            strong, params = self._views(weak)
            strong_out = self.model(self.normalize(strong))
        if o["pl_view"] == "weak":
            pl_logits, y = self.model(self.normalize(weak))["logits"], y_hat
        else:
            pl_logits, y = strong_out["logits"], warp_like(y_hat, params, "nearest", cutout_fill=IGNORE_INDEX)
        pl = sce_loss(upsample(pl_logits, size), y.to(self.device), alpha=o["ce_weight"], beta=o["rce_weight"],
                      reg_weight=o["reg_weight"], backend=self.backend)
        loss = loss_src + pl
        logged = {"seg": loss_src.detach(), "pl": pl.detach()}
        if o["kl_weight"] > 0:
            kl = self.structure_loss(strong_out, z, params, size)
            loss = loss + o["kl_weight"] * kl
            logged["kl"] = kl.detach()
        self.backward(loss)
        opt.step()
        # the prototypes follow the teacher's class means on what it saw (adaptation_modelv2.py: ema_out)
        sums, counts = class_feature_sums(seen_feats, seen_logits.argmax(1), self.num_classes, backend=self.backend)
        update_prototypes(self.prototypes, sums, counts, momentum=o["proto_momentum"],
                          min_pixels=o["proto_min_pixels"], all_gather=self.ctx.all_gather)
        self.teacher.update(self.model, o["ema_momentum"])
        return logged

    def distill_losses(self, student_logits, teacher_probs, labels):
        """{"ce": CE(labels), "kd": KL(teacher || student)} (the code's softmax-for-log-softmax KL with
        `code_kl_softmax`), on tensors at the same size."""
        ce = seg_loss(student_logits, labels)
        if self.options["code_kl_softmax"]:
            # F.kl_div(softmax(student), teacher) of the authors' code, averaged over every element
            kd = (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * F.softmax(student_logits, 1)).mean()
        else:
            kd = kl_loss(student_logits, teacher_probs, backend=self.backend)
        return {"ce": ce, "kd": kd}

    def _step_distill(self, batch):
        o = self.options
        source, target = batch["source"], batch["target"]
        weak = target["image"]
        size = (weak.shape[-2] // 4, weak.shape[-1] // 4)
        strong, params = self._views(weak)
        # the stage's labels follow the weak view, then a quarter of it (nearest, as the code's
        # interpolate(target_lp, scale_factor=0.25)) and the strong view
        labels = nearest_labels(target["label"], size)
        labels = warp_like(labels, params, "nearest", cutout_fill=IGNORE_INDEX)
        with torch.no_grad():
            t_probs = F.softmax(upsample(self.teacher(self.normalize(strong, self.teacher))["logits"].float(), size), 1)
        opt = self.optimizers["model"]
        opt.zero_grad(set_to_none=True)
        logits = upsample(self.model(self.normalize(strong))["logits"], size)
        losses = self.distill_losses(logits, t_probs, labels.to(self.device))
        loss = losses["ce"] + o["distill_kl_weight"] * losses["kd"]
        logged = {k: v.detach() for k, v in losses.items()}
        if o["distill_source_ce"]:
            _, loss_src = self._source_ce(source)
            loss = loss + loss_src
            logged["seg"] = loss_src.detach()
        self.backward(loss)
        opt.step()
        return logged

    # -- state ----------------------------------------------------------------------------------
    def extra_state(self):
        return {} if self.prototypes is None else {"prototypes": self.prototypes.detach().cpu().clone()}

    def load_extra_state(self, state):
        if self.stage == "stage1":
            if "prototypes" not in state:
                raise ValueError("proda: the stage-1 checkpoint has no prototypes")
            self.prototypes = state["prototypes"].to(self.device, torch.float32).clone()


def _complete(path, dtype, shape, ndim):
    """A stored array is there (written whole: it is renamed into place at the end), of `dtype` and
    `ndim` dimensions, its shape starting with `shape`."""
    if not os.path.isfile(path):
        return False
    try:
        array = np.load(path, mmap_mode="r")
    except ValueError:
        return False
    return array.dtype == dtype and array.ndim == ndim and array.shape[:len(shape)] == tuple(shape)
