"""--compare-backends: the same run with the reference ops and the fast ones agrees, and is timed."""
import pytest

from conftest import tiny_run_config
from udafast.engine.runs import compare_backends
from udafast.ops import backend


@pytest.mark.skipif(backend.native_unavailable_reason("sce_loss", "cpu") is not None,
                    reason="the compiled extension is not built")
def test_proda_losses_agree_across_backends(tmp_path):
    config = tiny_run_config("proda", train={"panels": 0})
    report = compare_backends(config, tmp_path, iters=2, fast="native", log=lambda *_: None)
    assert report["agree"], report["mismatches"]
    assert report["iters_compared"] == 8  # 2 iterations of each of the four stages
    assert 0 <= report["max_rel_loss_diff"] <= report["rtol"]
    assert set(report["sec_per_iter"]) == {"reference", "native"}
    assert report["speedup_per_iter"] > 0
    assert set(report["stage_setup_s"]["reference"]) == {"warmup", "stage1", "stage2", "stage3"}
