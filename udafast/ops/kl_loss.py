"""SPEC 1.4: KL(target || softmax(logits)) over valid pixels, fused."""
from typing import Optional

import torch

from udafast.ops import check
from udafast.ops import reference
from udafast.ops.backend import resolve
from udafast.ops.dispatch import launch
from udafast.ops.sce_loss import check_logits


def kl_loss(logits: torch.Tensor, target_probs: torch.Tensor, *, valid_mask: Optional[torch.Tensor] = None,
            backend: str = "auto") -> torch.Tensor:
    """sum over valid pixels and classes of t (log t - log_softmax(logits)), divided by n * C.

    `logits` [B, C, H, W]; `target_probs` t, the same shape, a constant that need not sum to 1;
    `valid_mask` bool [B, H, W] (None: every pixel valid); n: the number of valid pixels.

    Returns a 0-d float32 tensor (float64 for float64 logits; 0 when no pixel is valid),
    differentiable in `logits`."""
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
