"""benchmarks/proda_ablation.py: every row of the ProDA ablation runs (a few iterations each on tiny
scenes), its flags select what the row says, and the results name the paper's figures."""
import json

import pytest
import yaml

from benchmarks import proda_ablation
from conftest import tiny_config_file
from udafast.config import merge


def test_rows_flags_are_the_papers_components():
    rows = {key: flags for key, _, _, flags, _ in proda_ablation.ROWS}
    assert [r[2] for r in proda_ablation.ROWS] == [36.6, 41.6, 45.2, 45.6, 52.3, 47.6, 53.7, 56.9, 57.5, 56.9, 57.5]
    assert rows["stage2_run_init"] == rows["stage3_run_init"] == ["proda.student_init=null"]
    assert "proda.rectify=false" in rows["self_training"] and "proda.kl_weight=0.0" in rows["self_training"]
    assert "proda.ce_weight=1.0" in rows["self_training"] and "proda.rce_weight=0.0" in rows["self_training"]
    assert rows["sce"] == ["proda.rectify=false", "proda.kl_weight=0.0"]  # the defaults' SCE, no denoising, no KL
    assert rows["denoising"] == ["proda.kl_weight=0.0"] and rows["structure"] == ["proda.rectify=false"]
    assert rows["stage1"] == []


def test_the_ablation_runs_and_writes_its_table(tmp_path, capsys):
    config = merge(tiny_config_file(data={"target": {"options": {"length": 6}}, "val": {"options": {"length": 2}}},
                                    train={"panels": 0, "iters": 2}),
                   {"methods": {"proda": {"init": "@source_only"}}})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    results = tmp_path / "ablation.json"
    rc = proda_ablation.main(["--config", str(path), "--seeds", "0", "--out", str(tmp_path / "runs"),
                              "--results", str(results)])
    assert rc == 0
    data = json.loads(results.read_text())
    assert [r["key"] for r in data["rows"]] == [r[0] for r in proda_ablation.ROWS]
    for row in data["rows"]:
        assert row["miou_per_seed"] and 0 <= row["miou_mean"] <= 100
    by_key = {r["key"]: r for r in data["rows"]}
    assert by_key["source_only"]["label_accuracy_mean"] is None
    assert by_key["denoising"]["label_accuracy_mean"] is not None
    # the stage-1 rows started from the whole run's warm-up network, not their own warm-up
    assert not (tmp_path / "runs" / "seed_0" / "stage1_sce" / "metrics.json").read_text().count('"warmup"')
    table = (tmp_path / "ablation.md").read_text()
    assert "| all of stage 1 |" in table and "| 53.7 |" in table
    # a second call reuses the finished runs
    done = [p.stat().st_mtime_ns for p in sorted((tmp_path / "runs").rglob("metrics.json"))]
    assert proda_ablation.main(["--config", str(path), "--seeds", "0", "--out", str(tmp_path / "runs"),
                                "--results", str(results)]) == 0
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "runs").rglob("metrics.json"))] == done
    assert json.loads(results.read_text())["rows"] == data["rows"]
    # the source-only and whole ProDA runs can come from a comparison's folder
    comparison = tmp_path / "comparison"
    for method in ("source_only", "proda"):
        (comparison / method).mkdir(parents=True)
        (comparison / method / "seed_0").symlink_to(tmp_path / "runs" / "seed_0" / method)
    again = tmp_path / "again.json"
    assert proda_ablation.main(["--config", str(path), "--seeds", "0", "--out", str(tmp_path / "runs2"),
                                "--results", str(again), "--from-comparison", str(comparison)]) == 0
    rows = {r["key"]: r for r in json.loads(again.read_text())["rows"]}
    for key in ("source_only", "warmup", "stage1", "stage2", "stage3"):
        assert rows[key]["miou_mean"] == by_key[key]["miou_mean"]
    assert not (tmp_path / "runs2" / "seed_0" / "proda").exists()
    assert proda_ablation.main(["--config", str(path), "--seeds", "1", "--out", str(tmp_path / "runs3"),
                                "--results", str(again), "--from-comparison", str(comparison)]) == 2
    assert "no finished source_only run of seed 1" in capsys.readouterr().err


def test_bad_seeds_are_an_error(capsys):
    with pytest.raises(SystemExit):
        proda_ablation.main(["--seeds", "a,b"])
    assert "--seeds" in capsys.readouterr().err
