"""AdaBN: the source network with its BatchNorm statistics re-estimated on the target domain.

Li, Wang, Shi, Liu, Hou, "Revisiting Batch Normalization For Practical Domain Adaptation", ICLR
workshop 2017. No loss and no gradient: the network (normally the source-only one, `init:
"@source_only"`) sees `iters` target batches in training mode, and each BatchNorm layer's running
mean and variance become the plain average over those batches (momentum None) in place of the
source statistics. A control rather than one of the five methods: it measures how much of a
domain gap is low-level feature statistics, which every method that forwards target batches in
training mode also adapts as a side effect.
"""
import torch
import torch.nn as nn

from udafast.methods.base import Method

__all__ = ["AdaBN"]


class AdaBN(Method):
    name = "adabn"

    def start_stage(self, stage, model, resume=False):
        self.model = model
        self.optimizers = {}
        if not resume:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.reset_running_stats()
                    m.momentum = None  # cumulative average over every batch seen
        else:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = None

    @torch.no_grad()
    def step(self, batch, it, iters):
        self.model.train()
        self.model(self.normalize(batch["target"]["image"]))
        return {}
