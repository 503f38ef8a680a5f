"""Activation checkpointing of backbone stages: `stage(module, x, enabled, *args)`.

With `enabled` (and gradients being recorded), a stage keeps only its input and recomputes its
activations in the backward pass (torch.utils.checkpoint, non-reentrant, random state preserved),
trading about a third more compute for the stage's activation memory. The recomputation runs the
stage's BatchNorm layers in training mode a second time; their running statistics and batch
counters are put back afterwards, so a batch counts once, as without checkpointing."""
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

__all__ = ["stage"]


class _KeepBuffers:
    """Restores a module's buffers on exit (around the recomputation)."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.saved = [b.clone() for b in self.module.buffers()]

    def __exit__(self, *exc):
        with torch.no_grad():
            for b, s in zip(self.module.buffers(), self.saved):
                b.copy_(s)
        return False


class _NoContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def stage(module: nn.Module, x: torch.Tensor, enabled: bool, *args: Any) -> torch.Tensor:
    """`module(x, *args)`, checkpointed when `enabled` and autograd is recording."""
    if not (enabled and torch.is_grad_enabled()):
        return module(x, *args)
    return checkpoint(module, x, *args, use_reentrant=False, context_fn=lambda: (_NoContext(), _KeepBuffers(module)))
