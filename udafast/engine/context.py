"""The run context: what a run hands its method (the engine's implementation of
udafast.methods.context.RunContext) -- the datasets and training streams built from the config's
`data`, the model factory, the log, and the passes over the target set with their cross-process
sums and shared files."""
import contextlib
import os
import sys
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch

from udafast.config import merge
from udafast.data import BadSampleError
from udafast.engine import distributed as dist
from udafast.data.labels import CLASS_NAMES
from udafast.data.rare_class import class_stats, rcs_class_probabilities, samples_with_class
from udafast.engine.data import (BatchStream, MixedSet, RareClassStream, SkipLog, TrainView, TruthLabels,
                                 UniformDrawStream, build_split, collate)
from udafast.engine.logging import RunLogger
from udafast.methods.base import Method
from udafast.models import build_model
from udafast.models.checkpoint import load_model_checkpoint

__all__ = ["TrainingContext"]


def _label_option(name, wanted):
    """The dataset option that turns target labels on or off (target training sees no labels
    unless the method is the oracle)."""
    return {"synthetic": {"with_labels": wanted}, "cityscapes": {"labels": wanted}}.get(name, {})


class TrainingContext:
    """The engine's `RunContext` (udafast.methods.context): what a method may use of the run, the
    config, device, ops backend, run folder, datasets, training views and streams, a model factory,
    the logger, and passes over the target set.

    Under `data.skip_bad_samples`, `skip_log` (a SkipLog) records the bad samples passed over:
    the training streams replace one by the next good sample of their order, the passes over the
    target set leave it out (it has no pseudo-labels or soft labels, and no stream draws it). log.csv
    counts them in "skipped_samples" (under several processes, rank 0's count; checkpoints and
    metrics.json hold every process's). Evaluation never skips: a score over part of the val set
    would pass for one over all of it."""

    def __init__(self, config: Dict[str, Any], out_dir: str, device: Union[str, torch.device], logger: RunLogger,
                 method_cls: Type[Method]):
        self.config = config
        self.out_dir = out_dir
        self.device = torch.device(device)
        self.backend = config["backend"]
        self.seed = int(config["seed"])
        # this process of the run's processes (torchrun); 0 of 1 otherwise
        self.rank, self.world = dist.rank(), dist.world_size()
        self.logger = logger
        self.method_cls = method_cls
        data = config["data"]
        skip = data.get("skip_bad_samples", False)
        if not isinstance(skip, bool):
            raise ValueError(f"data.skip_bad_samples: expected true or false, got {skip!r}")
        self.skip_log = SkipLog(self._note_skip) if skip else None
        if skip:
            logger.track("skipped_samples", lambda: self.skip_log.count)
        self.source = build_split(data["source"])
        self.target = None
        #: whether target batches and frames carry "truth" (the true labels, to score pseudo-labels)
        self.has_truth = False
        if method_cls.uses_target:
            target_spec = data["target"]
            truth = data.get("target_truth", "auto")
            if truth not in ("auto", True, False):
                raise ValueError(f"data.target_truth: expected auto, true or false, got {truth!r}")
            truth = truth is True or (truth == "auto" and target_spec["name"] == "synthetic")
            wanted = method_cls.uses_target_labels or truth
            self.target = build_split(target_spec, **_label_option(target_spec["name"], wanted))
            if wanted and not getattr(self.target, "labelled", False):
                what = "trains on target labels" if method_cls.uses_target_labels else "scores pseudo-labels " \
                    "against target labels (data.target_truth: true)"
                raise ValueError(f"data.target: the {method_cls.name} method {what}, but {self.target!r} has none")
            if truth and not method_cls.uses_target_labels:
                self.target = TruthLabels(self.target)
                self.has_truth = True
        self.val = build_split(data["val"])
        stride = 8  # every network here has output stride 8
        self.source_view = TrainView.from_config(data.get("source_view"))
        self.target_view = TrainView.from_config(data.get("target_view"), align=stride)
        batch_size = int(data["batch_size"])
        workers = int(data.get("num_workers", 0))
        self.source_stream = BatchStream(self.source, batch_size, self.source_view, seed=self.seed * 2 + 1,
                                         num_workers=workers, rank=self.rank, world=self.world,
                                         skip_log=self.skip_log)
        self.target_stream = None
        self.mixed_stream = None  # see set_mixed_stream
        if self.target is not None:
            self.target_stream = BatchStream(self.target, batch_size, self.target_view, seed=self.seed * 2 + 2,
                                             num_workers=workers, rank=self.rank, world=self.world,
                                             skip_log=self.skip_log)

    def log(self, text: str) -> None:
        self.logger.message(text)

    def build_model(self, overrides: Optional[dict] = None, init: Union[bool, str] = True) -> torch.nn.Module:
        """A fresh network from the config's `model` (merged with `overrides`) on the device; with
        `init`, loaded with the weights of the config's `init` checkpoint when one is set, or of the
        checkpoint `init` names (a path)."""
        wanted = self.method_cls.model_overrides  # a dict, or a function of the model config giving one
        wanted = wanted(self.config["model"]) if callable(wanted) else wanted
        model = build_model(merge(self.config["model"], merge(wanted, overrides or {})))
        model.backbone.activation_checkpointing = bool(self.config["train"].get("activation_checkpointing"))
        channels_last = self.config["train"].get("channels_last", False)
        if not isinstance(channels_last, bool):
            raise ValueError(f"train.channels_last: expected true or false, got {channels_last!r}")
        if channels_last:
            model.use_channels_last()
        path = init if isinstance(init, str) else self.config.get("init")
        if init and path:
            # the backbone must come whole from the init; heads the init has in another form (e.g.
            # ProDA's feature head after a DeepLabV2 source network) start fresh
            state, own = load_model_checkpoint(path)["model"], model.state_dict()  # the authors' models too
            fits = {k: v for k, v in state.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
            lost = [k for k in own if k.startswith("backbone.") and k not in fits]
            if lost:
                raise ValueError(f"init: {path} does not fit the model's backbone (e.g. {lost[:3]})")
            model.load_state_dict(fits, strict=False)
            fresh = sorted({k.split(".")[0] for k in own if k not in fits})
            if fresh:
                self.log(f"init: {path} has no weights of this shape for {', '.join(fresh)}; they start fresh")
        model = model.to(self.device)
        if self.world > 1 and self.config["train"].get("sync_bn"):
            # after the move: the conversion picks torch.nn.SyncBatchNorm for CUDA parameters
            model = dist.convert_sync_batchnorm(model)
        return model

    def _replace_stream(self, old: BatchStream, cls: type, dataset: Any, view: TrainView, *args: Any) -> BatchStream:
        """A `cls` stream over `dataset` (its extra `args` after the view) with `old`'s batch size,
        seed and workers, in place of `old`, whose prefetching stops."""
        old.close()
        return cls(dataset, old.batch_size, view, *args, seed=old.seed, num_workers=old.num_workers, rank=self.rank,
                   world=self.world, skip_log=self.skip_log)

    def set_source_subset(self, indices: Sequence[int]) -> None:
        """Train on these source images only from now on (CBST's source portion)."""
        subset = torch.utils.data.Subset(self.source, list(indices))
        self.source_stream = self._replace_stream(self.source_stream, BatchStream, subset, self.source_view)

    def set_rare_class_sampling(self, temperature: float, min_pixels: int,
                                min_crop_ratio: float) -> Tuple[List[int], torch.Tensor]:
        """Draw the source batches by rare-class sampling from now on (udafast.data.rare_class):
        the classes' probabilities at `temperature`, images with more than `min_pixels` pixels of
        the class, views re-drawn while they hold no more than `min_pixels * min_crop_ratio`.
        -> (classes, probabilities). ValueError when a class has no such image (as DAFormer asserts)."""
        stats = class_stats(self.source, self.log)
        classes, probs = rcs_class_probabilities(stats, temperature)
        with_class = samples_with_class(stats, classes, min_pixels)
        empty = [c for c in classes if not with_class[c]]
        if empty:
            names = ", ".join(CLASS_NAMES[c] if c < len(CLASS_NAMES) else str(c) for c in empty)
            raise ValueError(f"no source image has more than {min_pixels} pixels of {names}")
        self.source_stream = self._replace_stream(self.source_stream, RareClassStream, self.source, self.source_view,
                                                  classes, probs, with_class, min_pixels * min_crop_ratio)
        return classes, probs

    def draw_target_with_replacement(self) -> None:
        """Draw the target batches uniformly with replacement from now on (UniformDrawStream), at
        the target stream's seed; its position so far is kept."""
        old = self.target_stream
        self.target_stream = self._replace_stream(old, UniformDrawStream, self.target, self.target_view)
        self.target_stream.load_state_dict(old.state_dict())

    def set_mixed_stream(self, source_indices: Optional[Sequence[int]], target_extras: Any = None,
                         seed: Optional[int] = None) -> Optional[BatchStream]:
        """From now on the trainer draws one stream over the union of these source images (through
        the source view) and the target set (through the target view and `target_extras`, as
        `BatchStream.set_extras`), shuffled together: `method.step` gets {"mixed": batch}, where
        batch["index"] < len(source_indices) marks a source image (its position in
        `source_indices`), the others target frame index + len(source_indices). CBST's training set
        (crst_seg.py: ConcatDataset of source subset and target, shuffled). `seed`: the stream's
        (default the run's). None as `source_indices` removes the stream. -> the stream."""
        if self.mixed_stream is not None:
            self.mixed_stream.close()
        if source_indices is None:
            self.mixed_stream = None
            return None
        mixed = MixedSet([(torch.utils.data.Subset(self.source, list(source_indices)), self.source_view, None),
                          (self.target, self.target_view, target_extras)])
        self.mixed_stream = BatchStream(mixed, self.source_stream.batch_size, mixed.view,
                                        seed=self.seed * 2 + 3 if seed is None else seed, extras=mixed.extras,
                                        num_workers=self.source_stream.num_workers, rank=self.rank, world=self.world,
                                        skip_log=self.skip_log)
        return self.mixed_stream

    def _note_skip(self, text):
        """A skipped file's message: through the logger on rank 0, on stderr with the rank elsewhere."""
        if self.rank == 0:
            self.log(text)
        else:
            print(f"[rank {self.rank}] {text}", file=sys.stderr, flush=True)

    def _target_frame(self, i, record=True):
        """Target frame `i` in the frame of the target view's resize, or None for a bad frame
        under `data.skip_bad_samples` (recorded in `skip_log` when `record`)."""
        try:
            return self.target_view.resized(self.target[i])
        except BadSampleError as exc:
            if self.skip_log is None:
                raise
            if record:
                self.skip_log.record(exc.path, exc.reason)
            return None

    def target_frames(self, batch_size: Optional[int] = None, limit: Optional[int] = None,
                      shard: bool = False) -> Iterator[Dict[str, Any]]:
        """The target training images in order, in the frame of the target view's resize (no
        random augmentation): batches {"image" [B, 3, H, W] in [0, 1], "index", "name"}. With
        `shard`, only this process's share (every world-th frame from its rank): the pass's results
        are then combined with `all_reduce_` / written through `shared_array`. Under
        `data.skip_bad_samples` bad frames are left out (and counted), so a batch may be short."""
        batch_size = batch_size or self.target_stream.batch_size
        n = len(self.target) if limit is None else min(limit, len(self.target))
        frames = list(range(self.rank, n, self.world)) if shard else list(range(n))
        for start in range(0, len(frames), batch_size):
            samples = []
            for i in frames[start:start + batch_size]:
                s = self._target_frame(i)
                if s is None:
                    continue
                s = {k: v for k, v in s.items() if k != "label"}  # (its "truth" stays, if any)
                s["index"] = i
                samples.append(s)
            if samples:
                yield collate(samples)

    def target_frame_size(self) -> Tuple[int, int]:
        """(H, W) of the target frames in the frame of the target view's resize: that of the first
        frame that reads (under `data.skip_bad_samples` bad ones are passed over, not counted)."""
        for i in range(len(self.target)):
            frame = self._target_frame(i, record=False)
            if frame is not None:
                return tuple(frame["image"].shape[-2:])
        raise ValueError(f"data.target: every frame of {self.target!r} is bad")

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the run's processes, in place (identity in one process)."""
        return dist.all_reduce_(tensor)

    def all_gather(self, tensor: torch.Tensor) -> List[torch.Tensor]:
        """Every process's `tensor` (the same shape everywhere) in rank order ([tensor] in one process)."""
        return dist.all_gather(tensor)

    @contextlib.contextmanager
    def shared_array(self, path: str, dtype: Any, shape: Sequence[int]) -> Iterator[np.ndarray]:
        """A .npy memmap of `shape` that every process writes its share of (rows of its sharded
        frames): made by rank 0 as a temporary file beside `path`, renamed to `path` once every
        process has written, removed if the block fails."""
        tmp = path[:-len(".npy")] + ".tmp.npy"
        if self.rank == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape)).flush()
        dist.barrier()
        array = np.lib.format.open_memmap(tmp, mode="r+")
        try:
            yield array
            array.flush()
            del array
            dist.barrier()
            if self.rank == 0:
                os.replace(tmp, path)
            dist.barrier()
        except BaseException:
            if self.rank == 0 and os.path.exists(tmp):
                os.unlink(tmp)
            raise
