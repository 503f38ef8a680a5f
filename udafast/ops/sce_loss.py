"""SPEC 1.4: symmetric cross-entropy (CE + reverse CE) with ProDA's regulariser, fused."""
from typing import Optional

import torch

from udafast.ops import check
from udafast.ops import reference
from udafast.ops.backend import resolve
from udafast.ops.dispatch import launch


def check_logits(logits: torch.Tensor) -> None:
    """`logits` must be a float [B, C, H, W] tensor (ValueError otherwise); kl_loss checks alike."""
    check.ndim("logits", logits, 4, "[B, C, H, W]")
    check.float_dtype("logits", logits, reduced=True)


def sce_loss(logits: torch.Tensor, target: torch.Tensor, *, alpha: float = 0.1, beta: float = 1.0,
             reg_weight: float = 0.0, ignore_index: int = 255, backend: str = "auto",
             validate: Optional[bool] = None) -> torch.Tensor:
    """alpha * CE + beta * RCE over non-ignored pixels + reg_weight * REG over all pixels.

    `logits` [B, C, H, W]; `target` int [B, H, W] (`ignore_index`: left out of CE and RCE).

    Returns a 0-d float32 tensor (float64 for float64 logits), differentiable in `logits`."""
    check_logits(logits)
    check.ndim("target", target, 3, "[B, H, W]")
    check.int_dtype("target", target)
    b, c, h, w = logits.shape
    check.same_shape("target", target, "[B, H, W]", (b, h, w))
    check.same_device(("logits", logits), ("target", target))
    alpha = check.number("alpha", alpha)
    beta = check.number("beta", beta)
    reg_weight = check.number("reg_weight", reg_weight)
    ignore_index = check.ignore_index(ignore_index)
    if check.values_checked(validate):
        check.labels_in_range("target", target, c, ignore_index)
    logits = check.widened_on_cpu(logits)
    chosen = resolve("sce_loss", backend, logits.device)
    return launch("sce_loss", chosen, reference.sce_loss, logits, target, alpha, beta, reg_weight, ignore_index)


__all__ = ["sce_loss"]
