"""benchmarks/profile_step.py at toy sizes: one profiled step per method, with the methods'
profiler labels found and their shares written to the table."""
import json

from benchmarks import profile_step


def test_quick_profile_finds_the_labels(tmp_path):
    assert profile_step.main(["--quick", "--threads", "1", "--methods", "daformer,mic", "--out", str(tmp_path)]) == 0
    [path] = tmp_path.glob("profile-step-*-quick.json")
    rows = json.loads(path.read_text())["rows"]
    assert set(rows["daformer"]["labels"]) == set(profile_step.LABELS) - {"udafast::masked_view"}
    assert set(rows["mic"]["labels"]) == set(profile_step.LABELS)
    for r in rows.values():
        assert r["step_s"] > 0 and sum(r["labels"].values()) < 2 * r["step_s"] and r["top_ops"]
    text = path.with_suffix(".md").read_text()
    assert "| mic | gta5_mic | small | 2, [64, 64] |" in text and "feature_distance" in text
