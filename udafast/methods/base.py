"""What every method is to the trainer.

The trainer draws a batch from each domain and hands it to `method.step(batch, it, iters)`, which
computes the method's loss, steps its optimisers and returns the losses to log. A method runs
one or more stages (`stages()`: CBST's rounds, ProDA's warm-up / stage 1 / 2 / 3); at the start of
each, `start_stage` sets up the network to train (`self.model`) and its optimisers, and may pass
over the target set through `ctx` (pseudo-labels, prototypes): the run as a method sees it, the
`RunContext` protocol of udafast.methods.context. Everything a method adapts beyond the
network's weights (optimisers, teacher, discriminators, prototypes, memory bank, thresholds) lives
in `self.modules` / `self.optimizers` / `extra_state()` and travels with the checkpoint.
"""
import copy
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from udafast.config import merge
from udafast.data.labels import IGNORE_INDEX
from udafast.inference import upsample
from udafast.methods.context import RunContext
from udafast.methods.label_quality import LabelQuality

__all__ = ["Method", "Stage", "is_number", "is_count", "seg_loss", "upsample", "nearest_labels", "EMATeacher",
           "ParameterEMATeacher", "build_optimizer"]


@dataclass(frozen=True)
class Stage:
    """A training stage: `iters` iterations under one network and one set of optimisers.
    `next_from`: the network the next stage starts from, "last" (this stage's final weights) or
    "best" (those of its best evaluation on target val, where `train.eval_every` validates within
    the stage; with no validation there the final weights are also the best-on-val ones)."""
    name: str
    iters: int
    next_from: str = "last"


def nearest_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Label maps [B, H, W] to `size` (H, W) by nearest neighbour, in their dtype: the authors' code's
    `F.interpolate(labels, size / scale_factor)` with its default mode."""
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].to(labels.dtype)


def seg_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy of logits (upsampled to the labels' size) over the labelled pixels; 0 with a
    gradient path when no pixel is labelled (rather than NaN)."""
    logits = upsample(logits, labels.shape[-2:])
    if not bool((labels != ignore_index).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=ignore_index)


def build_optimizer(groups: List[Dict[str, Any]], spec: Mapping[str, Any]) -> torch.optim.Optimizer:
    """An optimiser over param `groups` from an `optimizer:` config entry (sgd, adam or adamw; lr,
    momentum, weight_decay, betas, schedule, power, poly_iters, warmup_iters, warmup_ratio). Each
    group keeps its starting lr as `initial_lr` for the schedule."""
    name = spec.get("name", "sgd")
    for g in groups:
        g.setdefault("lr", spec["lr"])
        g["initial_lr"] = g["lr"]
    if name == "sgd":
        opt = torch.optim.SGD(groups, lr=spec["lr"], momentum=spec.get("momentum", 0.9),
                              weight_decay=spec.get("weight_decay", 0.0))
    elif name in ("adam", "adamw"):
        kind = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        opt = kind(groups, lr=spec["lr"], betas=tuple(spec.get("betas", (0.9, 0.999))),
                   weight_decay=spec.get("weight_decay", 0.0))
    else:
        raise ValueError(f"optimizer.name: expected 'sgd', 'adam' or 'adamw', got {name!r}")
    opt.schedule = spec.get("schedule", "poly")
    opt.power = float(spec.get("power", 0.9))
    if opt.schedule not in ("poly", "constant"):
        raise ValueError(f"optimizer.schedule: expected 'poly' or 'constant', got {opt.schedule!r}")
    # the poly schedule's horizon: None = the stage's iterations; a number N decays as (1 - it / N)^power
    # and the stage may stop before N (AdaptSegNet's code: NUM_STEPS 250000, NUM_STEPS_STOP 150000)
    horizon = spec.get("poly_iters")
    if horizon is not None and (isinstance(horizon, bool) or not isinstance(horizon, int) or horizon <= 0):
        raise ValueError(f"optimizer.poly_iters: expected null or a positive integer, got {horizon!r}")
    opt.poly_iters = horizon
    # mmcv's linear warm-up (DAFormer's poly10warm): over the first warmup_iters iterations the
    # scheduled lr times 1 - (1 - it / warmup_iters) * (1 - warmup_ratio)
    warmup, ratio = spec.get("warmup_iters", 0), spec.get("warmup_ratio", 1e-6)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"optimizer.warmup_iters: expected an integer >= 0, got {warmup!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        raise ValueError(f"optimizer.warmup_ratio: expected a number in [0, 1], got {ratio!r}")
    opt.warmup_iters, opt.warmup_ratio = warmup, float(ratio)
    return opt


