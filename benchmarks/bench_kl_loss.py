"""SPEC 1.4: kl_loss, forward + backward."""
import torch
import torch.nn.functional as F

import udafast.ops as ops
from udafast.ops import reference
from benchmarks.harness import Case, generator, nbytes

C = 19
SHAPE = (4, C, 256, 512)


def pytorch_kl_loss(logits, target_probs, valid_mask=None):
    """F.kl_div (t log t - t log q, 0 where t = 0) summed over classes, masked per pixel."""
    log_q = F.log_softmax(logits, dim=1)
    t = target_probs.detach().to(logits.dtype)
    classes = logits.shape[1]
    if valid_mask is None:
        return F.kl_div(log_q, t, reduction="sum") / logits.numel()  # n * C
    pixel = F.kl_div(log_q, t, reduction="none").sum(dim=1)
    n = valid_mask.sum().clamp(min=1).to(logits.dtype)
    return torch.where(valid_mask, pixel, 0.0).sum() / (n * classes)


def make_inputs(device):
    g = generator(42)
    logits = 3.0 * torch.randn(SHAPE, generator=g)
    target = torch.softmax(3.0 * torch.randn(SHAPE, generator=g), dim=1)
    valid = torch.rand((SHAPE[0],) + SHAPE[2:], generator=g) < 0.9
    return {
        "logits": logits.to(device).requires_grad_(True),
        "target_probs": target.to(device),
        "valid_mask": valid.to(device),
    }


CASES = [
    Case(
        name="kl_loss fwd+bwd",
        op="kl_loss",
        kernels=("kl_loss", "kl_loss_backward"),
        shapes=f"logits + target_probs float32 {list(SHAPE)}, valid_mask (90% valid)",
        make_inputs=make_inputs,
        api=lambda x, backend: lambda: ops.kl_loss(
            x["logits"], x["target_probs"], valid_mask=x["valid_mask"], backend=backend
        ),
        ref_call=lambda x, impl: lambda: impl(x["logits"], x["target_probs"], x["valid_mask"]),
        reference_fn=reference.kl_loss,
        pytorch_fn=pytorch_kl_loss,
        bytes_min=lambda x: 3 * nbytes(x["logits"]) + 2 * nbytes(x["target_probs"], x["valid_mask"]),
        bytes_note="forward: read logits, targets and mask; backward: read them again, write the "
                   "logits' gradient",
        backward="logits",
    ),
]
