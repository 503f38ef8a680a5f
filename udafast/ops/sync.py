"""The synchronisation the stateful ops helpers take from their caller.

`ClassThresholds.all_reduce`, `ClassMemoryBank` and `update_prototypes` keep state that every
process of a run must hold alike. They do not talk to the processes themselves: the caller passes
the collective (udafast's methods pass their run context's `all_reduce_` and `all_gather`, see
udafast.engine.distributed), as torchmetrics' `dist_sync_fn` does. None means one process.
"""
from typing import Callable, List

import torch

#: sums a tensor over the processes in place and returns it
AllReduce = Callable[[torch.Tensor], torch.Tensor]
#: every process's tensor (the same shape and dtype everywhere) in rank order, this one's included
AllGather = Callable[[torch.Tensor], List[torch.Tensor]]

__all__ = ["AllReduce", "AllGather"]
