"""benchmarks/memory.py: the measured configs are the GTA5 configs' (network, batch, views), and a
--quick CPU run through the real trainer writes sensible results."""
import json

import pytest

from benchmarks import memory


@pytest.mark.parametrize("method", memory.METHODS)
def test_full_size_config_is_the_gta5_config(method):
    from udafast.config import read_config
    from udafast.engine.runs import resolve_config
    original = resolve_config(read_config(memory.CONFIGS.get(method, f"gta5_{method}")), method)
    config = memory.measurement_config(method, "bf16+ckpt", device="cuda", iters=5)
    assert config["model"]["name"] == original["model"]["name"] and config["model"]["pretrained"] is None
    assert config["init"] is None  # CBST's "@source_only" would train a source network first
    data, old = config["data"], original["data"]
    assert data["batch_size"] == old["batch_size"] and data["num_workers"] == 0
    for key in ("source_view", "target_view"):
        assert data[key] == old[key]
    for split in ("source", "target", "val"):
        assert data[split]["name"] == "synthetic"
    # scenes at the views' resize (the resize is then the identity), or at the real dataset's size for
    # a view without one (CBST trains on GTA5 at its own size, as crst_seg.py does); the crops are the config's
    assert data["source"]["options"]["size"] == (old["source_view"]["resize"] or list(memory.GTA5_SIZE))
    assert data["target"]["options"]["size"] == (old["target_view"]["resize"] or list(memory.CITYSCAPES_SIZE))
    assert data["source"]["options"]["length"] == data["batch_size"]
    assert config["train"]["stage_iters"] == 5 and config["train"]["amp"] == "bf16"
    assert config["train"]["activation_checkpointing"] is True and config["train"]["panels"] == 0
    assert config["eval"] == dict(original["eval"], max_images=1)
    assert config["optimizer"] == original["optimizer"]
    changed = {"contrastive": {"bank_start": 0, "loss_start": 0}, "daformer": {"rcs_min_pixels": 0},
               "mic": {"rcs_min_pixels": 0}}.get(method, {})
    assert config.get(method) == (dict(original[method], **changed) if changed else original.get(method))


def test_proda_config_sizes():
    config = memory.measurement_config("proda", "fp32", device="cuda", iters=8)
    assert config["data"]["source_view"]["crop"] == [512, 896] and config["data"]["batch_size"] == 4
    assert config["train"]["amp"] is None and config["train"]["activation_checkpointing"] is False
    quick = memory.measurement_config("proda", "fp32", device="cpu", iters=2, quick=True)
    assert quick["model"]["name"] == "small"
    assert quick["data"]["source_view"]["crop"] == [64, 112]
    assert quick["data"]["source"]["options"]["size"] == [90, 160]
    assert quick["eval"]["input_size"] == [256, 128]