class EMATeacher:
    """A copy of the student whose weights are an exponential moving average of the student's
    (buffers such as BatchNorm statistics are copied), kept in eval mode."""

    def __init__(self, student: torch.nn.Module):
        self.model = copy.deepcopy(student)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, student: torch.nn.Module, momentum: float) -> None:
        """Move the teacher's weights towards the student's by `1 - momentum`; copy its buffers."""
        for t, s in zip(self.model.parameters(), student.parameters()):
            t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
        for t, s in zip(self.model.buffers(), student.buffers()):
            t.copy_(s)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)


class ParameterEMATeacher(EMATeacher):
    """The mean teacher of the contrastive script (`create_ema_model`, `update_ema_variables`) and
    of DACS (vikolss/DACS trainUDA.py; lhoyer/DAFormer mmseg/models/uda/dacs.py): an EMA of the
    student's parameters only, its buffers (BatchNorm statistics) its own, its forward in train mode
    (batch statistics). `dropout=False` turns Dropout and DropPath off in it, as DAFormer's
    `forward_train` does before the teacher labels."""

    def __init__(self, student: torch.nn.Module, dropout: bool):
        super().__init__(student)
        self.model.train()
        if not dropout:
            for m in self.model.modules():
                # DropPath: timm's and any module of that name (the MiT backbone's)
                if isinstance(m, torch.nn.modules.dropout._DropoutNd) or type(m).__name__ == "DropPath":
                    m.training = False

    @torch.no_grad()
    def update(self, student: torch.nn.Module, momentum: float) -> None:
        for t, s in zip(self.model.parameters(), student.parameters()):
            t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)


def is_number(value: object) -> bool:
    """An int or float option value (a bool is neither)."""
    return not isinstance(value, bool) and isinstance(value, (int, float))


