"""The training loop: one run of one method under one config and seed.

    Trainer(config, out_dir).run() -> metrics dict (also written to out_dir/metrics.json)

The method gets the run through a `TrainingContext` (udafast.engine.context).

Per iteration: the learning-rate schedule, a batch per domain, `method.step`, the log; every
`train.eval_every` iterations an evaluation on target val (keeping `checkpoints/best.pt`), every
`train.ckpt_every` a checkpoint; after each stage of a multi-stage method its network is saved as
`checkpoints/<stage>.pt` and evaluated, and the run's state as `checkpoints/last.pt`. A method whose
`finish_stage` changes the network once more (the contrastive method's BatchNorm re-estimation) is
evaluated again; the first score is kept as `miou_before_<name>` in metrics.json.

Checkpoints (udafast.engine.checkpoints): `last.pt` is always the newest complete one; with
`train.ckpt_every`, every checkpoint is also `iter_<N>.pt` (N: the run's iteration), and the
`train.keep_checkpoints` before the newest stay. A checkpoint holds everything the run continues
from: the network, the method's state (`Method.state_dict`: its modules, optimisers, generator
and extra state), the batch streams' positions, every global RNG (Python, NumPy, torch CPU and
CUDA; udafast.engine.rng), the trainer's counters and, when there is one, the AMP grad scaler;
the learning rates are a function of the iteration. So with `deterministic: true` on the CPU a resumed run ends bitwise
equal to the run that was not interrupted, wherever that one was killed. Each checkpoint also
carries what `python -m udafast.evaluate --checkpoint` needs to score it alone: the run's `data.val`
(as `data_val`), `eval.input_size` and `eval.classes` (as `eval_input_size`, `eval_classes`).

Every optimiser of the method steps through a `StepGuard` (udafast.engine.distributed): under
torchrun it averages the gradients over the processes, it refuses non-finite gradients (the run
stops with NonFiniteLoss naming the last good checkpoint, or, with `train.on_nonfinite: skip`, the
update is dropped and counted) and it applies one update per `train.grad_accum` micro-batches.
`train.amp: bf16` runs each step under bfloat16 autocast; `train.amp: fp16` under float16 autocast
with one torch.amp.GradScaler for every optimiser of the method: `Method.backward` scales each loss,
the step guards unscale the gradients and drop the update where they overflowed (counted in
`nonfinite_steps` whatever `train.on_nonfinite` says; a non-finite loss still follows it), and the
scale is updated once per iteration.
"""
import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import time

import torch
import yaml

from udafast.config import dump_config
from udafast.config_schema import validate_config
from udafast.data.labels import colorize
from udafast.engine import checkpoints, rng
from udafast.engine import distributed as dist
from udafast.engine.context import TrainingContext
from udafast.engine.data import SkipLog
from udafast.engine.devices import check_device
from udafast.engine.evaluation import evaluate_model, predict
from udafast.engine.logging import RunLogger
from udafast.inference import InferenceOptions
from udafast.methods import build_method, method_class
from udafast.models.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["Trainer", "NonFiniteLoss", "check_stage", "apply_schedule", "RANDOM_INIT_WARNINGS"]


#: said at the start of a DeepLabV2-ResNet101 run that would train from random weights (the
#: authors' code always starts from ImageNet weights; without them mIoU ends far lower)
#: the start-up warning of a network that would train from random weights, by model name (the
#: small CPU network has no pretrained weights to miss)
RANDOM_INIT_WARNINGS = {
    "deeplabv2_r101": (
        "WARNING: neither model.pretrained nor init is set: DeepLabV2-ResNet101 starts from RANDOM weights and "
        "will score far below the papers; set model.pretrained: imagenet (torchvision's ImageNet ResNet-101, "
        "ProDA's start) or imagenet_caffe (the Caffe DeepLab init of AdaptSegNet and CRST), or a weights file, or "
        "init: a checkpoint"),
    "mit_b5_daformer": (
        "WARNING: neither model.pretrained nor init is set: MiT-B5 starts from RANDOM weights and will score far "
        "below the papers; set model.pretrained to SegFormer's ImageNet-1k mit_b5.pth (DAFormer's start), or "
        "init: a checkpoint"),
}


