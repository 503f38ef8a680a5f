"""Run configs: defaults, files with `extends`, presets, per-method sections and --set overrides."""
import pytest

from udafast.engine.config import (DEFAULTS, apply_overrides, config_names, merge, parse_override, preset_names,
                                   read_config)
from udafast.engine.runs import resolve_config


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


def test_shipped_configs_resolve():
    assert "synthetic" in preset_names()
    preset = read_config("synthetic")
    for name in ("source_only", "oracle"):
        resolve_config(preset, name)
    for name in config_names():
        config = read_config(name)
        resolve_config(config, config.get("method", "source_only"))
