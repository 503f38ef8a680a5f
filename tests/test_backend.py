"""Backend selection, the extension's presence, and graceful degradation without it."""
import os
import subprocess
import sys

import pytest
import torch

import udafast.ops as ops
from udafast.ops import backend


@pytest.mark.skipif(os.environ.get("UDAFAST_NO_EXT") == "1", reason="installed without the extension on purpose")
def test_extension_is_built_and_has_every_cpu_kernel():
    assert backend.extension_loaded(), backend.EXTENSION_ERROR
    from udafast.info import OPS

    backwards = ("prototype_softmax_backward", "sce_loss_backward", "kl_loss_backward")
    missing = [op for op in OPS + backwards if not backend.native_has_kernel(op, "cpu")]
    assert not missing, f"no CPU kernel for {missing}"
    # the availability table agrees with the dispatcher, op by op
    for op in OPS + backwards:
        for device, key in (("cpu", "CPU"), ("cuda", "CUDA")):
            assert backend.native_has_kernel(op, device) == \
                torch._C._dispatch_has_kernel_for_dispatch_key(f"udafast::{op}", key), (op, device)
    assert backend.resolve("sce_loss", "auto", "cpu") == "native"


def test_triton_without_kernel_or_device_raises_runtime_error_saying_why():
    with pytest.raises(RuntimeError, match="backend='triton' is unavailable for sce_loss"):
        ops.sce_loss(torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.int64), backend="triton")


def test_reference_backend_is_always_available():
    assert backend.resolve("kl_loss", "reference", "cpu") == "reference"


SCRIPT = """
import sys, warnings
sys.modules["udafast._C"] = None  # the extension fails to load
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, udafast
    from udafast import ops
    logits, target = torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.int64)
    ops.sce_loss(logits, target)
    ops.kl_loss(logits, torch.rand(1, 3, 2, 2))
fallbacks = [w for w in caught if "falls back to the pure-PyTorch reference" in str(w.message)]
print("warnings", len(fallbacks))
try:
    ops.sce_loss(logits, target, backend="native")
except RuntimeError as exc:
    print("native:", exc)
from udafast.info import report
print(report())
"""


def test_missing_extension_falls_back_to_reference_with_one_warning():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "warnings 1" in result.stdout
    assert "native: backend='native' is unavailable for sce_loss: the udafast._C extension is not loaded" in result.stdout
    assert "extension udafast._C: udafast._C is not built" in result.stdout


def test_info_prints_versions_and_backends():
    result = subprocess.run([sys.executable, "-m", "udafast.info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"torch   {torch.__version__}" in result.stdout
    for op in ("class_thresholds", "topk_per_class", "prototype_softmax", "sce_loss", "kl_loss"):
        assert op in result.stdout


@pytest.mark.parametrize(
    "native, triton, expected",
    [(True, True, "native"), (False, True, "triton"), (True, False, "native"), (False, False, "reference")],
)
def test_auto_on_cuda_follows_the_table_then_falls_back(monkeypatch, native, triton, expected):
    monkeypatch.setattr(backend, "native_has_kernel", lambda op, device_type: native)
    monkeypatch.setattr(backend, "triton_available", lambda op, device_type: triton)
    monkeypatch.setitem(backend.CUDA_AUTO, "sce_loss", "native")
    assert backend.auto_choice("sce_loss", "cuda") == expected
    monkeypatch.setitem(backend.CUDA_AUTO, "sce_loss", "triton")
    flipped = {"native": "triton" if triton else "native", "triton": "triton", "reference": "reference"}
    assert backend.auto_choice("sce_loss", "cuda") == flipped[expected]


def test_cuda_auto_table_names_every_op_and_a_fast_backend():
    from udafast.info import OPS

    assert set(backend.CUDA_AUTO) == set(OPS)
    assert set(backend.CUDA_AUTO.values()) <= {"native", "triton"}