def is_count(value: object, low: int) -> bool:
    """An int option value (not a bool) of at least `low`."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= low


class Method:
    """Base of the methods; see the module docstring. Subclasses set `name`, `defaults` (their
    config section's keys and values), and implement `step` (and, with stages, `stages` /
    `start_stage`)."""

    name: str = "method"
    defaults: Dict[str, Any] = {}
    #: the method trains on target labels (the oracle): only then are they loaded
    uses_target_labels: bool = False
    #: the method draws target batches at all
    uses_target: bool = True
    #: the network's options this method needs (e.g. ProDA's feature head), merged over the config's;
    #: or a static function of the model config returning them (keys depend on the model's name)
    model_overrides: Union[Dict[str, Any], Callable[[Dict[str, Any]], Dict[str, Any]]] = {}

    def __init__(self, config: Dict[str, Any], ctx: RunContext):
        """`config`: the run's resolved config (this method's section checked against `defaults`
        here); `ctx`: the run it trains in."""
        self.config = config
        section = config.get(self.name) or {}
        unknown = sorted(set(section) - set(self.defaults))
        if unknown:
            raise ValueError(f"{self.name}: unknown option(s) {', '.join(unknown)}; known: {sorted(self.defaults)}")
        self.options = merge(self.defaults, section)
        self.ctx: RunContext = ctx
        self.device: torch.device = ctx.device
        self.backend: str = ctx.backend
        self.model: Optional[torch.nn.Module] = None
        # name -> nn.Module or EMATeacher, saved with the checkpoint
        self.modules: Dict[str, Union[torch.nn.Module, EMATeacher]] = {}
        # name -> optimizer (see build_optimizer), scheduled by the trainer
        self.optimizers: Dict[str, torch.optim.Optimizer] = {}
        # name -> LabelQuality of the pseudo-labels made since the last report
        self.label_quality: Dict[str, LabelQuality] = {}
        # per process under torchrun (augmentation draws differ across shards; rank 0 = one process's)
        rank = getattr(ctx, "rank", 0)
        self.generator = torch.Generator(device="cpu").manual_seed(int(config.get("seed", 0)) + 7919 + 1_000_003 * rank)

    def option_error(self, key: str, expected: str) -> ValueError:
        """The one-line error for option `key` of this method's config section."""
        return ValueError(f"{self.name}.{key}: expected {expected}, got {self.options[key]!r}")

    # -- stages ---------------------------------------------------------------------------------
    @classmethod
    def stage_names(cls, config: Dict[str, Any]) -> List[str]:
        """The names of `stages()` under `config`, known before anything is built (to check
        `--stage` before a pretraining runs)."""
        return ["train"]

    def stages(self) -> List[Stage]:
        """The method's training stages, in order (one "train" stage of `train.iters` by default)."""
        return [Stage("train", int(self.config["train"]["iters"]))]

    def start_stage(self, stage: Stage, model: torch.nn.Module, resume: bool = False) -> None:
        """Set up `stage`, given the network it starts from (the init or the previous stage's).
        `resume`: a checkpoint will be loaded right after, so skip work whose result it holds."""
        self.model = model
        self.optimizers = {"model": build_optimizer(model.param_groups(self.config["optimizer"]["lr"]),
                                                    self.config["optimizer"])}

    def end_stage(self, stage: Stage) -> None:
        """Called after the last iteration of `stage` (before its evaluation)."""

    def observe_validation(self, stage: Stage, miou: float, done: int) -> None:
        """Called after each evaluation on target val within `stage` (after `done` of its
        iterations; the end-of-stage one has `done == stage.iters`). Only a method that follows its
        authors' code in using target labels reads this (the contrastive method's best-on-val
        reload, off by default)."""

    def finish_stage(self, stage: Stage) -> Optional[str]:
        """Called after `stage`'s evaluation. A method that changes its network once more after
        training (the contrastive method's final BatchNorm re-estimation) does it here and returns a
        short name for it: the trainer then evaluates again and also reports the first score as
        `miou_before_<name>`. None (the default): nothing changed."""
        return None

    # -- the step -------------------------------------------------------------------------------
    def step(self, batch: Dict[str, Dict[str, Any]], it: int, iters: int) -> Dict[str, float]:
        """One iteration on `batch = {"source": ..., "target": ...}` (images in [0, 1] on the CPU)
        at iteration `it` of `iters` of the stage -> {loss name: float}."""
        raise NotImplementedError

    #: the trainer's torch.amp.GradScaler under `train.amp: fp16`, else None
    grad_scaler: Optional[torch.amp.GradScaler] = None

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()`, of the loss times the float16 loss scale when the trainer runs a grad
        scaler (the step guards unscale the gradients before the update). Every backward pass of a
        method's step goes through here."""
        (loss if self.grad_scaler is None else self.grad_scaler.scale(loss)).backward()

    def normalize(self, images: torch.Tensor, model: Optional[torch.nn.Module] = None) -> torch.Tensor:
        """Images in [0, 1] -> the network's input on the run's device."""
        from udafast.data.transforms import normalize
        model = model or self.model
        return normalize(images.to(self.device, non_blocking=True), getattr(model, "normalization", "imagenet"))

    # -- what the method makes ------------------------------------------------------------------
    def record_labels(self, name: str, labels: torch.Tensor, truth: Optional[torch.Tensor] = None) -> None:
        """Count pseudo-labels `labels` (255 = unlabelled) the method made under `name`, against the
        target's true labels `truth` aligned with them (a target batch's or frame's "truth", None
        where the run has none). The trainer reports and resets them at each evaluation."""
        if name not in self.label_quality:
            self.label_quality[name] = self._label_meter()
        self.label_quality[name].update(labels, truth)

    def _label_meter(self) -> LabelQuality:
        return LabelQuality(int(self.config["model"].get("num_classes", 19)))

    # -- state ----------------------------------------------------------------------------------
    def extra_state(self) -> Dict[str, Any]:
        """Adaptation state beyond modules and optimisers (tensors, dicts, plain values)."""
        return {}

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        """Take back what `extra_state` returned."""

    def state_dict(self) -> Dict[str, Any]:
        """The method's whole state for a checkpoint: its modules, optimisers, generator, extra
        state and the pseudo-label counts not yet reported."""
        return {"modules": {k: m.state_dict() for k, m in self.modules.items()},
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "generator": self.generator.get_state(),
                "extra": self.extra_state(),
                "label_quality": {k: m.counts() for k, m in self.label_quality.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Take back `state_dict()`'s result; ValueError when its modules or optimisers are not
        this method's."""
        missing = (set(self.modules) ^ set(state["modules"])) | (set(self.optimizers) ^ set(state["optimizers"]))
        if missing:
            raise ValueError(f"{self.name}: checkpoint's method state does not match (modules/optimizers "
                             f"{sorted(missing)})")
        for k, m in self.modules.items():
            m.load_state_dict(state["modules"][k])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        self.generator.set_state(state["generator"])
        self.load_extra_state(state["extra"])
        self.label_quality = {}
        for k, counts in state.get("label_quality", {}).items():
            self.label_quality[k] = self._label_meter()
            self.label_quality[k].load_counts(counts)
