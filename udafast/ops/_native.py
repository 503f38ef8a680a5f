"""Fake (meta) kernels and autograd for the compiled ops torch.ops.udafast.*.

Imported only when udafast._C loaded; the schemas live in csrc/udafast.cpp.
"""
import torch

lib = "udafast::"


@torch.library.register_fake(lib + "class_thresholds")
def _(conf, pred, num_classes, portion, ignore_index):
    return conf.new_empty((num_classes,))


@torch.library.register_fake(lib + "class_histogram_add_")
def _(counts, conf, pred, ignore_index):
    return None


@torch.library.register_fake(lib + "cbst_pseudo_labels")
def _(probs, thresholds, ignore_index):
    b, _, h, w = probs.shape
    return probs.new_empty((b, h, w), dtype=torch.int64)


@torch.library.register_fake(lib + "topk_per_class")
def _(scores, labels, num_classes, k, ignore_index):
    return (
        scores.new_empty((num_classes, k), dtype=torch.int64),
        scores.new_empty((num_classes,), dtype=torch.int64),
    )


@torch.library.register_fake(lib + "prototype_softmax")
def _(features, prototypes, tau, log):
    b, _, h, w = features.shape
    shape = (b, prototypes.shape[0], h, w)
    # float16/bfloat16 features (CUDA) keep float32 distances for the backward
    reduced = features.dtype in (torch.float16, torch.bfloat16)
    return features.new_empty(shape), features.new_empty(shape, dtype=torch.float32 if reduced else features.dtype)


@torch.library.register_fake(lib + "prototype_softmax_backward")
def _(grad_out, out, distances, features, prototypes, tau, log):
    return torch.empty_like(features)


@torch.library.register_fake(lib + "prototype_rectify")
def _(features, prototypes, soft_labels, tau):
    b, _, h, w = features.shape
    return features.new_empty((b, h, w), dtype=torch.int64)


@torch.library.register_fake(lib + "class_feature_sums")
def _(features, labels, num_classes, ignore_index):
    b, d = features.shape[:2]
    return features.new_empty((b, num_classes, d)), features.new_empty((b, num_classes), dtype=torch.int64)


def _loss_fake(logits):
    b, _, h, w = logits.shape
    loss_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return (
        logits.new_empty((), dtype=loss_dtype),
        logits.new_empty((b, h, w), dtype=loss_dtype),
        logits.new_empty((), dtype=torch.int64),
    )


@torch.library.register_fake(lib + "sce_loss")
def _(logits, target, alpha, beta, reg_weight, ignore_index):
    return _loss_fake(logits)


@torch.library.register_fake(lib + "sce_loss_backward")
def _(grad_loss, logits, target, lse, num_valid, alpha, beta, reg_weight, ignore_index):
    return torch.empty_like(logits)


@torch.library.register_fake(lib + "kl_loss")
def _(logits, target_probs, valid_mask):
    return _loss_fake(logits)


@torch.library.register_fake(lib + "kl_loss_backward")
def _(grad_loss, logits, target_probs, valid_mask, lse, num_valid):
    return torch.empty_like(logits)


# ---- autograd: only the differentiable inputs get gradients; constants get None ----


def _prototype_softmax_setup(ctx, inputs, output):
    features, prototypes, tau, log = inputs
    out, distances = output
    ctx.save_for_backward(out, distances, features, prototypes)
    ctx.tau, ctx.log = tau, log


def _prototype_softmax_backward(ctx, grad_out, _grad_distances):
    out, distances, features, prototypes = ctx.saved_tensors
    grad = torch.ops.udafast.prototype_softmax_backward(
        grad_out, out, distances, features, prototypes, ctx.tau, ctx.log
    )
    return grad, None, None, None


torch.library.register_autograd(
    lib + "prototype_softmax", _prototype_softmax_backward, setup_context=_prototype_softmax_setup
)


def _sce_setup(ctx, inputs, output):
    logits, target, alpha, beta, reg_weight, ignore_index = inputs
    _, lse, num_valid = output
    ctx.save_for_backward(logits, target, lse, num_valid)
    ctx.args = (alpha, beta, reg_weight, ignore_index)


def _sce_backward(ctx, grad_loss, _grad_lse, _grad_num_valid):
    logits, target, lse, num_valid = ctx.saved_tensors
    grad = torch.ops.udafast.sce_loss_backward(grad_loss, logits, target, lse, num_valid, *ctx.args)
    return grad, None, None, None, None, None


torch.library.register_autograd(lib + "sce_loss", _sce_backward, setup_context=_sce_setup)


def _kl_setup(ctx, inputs, output):
    logits, target_probs, valid_mask = inputs
    _, lse, num_valid = output
    ctx.save_for_backward(logits, target_probs, valid_mask, lse, num_valid)


def _kl_backward(ctx, grad_loss, _grad_lse, _grad_num_valid):
    logits, target_probs, valid_mask, lse, num_valid = ctx.saved_tensors
    grad = torch.ops.udafast.kl_loss_backward(grad_loss, logits, target_probs, valid_mask, lse, num_valid)
    return grad, None, None


torch.library.register_autograd(lib + "kl_loss", _kl_backward, setup_context=_kl_setup)
