"""SPEC 1.4: sce_loss, forward + backward."""
import math

import torch
import torch.nn.functional as F

import udafast.ops as ops
from udafast.ops import reference
from benchmarks.harness import Case, class_labels, generator, nbytes

C = 19
SHAPE = (4, C, 256, 512)
IGNORE = 255
ALPHA, BETA, REG = 0.1, 1.0, 0.1  # ProDA stage 1: 0.1 CE + 1.0 RCE, 0.1 REG
_NEG_LOG_FLOOR = -math.log(1e-4)


def pytorch_sce_loss(logits, target, alpha=0.1, beta=1.0, reg_weight=0.0, ignore_index=255):
    """CE by nll_loss; RCE = -log(1e-4) * (sum_k clamp(p_k) - clamp(p_y)) on valid pixels."""
    log_p = F.log_softmax(logits, dim=1)
    target = target.long()
    valid = target != ignore_index
    n = valid.sum().clamp(min=1).to(logits.dtype)
    ce = F.nll_loss(log_p, target, ignore_index=ignore_index, reduction="sum") / n
    p = log_p.exp().clamp(1e-7, 1.0)
    p_y = p.gather(1, torch.where(valid, target, 0).unsqueeze(1)).squeeze(1)
    rce = _NEG_LOG_FLOOR * torch.where(valid, p.sum(dim=1) - p_y, 0.0).sum() / n
    loss = alpha * ce + beta * rce
    if reg_weight:
        loss = loss - reg_weight * log_p.mean()
    return loss


def make_inputs(device):
    g = generator(41)
    logits = 3.0 * torch.randn(SHAPE, generator=g)
    target = class_labels((SHAPE[0],) + SHAPE[2:], C, g, ignore_fraction=0.1, ignore_index=IGNORE)
    return {"logits": logits.to(device).requires_grad_(True), "target": target.to(device)}


CASES = [
    Case(
        name="sce_loss fwd+bwd",
        op="sce_loss",
        kernels=("sce_loss", "sce_loss_backward"),
        shapes=f"logits float32 {list(SHAPE)}, target int64 (10% ignored), alpha={ALPHA}, beta={BETA}, "
               f"reg_weight={REG}",
        make_inputs=make_inputs,
        api=lambda x, backend: lambda: ops.sce_loss(
            x["logits"], x["target"], alpha=ALPHA, beta=BETA, reg_weight=REG, ignore_index=IGNORE, backend=backend
        ),
        ref_call=lambda x, impl: lambda: impl(x["logits"], x["target"], ALPHA, BETA, REG, IGNORE),
        reference_fn=reference.sce_loss,
        pytorch_fn=pytorch_sce_loss,
        bytes_min=lambda x: 3 * nbytes(x["logits"]) + 2 * nbytes(x["target"]),
        bytes_note="forward: read logits and target; backward: read them again, write the logits' gradient",
        backward="logits",
    ),
]
