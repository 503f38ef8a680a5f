"""Run configs: nested dicts built from the defaults, a preset or YAML file, and `key=value` overrides.

Precedence, lowest first: `DEFAULTS`, the method's own defaults (its section), the config file or
preset, then `--set` overrides (dotted keys, values parsed as YAML). An unknown key, at any depth,
is an error (udafast.config_schema checks every resolved config) so that a typo never silently
trains with a default.
"""
import copy
import os
from collections.abc import Mapping

import yaml

__all__ = ["DEFAULTS", "DATA_SPLITS", "PRESETS_DIR", "CONFIGS_DIR", "preset_names", "config_names", "read_config",
           "resolve_config_path", "merge", "apply_overrides", "parse_override", "dump_config"]

_HERE = os.path.dirname(os.path.abspath(__file__))
#: the authors' settings for the real benchmarks (GTA5/SYNTHIA -> Cityscapes)
CONFIGS_DIR = os.path.join(_HERE, "configs")
#: settings for the embedded benchmark, chosen for CPU runs
PRESETS_DIR = os.path.join(CONFIGS_DIR, "presets")

DEFAULTS = {
    "method": "source_only",
    "seed": 0,
    "device": "cpu",
    "backend": "auto",
    "deterministic": False,
    "threads": None,
    "model": {"name": "small", "num_classes": 19},
    # a checkpoint to start from (its weights; the run's own config still decides the rest), or
    # "@source_only": the source-only run of the same comparison and seed (trained first if alone)
    "init": None,
    # train-section overrides for that source-only network when it has to be trained first
    "pretrain": {},
    "data": {
        "source": {"name": "synthetic", "root": None, "split": "train", "options": {"domain": "source"}},
        "target": {"name": "synthetic", "root": None, "split": "train", "options": {"domain": "target"}},
        "val": {"name": "synthetic", "root": None, "split": "val", "options": {"domain": "target"}},
        # per-domain training views: resize (H, W) or shorter side, random scale, crop (H, W), flip
        "source_view": {"resize": None, "scale_range": None, "crop": None, "flip": 0.5, "cat_max_ratio": 1.0},
        "target_view": {"resize": None, "scale_range": None, "crop": None, "flip": 0.5, "cat_max_ratio": 1.0},
        "batch_size": 4,
        "num_workers": 0,
        # true: training passes over bad samples (undecodable files, labels of another size or with
        # values outside the table), counted in log.csv and metrics.json; false: the run stops
        # naming the file. Evaluation always stops.
        "skip_bad_samples": False,
        # the target training set's true labels, read only to score the pseudo-labels a method makes
        # (metrics.json "pseudo_labels"), never trained on: "auto" = where they come free (the
        # embedded benchmark), true = required (e.g. Cityscapes train with its gtFine), false = never
        "target_truth": "auto",
    },
    "optimizer": {"name": "sgd", "lr": 2.5e-4, "momentum": 0.9, "weight_decay": 5e-4, "betas": [0.9, 0.999],
                  "schedule": "poly", "power": 0.9, "poly_iters": None, "warmup_iters": 0, "warmup_ratio": 1.0e-6},
    # stage_iters: when set, every stage of the run runs that many iterations, over the method's own
    # per-stage settings (ProDA's proda.<stage>_iters, CBST's rounds) and those of pretraining runs
    # trained first (`pretrain`, ssl_source); --iters N sets it and iters to N (quick checks)
    # grad_accum: micro-batches per update; amp: null, "bf16" (autocast) or "fp16" (autocast and a
    # grad scaler); on_nonfinite: "stop" or
    # "skip"; sync_bn: BatchNorm over the batches of every process (torchrun); activation_checkpointing:
    # recompute the backbone's activations in the backward instead of keeping them; channels_last: the
    # networks' weights and inputs in the channels-last memory format (faster convolutions)
    "train": {"iters": 1000, "stage_iters": None, "eval_every": 0, "ckpt_every": 0, "keep_checkpoints": 2,
              "panels": 4, "grad_accum": 1, "amp": None, "on_nonfinite": "stop", "sync_bn": False,
              "activation_checkpointing": False, "channels_last": False},
    # input_size (width, height) of the network at evaluation; None = the images' own size. flip,
    # scales, slide: the softmax averaged over the image and its mirror, over these factors of the
    # input size, and made by sliding windows crop [H, W] every stride [H, W] (udafast.inference)
    "eval": {"input_size": None, "classes": 19, "max_images": None, "flip": False, "scales": [1.0],
             "slide": {"crop": None, "stride": None}},
}

#: the data sections that name a dataset (name, root, split, options)
DATA_SPLITS = ("source", "target", "val")


def merge(base, update):
    """A deep copy of `base` with `update` merged in (dicts recursively, everything else replaced)."""
    out = copy.deepcopy(dict(base))
    for key, value in (update or {}).items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _names(folder):
    if not os.path.isdir(folder):
        return []
    # files starting with "_" are shared bases that the others extend
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml") and not f.startswith("_"))


def preset_names():
    """The embedded-benchmark presets (udafast/configs/presets/*.yaml)."""
    return _names(PRESETS_DIR)


def config_names():
    """The authors'-settings configs shipped with udafast (udafast/configs/*.yaml)."""
    return _names(CONFIGS_DIR)


def resolve_config_path(name_or_path):
    """A YAML path as given, or a shipped config/preset by name (`gta5_adaptsegnet`, `synthetic`)."""
    path = os.fspath(name_or_path)
    if os.path.isfile(path):
        return path
    for folder in (CONFIGS_DIR, PRESETS_DIR):
        candidate = os.path.join(folder, path if path.endswith(".yaml") else path + ".yaml")
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"config not found: {path} (not a file, nor one of the shipped configs "
                            f"{config_names()} or presets {preset_names()})")


def read_config(name_or_path):
    """The dict in a YAML config file (see `resolve_config_path`); an `extends: other` key merges
    this file over `other` (a path relative to this file, or a shipped name)."""
    path = resolve_config_path(name_or_path)
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    data = dict(data)
    parent = data.pop("extends", None)
    if parent is not None:
        local = os.path.join(os.path.dirname(path), parent)
        base = read_config(local if os.path.isfile(local) else parent)
        data = merge(base, data)
    return data


def parse_override(text):
    """`"a.b.c=value"` -> (["a", "b", "c"], value parsed as YAML)."""
    if not isinstance(text, str) or "=" not in text:
        raise ValueError(f"--set: expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ValueError(f"--set: empty key in {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        # YAML 1.1 reads "1e-3" (no dot) as a string; a number is what anyone typing it means
        try:
            value = float(value)
        except ValueError:
            pass
    return keys, value


def apply_overrides(config, overrides):
    """`config` with each `key=value` of `overrides` set (creating nested dicts as needed)."""
    out = copy.deepcopy(config)
    for text in overrides or ():
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            if not isinstance(node.get(k), Mapping):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return out


def dump_config(config, path):
    """Write `config` as YAML (the resolved config of a run)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(_plain(config), f, sort_keys=False, default_flow_style=None)
    os.replace(tmp, path)


def _plain(value):
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