@pytest.mark.parametrize("argv, message", [
    (["--methods", "proda,fcn"], "--methods: unknown fcn"),
    (["--variants", "fp16"], "--variants"),
    (["--variants", "bf16+ckpt+ckpt"], "--variants"),
    (["--iters", "0"], "--iters"),
    (["--device", "cpu"], "--quick"),
    (["--device", "tpu", "--quick"], "--device"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        memory.parse_args(argv)
    assert message in capsys.readouterr().err


def test_quick_cpu_run(tmp_path):
    """ProDA (warm-up iteration, then stage 1 measured) in float32 and bf16 + checkpointing, each
    in its own process through the real trainer; then an earlier file's other rows survive a merge."""
    out = tmp_path / "results"
    code = memory.main(["--quick", "--device", "cpu", "--methods", "proda", "--variants", "fp32,bf16+ckpt",
                        "--iters", "2", "--threads", "1", "--out", str(out), "--keep", str(tmp_path / "runs")])
    assert code == 0
    [path] = out.glob("memory-cpu-*-quick.json")
    data = json.loads(path.read_text())
    assert data["quick"] is True and data["device"]["type"] == "cpu"
    rows = {r["variant"]: r for r in data["results"]}
    assert set(rows) == {"fp32", "bf16+ckpt"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["method"] == "proda" and r["stage"] == "stage1" and r["steps"] == 2
        assert list(r["stage_setup_s"]) == ["stage1"]  # only the measured stage ran, after the warm-up
        assert r["batch_size"] == 4 and r["source_input"] == "64x112" and r["model"] == "small"
        assert r["peak_rss_bytes"] > r["rss_before_bytes"] > 0
        assert 0 < r["rss_growth_bytes"] < 2**31
        assert r["sec_per_iter"] > 0 and r["step_s"] > 0
    # the warm-up network came from the preparing run, and stage 1 trained from it
    assert (tmp_path / "runs" / "proda" / "prepare" / "run" / "checkpoints" / "warmup.pt").is_file()
    assert (tmp_path / "runs" / "proda" / "fp32" / "run" / "checkpoints" / "stage1.pt").is_file()
    text = path.with_suffix(".md").read_text()
    assert "TOY SIZES" in text and "| proda | gta5_proda | stage1 | small | 4 | 64x112, 64x112 |" in text

    # a later run's rows replace the same (method, variant), the others stay
    old = dict(data, results=data["results"] + [dict(rows["fp32"], method="dann")])
    merged = memory.merge_results(old, dict(data["runs"][data["latest_run"]], date="later"),
                                  [dict(rows["fp32"], peak_rss_bytes=1)], ["fp32", "bf16+ckpt"])
    keys = [(r["method"], r["variant"], r["run"]) for r in merged["results"]]
    assert keys == [("dann", "fp32", data["latest_run"]), ("proda", "fp32", "later"),
                    ("proda", "bf16+ckpt", data["latest_run"])]
    assert set(merged["runs"]) == {data["latest_run"], "later"}


def test_failures_are_rows(tmp_path, monkeypatch):
    """A measurement that fails is a row with the reason (written to its result file too), and the
    table says so; running out of CUDA memory is a result of its own ("oom")."""
    spec = {"method": "proda", "variant": "fp32", "phase": "measure", "device": "cpu", "iters": 1, "quick": True,
            "threads": 1, "out_dir": str(tmp_path / "run"), "result": str(tmp_path / "result.json")}
    result = memory.run_child(spec)  # stage 1 without the warm-up network: the trainer's own error
    assert result["status"] == "error" and "warmup.pt" in result["reason"]
    assert result["device"]["type"] == "cpu"
    assert json.loads((tmp_path / "result.json").read_text())["reason"] == result["reason"]

    from udafast.methods.source_only import SourceOnly
    original = SourceOnly.step

    def out_of_memory(method, batch, it, iters):
        if it == 1:
            raise memory.torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(method, batch, it, iters)
    monkeypatch.setattr(SourceOnly, "step", out_of_memory)
    spec = dict(spec, method="source_only", iters=3, out_dir=str(tmp_path / "oom"), result=None)
    oom = memory.run_child(spec)
    assert oom["status"] == "oom" and oom["reason"] == "after 1 steps: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert SourceOnly.step is out_of_memory  # the measurement's wrapper is gone
    env = memory.environment(result["device"], 1, True, 1)
    row = dict(result, **memory._describe("proda", True), wall_s=1.0)
    oom_row = dict(row, variant="bf16", status="oom", reason=oom["reason"])
    text = memory.markdown(memory.merge_results(None, env, [row, oom_row], list(memory.VARIANTS)))
    assert "| proda | fp32 | - | - | - | - | - | error: FileNotFoundError" in text
    assert "| error | OOM |\n" in text  # columns: the variants measured
    assert "| proda | bf16 | - | - | - | - | - | oom: after 1 steps: CUDA out of memory" in text


def test_cuda_results_file(tmp_path):
    """The CUDA table and file names, from measurement rows as a GPU run's processes report them
    (written after each row, in method and variant order)."""
    device = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "cuda_version": "13.0", "cuda_memory_bytes": 80 * 2**30,
              "torch_threads": 16, "cpu_model": "some CPU", "cpu_count": 16, "slug": "cuda-nvidia-h100-80gb-hbm3"}
    args = memory.parse_args(["--device", "cpu", "--quick", "--variants", "bf16+ckpt,fp32"])
    args.quick = False  # as a full-size GPU run
    results = memory.ResultsFile(tmp_path, args)

    def row(method, variant, gib, **extra):
        return {"method": method, "variant": variant, "status": "ok", "device": dict(device),
                "peak_step_bytes": int(gib * 2**30), "peak_setup_bytes": 2**30, "peak_run_bytes": int(gib * 2**30),
                "reserved_step_bytes": int(gib * 2**30) + 2**29, "sec_per_iter": 1.25, "step_s": 1.2,
                **memory._describe(method, False), **extra}

    results.add(row("proda", "bf16+ckpt", 12.5))
    path = tmp_path / "memory-cuda-nvidia-h100-80gb-hbm3.json"
    assert json.loads(path.read_text())["results"][0]["peak_step_bytes"] == int(12.5 * 2**30)
    results.add(row("proda", "fp32", 40))
    results.add(row("dann", "fp32", 9))
    results.add({"method": "dann", "variant": "bf16+ckpt", "status": "oom", "reason": "CUDA out of memory",
                 **memory._describe("dann", False)})
    text = results.finish()
    assert text == path.with_suffix(".md").read_text()
    assert "# udafast training memory per method: NVIDIA H100 80GB HBM3" in text and "TOY" not in text
    assert "CUDA 13.0, 80.0 GiB" in text
    assert "| dann | gta5_dann | train | deeplabv2_r101 | 1 | 720x1280, 512x1024 | 9.00 GiB, 1.250 s | OOM |" in text
    assert ("| proda | gta5_proda | stage1 | deeplabv2_r101 | 4 | 512x896, 512x896 | 40.00 GiB, 1.250 s | "
            "12.50 GiB, 1.250 s |") in text
    assert "| proda | bf16+ckpt | 12.50 | 1.00 | 12.50 | 13.00 | 1.250 | 1.200 |  |" in text
    data = json.loads(path.read_text())
    assert [(r["method"], r["variant"]) for r in data["results"]] == [
        ("dann", "fp32"), ("dann", "bf16+ckpt"), ("proda", "fp32"), ("proda", "bf16+ckpt")]
    assert data["device"]["name"] == "NVIDIA H100 80GB HBM3" and "device" not in data["results"][0]


def test_quick_cpu_run_of_the_mean_teacher_line(tmp_path):
    """dacs, daformer and mic measured under their GTA5 configs (MiT-B5's replaced by the small
    network at toy sizes), in bf16 with activation checkpointing."""
    out = tmp_path / "results"
    code = memory.main(["--quick", "--device", "cpu", "--methods", "dacs,daformer,mic", "--variants", "bf16+ckpt",
                        "--iters", "2", "--threads", "1", "--out", str(out)])
    assert code == 0
    [path] = out.glob("memory-cpu-*-quick.json")
    rows = {r["method"]: r for r in json.loads(path.read_text())["results"]}
    assert set(rows) == {"dacs", "daformer", "mic"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["steps"] == 2 and r["batch_size"] == 2 and r["source_input"] == "64x64" and r["model"] == "small"
    assert rows["daformer"]["config"] == "gta5_daformer" and rows["mic"]["config"] == "gta5_mic"
