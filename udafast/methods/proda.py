"""ProDA: prototypical pseudo-label denoising and target structure learning.

Zhang, Zhang, Zhang, Chen, Wang, Wen, "Prototypical Pseudo Label Denoising and Target Structure
Learning for Domain Adaptive Semantic Segmentation", CVPR 2021 (SPEC part 2). Four stages:

- `warmup`: `L = CE_src + 0.01 L_adv`, single-level output-space adversarial training (LS-GAN).
- start of `stage1`, with the warm-up network: the fixed soft labels `p_{t,0}` (its softmax on every
  target training frame at the output stride, float16 in `<out_dir>/proda/soft_labels.npy`, outside
  the checkpoints), the initial prototypes `eta_c` (class means of the head features over the target
  set, class = the warm-up argmax; a class never predicted keeps a zero prototype until the teacher
  predicts it), and the EMA teacher (a copy, momentum 0.999).
- `stage1`: with `w = prototype_softmax(teacher features of the weak view)`,
  `y_hat = argmax_c(w_c p_{t,0,c})` warped into the strong view (cutout and out-of-image pixels
  ignored), and the student on the strong view,
      `L = CE_src + (0.1 CE + 1.0 RCE)(y_hat) + 0.1 REG + 10 KL(w_strong || softmax(-d_student / tau))`,
  all target terms at a quarter of the crop (stride-8 outputs upsampled). After each step the
  prototypes move towards the teacher's per-image class means (SPEC 1.3) and the teacher towards the
  student.
- `stage2`, `stage3`: self-distillation of the previous stage's network (frozen) into a fresh student
  (`ctx.build_model()`: the run's init, i.e. the warm-up's initialisation; no self-supervised
  weights here): `L = CE(y) + KL(teacher || student)` on the strong view, `y` = the teacher's argmax
  on the weak view where its confidence exceeds 0.95 (else ignored).
"""
import contextlib
import os

import numpy as np
import torch
import torch.nn.functional as F

from udafast.data.labels import IGNORE_INDEX
from udafast.data.transforms import strong_augment, warp_like
from udafast.engine.config import merge
from udafast.methods.adversarial import GANS, OutputSpaceAdversary, check_scale, scaled_size
from udafast.methods.base import EMATeacher, Method, Stage, build_optimizer, seg_loss, upsample
from udafast.ops import class_feature_sums, kl_loss, prototype_rectify, prototype_softmax, sce_loss, update_prototypes

__all__ = ["ProDA", "SoftLabels"]

STAGES = ("warmup", "stage1", "stage2", "stage3")
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
        return {"soft": torch.from_numpy(np.asarray(self._array[index], dtype=np.float32))}

    def __getstate__(self):
        return {"path": self.path, "_array": None}


