"""SPEC 1.3: class_feature_sums, on ProDA's 256-d head features at stride 8 (as bench_prototype_softmax)."""
import torch

import udafast.ops as ops
from benchmarks.harness import Case, class_labels, generator, nbytes
from udafast.ops import reference

C = 19
B, D, H, W = 2, 256, 128, 224
IGNORE = 255


# ---- best pure PyTorch ----------------------------------------------------------------------


def pytorch_class_feature_sums(features, labels, num_classes, ignore_index=255):
    """A [B, C, HW] membership mask times the features in one batched matmul."""
    b, d, h, w = features.shape
    classes = torch.arange(num_classes, device=features.device)
    member = labels.reshape(b, 1, h * w).long() == classes[None, :, None]
    member &= (classes != ignore_index)[None, :, None]
    sums = torch.bmm(member.to(features.dtype), features.reshape(b, d, h * w).transpose(1, 2))
    return sums, member.sum(dim=2)


# ---- inputs ---------------------------------------------------------------------------------


def sums_inputs(device):
    g = generator(34)
    features = torch.randn(B, D, H, W, generator=g)
    labels = class_labels((B, H, W), C, g, ignore_fraction=0.05, ignore_index=IGNORE)
    return {"features": features.to(device), "labels": labels.to(device)}


# ---- cases ----------------------------------------------------------------------------------

CASES = [
    Case(
        name="class_feature_sums",
        op="class_feature_sums",
        kernels=("class_feature_sums",),
        shapes=f"features float32 [{B}, {D}, {H}, {W}], labels int64 [{B}, {H}, {W}] (5% ignored), C={C}",
        make_inputs=sums_inputs,
        api=lambda x, backend: lambda: ops.class_feature_sums(
            x["features"], x["labels"], C, ignore_index=IGNORE, backend=backend
        ),
        ref_call=lambda x, impl: lambda: impl(x["features"], x["labels"], C, IGNORE),
        reference_fn=reference.class_feature_sums,
        pytorch_fn=pytorch_class_feature_sums,
        bytes_min=lambda x: nbytes(x["features"], x["labels"]) + B * C * D * 4 + B * C * 8,
        bytes_note="read features and labels once, write [B, C, D] sums and [B, C] counts",
    ),
]