class NonFiniteLoss(RuntimeError):
    """Training stopped at a non-finite loss or gradient (the message names the last good checkpoint)."""


def check_stage(config: dict, stage) -> None:
    """ValueError naming --stage when `stage` (None: every stage) is not one of the method's."""
    if stage is None:
        return
    names = method_class(config["method"]).stage_names(config)
    if stage not in names:
        raise ValueError(f"--stage: {config['method']} has the stages {names}, got {stage!r}")


class Trainer:
    """One run: `config` (resolved, see udafast.config), results under `out_dir`.
    `stage`: run only that stage of a multi-stage method; `resume`: a checkpoint path to continue
    from, or True for the run folder's newest good one (see udafast.engine.checkpoints)."""

    #: a torch.amp.GradScaler when the run trains under float16 autocast: saved with the checkpoints
    #: (key "scaler") and restored on resume
    scaler = None

    def __init__(self, config, out_dir, *, stage=None, resume=None, progress=None, tensorboard=True):
        self.config = config
        self.out_dir = os.fspath(out_dir)
        self.stage_only = stage
        self.resume = resume
        self.progress = progress
        self.tensorboard = tensorboard
        self.ckpt_dir = os.path.join(self.out_dir, "checkpoints")
        self.method = None

    # ---------------------------------------------------------------------------------------------
    def run(self):
        config = self.config
        validate_config(config)  # before anything is written: config.yaml never records a typo
        # plain mistakes fail here, before anything is built, trained or written
        check_device(config["device"], "device")
        iters = config["train"]["iters"]
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"train.iters: expected a positive int, got {iters!r}")
        check_stage(config, self.stage_only)
        device = dist.init_from_env(config["device"])
        self.rank, self.world = dist.rank(), dist.world_size()
        train = config["train"]
        self.accumulate, self.on_nonfinite, self.amp = train["grad_accum"], train["on_nonfinite"], train["amp"]
        if isinstance(self.accumulate, bool) or not isinstance(self.accumulate, int) or self.accumulate < 1:
            raise ValueError(f"train.grad_accum: expected a positive int, got {self.accumulate!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"train.on_nonfinite: expected 'stop' or 'skip', got {self.on_nonfinite!r}")
        if self.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"train.amp: expected null, 'bf16' or 'fp16', got {self.amp!r}")
        # one scaler for every optimiser of the method: one loss scale, updated once per iteration
        self.scaler = torch.amp.GradScaler(device.type) if self.amp == "fp16" else None
        for key in ("sync_bn", "activation_checkpointing"):
            if not isinstance(train[key], bool):
                raise ValueError(f"train.{key}: expected true or false, got {train[key]!r}")
        self.inference = InferenceOptions.from_config(config["eval"], "eval")
        resume_ckpt = self._resume_checkpoint()
        if resume_ckpt is not None:
            finished = self._finished_metrics(resume_ckpt)
            if finished is not None:
                return finished
        os.makedirs(self.ckpt_dir, exist_ok=True)
        if self.rank == 0:
            dump_config(config, os.path.join(self.out_dir, "config.yaml"))
        if config.get("threads"):
            torch.set_num_threads(int(config["threads"]))
        if config.get("deterministic"):
            torch.use_deterministic_algorithms(True, warn_only=True)
        # each process its own random stream (augmentation, dropout); the weights are rank 0's
        rng.seed_process(config["seed"], self.rank)
        method_cls = method_class(config["method"])

        logger = RunLogger(self.out_dir, 1, progress=self.progress, tensorboard=self.tensorboard, rank=self.rank)
        self.random_init = not config["model"].get("pretrained") and not config.get("init")
        if self.random_init and config["model"].get("name") in RANDOM_INIT_WARNINGS:
            logger.message(RANDOM_INIT_WARNINGS[config["model"]["name"]])
        ctx = None
        try:
            ctx = TrainingContext(config, self.out_dir, device, logger, method_cls)
            if self.world > 1:
                logger.message(f"{self.world} processes ({torch.distributed.get_backend()}), "
                               f"{ctx.source_stream.batch_size} images per domain each")
            method = build_method(config, ctx)
            method.grad_scaler = self.scaler
            self.method = method  # for inspection after the run
            stages = method.stages()
            if config["train"].get("stage_iters"):  # only the length changes (not what a stage hands on)
                stages = [dataclasses.replace(s, iters=int(config["train"]["stage_iters"])) for s in stages]
            todo = [i for i, s in enumerate(stages) if self.stage_only in (None, s.name)]
            logger.set_total(sum(stages[i].iters for i in todo))
            return self._run_stages(method, ctx, stages, todo, resume_ckpt, logger)
        finally:
            if ctx is not None:  # stop loader workers now, also when the run failed
                for stream in (ctx.source_stream, ctx.target_stream, ctx.mixed_stream):
                    if stream is not None:
                        stream.close()
            logger.close()

    def _resume_checkpoint(self):
        """The checkpoint to resume from (None without `resume`): the path given, or the run folder's
        newest good one; its path goes to `self.resume_path`, what was skipped to `self._resume_notes`
        (logged once the logger is up)."""
        self._resume_notes = []
        if not self.resume:
            return None
        if self.resume is True:
            ckpt, self.resume_path = checkpoints.find_resume(self.ckpt_dir, self._resume_notes.append)
        else:
            self.resume_path = os.fspath(self.resume)
            ckpt = checkpoints.load_resumable(self.resume_path)
        return ckpt

    def _finished_metrics(self, ckpt):
        """The run's metrics.json when `ckpt` ends what this run trains (the end-of-stage checkpoint
        of its last stage, or of `--stage`) and the run folder has them and the same config.yaml:
        there is nothing to resume, so nothing is run or written, and the message says so. None
        otherwise (a config that differs, e.g. more iterations, continues the run as before)."""
        config = self.config
        names = method_class(config["method"]).stage_names(config)
        last = self.stage_only or names[-1]
        done = (ckpt.get("method_name") == config["method"] and ckpt["stage"] == names.index(last)
                and ckpt["stage_iter"] == (ckpt["trainer"].get("stage_results") or {}).get(last, {}).get("iters"))
        path, run_config = (os.path.join(self.out_dir, name) for name in ("metrics.json", "config.yaml"))
        if not done or not os.path.isfile(path) or not os.path.isfile(run_config):
            return None
        with open(run_config) as f:
            if yaml.safe_load(f) != yaml.safe_load(yaml.safe_dump(config)):
                return None
        with open(path) as f:
            metrics = json.load(f)
        if metrics.get("method") != config["method"]:
            return None
        if self.rank == 0:
            for note in self._resume_notes:
                print(note, file=sys.stderr)
            print(f"resume: {self.resume_path} is the end of the run (stage {last!r} finished, iteration "
                  f"{ckpt['iter']}); nothing to resume, {path} is left as it is", file=sys.stderr)
        return metrics

    def _resume_position(self, ckpt, stages, todo, state, logger):
        """(position in `todo`, stage iteration) the checkpoint resumes at, its trainer counters put
        into `state`; ValueError naming the file when it is of another method or stage layout."""
        path = self.resume_path
        for note in self._resume_notes:
            logger.message(note)
        if ckpt.get("method_name", self.config["method"]) != self.config["method"]:
            raise ValueError(f"{path}: a checkpoint of the {ckpt['method_name']} method; this run trains "
                             f"{self.config['method']}")
        index, stage_iter = ckpt["stage"], ckpt["stage_iter"]
        known = isinstance(index, int) and 0 <= index < len(stages)
        name = stages[index].name if known else f"#{index}"
        if not known or index not in todo:
            raise ValueError(f"{path}: a checkpoint of stage {name!r}; this run trains "
                             f"{[stages[i].name for i in todo]}")
        if not isinstance(stage_iter, int) or not 0 <= stage_iter <= stages[index].iters:
            raise ValueError(f"{path}: a checkpoint at iteration {stage_iter!r} of stage {name!r}, which has "
                             f"{stages[index].iters} iterations in this config")
        state.update({k: ckpt["trainer"].get(k, state[k]) for k in _RESUMED})
        logger.message(f"resuming from {path}: stage {name!r}, iteration {stage_iter}")
        logger.resume(state["global_iter"])
        return todo.index(index), stage_iter

    def _restore(self, method, ctx, ckpt):
        """Load the checkpoint's network, method state, stream positions, RNGs and grad scaler, after
        `method.start_stage` of its stage."""
        try:
            method.model.load_state_dict(ckpt["model"])
            method.load_state_dict(ckpt["method"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"{self.resume_path}: does not fit this run: {e}") from None
        ctx.source_stream.load_state_dict(ckpt["streams"]["source"])
        if ctx.target_stream is not None and ckpt["streams"].get("target"):
            ctx.target_stream.load_state_dict(ckpt["streams"]["target"])
        if ctx.mixed_stream is not None and ckpt["streams"].get("mixed"):
            ctx.mixed_stream.load_state_dict(ckpt["streams"]["mixed"])
        self._restore_rng(method, ctx, ckpt)
        if self.scaler is not None and ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        if ctx.skip_log is not None and ckpt.get("skipped") and self.rank == 0:  # every process's, counted once
            ctx.skip_log.load_state_dict(ckpt["skipped"])

    def _stage_init(self, ctx, stages, index):
        """The network stage `index` starts from: the config's init for the first stage; else the
        previous stage's network (checkpoints/<stage>_best.pt where that stage hands on its
        best-on-val network and validated within itself, else checkpoints/<stage>.pt), or, for a
        stage run alone whose previous stage is not in the run folder, the config's init."""
        if index == 0:
            return ctx.build_model()
        previous = stages[index - 1]
        path = os.path.join(self.ckpt_dir, f"{previous.name}.pt")
        best = os.path.join(self.ckpt_dir, f"{previous.name}_best.pt")
        if previous.next_from == "best" and os.path.isfile(best):
            ckpt = load_checkpoint(best)
            kept = ckpt["trainer"]["stage_best"][previous.name]
            ctx.log(f"stage {stages[index].name!r} starts from {previous.name!r}'s best-on-val network "
                    f"(iteration {kept['iter']}, mIoU {kept['miou']:.2f}): {best}")
            model = ctx.build_model(init=False)
            model.load_state_dict(ckpt["model"])
            return model
        if not os.path.isfile(path):
            if self.stage_only is not None and self.config.get("init"):
                ctx.log(f"stage {stages[index].name!r}: no {path}; starting from init {self.config['init']}")
                return ctx.build_model()
            raise FileNotFoundError(f"stage {stages[index].name!r} starts from the previous stage's network, "
                                    f"but {path} is not there (run that stage first, or give an init)")
        model = ctx.build_model(init=False)
        model.load_state_dict(load_checkpoint(path)["model"])
        return model

    def _run_stages(self, method, ctx, stages, todo, resume_ckpt, logger):
        config = self.config
        train = config["train"]
        eval_every, ckpt_every = int(train.get("eval_every") or 0), int(train.get("ckpt_every") or 0)
        state = {"global_iter": 0, "best": None, "stage_best": {}, "stage_results": {}, "times": [], "setup_s": {}, "nonfinite_steps": 0,
                 "pseudo_labels": {}}
        first, start_iter = 0, 0
        if resume_ckpt is not None:
            first, start_iter = self._resume_position(resume_ckpt, stages, todo, state, logger)
        logger.set_position(state["global_iter"])
        result = None
        for pos in range(first, len(todo)):
            index = todo[pos]
            stage = stages[index]
            resuming = resume_ckpt is not None and pos == first
            model = self._stage_init(ctx, stages, index)
            dist.broadcast_state([model])  # the stage's set-up passes (pseudo-labels) run rank 0's network
            t_setup = time.perf_counter()
            method.start_stage(stage, model, resume=resuming)
            state["setup_s"][stage.name] = round(time.perf_counter() - t_setup, 3)
            begin = 0
            if resuming:
                self._restore(method, ctx, resume_ckpt)
                begin = start_iter
            logger.set_description(stage.name)
            method.model.train()
            synced = _synced_modules(method)
            if not resuming:  # the networks the method made in its set-up (heads, discriminators, students)
                dist.broadcast_state([m for m in synced if m is not model])
            guards = [dist.StepGuard(name, opt, on_nonfinite=self.on_nonfinite, accumulate=self.accumulate,
                                     scaler=self.scaler) for name, opt in method.optimizers.items()]
            for it in range(begin, stage.iters):
                t0 = time.perf_counter()
                lrs = apply_schedule(method.optimizers, it, stage.iters)
                skipped_before, unscaled_before = sum(g.skipped for g in guards), sum(g.unscaled for g in guards)
                # a skipped update must not leave the step's BatchNorm statistics behind either
                kept = _buffers(synced, clone=True) if self.on_nonfinite == "skip" or self.scaler else None
                try:
                    losses = self._iteration(method, ctx, guards, it, stage.iters)
                except dist.NonFiniteError as e:
                    raise NonFiniteLoss(self._nonfinite_message(str(e), stage, it)) from None
                skipped = sum(g.skipped for g in guards) > skipped_before
                if self.scaler is not None and sum(g.unscaled for g in guards) > unscaled_before:
                    self.scaler.update()  # a lower scale after an overflow, a higher one after a finite run
                if skipped:
                    torch._foreach_copy_(_buffers(synced), kept)
                elif self.world > 1:
                    dist.average_buffers(synced)
                self._check_losses(losses, skipped, state, stage, it, logger)
                dt = time.perf_counter() - t0
                state["times"].append(dt)
                state["global_iter"] += 1
                logger.log_iteration(state["global_iter"], stage.name, it + 1, losses, lrs, dt)
                done = it + 1
                if eval_every and done % eval_every == 0 and done < stage.iters:
                    result = self._evaluate(method, ctx, index, stage, state, logger, keep_best=True)
                    self._stage_best(method, ctx, stages, index, done, result, state)
                    method.observe_validation(stage, result["miou"], done)
                if ckpt_every and done % ckpt_every == 0 and done < stage.iters:
                    self._save_periodic(method, ctx, index, done, state)
            for guard in guards:
                guard.remove()
            method.end_stage(stage)
            self._report_labels(method, stage, state, logger)
            if len(stages) > 1:
                self._save(method, ctx, index, stage.iters, state, f"{stage.name}.pt")
            result = self._evaluate(method, ctx, index, stage, state, logger, keep_best=bool(eval_every))
            state["stage_results"][stage.name] = {"miou": result["miou"], "iters": stage.iters}
            if eval_every:
                self._stage_best(method, ctx, stages, index, stage.iters, result, state)
            method.observe_validation(stage, result["miou"], stage.iters)
            if stage.name in state["stage_best"]:
                state["stage_results"][stage.name]["best"] = state["stage_best"][stage.name]
            refined = method.finish_stage(stage)  # a last change after training (e.g. BatchNorm re-estimation)
            if refined:
                if self.world > 1:
                    dist.average_buffers([method.model])
                before = result["miou"]
                result = self._evaluate(method, ctx, index, stage, state, logger, keep_best=bool(eval_every))
                state["stage_results"][stage.name].update({"miou": result["miou"], f"miou_before_{refined}": before})
            self._save(method, ctx, index, stage.iters, state, "last.pt")
            self._panels(method.model, ctx, stage.name)
        return self._finish(method, ctx, result, state, stages, todo)

    def _restore_rng(self, method, ctx, ckpt):
        """The checkpoint's random state (udafast.engine.rng.restore_rng), or fresh seeds, said so."""
        if not rng.restore_rng(ckpt, method.generator, self.config["seed"], self.rank, self.world):
            ctx.log(f"resume: the checkpoint was written by {ckpt.get('world_size', 1)} process(es), this run has "
                    f"{self.world}: data order continues, random streams are re-seeded")

    def _iteration(self, method, ctx, guards, it, iters):
        """One optimiser update: `train.grad_accum` micro-batches through `method.step` (under bf16 or
        fp16 autocast with `train.amp`) -> the losses, averaged over micro-batches and processes."""
        totals = {}
        for micro in range(self.accumulate):
            for guard in guards:
                guard.micro_step = micro
            if ctx.mixed_stream is not None:  # one stream over both domains (TrainingContext.set_mixed_stream)
                batch = {"mixed": next(ctx.mixed_stream)}
            else:
                batch = {"source": next(ctx.source_stream)}
                if ctx.target_stream is not None:
                    batch["target"] = next(ctx.target_stream)
            with self._autocast(ctx.device):
                losses = method.step(batch, it, iters)
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + float(v) / self.accumulate
        if self.world > 1 and totals:
            names = sorted(totals)
            mean = dist.all_reduce_(torch.tensor([totals[k] for k in names], dtype=torch.float64)) / self.world
            totals = dict(zip(names, mean.tolist()))
        return totals

    def _autocast(self, device):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)

    def _check_losses(self, losses, skipped, state, stage, it, logger):
        """Stop on a non-finite loss, or, with `train.on_nonfinite: skip`, count the iteration
        (the step guards have already refused the update where the gradients were not finite; under
        fp16 they always do, the grad scaler's overflow, and the iteration is counted)."""
        bad = sorted(k for k, v in losses.items() if not math.isfinite(v))
        if bad and self.on_nonfinite == "stop":
            raise NonFiniteLoss(self._nonfinite_message(f"non-finite loss ({', '.join(bad)})", stage, it))
        if bad or skipped:
            state["nonfinite_steps"] += 1
            what = f"non-finite loss ({', '.join(bad)})" if bad else "non-finite gradients"
            if skipped and self.scaler is not None:
                what += f" (fp16 loss scale now {self.scaler.get_scale():g})"
            logger.message(f"  [{stage.name}] iteration {it + 1}: {what}; "
                           f"{'update skipped' if skipped else 'update kept (finite gradients)'} "
                           f"({state['nonfinite_steps']} such iterations so far)")

    def _nonfinite_message(self, what, stage, it):
        last = os.path.join(self.ckpt_dir, "last.pt")
        kept = f"the last good checkpoint is {last}" if os.path.isfile(last) else "no checkpoint was written yet"
        return (f"{what} at stage {stage.name!r} iteration {it + 1}: training stopped before the update; {kept} "
                f"(resume with --resume; --skip-nonfinite skips such steps instead)")

    # ---------------------------------------------------------------------------------------------
    def _save(self, method, ctx, stage_index, stage_iter, state, name):
        """The run's state after `stage_iter` iterations of stage `stage_index` (None: not a resume
        point, best.pt) as checkpoints/<name>; `last.pt` through the rotation of
        udafast.engine.checkpoints (with `train.ckpt_every`, also as iter_<N>.pt). Rank 0 writes it,
        with every process's random state; the others wait for it."""
        streams = {"source": ctx.source_stream.state_dict(),
                   "target": None if ctx.target_stream is None else ctx.target_stream.state_dict(),
                   "mixed": None if ctx.mixed_stream is None else ctx.mixed_stream.state_dict()}
        extra = {} if self.scaler is None else {"scaler": self.scaler.state_dict()}
        if ctx.skip_log is not None:
            extra["skipped"] = self._skipped(ctx)
        if self.world > 1:
            extra["rng_per_rank"] = rng.gather_rng_states(method.generator, self.world)
        if self.rank == 0:
            def write(path):
                save_checkpoint(path, method.model, iter=state["global_iter"], stage=stage_index,
                                stage_iter=stage_iter, method=method.state_dict(), streams=streams,
                                rng=rng.get_rng_state(),
                                eval_input_size=self.config["eval"].get("input_size"),
                                eval_classes=int(self.config["eval"].get("classes", 19)),
                                data_val=self.config["data"]["val"],
                                method_name=self.config["method"], world_size=self.world,
                                trainer={k: state[k] for k in _RESUMED}, **extra)

            train = self.config["train"]
            if name != checkpoints.LAST:
                write(os.path.join(self.ckpt_dir, name))
            elif int(train.get("ckpt_every") or 0):
                checkpoints.publish(self.ckpt_dir, state["global_iter"], train.get("keep_checkpoints", 2), write)
            else:
                checkpoints.write_last(self.ckpt_dir, write)
        dist.barrier()

    def _skipped(self, ctx):
        """The bad samples every process has skipped (`SkipLog.merge` of their states)."""
        if self.world == 1:
            return ctx.skip_log.state_dict()
        states = [None] * self.world
        torch.distributed.all_gather_object(states, ctx.skip_log.state_dict())
        return SkipLog.merge(states)

    def _save_periodic(self, method, ctx, stage_index, stage_iter, state):
        """The checkpoint of every `train.ckpt_every` iterations: last.pt and iter_<N>.pt."""
        self._save(method, ctx, stage_index, stage_iter, state, checkpoints.LAST)

    def _report_labels(self, method, stage, state, logger):
        """The quality of the pseudo-labels the method made in `stage` (summed over processes): into
        metrics.json's "pseudo_labels", TensorBoard and the log; the counts then start afresh."""
        report = {}
        for name in sorted(method.label_quality):
            meter = method.label_quality[name]
            counts = meter.counts()
            if self.world > 1:
                dist.all_reduce_(counts)
                meter.load_counts(counts)
            summary = meter.summary()
            report[name] = summary
            scalars = {k: summary[k] for k in ("coverage_total", "precision_mean", "recall_mean", "accuracy")
                       if summary[k] is not None}
            logger.log_scalars(f"pseudo_labels/{stage.name}/{name}", scalars, state["global_iter"])
            logger.message(f"  [{stage.name}] pseudo-labels {name!r}: " + ", ".join(
                f"{k} {100 * v:.1f}%" for k, v in scalars.items()))
        method.label_quality = {}
        if report:
            state["pseudo_labels"][stage.name] = report

    def _evaluate(self, method, ctx, stage_index, stage, state, logger, keep_best):
        ev = self.config["eval"]
        val = ctx.val
        if ev.get("max_images"):
            val = torch.utils.data.Subset(val, range(min(int(ev["max_images"]), len(val))))
        if self.world > 1:  # each process scores its share; the confusion matrices are summed
            val = torch.utils.data.Subset(val, dist.shard(len(val)))
        result = evaluate_model(method.model, val, input_size=ev.get("input_size"), device=ctx.device,
                                classes=int(ev.get("classes", 19)), all_reduce=self.world > 1,
                                inference=self.inference)
        logger.log_scalars("val", {"miou": result["miou"]}, state["global_iter"])
        logger.message(f"  [{stage.name}] iter {state['global_iter']}: target val mIoU {result['miou']:.2f}")
        if keep_best and (state["best"] is None or result["miou"] > state["best"]["miou"]):
            state["best"] = {"miou": result["miou"], "iter": state["global_iter"], "stage": stage.name,
                             "per_class_iou": _per_class(result)}
            self._save(method, ctx, stage_index, None, state, "best.pt")
        return result

    def _stage_best(self, method, ctx, stages, index, done, result, state):
        """Keep checkpoints/<stage>_best.pt, the network the next stage starts from, where the stage
        hands on its best-on-val network (`Stage.next_from`) and validates within itself."""
        stage = stages[index]
        if stage.next_from != "best" or index == len(stages) - 1:
            return
        best = state["stage_best"].get(stage.name)
        if best is not None and result["miou"] <= best["miou"]:
            return
        state["stage_best"][stage.name] = {"miou": result["miou"], "iter": done}
        self._save(method, ctx, index, None, state, f"{stage.name}_best.pt")

    def _panels(self, model, ctx, stage_name):
        """A PNG of image | ground truth | prediction for the first val images."""
        n = int(self.config["train"].get("panels") or 0)
        if n <= 0 or self.rank != 0:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        n = min(n, len(ctx.val))
        fig, axes = plt.subplots(n, 3, figsize=(9, 1.6 * n + 0.4), squeeze=False)
        model.eval()
        try:
            for i in range(n):
                sample = ctx.val[i]
                logits = predict(model, sample["image"], input_size=self.config["eval"].get("input_size"),
                                 device=ctx.device, output_size=tuple(sample["image"].shape[-2:]),
                                 inference=self.inference)
                views = (sample["image"].permute(1, 2, 0).numpy(), colorize(sample["label"].numpy()),
                         colorize(logits.argmax(0).cpu().numpy()))
                for ax, im, title in zip(axes[i], views, ("image", "ground truth", "prediction")):
                    ax.imshow(im)
                    ax.set_axis_off()
                    if i == 0:
                        ax.set_title(title, fontsize=9)
        finally:
            model.train()
        fig.tight_layout()
        folder = os.path.join(self.out_dir, "panels")
        os.makedirs(folder, exist_ok=True)
        fig.savefig(os.path.join(folder, f"{stage_name}.png"), dpi=80)
        plt.close(fig)

    def _finish(self, method, ctx, result, state, stages, todo):
        times = state["times"][3:] or state["times"]
        metrics = {
            "method": self.config["method"],
            "miou": result["miou"],
            "per_class_iou": _per_class(result),
            "iters": sum(stages[i].iters for i in todo),
            "backend": self.config["backend"],
            "sec_per_iter": round(statistics.median(times), 5) if times else None,
            "seed": int(self.config["seed"]),
            "stages": state["stage_results"],
            "stage_setup_s": state["setup_s"],
            "last": {"miou": result["miou"], "checkpoint": "checkpoints/last.pt"},
            "processes": self.world,
            "nonfinite_steps": state["nonfinite_steps"],
            "pretrained": self.config["model"].get("pretrained"),
            "random_init": self.random_init,
        }
        # the score before a method's last change after training (Method.finish_stage), e.g. miou_before_bn_update
        last_stage = state["stage_results"].get(stages[todo[-1]].name, {})
        metrics.update({k: v for k, v in last_stage.items() if k.startswith("miou_before_")})
        if state["pseudo_labels"]:
            metrics["pseudo_labels"] = state["pseudo_labels"]
        if state["best"] is not None:
            metrics["best"] = {**state["best"], "checkpoint": "checkpoints/best.pt"}
        if "miou13" in result:
            metrics["miou13"] = result["miou13"]
        if ctx.skip_log is not None:
            skipped = self._skipped(ctx)
            metrics["skipped_samples"], metrics["bad_files"] = skipped["count"], skipped["files"]
        if self.rank == 0:
            path = os.path.join(self.out_dir, "metrics.json")
            with open(path + ".tmp", "w") as f:
                json.dump(metrics, f, indent=2)
            os.replace(path + ".tmp", path)
        dist.barrier()
        return metrics


