"""DANN: domain-adversarial training by gradient reversal, per pixel on the backbone features.

    L = CE(source) + mean_pixels BCE(D(R(f)), domain)

with `f` the stride-8 backbone features of both domains, `D` a per-pixel domain classifier (1x1
convs in -> hidden -> hidden -> 1, ReLU), domain labels source 0 / target 1, the BCE averaged over
every pixel of both domains, and `R` the gradient reversal layer: identity forward, gradient times
`-w * lambda_p` backward. One optimiser step trains `D` on the full domain loss (its gradient is the
BCE's, unscaled) and the network to make the domains indistinguishable: the features receive
`-w * lambda_p` times the BCE's gradient. `lambda_p = 2 / (1 + exp(-10 p)) - 1` over training
progress `p`; w (`dann.weight`) scales only the reversed gradient (SPEC part 2), as in the paper,
where the classifier descends the domain loss and lambda scales what reaches the features.

Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation", ICML 2015; Ganin et al.,
"Domain-Adversarial Training of Neural Networks", JMLR 2016. No official segmentation version
exists; the per-pixel form and the weight w = 0.001 (AdaptSegNet's adversarial scale) are SPEC
part 2's choices.
"""
import math

import torch
import torch.nn.functional as F

from udafast.methods.base import Method, seg_loss
from udafast.methods.adversarial import SOURCE_LABEL, TARGET_LABEL
from udafast.methods.context import RunContext
from udafast.models.heads import DomainClassifier

__all__ = ["DANN", "GradientReversal", "grad_reverse", "grl_lambda", "domain_loss"]


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by `-lambd`."""

    @staticmethod
    def forward(ctx, x, lambd):
        ctx.lambd = float(lambd)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * -ctx.lambd, None


def grad_reverse(x, lambd):
    return GradientReversal.apply(x, lambd)


def grl_lambda(p, gamma=10.0):
    """DANN's schedule `2 / (1 + exp(-gamma p)) - 1`: 0 at the start, -> 1 as progress p -> 1
    (the classifier's early, noisy signal is kept from the features)."""
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


def domain_loss(source_logits, target_logits):
    """BCE-with-logits averaged over every pixel of both domains (source 0, target 1); the domains'
    maps may differ in size, each pixel counts once."""
    logits = torch.cat([source_logits.reshape(-1), target_logits.reshape(-1)])
    labels = torch.cat([torch.full((source_logits.numel(),), SOURCE_LABEL, device=logits.device),
                        torch.full((target_logits.numel(),), TARGET_LABEL, device=logits.device)])
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def _check(options):
    w = options["weight"]
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
        raise ValueError(f"dann.weight: expected a number >= 0, got {w!r}")
    lam = options["grl_lambda"]
    if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0):
        raise ValueError(f"dann.grl_lambda: expected null (the schedule) or a number >= 0, got {lam!r}")
    h = options["hidden"]
    if isinstance(h, bool) or not isinstance(h, int) or h <= 0:
        raise ValueError(f"dann.hidden: expected a positive integer, got {h!r}")


class DANN(Method):
    name = "dann"
    defaults = {
        "weight": 0.001,       # scales the gradient reversed into the features (not the classifier's)
        "grl_lambda": None,    # None: the schedule 2 / (1 + exp(-10 p)) - 1; a number: fixed
        "hidden": 1024,        # the domain classifier's width
    }

    def __init__(self, config: dict, ctx: RunContext):
        super().__init__(config, ctx)
        _check(self.options)

    def start_stage(self, stage, model, resume=False):
        super().start_stage(stage, model, resume)
        channels = model.backbone.out_channels[-1]
        self.classifier = DomainClassifier(channels, self.options["hidden"]).to(self.device)
        self.modules = {"domain_classifier": self.classifier}
        # one optimiser: the classifier trains with the heads, at 10x the backbone's lr
        opt = self.optimizers["model"]
        lr = 10.0 * float(self.config["optimizer"]["lr"])
        opt.add_param_group({"params": list(self.classifier.parameters()), "lr": lr, "initial_lr": lr,
                             "name": "domain_classifier"})

    def lambda_at(self, it, iters):
        fixed = self.options["grl_lambda"]
        return float(fixed) if fixed is not None else grl_lambda(it / iters)

    def step(self, batch, it, iters):
        source, target = batch["source"], batch["target"]
        lambd = self.lambda_at(it, iters)
        out_s = self.model(self.normalize(source["image"]), return_backbone=True)
        out_t = self.model(self.normalize(target["image"]), return_backbone=True)
        seg = seg_loss(out_s["logits"], source["label"].to(self.device))
        # the weight scales only the gradient reversed into the features; the classifier minimises
        # the full domain loss (its own gradient unscaled)
        scale = self.options["weight"] * lambd
        dom = domain_loss(self.classifier(grad_reverse(out_s["backbone"], scale)),
                          self.classifier(grad_reverse(out_t["backbone"], scale)))
        loss = seg + dom
        opt = self.optimizers["model"]
        opt.zero_grad(set_to_none=True)
        self.backward(loss)
        opt.step()
        return {"seg": seg.detach(), "domain": dom.detach(), "lambda": lambd}
