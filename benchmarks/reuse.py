"""Runs a benchmark script trains or takes as they are: a finished run with the same config in its
folder, or a comparison's run (`python -m udafast.train --method all --seeds ...`)."""
import json
import os

import yaml

from udafast.engine.runs import SOURCE_INIT, needs_ssl, run_method

__all__ = ["run_or_reuse", "comparison_run"]


def run_or_reuse(config: dict, folder: str, **kw) -> dict:
    """The run's metrics: those of a finished run already in `folder` (same config), else a new run
    (`udafast.engine.runs.run_method(config, folder, **kw)`)."""
    done = os.path.join(folder, "metrics.json")
    if os.path.isfile(done) and os.path.isfile(os.path.join(folder, "config.yaml")):
        with open(os.path.join(folder, "config.yaml")) as f:
            recorded = _as_recorded(config, folder, kw.get("source_run"), kw.get("stage"))
            same = yaml.safe_load(f) == yaml.safe_load(yaml.safe_dump(recorded))
        if same:
            with open(done) as f:
                return json.load(f)
    return run_method(config, folder, **kw)


def _as_recorded(config, folder, source_run, stage):
    """`config` as the run folder's config.yaml records it: the source-only init and the
    "@ssl_source" student init resolved as run_method resolves them."""
    if config.get("init") == SOURCE_INIT and source_run is not None:
        config = dict(config, init=os.path.join(source_run, "checkpoints", "last.pt"))
    if needs_ssl(config, stage):
        student_init = os.path.join(folder, "pretrain_ssl_source", "checkpoints", "last.pt")
        config = dict(config, proda=dict(config["proda"], student_init=student_init))
    return config


def comparison_run(folder: str, method: str, seed: int) -> str:
    """A comparison's finished run of `method` and `seed` (`python -m udafast.train --method all`)."""
    for candidate in (os.path.join(folder, method, f"seed_{seed}"), os.path.join(folder, method)):
        path = os.path.join(candidate, "metrics.json")
        if os.path.isfile(path):
            with open(path) as f:
                if json.load(f).get("seed") == seed:
                    return candidate
    raise FileNotFoundError(f"--from-comparison: no finished {method} run of seed {seed} under {folder}")
