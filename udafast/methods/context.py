"""What a method may use of the run it trains in: the `RunContext` protocol.

A method gets its context as `Method(config, ctx)`. The engine's `TrainingContext`
(udafast.engine.context) implements this protocol; a test may pass any object with the members a
method reads. The methods import nothing of the engine: everything they touch of the run is
listed here.
"""
import contextlib
from typing import Any, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch

__all__ = ["RunContext", "Stream"]


class Stream(Protocol):
    """An endless stream of training batches (the engine's `BatchStream`), as the methods use it."""

    #: images per batch (per process under torchrun)
    batch_size: int
    #: passes over the dataset so far
    epoch: int

    def __next__(self) -> Dict[str, Any]:
        """The next batch: {"image" [B, 3, H, W] in [0, 1], "label", "index", ... and the extras}."""

    def set_extras(self, extras: Any) -> None:
        """Per-sample extras (pseudo-labels, soft labels) joined to each sample by its index from
        the next batch on; None removes them."""


class RunContext(Protocol):
    """The run as a method sees it: device and backend, the run folder, the datasets and training
    streams, a model factory, the log, and the passes over the target set with their cross-process
    sums. Under torchrun `rank` is this process of `world`; a pass with `shard=True` covers this
    process's share of the frames, combined through `all_reduce_` or `shared_array`."""

    device: torch.device
    #: the ops backend of the run's config ("auto", "reference", "native", "triton")
    backend: str
    #: the run folder (a method's files, e.g. pseudo-labels, go below it)
    out_dir: str
    rank: int
    world: int
    #: the source and target training sets (`target` is None for a method that draws no target batches)
    source: Sequence[Dict[str, Any]]
    target: Optional[Sequence[Dict[str, Any]]]
    source_stream: Stream
    target_stream: Optional[Stream]

    def log(self, text: str) -> None:
        """A line in the run's log."""

    def build_model(self, overrides: Optional[dict] = None, init: Any = True) -> torch.nn.Module:
        """A fresh network from the config's `model` (merged with `overrides`) on the device; with
        `init`, loaded with the config's `init` checkpoint, or the checkpoint `init` names (a path)."""

    def set_rare_class_sampling(self, temperature: float, min_pixels: int,
                                min_crop_ratio: float) -> Tuple[List[int], torch.Tensor]:
        """Draw the source batches by DAFormer's rare-class sampling from now on (batches carry
        "rare_class"). -> (classes, their probabilities); ValueError when a class has no image with
        more than `min_pixels` of it."""

    def draw_target_with_replacement(self) -> None:
        """Draw the target batches uniformly with replacement from now on (DAFormer's target under
        rare-class sampling), not as shuffled passes over the set."""

    def set_mixed_stream(self, source_indices: Optional[Sequence[int]], target_extras: Any = None,
                         seed: Optional[int] = None) -> Optional[Stream]:
        """From now on one stream over these source images and the target set, shuffled together
        (`method.step` gets {"mixed": batch}); None removes it. -> the stream."""

    def target_frames(self, batch_size: Optional[int] = None, limit: Optional[int] = None,
                      shard: bool = False) -> Iterator[Dict[str, Any]]:
        """The target training images in order, without random augmentation: batches {"image",
        "index", "name"} (with `shard`, this process's share only)."""

    def target_frame_size(self) -> Tuple[int, int]:
        """(H, W) of the frames `target_frames` yields."""

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the run's processes, in place (identity in one process)."""

    def all_gather(self, tensor: torch.Tensor) -> List[torch.Tensor]:
        """Every process's `tensor` (the same shape everywhere) in rank order ([tensor] in one process)."""

    def shared_array(self, path: str, dtype: Any,
                     shape: Sequence[int]) -> contextlib.AbstractContextManager[np.ndarray]:
        """A .npy memmap of `shape` every process writes its share of, at `path` once all have."""
