"""Run configs: defaults, files with `extends`, presets, per-method sections and --set overrides;
the whole-config check (udafast.config_schema)."""
import subprocess
import sys

import pytest
import yaml

from udafast.config import (DEFAULTS, apply_overrides, config_names, merge, parse_override, preset_names,
                                   read_config)
from udafast.config_schema import validate_config
from udafast.engine.runs import resolve_config
from udafast.methods import METHOD_NAMES


def test_merge_is_deep_and_copies():
    base = {"a": {"b": 1, "c": [1]}, "d": 2}
    out = merge(base, {"a": {"b": 5}})
    assert out == {"a": {"b": 5, "c": [1]}, "d": 2}
    out["a"]["c"].append(2)
    assert base["a"]["c"] == [1]


@pytest.mark.parametrize("text, keys, value", [
    ("train.iters=5", ["train", "iters"], 5),
    ("optimizer.lr=2.5e-4", ["optimizer", "lr"], 2.5e-4),
    ("optimizer.lr=1e-3", ["optimizer", "lr"], 1e-3),
    ("name=deeplab", ["name"], "deeplab"),
    ("init=null", ["init"], None),
    ("eval.input_size=[1024, 512]", ["eval", "input_size"], [1024, 512]),
    ("data.source.root=/a=b", ["data", "source", "root"], "/a=b"),
])
def test_parse_override(text, keys, value):
    assert parse_override(text) == (keys, value)


@pytest.mark.parametrize("bad", ["iters", "=3", "a..b=1"])
def test_parse_override_rejects(bad):
    with pytest.raises(ValueError, match="--set"):
        parse_override(bad)


def test_overrides_create_nested_keys():
    out = apply_overrides({"a": 1}, ["b.c.d=2", "a=3"])
    assert out == {"a": 3, "b": {"c": {"d": 2}}}


def test_resolve_config_precedence():
    file_config = {"train": {"iters": 7}, "methods": {"oracle": {"train": {"iters": 9}}}}
    assert resolve_config(file_config, "source_only")["train"]["iters"] == 7
    oracle = resolve_config(file_config, "oracle", ["train.eval_every=3"])
    assert oracle["train"]["iters"] == 9 and oracle["train"]["eval_every"] == 3
    assert oracle["method"] == "oracle"
    assert oracle["optimizer"] == DEFAULTS["optimizer"]


def test_resolve_config_rejects_unknown():
    with pytest.raises(ValueError, match="unknown key"):
        resolve_config({"trian": {}}, "source_only")
    with pytest.raises(ValueError, match="unknown method"):
        resolve_config({"methods": {"nope": {}}}, "source_only")
    with pytest.raises(ValueError, match="method"):
        resolve_config({}, "nope")


