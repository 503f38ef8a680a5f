"""Runs a benchmark script trains or takes as they are (a finished run with the same config in its
folder, or a comparison's run: `python -m udafast.train --method all --seeds ...`), and the
command line and results files of such scripts."""
import argparse
import json
import os
from typing import List

import yaml

from udafast.engine.runs import SOURCE_INIT, needs_ssl, run_method

__all__ = ["run_or_reuse", "comparison_run", "add_seed_run_arguments", "parse_seeds", "write_results"]


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


def add_seed_run_arguments(parser: argparse.ArgumentParser, out: str, results: str, comparison_help: str) -> None:
    """The options of a script that trains runs per seed: --config, --seeds, --out (default `out`),
    --results (default `results`), --set and --from-comparison (`comparison_help`)."""
    parser.add_argument("--config", default="synthetic", help="a preset or YAML file (default: synthetic)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    parser.add_argument("--out", default=out, help="the runs' folder")
    parser.add_argument("--results", default=results)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    parser.add_argument("--from-comparison", metavar="DIR", default=None, help=comparison_help)


def parse_seeds(parser: argparse.ArgumentParser, text: str) -> List[int]:
    """`--seeds` as integers; a parser error naming the option otherwise."""
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {text!r}")


def write_results(results: dict, path: str, table: str) -> None:
    """`results` as JSON at `path` and `table` beside it (.md); the table printed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    stem = path[:-5] if path.endswith(".json") else path
    with open(stem + ".md", "w") as f:
        f.write(table + "\n")
    print(table)
