"""SPEC 1.2: per-class top-K selection and the class-wise memory bank built on it."""
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from udafast.ops import check
from udafast.ops import reference
from udafast.ops.backend import resolve
from udafast.ops.dispatch import launch
from udafast.ops.sync import AllGather


def topk_per_class(scores: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int, *,
                   ignore_index: int = 255, backend: str = "auto",
                   validate: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per class, the positions of its min(N_c, k) highest scores, descending, ties by lower
    position; rows padded with -1. Exact.

    `scores` [N]: float, no NaN; `labels` [N]: integer, the class of each position
    (`ignore_index`: left out).

    Returns (index int64 [C, k], count int64 [C])."""
    check.ndim("scores", scores, 1, "[N]")
    check.ndim("labels", labels, 1, "[N]")
    check.float_dtype("scores", scores, reduced=True)
    scores = check.widened(scores)
    check.int_dtype("labels", labels)
    check.same_shape("labels", labels, "scores", scores.shape)
    check.same_device(("scores", scores), ("labels", labels))
    check.positive_int("num_classes", num_classes)
    check.positive_int("k", k)
    ignore_index = check.ignore_index(ignore_index)
    if check.values_checked(validate):
        check.no_nan("scores", scores)
        check.labels_in_range("labels", labels, num_classes, ignore_index)
    chosen = resolve("topk_per_class", backend, scores.device)
    return launch(
        "topk_per_class", chosen, reference.topk_per_class, scores.detach(), labels, num_classes, k, ignore_index
    )


class ClassMemoryBank:
    """One ring of `size` features of `dim` channels per class, newest first (SPEC 1.2):
    `features` [C, size, D] and `counts` int64 [C].

    `all_gather`: under several processes, the caller's gather (e.g. the run context's
    `all_gather`, see udafast.ops.sync) through which `push` inserts every process's selection;
    None: one process.
    """

    def __init__(self, num_classes: int, size: int, dim: int, device: Optional[Union[torch.device, str]] = None, *,
                 dtype: torch.dtype = torch.float32, ignore_index: int = 255, backend: str = "auto",
                 all_gather: Optional[AllGather] = None) -> None:
        check.positive_int("num_classes", num_classes)
        check.positive_int("size", size)
        check.positive_int("dim", dim)
        self.num_classes, self.size, self.dim = num_classes, size, dim
        self.ignore_index = check.ignore_index(ignore_index)
        self.backend = backend
        self.all_gather = all_gather
        self.features = torch.zeros(num_classes, size, dim, dtype=dtype, device=device)
        self.counts = torch.zeros(num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def push(self, features: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, per_class: int, *,
             validate: Optional[bool] = None) -> None:
        """Insert, per class, the `per_class` highest-scoring features in front (descending score).

        `features` [N, D], `labels` [N] and `scores` [N] as in `topk_per_class`; pixels to leave
        out carry `ignore_index` as their label. With `all_gather`, every process's selection is
        gathered and inserted in rank order (rank 0's in front), so all banks stay equal.
        """
        check.ndim("features", features, 2, "[N, D]")
        if features.shape[1] != self.dim:
            raise ValueError(f"features must have dim={self.dim} channels; got shape {tuple(features.shape)}")
        if scores.dim() != 1 or scores.shape[0] != features.shape[0]:
            raise ValueError(f"scores must have shape [N] = ({features.shape[0]},); got {tuple(scores.shape)}")
        check.positive_int("per_class", per_class)
        index, count = topk_per_class(
            scores, labels, self.num_classes, per_class,
            ignore_index=self.ignore_index, backend=self.backend, validate=validate,
        )
        if features.shape[0] == 0:  # nothing to offer (a process may have none under several processes)
            selected = self.features.new_zeros(self.num_classes, per_class, self.dim)
        else:
            selected = features.detach().to(self.features)[index.clamp(min=0)]  # [C, per_class, D]
        blocks = [(selected, count)]
        if self.all_gather is not None:
            blocks = list(zip(self.all_gather(selected), self.all_gather(count)))
        # the last block inserted ends up in front: insert in reverse rank order
        for block_features, block_counts in reversed(blocks):
            self._insert(block_features, block_counts.tolist())

    def _insert(self, block_features: torch.Tensor, block_counts: List[int]) -> None:
        for c, n in enumerate(block_counts):
            if n == 0:
                continue
            n = min(n, self.size)
            kept = min(int(self.counts[c]), self.size - n)
            self.features[c, n : n + kept] = self.features[c, :kept].clone()
            self.features[c, :n] = block_features[c, :n]
            self.counts[c] = n + kept

    def get(self, c: int) -> torch.Tensor:
        """The features of class c, newest first: [n_c, D]."""
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < self.num_classes:
            raise ValueError(f"c must be a class index in [0, {self.num_classes}); got {c!r}")
        return self.features[c, : int(self.counts[c])]

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """{"features", "counts"} (copies)."""
        return {"features": self.features.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore the features and counts of a `state_dict` of a bank of the same shape."""
        if tuple(state["features"].shape) != tuple(self.features.shape):
            raise ValueError(
                f"state['features'] must have shape {tuple(self.features.shape)}; got {tuple(state['features'].shape)}"
            )
        self.features.copy_(state["features"])
        self.counts.copy_(state["counts"])


__all__ = ["topk_per_class", "ClassMemoryBank"]
