"""SPEC 1.4: KL(target || softmax(logits)) over valid pixels, fused."""
import torch

from udafast.ops import validate as check
from udafast.ops import reference
from udafast.ops.backend import resolve
from udafast.ops.dispatch import launch
from udafast.ops.sce_loss import check_logits


def kl_loss(logits, target_probs, *, valid_mask=None, backend="auto"):
    """sum over valid pixels and classes of t (log t - log_softmax(logits)), divided by n * C.

    `target_probs` is a constant and need not sum to 1; 0 when no pixel is valid."""
    check_logits(logits)
    check.ndim("target_probs", target_probs, 4, "[B, C, H, W]")
    check.float_dtype("target_probs", target_probs, reduced=True)
    check.same_shape("target_probs", target_probs, "logits", logits.shape)
    check.same_device(("logits", logits), ("target_probs", target_probs))
    if valid_mask is not None:
        check.ndim("valid_mask", valid_mask, 3, "[B, H, W]")
        if valid_mask.dtype != torch.bool:
            raise ValueError(f"valid_mask must be of dtype bool; got {valid_mask.dtype}")
        b, _, h, w = logits.shape
        check.same_shape("valid_mask", valid_mask, "[B, H, W]", (b, h, w))
        check.same_device(("logits", logits), ("valid_mask", valid_mask))
    logits, target_probs = check.widened_on_cpu(logits), check.widened_on_cpu(target_probs)
    chosen = resolve("kl_loss", backend, logits.device)
    return launch("kl_loss", chosen, reference.kl_loss, logits, target_probs.detach(), valid_mask)


__all__ = ["kl_loss"]
