"""SPEC 1.2: topk_per_class (the selection behind ClassMemoryBank.push)."""
import torch

import udafast.ops as ops
from udafast.ops import reference
from benchmarks.harness import Case, class_labels, generator, nbytes

C = 19
K = 256
N = 65536
IGNORE = 255
IGNORED = 0.3  # share of pixels callers filter out (wrong or unconfident teacher predictions)


def pytorch_topk_per_class(scores, labels, num_classes, k, ignore_index=255):
    """One masked [C, N] torch.topk. (Equal scores may come out in another order than the
    reference's lowest-position-first; with continuous scores that is rare.)"""
    n = scores.numel()
    classes = torch.arange(num_classes, device=scores.device)
    member = (labels.reshape(1, -1).long() == classes[:, None]) & (classes != ignore_index)[:, None]
    masked = torch.where(member, scores.reshape(1, -1), float("-inf"))
    kk = min(k, n)
    index = torch.topk(masked, kk, dim=1, sorted=True).indices
    count = member.sum(dim=1).clamp_(max=k)
    index = torch.where(torch.arange(kk, device=scores.device) < count[:, None], index, -1)
    if kk < k:
        index = torch.cat([index, index.new_full((num_classes, k - kk), -1)], dim=1)
    return index, count


def make_inputs(device):
    g = generator(21)
    scores = torch.rand(N, generator=g)  # selector outputs, sigmoid in (0, 1)
    labels = class_labels((N,), C, g, ignore_fraction=IGNORED, ignore_index=IGNORE)
    return {"scores": scores.to(device), "labels": labels.to(device)}


CASES = [
    Case(
        name="topk_per_class",
        op="topk_per_class",
        kernels=("topk_per_class",),
        shapes=f"scores float32 + labels int64 [{N}] ({int(IGNORED * 100)}% ignored), C={C}, k={K}",
        make_inputs=make_inputs,
        api=lambda x, backend: lambda: ops.topk_per_class(
            x["scores"], x["labels"], C, K, ignore_index=IGNORE, backend=backend
        ),
        ref_call=lambda x, impl: lambda: impl(x["scores"], x["labels"], C, K, IGNORE),
        reference_fn=reference.topk_per_class,
        pytorch_fn=pytorch_topk_per_class,
        bytes_min=lambda x: nbytes(x["scores"], x["labels"]) + 8 * C * K + 8 * C,
        bytes_note="read scores and labels once, write the [C, k] index and [C] count",
    ),
]
