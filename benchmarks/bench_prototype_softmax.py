"""SPEC 1.3: prototype_softmax (forward, forward + backward) and prototype_rectify."""
import torch
import torch.nn.functional as F

import udafast.ops as ops
from udafast.ops import reference
from benchmarks.harness import Case, generator, nbytes

C = 19
B, D, H, W = 2, 256, 128, 224  # ProDA: 256-d head features at stride 8 of a 1024 x 1792 view
TAU = 1.0


# ---- best pure PyTorch ----------------------------------------------------------------------


def pytorch_prototype_logits(features, prototypes, tau=1.0):
    """-||f - p|| / tau from the expansion ||f||^2 - 2 f.p + ||p||^2 (one matmul, no [B, C, D, H, W])."""
    b, d, h, w = features.shape
    f = features.reshape(b, d, h * w)
    p = prototypes.detach().to(features.dtype)
    fp = torch.einsum("cd,bdn->bcn", p, f)  # [B, C, HW]
    ff = torch.linalg.vector_norm(f, dim=1, keepdim=True).square()  # [B, 1, HW]
    pp = p.square().sum(dim=1)[None, :, None]  # [1, C, 1]
    dist = (ff - 2.0 * fp + pp).clamp_min(0.0).sqrt()
    return (dist / -tau).reshape(b, -1, h, w)


def pytorch_prototype_softmax(features, prototypes, tau=1.0, log=False):
    logits = pytorch_prototype_logits(features, prototypes, tau)
    return F.log_softmax(logits, dim=1) if log else F.softmax(logits, dim=1)


@torch.no_grad()
def pytorch_prototype_rectify(features, prototypes, soft_labels, tau=1.0):
    """argmax of exp(l - max l) * soft_labels: the softmax's per-pixel normaliser does not move it."""
    logits = pytorch_prototype_logits(features, prototypes, tau)
    weights = (logits - logits.amax(dim=1, keepdim=True)).exp_()
    return weights.mul_(soft_labels).argmax(dim=1)


# ---- inputs ---------------------------------------------------------------------------------


def _features_prototypes(g):
    features = torch.randn(B, D, H, W, generator=g)
    prototypes = torch.randn(C, D, generator=g)
    return features, prototypes


def forward_inputs(device):
    features, prototypes = _features_prototypes(generator(31))
    return {"features": features.to(device), "prototypes": prototypes.to(device)}


def backward_inputs(device):
    g = generator(32)
    features, prototypes = _features_prototypes(g)
    grad_out = torch.randn(B, C, H, W, generator=g)
    return {
        "features": features.to(device).requires_grad_(True),
        "prototypes": prototypes.to(device),
        "grad_out": grad_out.to(device),
    }


def rectify_inputs(device):
    g = generator(33)
    features, prototypes = _features_prototypes(g)
    soft = torch.softmax(3.0 * torch.randn(B, C, H, W, generator=g), dim=1)
    return {"features": features.to(device), "prototypes": prototypes.to(device), "soft_labels": soft.to(device)}


# ---- cases ----------------------------------------------------------------------------------

FEATURES = f"features float32 [{B}, {D}, {H}, {W}], prototypes [{C}, {D}], tau={TAU:g}"
OUT_BYTES = B * C * H * W * 4


def _softmax_api(x, backend):
    return lambda: ops.prototype_softmax(x["features"], x["prototypes"], TAU, backend=backend)


def _softmax_ref_call(x, impl):
    return lambda: impl(x["features"], x["prototypes"], TAU, False)


CASES = [
    Case(
        name="prototype_softmax fwd",
        op="prototype_softmax",
        kernels=("prototype_softmax",),
        shapes=FEATURES + " (the teacher's forward, no autograd)",
        make_inputs=forward_inputs,
        api=_softmax_api,
        ref_call=_softmax_ref_call,
        reference_fn=reference.prototype_softmax,
        pytorch_fn=pytorch_prototype_softmax,
        bytes_min=lambda x: nbytes(x["features"], x["prototypes"]) + OUT_BYTES,
        bytes_note="read features once, write the [B, C, H, W] softmax",
    ),
    Case(
        name="prototype_softmax fwd+bwd",
        op="prototype_softmax",
        kernels=("prototype_softmax", "prototype_softmax_backward"),
        shapes=FEATURES + ", backward of a random [B, C, H, W] output gradient",
        make_inputs=backward_inputs,
        api=_softmax_api,
        ref_call=_softmax_ref_call,
        reference_fn=reference.prototype_softmax,
        pytorch_fn=pytorch_prototype_softmax,
        bytes_min=lambda x: 3 * nbytes(x["features"]) + 2 * OUT_BYTES,
        bytes_note="forward: read features, write the softmax; backward: read the output gradient and "
                   "the features again, write the features' gradient",
        backward="features",
    ),
    Case(
        name="prototype_rectify",
        op="prototype_rectify",
        kernels=("prototype_rectify",),
        shapes=FEATURES + f", soft_labels float32 [{B}, {C}, {H}, {W}]",
        make_inputs=rectify_inputs,
        api=lambda x, backend: lambda: ops.prototype_rectify(
            x["features"], x["prototypes"], x["soft_labels"], TAU, backend=backend
        ),
        ref_call=lambda x, impl: lambda: impl(x["features"], x["prototypes"], x["soft_labels"], TAU),
        reference_fn=reference.prototype_rectify,
        pytorch_fn=pytorch_prototype_rectify,
        bytes_min=lambda x: nbytes(x["features"], x["prototypes"], x["soft_labels"]) + B * H * W * 8,
        bytes_note="read features and soft labels once, write int64 labels",
        label_tolerance=1e-4,
    ),
]