class ProDA(Method):
    name = "proda"
    defaults = {
        # iterations of each stage; None = train.iters
        "warmup_iters": None, "stage1_iters": None, "stage2_iters": None, "stage3_iters": None,
        # warm-up: output-space adversarial training
        "adv_weight": 0.01, "gan": "lsgan", "disc_lr": 1.0e-4,
        "disc_ndf": 64,              # discriminator width (64, 128, 256, 512, 1 channels)
        "adv_scale": 1.0,            # the discriminator sees predictions at this fraction of the input size
        # stage 1 (the authors' code trains every layer at this lr here: no heads x10)
        "stage1_lr": 1.0e-4,
        "tau": 1.0,                  # prototype softmax temperature
        "ce_weight": 0.1,            # alpha of the symmetric CE on y_hat
        "rce_weight": 1.0,           # beta
        "reg_weight": 0.1,           # the REG term of sce_loss
        "kl_weight": 10.0,           # structure learning
        "rectify_threshold": 0.0,    # y_hat ignored where the normalised rectified score is below (code: train_thred, 0)
        "ema_momentum": 0.999,
        "proto_momentum": 0.9999,
        "proto_min_pixels": 10,
        # stages 2 and 3
        "distill_lr": 6.0e-4,        # heads x10
        "distill_threshold": 0.95,
        "distill_kl_weight": 1.0,
        "distill_source_ce": False,  # the authors' code also back-propagates source CE here
        "code_kl_softmax": False,    # *code:* its KL takes the student's softmax where log-softmax belongs
        # batch size of the pass over the target set at the start of stage 1 (None = data.batch_size)
        "pass_batch_size": None,
    }

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        o = self.options
        for key in ("warmup_iters", "stage1_iters", "stage2_iters", "stage3_iters", "pass_batch_size", "disc_ndf"):
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
        for key in ("distill_source_ce", "code_kl_softmax"):
            if not isinstance(o[key], bool):
                raise ValueError(f"proda.{key}: expected a bool, got {o[key]!r}")
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
    def stages(self):
        default = int(self.config["train"]["iters"])
        return [Stage(s, self.options[f"{s}_iters"] or default) for s in STAGES]

    def start_stage(self, stage, model, resume=False):
        self.stage = stage.name
        self.modules, self.optimizers = {}, {}
        self.prototypes = self.teacher = self.adversary = None
        self.ctx.target_stream.set_extras(None)
        spec = self.config["optimizer"]
        if stage.name == "warmup":
            self.model = model
            self.optimizers["model"] = build_optimizer(model.param_groups(spec["lr"]), spec)
            self.adversary = OutputSpaceAdversary(("main",), self.num_classes, self.options["gan"],
                                                  optimizer={"lr": self.options["disc_lr"]}, device=self.device,
                                                  ndf=self.options["disc_ndf"])
            self.adversary.register(self)
        elif stage.name == "stage1":
            self.model = model
            lr = self.options["stage1_lr"]
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
            self.model = self.ctx.build_model()
            lr = self.options["distill_lr"]
            self.optimizers["model"] = build_optimizer(self.model.param_groups(lr), merge(spec, {"lr": lr}))
            self.ctx.log(f"proda {stage.name}: distilling into a fresh student from the run's init "
                         f"({self.config.get('init') or 'no init: the model config weights'})")

    @torch.no_grad()
    def _target_pass(self, model, need_prototypes=True):
        """One pass of the warm-up network over the target training frames: writes the soft labels
        (unless a complete file is there) and returns the initial prototypes [C, D] (or None).
        Under several processes each takes its share of the frames; the soft labels go into one
        shared file and the class sums are added up."""
        path = self.soft_labels_path
        have_soft = _complete(path, len(self.ctx.target), self.num_classes)
        if have_soft and not need_prototypes:
            self.ctx.log(f"proda: reusing the soft labels in {path}")
            return None
        was_training = model.training
        model.eval()
        try:
            size, dim = self._output_shape(model)
            sums = torch.zeros(self.num_classes, dim, dtype=torch.float64, device=self.device)
            counts = torch.zeros(self.num_classes, dtype=torch.int64, device=self.device)
            with contextlib.ExitStack() as stack:
                soft = None
                if not have_soft:
                    soft = stack.enter_context(self.ctx.shared_array(
                        path, np.float16, (len(self.ctx.target), self.num_classes) + size))
                for batch in self.ctx.target_frames(self.options["pass_batch_size"], shard=True):
                    out = model(self.normalize(batch["image"], model))
                    logits, features = out["logits"], out["features"]
                    if soft is not None:
                        if tuple(logits.shape[-2:]) != size:
                            raise ValueError(f"proda: target frames of different sizes ({tuple(logits.shape[-2:])} "
                                             f"against {size} at the output stride); set data.target_view.resize")
                        soft[batch["index"].numpy()] = F.softmax(logits, dim=1).to(torch.float16).cpu().numpy()
                    if need_prototypes:
                        s, c = class_feature_sums(features.float(), logits.argmax(1), self.num_classes,
                                                  backend=self.backend)
                        sums += s.sum(0).double()
                        counts += c.sum(0)
            if soft is not None:
                self.ctx.log(f"proda: soft labels of {len(self.ctx.target)} target frames written to {path}")
        finally:
            model.train(was_training)
        if not need_prototypes:
            return None
        self.ctx.all_reduce_(sums)
        self.ctx.all_reduce_(counts)
        prototypes = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None].double(),
                                 torch.zeros_like(sums)).float()
        missing = [c for c in range(self.num_classes) if counts[c] == 0]
        if missing:
            self.ctx.log(f"proda: classes {missing} never predicted on the target set; their prototypes start at 0")
        return prototypes

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
        (loss_src + self.options["adv_weight"] * adv).backward()
        opt.step()
        disc = self.adversary.discriminator_step({"main": src_out["logits"]}, {"main": tgt_out["logits"]},
                                                 scaled_size(source["image"], scale),
                                                 scaled_size(target["image"], scale))["main"]
        return {"seg": loss_src.detach(), "adv": adv.detach(), "disc": disc}

    def _views(self, images):
        """The strong view of the weak `images` (CPU) and its params."""
        return strong_augment(images, self.generator)

    def stage1_targets(self, teacher_out, soft, params, size):
        """From the teacher's outputs on the weak view, the soft labels and the strong view's params:
        (y_hat warped into the strong view [B, h, w], the teacher's prototype softmax warped [B, C, h, w],
        the valid mask [B, h, w], the teacher's features and argmax at `size` for the prototype update)."""
        o = self.options
        feats = upsample(teacher_out["features"].float(), size)
        pred = upsample(teacher_out["logits"].float(), size).argmax(1)
        soft = upsample(soft.to(feats.device, torch.float32), size)
        y_hat = prototype_rectify(feats, self.prototypes, soft, o["tau"], backend=self.backend)
        z = prototype_softmax(feats, self.prototypes, o["tau"], backend=self.backend)
        if o["rectify_threshold"] > 0:
            rectified = z * soft
            score = rectified.max(1).values / rectified.sum(1).clamp_min(1e-12)
            y_hat = y_hat.masked_fill(score < o["rectify_threshold"], IGNORE_INDEX)
        y_strong = warp_like(y_hat, params, "nearest", cutout_fill=IGNORE_INDEX)
        z_strong = warp_like(z, params, "bilinear")
        # pixels of the strong view that come from the image and lie outside the cutout
        valid = warp_like(torch.ones_like(y_hat, dtype=torch.float32), params, "nearest", fill=0.0,
                          cutout_fill=0.0) > 0.5
        return y_strong, z_strong, valid, feats, pred

    def stage1_losses(self, student_out, y_strong, z_strong, valid, size):
        """{"pl": (ce_weight CE + rce_weight RCE + reg_weight REG)(y_hat), "kl": KL_struct} of the
        student's outputs on the strong view, at `size`."""
        o = self.options
        logits = upsample(student_out["logits"], size)
        feats = upsample(student_out["features"], size)
        pl = sce_loss(logits, y_strong, alpha=o["ce_weight"], beta=o["rce_weight"], reg_weight=o["reg_weight"],
                      backend=self.backend)
        # kl_loss takes logits: the log-softmax -d/tau - logsumexp is one (log_softmax is idempotent)
        log_w = prototype_softmax(feats, self.prototypes, o["tau"], log=True, backend=self.backend)
        kl = kl_loss(log_w, z_strong, valid_mask=valid, backend=self.backend)
        return {"pl": pl, "kl": kl}

    def _step_stage1(self, batch):
        o = self.options
        source, target = batch["source"], batch["target"]
        weak = target["image"]
        size = (weak.shape[-2] // 4, weak.shape[-1] // 4)
        with torch.no_grad():
            t_out = self.teacher.model(self.normalize(weak))
        strong, params = self._views(weak)
        y_strong, z_strong, valid, t_feats, t_pred = self.stage1_targets(t_out, target["maps"]["soft"], params, size)
        opt = self.optimizers["model"]
        opt.zero_grad(set_to_none=True)
        _, loss_src = self._source_ce(source)
        losses = self.stage1_losses(self.model(self.normalize(strong)), y_strong.to(self.device),
                                    z_strong.to(self.device), valid.to(self.device), size)
        (loss_src + losses["pl"] + o["kl_weight"] * losses["kl"]).backward()
        opt.step()
        sums, counts = class_feature_sums(t_feats, t_pred, self.num_classes, backend=self.backend)
        update_prototypes(self.prototypes, sums, counts, momentum=o["proto_momentum"],
                          min_pixels=o["proto_min_pixels"])
        self.teacher.update(self.model, o["ema_momentum"])
        return {"seg": loss_src.detach(), "pl": losses["pl"].detach(), "kl": losses["kl"].detach()}

    def distill_targets(self, teacher_weak_logits, params, size):
        """Hard labels of the teacher on the weak view (confidence > threshold, else ignored), warped
        into the strong view (cutout and out-of-image pixels ignored)."""
        probs = F.softmax(upsample(teacher_weak_logits.float(), size), dim=1)
        conf, labels = probs.max(1)
        labels = labels.masked_fill(conf <= self.options["distill_threshold"], IGNORE_INDEX)
        return warp_like(labels, params, "nearest", cutout_fill=IGNORE_INDEX)

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
        with torch.no_grad():
            labels = self.distill_targets(self.teacher(self.normalize(weak, self.teacher))["logits"], params, size)
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
        loss.backward()
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


def _complete(path, n, num_classes):
    """The soft-labels file is there (written whole: it is renamed into place at the end) and fits."""
    if not os.path.isfile(path):
        return False
    try:
        array = np.load(path, mmap_mode="r")
    except ValueError:
        return False
    return array.dtype == np.float16 and array.ndim == 4 and array.shape[:2] == (n, num_classes)
