"""`python -m udafast.train`: flags, outputs, seeds, the results file, errors."""
import json
import subprocess
import sys

import pytest
import yaml

from udafast import train
from udafast.engine.runs import format_results, summarize, write_results


def test_help_lists_methods_and_presets():
    out = subprocess.run([sys.executable, "-m", "udafast.train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for word in ("source_only", "oracle", "dann", "adaptsegnet", "cbst", "contrastive", "proda", "synthetic",
                 "--compare-backends", "--seeds", "--resume"):
        assert word in out.stdout


def test_one_method_with_flags(tiny_yaml, tmp_path, capsys):
    out = tmp_path / "run"
    metrics = train.main(["--method", "oracle", "--config", tiny_yaml, "--out", str(out), "--iters", "3",
                          "--batch-size", "2", "--seed", "5", "--backend", "reference", "--set", "eval.max_images=2",
                          "--progress", "lines"])
    assert metrics["iters"] == 3 and metrics["seed"] == 5 and metrics["backend"] == "reference"
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["method"] == "oracle" and resolved["eval"]["max_images"] == 2
    assert resolved["data"]["batch_size"] == 2
    assert "target val mIoU" in capsys.readouterr().out


def test_seeds_write_results(tiny_yaml, tmp_path):
    out = tmp_path / "seeds"
    results = train.main(["--method", "source_only", "--config", tiny_yaml, "--out", str(out), "--seeds", "0,1",
                          "--results", str(tmp_path / "res.json")])
    entry = results["methods"]["source_only"]
    assert entry["seeds"] == [0, 1] and len(entry["miou_per_seed"]) == 2
    assert (out / "seed_0" / "metrics.json").is_file() and (out / "seed_1" / "metrics.json").is_file()
    for suffix in (".json", ".md", ".png"):
        assert (tmp_path / f"res{suffix}").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--method", "source_only", "--config", "/nonexistent/x.yaml"], "/nonexistent/x.yaml"),
    (["--method", "source_only", "--set", "trian.iters=3"], "unknown key"),
    (["--method", "all", "--stage", "stage1"], "--stage"),
])
def test_errors_exit_with_a_message(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(argv + ["--out", str(tmp_path / "x")])
    assert message in str(e.value)


def fake_metrics(name, seed, miou, stages=None):
    return {"method": name, "seed": seed, "miou": miou, "per_class_iou": {"road": miou, "sky": None},
            "sec_per_iter": 0.1, "iters": 10, "backend": "auto", "stages": stages or {}}


def test_summarize_and_write(tmp_path):
    runs = {"source_only": [fake_metrics("source_only", 0, 20.0), fake_metrics("source_only", 1, 22.0)],
            "proda": [fake_metrics("proda", s, 30.0 + s, {"warmup": {"miou": 25.0 + s}, "stage1": {"miou": 30.0 + s}})
                      for s in (0, 1)]}
    results = summarize(runs, preset="synthetic")
    src = results["methods"]["source_only"]
    assert src["miou_mean"] == 21.0 and src["miou_std"] == 1.41
    assert src["per_class_iou"] == {"road": 21.0, "sky": None}
    assert results["methods"]["proda"]["stages"]["warmup"]["miou_mean"] == 25.5
    assert results["preset"] == "synthetic" and "commit" in results
    table = format_results(results)
    assert "| source_only | 21.00 ± 1.41 |" in table and "proda after warmup" in table
    path = write_results(results, tmp_path / "r.json")
    assert json.loads(open(path).read())["methods"]["proda"]["miou_mean"] == 30.5
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_summary_shows_the_pseudo_label_class_means():
    runs = {"cbst": []}
    for seed, (cov, prec) in enumerate([(0.2, 0.8), (0.4, 0.6)]):
        m = fake_metrics("cbst", seed, 25.0)
        m["pseudo_labels"] = {"round0": {"labels": {"coverage_total": cov, "precision_mean": prec,
                                                     "recall_mean": None, "accuracy": 0.9}}}
        runs["cbst"].append(m)
    entry = summarize(runs)["methods"]["cbst"]
    assert entry["pseudo_labels"]["round0"]["labels"] == {"coverage_total": 30.0, "precision_mean": 70.0,
                                                          "recall_mean": None, "accuracy": 90.0}
    assert "| 30.0 / 70.0 / - (labels, round0) |" in format_results(summarize(runs))


def test_summary_keeps_the_score_before_a_last_change():
    runs = {"contrastive": [dict(fake_metrics("contrastive", s, 30.0 + s), miou_before_bn_update=28.0 + s)
                            for s in (0, 1)]}
    results = summarize(runs)
    assert results["methods"]["contrastive"]["miou_before_bn_update_mean"] == 28.5
    assert "| contrastive | 30.50 ± 0.71 (bn update: before 28.50) |" in format_results(results)
