"""How good a method's pseudo-labels are, per class: what a self-training method is made of.

A method feeds every pseudo-label map it makes (CBST's round labels, ProDA's rectified and
distillation labels, a teacher's labels) to `LabelQuality.update` with, where the run has them, the
target's true labels aligned with it. Per class c it reports

- `coverage[c]`: the share of the target pixels seen that are labelled c (their sum, `coverage_total`,
  is the share labelled at all);
- `precision[c]`: of the pixels labelled c that have a true label, the share whose true class is c;
- `recall[c]`: of the pixels whose true class is c, the share labelled c;
- `accuracy`: of the labelled pixels that have a true label, the share labelled right,

with `precision_mean` / `recall_mean` over the classes where they are defined (None where no true
labels were given). Counts are int64 and add up across processes (`counts()` / `load_counts`).
Pixels labelled outside [0, C) (255) are unlabelled, true labels outside it unknown.
"""
from __future__ import annotations

import torch

__all__ = ["LabelQuality"]

#: rows of the counts matrix
_LABELLED, _CORRECT, _LABELLED_WITH_TRUTH, _TRUE = range(4)


class LabelQuality:
    """Per-class coverage, precision and recall of pseudo-labels (see the module docstring)."""

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)
        # [labelled as c, labelled c and truly c, labelled c where truth is known, truly c] per class
        self._counts = torch.zeros(4, self.num_classes, dtype=torch.int64)
        self._pixels = 0
        self._with_truth = False

    @torch.no_grad()
    def update(self, labels: torch.Tensor, truth: torch.Tensor | None = None) -> None:
        """Add a batch of pseudo-labels (int, 255 = unlabelled) and, when known, the true labels of
        the same pixels (same shape; 255 = unknown)."""
        labels = labels.detach().reshape(-1).to("cpu", torch.int64)
        c = self.num_classes
        self._pixels += labels.numel()
        labelled = (labels >= 0) & (labels < c)
        self._counts[_LABELLED] += torch.bincount(labels[labelled], minlength=c)
        if truth is None:
            return
        truth = truth.detach().reshape(-1).to("cpu", torch.int64)
        if truth.shape != labels.shape:
            raise ValueError(f"truth: expected {tuple(labels.shape)} pixels like the labels, got {tuple(truth.shape)}")
        self._with_truth = True
        known = (truth >= 0) & (truth < c)
        both = labelled & known
        self._counts[_LABELLED_WITH_TRUTH] += torch.bincount(labels[both], minlength=c)
        self._counts[_CORRECT] += torch.bincount(labels[both & (labels == truth)], minlength=c)
        self._counts[_TRUE] += torch.bincount(truth[known], minlength=c)

    def counts(self) -> torch.Tensor:
        """float64 [4 * C + 2]: the counts, the pixel count and whether truth was given, as one
        tensor a caller can sum across processes (exact below 2^53 pixels)."""
        return torch.cat([self._counts.reshape(-1).double(),
                          torch.tensor([float(self._pixels), float(self._with_truth)], dtype=torch.float64)])

    def load_counts(self, flat: torch.Tensor) -> None:
        """Set the state from `counts()` (e.g. after summing them across processes)."""
        c = self.num_classes
        flat = flat.detach().to("cpu", torch.float64)
        self._counts = flat[:4 * c].round().to(torch.int64).reshape(4, c)
        self._pixels = int(flat[4 * c].item())
        self._with_truth = bool(flat[4 * c + 1].item() > 0)

    def summary(self) -> dict:
        """The figures of the module docstring as plain floats and lists (fractions in [0, 1])."""
        n = self._counts
        pixels = max(self._pixels, 1)
        coverage = (n[_LABELLED].double() / pixels).tolist()
        out = {"pixels": self._pixels, "coverage": coverage, "coverage_total": float(sum(coverage)),
               "precision": None, "recall": None, "precision_mean": None, "recall_mean": None, "accuracy": None}
        if not self._with_truth:
            return out
        precision = [float(t) / float(p) if p > 0 else None
                     for t, p in zip(n[_CORRECT].tolist(), n[_LABELLED_WITH_TRUTH].tolist())]
        recall = [float(t) / float(g) if g > 0 else None for t, g in zip(n[_CORRECT].tolist(), n[_TRUE].tolist())]
        judged = int(n[_LABELLED_WITH_TRUTH].sum())
        out.update(precision=precision, recall=recall, precision_mean=_mean(precision), recall_mean=_mean(recall),
                   accuracy=float(n[_CORRECT].sum()) / judged if judged else None)
        return out


def _mean(values):
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None
