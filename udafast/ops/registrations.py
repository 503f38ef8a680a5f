"""What torch.library needs beside each compiled op's kernels, in one table for both compiled
backends: the C++/CUDA ops `udafast::<op>` (schemas in csrc/udafast.cpp) and the Triton ops
`udafast_triton::<op>` (udafast.kernels).

- `FAKES`: the fake (meta) kernel of every op: output shapes, dtypes and layouts, for
  torch.compile and FakeTensor tracing. Both backends return exactly these.
- `AUTOGRAD`: for the differentiable ops, how the forward's context is saved and how the op's own
  backward op (`<op>_backward` in the same namespace) is called; constants get no gradient.
- `AUXILIARY`: those ops also return what their backward reuses (the distances; the per-pixel
  log-sum-exp and the valid count); `public_output` keeps the op's own result.

`register(namespace)` applies the table to the ops of one namespace.
"""
from typing import Any, Callable

import torch

__all__ = ["FAKES", "AUTOGRAD", "AUXILIARY", "register", "public_output"]


def _reduced_to_float32(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 inputs keep float32 partial results (distances, losses)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _loss_outputs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss 0-d, lse [B, H, W], num_valid int64 0-d); float64 only for float64 logits."""
    b, _, h, w = logits.shape
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return (logits.new_empty((), dtype=dtype), logits.new_empty((b, h, w), dtype=dtype),
            logits.new_empty((), dtype=torch.int64))


def _prototype_softmax(features, prototypes, tau, log):
    b, _, h, w = features.shape
    shape = (b, prototypes.shape[0], h, w)
    return features.new_empty(shape), features.new_empty(shape, dtype=_reduced_to_float32(features.dtype))


FAKES: dict[str, Callable[..., Any]] = {
    "class_thresholds": lambda conf, pred, num_classes, portion, ignore_index: conf.new_empty((num_classes,)),
    "class_histogram_add_": lambda counts, conf, pred, ignore_index: None,
    "cbst_pseudo_labels": lambda probs, thresholds, ignore_index: probs.new_empty(
        (probs.shape[0], *probs.shape[2:]), dtype=torch.int64),
    "topk_per_class": lambda scores, labels, num_classes, k, ignore_index: (
        scores.new_empty((num_classes, k), dtype=torch.int64), scores.new_empty((num_classes,), dtype=torch.int64)),
    "prototype_softmax": _prototype_softmax,
    # both backends write the gradient of the contiguous features
    "prototype_softmax_backward": lambda grad_out, out, distances, features, prototypes, tau, log: torch.empty_like(
        features, memory_format=torch.contiguous_format),
    "prototype_rectify": lambda features, prototypes, soft_labels, tau: features.new_empty(
        (features.shape[0], *features.shape[2:]), dtype=torch.int64),
    "class_feature_sums": lambda features, labels, num_classes, ignore_index: (
        features.new_empty((features.shape[0], num_classes, features.shape[1])),
        features.new_empty((features.shape[0], num_classes), dtype=torch.int64)),
    "sce_loss": lambda logits, target, alpha, beta, reg_weight, ignore_index: _loss_outputs(logits),
    # the losses' gradients take the logits' layout
    "sce_loss_backward": lambda grad_loss, logits, target, lse, num_valid, alpha, beta, reg_weight, ignore_index:
        torch.empty_like(logits),
    "kl_loss": lambda logits, target_probs, valid_mask: _loss_outputs(logits),
    "kl_loss_backward": lambda grad_loss, logits, target_probs, valid_mask, lse, num_valid: torch.empty_like(logits),
}


def _prototype_softmax_setup(ctx, inputs, output):
    features, prototypes, tau, log = inputs
    out, distances = output
    ctx.save_for_backward(out, distances, features, prototypes)
    ctx.constants = (tau, log)


def _prototype_softmax_backward(backward_op, ctx, grad_out, _grad_distances):
    out, distances, features, prototypes = ctx.saved_tensors
    return backward_op(grad_out, out, distances, features, prototypes, *ctx.constants), None, None, None


def _sce_setup(ctx, inputs, output):
    logits, target, alpha, beta, reg_weight, ignore_index = inputs
    _, lse, num_valid = output
    ctx.save_for_backward(logits, target, lse, num_valid)
    ctx.constants = (alpha, beta, reg_weight, ignore_index)


def _sce_backward(backward_op, ctx, grad_loss, _grad_lse, _grad_num_valid):
    logits, target, lse, num_valid = ctx.saved_tensors
    return backward_op(grad_loss, logits, target, lse, num_valid, *ctx.constants), None, None, None, None, None


def _kl_setup(ctx, inputs, output):
    logits, target_probs, valid_mask = inputs
    _, lse, num_valid = output
    ctx.save_for_backward(logits, target_probs, valid_mask, lse, num_valid)


def _kl_backward(backward_op, ctx, grad_loss, _grad_lse, _grad_num_valid):
    logits, target_probs, valid_mask, lse, num_valid = ctx.saved_tensors
    return backward_op(grad_loss, logits, target_probs, valid_mask, lse, num_valid), None, None


#: op -> (setup_context, backward(backward_op, ctx, *grads))
AUTOGRAD: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "prototype_softmax": (_prototype_softmax_setup, _prototype_softmax_backward),
    "sce_loss": (_sce_setup, _sce_backward),
    "kl_loss": (_kl_setup, _kl_backward),
}

#: ops whose compiled form returns (result, what its backward reuses...)
AUXILIARY = frozenset(AUTOGRAD)


def public_output(op: str, backend: str, out: Any) -> Any:
    """The op's own result from what a backend returned (the reference returns only that)."""
    return out[0] if backend != "reference" and op in AUXILIARY else out


def register(namespace: str) -> None:
    """Register the fake kernels and autograd formulas of the ops `namespace` defines (every op of
    the table that `torch.ops.<namespace>` has)."""
    ops = getattr(torch.ops, namespace)
    for op, fake in FAKES.items():
        if hasattr(ops, op):
            torch.library.register_fake(f"{namespace}::{op}", fake)
    for op, (setup, backward) in AUTOGRAD.items():
        if hasattr(ops, op):
            backward_op = getattr(ops, f"{op}_backward")
            torch.library.register_autograd(
                f"{namespace}::{op}",
                lambda ctx, *grads, backward=backward, backward_op=backward_op: backward(backward_op, ctx, *grads),
                setup_context=setup)