def _synced_modules(method):
    """The networks whose weights and buffers must be equal on every process: the trained one and
    everything in the method's saved state that is (or holds) a module."""
    modules = [method.model]
    for m in method.modules.values():
        m = m if isinstance(m, torch.nn.Module) else getattr(m, "model", None)
        if isinstance(m, torch.nn.Module) and all(m is not seen for seen in modules):
            modules.append(m)
    return modules


def _buffers(modules, clone=False):
    out = [b for m in modules for b in m.buffers()]
    return [b.clone() for b in out] if clone else out


#: the trainer's counters a checkpoint carries (any counter added to the run's state that a resumed
#: run must continue from belongs here)
_RESUMED = ("global_iter", "best", "stage_best", "stage_results", "nonfinite_steps", "pseudo_labels")


def _per_class(result):
    """IoU by class name (None where the class never occurs in prediction or ground truth)."""
    return {name: (None if math.isnan(v) else round(v, 3)) for name, v in result["iou"].items()}


def apply_schedule(optimizers: dict, it: int, iters: int) -> dict:
    """Set each optimiser's learning rates for iteration `it` of `iters` (its `schedule`: poly decay
    over `poly_iters` or the stage, or constant, after a linear warm-up when it has one; see
    udafast.methods.base.build_optimizer)
    -> {optimiser name: its first group's lr}."""
    lrs = {}
    for name, opt in optimizers.items():
        horizon = getattr(opt, "poly_iters", None) or iters
        factor = max(0.0, 1.0 - it / horizon) ** opt.power if opt.schedule == "poly" else 1.0
        warmup = getattr(opt, "warmup_iters", 0)
        if it < warmup:
            factor *= 1.0 - (1.0 - it / warmup) * (1.0 - opt.warmup_ratio)
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * factor
        lrs[name] = opt.param_groups[0]["lr"]
    return lrs
