"""`--iters N`: N iterations in every stage of the run (ProDA's stages, CBST's rounds, the pretraining
runs trained first), over the config's per-stage settings; `--method all` and --compare-backends too."""
import json

import pytest
import yaml

from conftest import tiny_config_file
from udafast import train
from udafast.engine import runs


def _write(tmp_path, **sections):
    path = tmp_path / "tiny.yaml"
    base = {"train": {"iters": 9, "panels": 0},
            "data": {"target": {"options": {"length": 6}}, "val": {"options": {"length": 2}}}}
    path.write_text(yaml.safe_dump(tiny_config_file(**runs.merge(base, sections))))
    return str(path)


def _metrics(folder):
    return json.loads((folder / "metrics.json").read_text())


def test_proda_runs_n_iterations_per_stage_and_pretraining(tmp_path, one_thread):
    """The per-stage settings (5), the source-only pretraining's (7) and ssl_source's (6) give way to
    --iters 2; each stage still hands on its best-on-val network (only the length changed)."""
    config = _write(tmp_path, methods={
        "proda": {"init": "@source_only", "pretrain": {"iters": 7},
                  "proda": {"warmup_iters": 5, "stage1_iters": 5, "stage2_iters": 5, "stage3_iters": 5,
                            "disc_ndf": 4, "proto_init_epochs": 1, "student_init": "@ssl_source"}},
        "ssl_source": {"train": {"iters": 6}, "ssl_source": {"view_size": [16, 32]}}})
    out = tmp_path / "proda"
    metrics = train.main(["--method", "proda", "--config", config, "--out", str(out), "--iters", "2",
                          "--eval-every", "1", "--progress", "lines"])
    assert {s: v["iters"] for s, v in metrics["stages"].items()} == \
        {"warmup": 2, "stage1": 2, "stage2": 2, "stage3": 2}
    assert metrics["iters"] == 8 and _metrics(out)["stages"]["stage2"]["iters"] == 2
    assert "best" in metrics["stages"]["warmup"]  # next_from "best" survives the new length
    assert _metrics(out / "pretrain_source_only")["iters"] == 2
    assert _metrics(out / "pretrain_ssl_source")["iters"] == 2
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["iters"] == 2 and resolved["train"]["stage_iters"] == 2


def test_cbst_runs_n_iterations_per_round(tmp_path, one_thread):
    """A round is cbst.epochs_per_round epochs of its set (3 x several batches here); --iters 2 makes it 2,
    and the source-only network trained first (pretrain: 7) gets 2 too."""
    config = _write(tmp_path, methods={"cbst": {
        "init": "@source_only", "pretrain": {"iters": 7},
        "data": {"source_view": {"crop": [16, 32]}, "target_view": {"crop": [16, 32]}},
        "cbst": {"rounds": 2, "epochs_per_round": 3, "source_start": 0.5, "source_max": 0.5}}})
    out = tmp_path / "cbst"
    metrics = train.main(["--method", "cbst", "--config", config, "--out", str(out), "--iters", "2",
                          "--progress", "lines"])
    assert {s: v["iters"] for s, v in metrics["stages"].items()} == {"round0": 2, "round1": 2}
    assert metrics["iters"] == 4
    assert _metrics(out / "pretrain_source_only")["iters"] == 2


def test_comparison_passes_n_to_every_method_and_pretraining(tmp_path, monkeypatch):
    """--method all: every compared method's config, and the ssl_source pretraining's, run N per stage."""
    seen = {}

    def fake_run(config, out_dir, **kw):
        seen[config["method"]] = config["train"]
        seen["ssl_source"] = kw["ssl_config"]["train"]
        return {"method": config["method"], "seed": config["seed"], "miou": 1.0, "per_class_iou": {"road": 1.0},
                "sec_per_iter": 0.1, "iters": 2, "backend": "auto", "stages": {}}

    monkeypatch.setattr(runs, "run_method", fake_run)
    config = _write(tmp_path, methods={"proda": {"proda": {"stage1_iters": 5}}, "adabn": {"train": {"iters": 25}}})
    train.main(["--method", "all", "--config", config, "--out", str(tmp_path / "all"), "--iters", "2"])
    assert set(seen) == set(runs.COMPARED) | {"ssl_source"}
    assert all(t["iters"] == 2 and t["stage_iters"] == 2 for t in seen.values())


def test_compare_backends_runs_n_iterations(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(runs, "compare_backends", lambda config, out, iters: seen.append(iters) or
                        {"agree": True, "method": "dann", "iters_compared": iters, "max_rel_loss_diff": 0.0,
                         "rtol": 1e-3, "sec_per_iter": {"reference": 1.0, "auto": 0.5}, "speedup_per_iter": 2.0,
                         "speedup_pseudo_labels": {}})
    config = _write(tmp_path)
    for argv, iters in (([], 5), (["--iters", "3"], 3)):
        train.main(["--method", "dann", "--config", config, "--compare-backends", "--out", str(tmp_path / "b")] + argv)
        assert seen[-1] == iters


@pytest.mark.parametrize("argv, iters, stage_iters", [
    (["--iters", "2"], 2, 2),
    # --set train.iters keeps its meaning: a single stage's length, and ProDA's stages' where
    # proda.<stage>_iters leaves them unset
    (["--set", "train.iters=3"], 3, None),
    (["--iters", "2", "--set", "train.stage_iters=4"], 2, 4),  # --set comes last
])
def test_iters_flag_against_set(tmp_path, argv, iters, stage_iters):
    args = train.build_parser().parse_args(["--method", "proda"] + argv)
    config = runs.resolve_config({}, "proda", train._overrides(args))
    assert (config["train"]["iters"], config["train"]["stage_iters"]) == (iters, stage_iters)
