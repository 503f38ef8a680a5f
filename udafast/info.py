"""`python -m udafast.info`: versions, and which op backends are available here (and why not)."""
import platform
import sys

import torch

import udafast
from udafast.ops import backend

OPS = (
    "class_thresholds", "class_histogram_add_", "cbst_pseudo_labels", "topk_per_class",
    "prototype_softmax", "prototype_rectify", "class_feature_sums", "sce_loss", "kl_loss",
)


def _triton_version():
    try:
        import triton

        return triton.__version__
    except Exception as exc:
        return f"not installed ({type(exc).__name__})"


def report():
    lines = [
        f"udafast {udafast.__version__}",
        f"python  {platform.python_version()} ({sys.executable})",
        f"torch   {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}, "
        f"CUDA available: {torch.cuda.is_available()}, threads: {torch.get_num_threads()})",
        f"triton  {_triton_version()}",
        f"extension udafast._C: {'loaded' if backend.extension_loaded() else backend.EXTENSION_ERROR}",
        "",
        f"{'op':<22} {'device':<7} {'auto':<10} {'native':<7} triton",
    ]
    reasons = []  # why a backend is unavailable, each printed once and referred to by number

    def status(reason):
        if reason is None:
            return "yes"
        if reason not in reasons:
            reasons.append(reason)
        return f"no [{reasons.index(reason) + 1}]"

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for op in OPS:
        for device in devices:
            native = status(backend.native_unavailable_reason(op, device))
            triton = status(backend.triton_unavailable_reason(op, device))
            auto = backend.auto_choice(op, device)
            lines.append(f"{op:<22} {device:<7} {auto:<10} {native:<7} {triton}")
    lines += [""] + [f"[{i}] {reason}" for i, reason in enumerate(reasons, 1)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
