"""SPEC 1.2: per-class top-K selection and the class-wise memory bank built on it."""
import torch

from udafast.ops import validate as check
from udafast.ops import reference
from udafast.ops.backend import resolve
from udafast.ops.dispatch import launch


def topk_per_class(scores, labels, num_classes, k, *, ignore_index=255, backend="auto", validate=None):
    """Per class, the positions of its min(N_c, k) highest scores, descending, ties by lower
    position; rows padded with -1. Returns (index int64 [C, k], count int64 [C]). Exact."""
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
    """One ring of `size` features per class, newest first (SPEC 1.2)."""

    def __init__(self, num_classes, size, dim, device=None, *, dtype=torch.float32, ignore_index=255, backend="auto"):
        check.positive_int("num_classes", num_classes)
        check.positive_int("size", size)
        check.positive_int("dim", dim)
        self.num_classes, self.size, self.dim = num_classes, size, dim
        self.ignore_index = check.ignore_index(ignore_index)
        self.backend = backend
        self.features = torch.zeros(num_classes, size, dim, dtype=dtype, device=device)
        self.counts = torch.zeros(num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def push(self, features, labels, scores, per_class, *, validate=None):
        """Insert, per class, the `per_class` highest-scoring features in front (descending score).

        Pixels to leave out carry `ignore_index` as their label. Under torch.distributed every
        process's selection is gathered and inserted in rank order, so all banks stay equal.
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
        if features.shape[0] == 0:  # nothing to offer (a process may have none under torch.distributed)
            selected = self.features.new_zeros(self.num_classes, per_class, self.dim)
        else:
            selected = features.detach().to(self.features)[index.clamp(min=0)]  # [C, per_class, D]
        blocks = [(selected, count)]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            all_selected = [torch.empty_like(selected) for _ in range(world)]
            all_counts = [torch.empty_like(count) for _ in range(world)]
            torch.distributed.all_gather(all_selected, selected.contiguous())
            torch.distributed.all_gather(all_counts, count)
            blocks = list(zip(all_selected, all_counts))
        # the last block inserted ends up in front: insert in reverse rank order
        for block_features, block_counts in reversed(blocks):
            self._insert(block_features, block_counts.tolist())

    def _insert(self, block_features, block_counts):
        for c, n in enumerate(block_counts):
            if n == 0:
                continue
            n = min(n, self.size)
            kept = min(int(self.counts[c]), self.size - n)
            self.features[c, n : n + kept] = self.features[c, :kept].clone()
            self.features[c, :n] = block_features[c, :n]
            self.counts[c] = n + kept

    def get(self, c):
        """The features of class c, newest first: [n_c, D]."""
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < self.num_classes:
            raise ValueError(f"c must be a class index in [0, {self.num_classes}); got {c!r}")
        return self.features[c, : int(self.counts[c])]

    def state_dict(self):
        return {"features": self.features.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state):
        if tuple(state["features"].shape) != tuple(self.features.shape):
            raise ValueError(
                f"state['features'] must have shape {tuple(self.features.shape)}; got {tuple(state['features'].shape)}"
            )
        self.features.copy_(state["features"])
        self.counts.copy_(state["counts"])


__all__ = ["topk_per_class", "ClassMemoryBank"]