def test_read_config_extends_and_missing(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {iters: 3, eval_every: 1}\nseed: 4\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ntrain: {iters: 5}\n")
    assert read_config(tmp_path / "child.yaml") == {"train": {"iters": 5, "eval_every": 1}, "seed": 4}
    missing = tmp_path / "nope.yaml"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        read_config(missing)
    (tmp_path / "bad.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        read_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize("name", config_names() + preset_names())
def test_shipped_configs_resolve_for_every_method(name):
    """Each shipped config and preset passes the whole-config check for every method (any may be
    run with it: its own, those of its `methods:` sections, the others of --method all)."""
    config = read_config(name)
    named = {config.get("method", "source_only"), *(config.get("methods") or {})}
    assert named <= set(METHOD_NAMES)
    for method in METHOD_NAMES:
        resolved = resolve_config(config, method)
        validate_config(resolved)
        if resolved["data"]["source"]["name"] != "synthetic":  # no synthetic option carried over
            assert all(resolved["data"][s]["options"] == {} for s in ("source", "target", "val"))


@pytest.mark.parametrize("file_config, overrides, message", [
    ({}, ["train.iter=5"], "config: unknown key train.iter (did you mean train.iters?); known in train: "
                           "activation_checkpointing, amp, channels_last, ckpt_every, eval_every, grad_accum, iters, "),
    ({}, ["data.batchsize=2"], "unknown key data.batchsize (did you mean data.batch_size?); known in data: batch_size,"),
    ({"train": {"iterations": 5}}, [], "unknown key train.iterations (did you mean train.iters?)"),
    ({"trian": {}}, [], "unknown key trian (did you mean train?); known at the top level: adabn, adaptsegnet,"),
    ({"model": {"name": "small", "widht": 8}}, [], "unknown key model.widht (did you mean model.width?); "
                                                   "known in model: feature_dim, name, normalization, num_classes, width"),
    ({"model": {"name": "deeplabv2_r101"}}, ["model.width=8"], "unknown key model.width; known in model: aspp,"),
    ({}, ["data.source.options.lenght=5"], "unknown key data.source.options.lenght (did you mean "
                                           "data.source.options.length?); known in data.source.options: cache, domain,"),
    ({"data": {"val": {"name": "cityscapes", "options": {"label": True}}}}, [],
     "unknown key data.val.options.label (did you mean data.val.options.labels?); known in data.val.options: "
     "labels, list_file, strict"),
    ({"data": {"target_view": {"crops": [8, 8]}}}, [], "unknown key data.target_view.crops (did you mean "
                                                       "data.target_view.crop?)"),
    ({"pretrain": {"iter": 3}}, [], "unknown key pretrain.iter (did you mean pretrain.iters?); known in pretrain:"),
    ({"methods": {"proda": {"proda": {"stage1_iter": 3}}}}, [],
     "config of proda (methods.proda): unknown key proda.stage1_iter (did you mean proda.stage1_iters?); "
     "known in proda: adv_scale,"),
    ({"cbst": {"round": 2}}, [], "unknown key cbst.round (did you mean cbst.rounds?)"),
    ({}, ["adaptsegnet.discriminator.betass=[0.9, 0.99]"],
     "unknown key adaptsegnet.discriminator.betass (did you mean adaptsegnet.discriminator.betas?); known in "
     "adaptsegnet.discriminator: betas, lr, momentum, name, poly_iters, power, schedule, warmup_iters, "
     "warmup_ratio, weight_decay"),
    ({}, ["oracle.weight=1"], "unknown key oracle.weight; oracle takes no keys"),
    ({}, ["train.iters.x=5"], "unknown key train.iters.x (train.iters takes a value, not keys)"),
    ({}, ["train.iter=5", "eval.max_image=2"], "unknown keys train.iter (did you mean train.iters?), eval.max_image "
                                               "(did you mean eval.max_images?); known in train: "),
    ({"model": {"name": "resnet"}}, [], "model.name: expected one of deeplabv2_r101, small, mit_b5_daformer, got 'resnet'"),
    ({}, ["data.val.name=citiscapes"], "data.val.name: unknown dataset 'citiscapes'; known: cityscapes, folder,"),
    ({"train": None}, [], "train: expected a mapping of activation_checkpointing, amp,"),
])
def test_unknown_keys_are_named_at_any_depth(file_config, overrides, message):
    with pytest.raises(ValueError) as e:
        resolve_config(file_config, "source_only", overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_null_stands_for_an_empty_section_where_the_code_reads_it_so():
    config = resolve_config({"data": {"source_view": None}, "eval": {"slide": None}, "proda": None, "pretrain": None},
                            "proda")
    assert config["data"]["source_view"] is None and config["proda"] is None
    with pytest.raises(ValueError, match="^data.source: expected a mapping of name, options, root, split, got None$"):
        resolve_config({"data": {"source": {"name": "synthetic"}}}, "proda", ["data.source=null"])


def test_free_form_dataset_options():
    """A dataset whose factory takes **options takes any option (the factory checks them)."""
    from udafast.data import datasets
    datasets.register_dataset("test-free", lambda root, split, transform=None, **options: None)
    try:
        config = resolve_config({"data": {"target": {"name": "test-free", "options": {"anything": 1}}}}, "source_only")
        assert config["data"]["target"]["options"] == {"anything": 1}
        assert datasets.dataset_options("test-free") is None
    finally:
        datasets._REGISTRY.pop("test-free")
    assert datasets.dataset_options("gta5") == ("list_file", "strict")


def test_another_dataset_drops_the_options_of_the_one_below():
    """data.<split>.options belong to the split's dataset: the default synthetic `domain` does not
    reach gta5, whether a file or --set names it; options given with it stay."""
    gta = resolve_config({"data": {"source": {"name": "gta5", "options": {"strict": False}}}}, "source_only")
    assert gta["data"]["source"]["options"] == {"strict": False}
    assert gta["data"]["target"]["options"] == {"domain": "target"}
    assert resolve_config({}, "source_only", ["data.source.name=gta5"])["data"]["source"]["options"] == {}
    kept = resolve_config({}, "source_only", ["data.source.name=folder", "data.source.options.image_dir=img"])
    assert kept["data"]["source"]["options"] == {"image_dir": "img"}


@pytest.fixture
def tiny_yaml_path(tmp_path):
    from conftest import tiny_config_file
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config_file(train={"iters": 1, "panels": 0})))
    return path


@pytest.mark.parametrize("method, extra, argv, message", [
    ("source_only", {}, ["--set", "train.iter=5"], "config: unknown key train.iter (did you mean train.iters?)"),
    ("source_only", {}, ["--set", "data.batchsize=2"], "unknown key data.batchsize (did you mean data.batch_size?)"),
    ("source_only", {"train": {"iterations": 5}}, [], "unknown key train.iterations (did you mean train.iters?)"),
    # the comparison checks every method's config before source_only trains
    ("all", {"methods": {"proda": {"proda": {"stage1_iter": 2}}}}, [],
     "unknown key proda.stage1_iter (did you mean proda.stage1_iters?)"),
])
def test_cli_stops_at_a_typo_before_writing(tiny_yaml_path, tmp_path, method, extra, argv, message):
    from udafast import train
    tiny_yaml_path.write_text(yaml.safe_dump(merge(yaml.safe_load(tiny_yaml_path.read_text()), extra)))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(["--method", method, "--config", str(tiny_yaml_path), "--out", str(out)] + argv)
    assert str(e.value).startswith("udafast.train: error: ") and message in str(e.value)
    assert not out.exists()


def test_cli_typo_is_one_line_without_traceback(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "udafast.train", "--method", "source_only", "--out", str(out),
                           "--set", "train.iter=5"], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "udafast.train: error: config: unknown key train.iter (did you mean train.iters?); known in train: "
        + ", ".join(sorted(DEFAULTS["train"]))]
    assert not out.exists()


def test_trainer_checks_the_config_before_writing(tmp_path):
    """A config built by hand (not through resolve_config) is checked before the run folder exists."""
    from conftest import tiny_run_config
    from udafast.engine.trainer import Trainer
    config = tiny_run_config("source_only")
    config["eval"]["max_image"] = 2
    with pytest.raises(ValueError, match=r"unknown key eval.max_image \(did you mean eval.max_images\?\)"):
        Trainer(config, tmp_path / "run", progress=False).run()
    assert not (tmp_path / "run").exists()
