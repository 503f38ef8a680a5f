"""Runs above the trainer: resolving a method's config, several seeds, the comparison of every
method, its results file / table / chart, and the reference-vs-fast backend comparison."""
import copy
import json
import math
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Mapping
from typing import Iterable, Optional, Tuple

from udafast.config import DATA_SPLITS, DEFAULTS, merge
from udafast.config_schema import validate_config
from udafast.methods import METHOD_NAMES, method_class

__all__ = ["resolve_config", "run_method", "run_seeds", "compare_methods", "summarize", "write_results",
           "format_results", "compare_backends", "needs_ssl", "mean_std", "git_commit", "COMPARED", "SOURCE_INIT",
           "SSL_INIT"]

#: the methods `--method all` compares, in table order
COMPARED = ("source_only", "adabn", "dann", "adaptsegnet", "cbst", "contrastive", "proda", "dacs", "daformer", "mic",
            "oracle")
#: bounds and controls rather than adaptation methods (grey in the chart)
CONTROLS = ("source_only", "adabn", "oracle")
#: an `init` value naming another method's run of the same comparison and seed
SOURCE_INIT = "@source_only"
#: a `proda.student_init` value: the self-supervised source pretraining (`ssl_source`) of the same
#: comparison and seed, trained first when it is not there
SSL_INIT = "@ssl_source"


def resolve_config(file_config, method, overrides=()):
    """The config of one `method`: DEFAULTS, then the file's common keys, then its
    `methods: {method: {...}}` section, then `overrides` (a list of key=value). ValueError naming
    any unknown key, at any depth (udafast.config_schema), in this config or in that of another
    method the file has a `methods:` section for."""
    config = _resolve(file_config, method, overrides)
    validate_config(config)
    for other in (file_config or {}).get("methods") or {}:
        if other != method:
            validate_config(_resolve(file_config, other, overrides), what=f"config of {other} (methods.{other})")
    return config


def _resolve(file_config, method, overrides):
    file_config = copy.deepcopy(file_config or {})
    per_method = file_config.pop("methods", {}) or {}
    preset = file_config.pop("preset", None)
    bad = sorted(set(per_method) - set(METHOD_NAMES))
    if bad:
        raise ValueError(f"config: methods: unknown method(s) {', '.join(bad)}")
    config = _merge_layer(DEFAULTS, file_config)
    config = _merge_layer(config, per_method.get(method) or {})
    config["method"] = method
    config = _override_layer(config, overrides)
    method_class(config["method"])  # validates the name
    if preset is not None:
        config["preset"] = preset
    return config


def _split(config, split):
    data = config.get("data") if isinstance(config, Mapping) else None
    node = data.get(split) if isinstance(data, Mapping) else None
    return node if isinstance(node, Mapping) else {}


def _override_layer(config, overrides):
    """`config` with `overrides` (key=value) applied in order; one that points a data split at
    another dataset drops the options of the one before (later ones may set its own)."""
    from udafast.config import apply_overrides
    for text in overrides or ():
        before, config = config, apply_overrides(config, [text])
        for split in DATA_SPLITS:
            new = _split(config, split)
            if "name" in new and new["name"] != _split(before, split).get("name"):
                new["options"] = {}
    return config


def _merge_layer(config, update):
    """`update` merged over `config` (udafast.config.merge); a data split whose dataset
    `update` changes keeps only the options `update` gives it (the synthetic default's `domain` is
    not an option of gta5)."""
    out = merge(config, update)
    for split in DATA_SPLITS:
        given = _split(update, split)
        if "name" in given and given["name"] != _split(config, split).get("name"):
            _split(out, split)["options"] = copy.deepcopy(given.get("options") or {})
    return out


def _seed_dir(out, seed, several):
    return os.path.join(out, f"seed_{seed}") if several else out


def run_method(config, out_dir, *, stage=None, resume=None, progress=None, source_run=None, source_config=None,
               ssl_run=None, ssl_config=None, log=print):
    """Train `config` into `out_dir` -> its metrics. An `init` of "@source_only" is the source-only
    run `source_run` (a run folder); when not given, one is trained first into
    `out_dir/pretrain_source_only` with `source_config` (the source_only config of the same file;
    default: this config as source_only), its `train` section updated with `pretrain`.

    A `proda.student_init` of "@ssl_source" is, likewise, the self-supervised source pretraining
    `ssl_run` (a run folder; default `out_dir/pretrain_ssl_source`), trained first with `ssl_config`
    (the ssl_source config of the same file; default: this config as ssl_source) unless its
    metrics.json is there; its `checkpoints/last.pt` replaces the value. Its time is part of this
    run's: logged, and in the metrics as "pretrain_s" (0 when reused). `stage` is checked before
    any pretraining."""
    from udafast.engine.trainer import Trainer, check_stage
    check_stage(config, stage)
    config = copy.deepcopy(config)
    if config.get("init") == SOURCE_INIT:
        if source_run is None:
            source_run = os.path.join(out_dir, "pretrain_source_only")
            if not os.path.isfile(os.path.join(source_run, "metrics.json")):
                log(f"{config['method']} starts from a source-only network: training it into {source_run}")
                pre = copy.deepcopy(source_config or config)
                pre["method"], pre["init"], pre["seed"] = "source_only", None, config["seed"]
                pre["train"] = merge(pre["train"], config.get("pretrain") or {})
                Trainer(pre, source_run, progress=progress).run()
        config["init"] = os.path.join(source_run, "checkpoints", "last.pt")
    pretrain_s = None
    if needs_ssl(config, stage):
        ssl_run = ssl_run or os.path.join(out_dir, "pretrain_ssl_source")
        pretrain_s = 0.0
        if os.path.isfile(os.path.join(ssl_run, "metrics.json")):
            log(f"{config['method']} stage 2 starts from the self-supervised source pretraining in {ssl_run} (reused)")
        else:
            log(f"{config['method']} stage 2 starts from a self-supervised source pretraining: training it into "
                f"{ssl_run}")
            pre = copy.deepcopy(ssl_config or config)
            pre["method"], pre["seed"] = "ssl_source", config["seed"]
            if ssl_config is None:
                pre["init"] = None
            t0 = time.perf_counter()
            done = run_method(pre, ssl_run, progress=progress, source_run=source_run, source_config=source_config,
                              log=log)
            pretrain_s = round(time.perf_counter() - t0, 3)
            log(f"ssl_source pretraining: {done['iters']} iterations in {pretrain_s:.0f} s "
                f"({done['sec_per_iter']:.3f} s/iter), counted in {config['method']}'s time")
        config[config["method"]] = merge(config.get(config["method"]) or {},
                                         {"student_init": os.path.join(ssl_run, "checkpoints", "last.pt")})
    metrics = Trainer(config, out_dir, stage=stage, resume=resume, progress=progress).run()
    if pretrain_s is not None:
        metrics = dict(metrics, pretrain_s=pretrain_s)
    return metrics


def needs_ssl(config, stage):
    """Whether this run (or its `stage`) starts a student from "@ssl_source": ProDA's stage 2, or
    stage 3 when it does not continue from stage 2's network."""
    options = config.get(config.get("method")) or {}
    if config.get("method") != "proda" or options.get("student_init") != SSL_INIT:
        return False
    stages = ("stage2",) if options.get("stage3_from_stage2", True) else ("stage2", "stage3")
    return stage is None or stage in stages


def run_seeds(config, out_dir, seeds, *, progress=None, source_runs=None, ssl_runs=None, log=print, **kw):
    """`run_method` once per seed (into out_dir/seed_<s> when several) -> [metrics]. The time
    logged per seed includes any pretraining run_method does first ("@ssl_source")."""
    results = []
    for seed in seeds:
        cfg = copy.deepcopy(config)
        cfg["seed"] = int(seed)
        folder = _seed_dir(out_dir, seed, len(seeds) > 1)
        source_run = None if source_runs is None else source_runs.get(seed)
        ssl_run = None if ssl_runs is None else ssl_runs.get(seed)
        t0 = time.perf_counter()
        metrics = run_method(cfg, folder, progress=progress, source_run=source_run, ssl_run=ssl_run, log=log, **kw)
        pre = f", of which {metrics['pretrain_s']:.0f} s ssl_source pretraining" if metrics.get("pretrain_s") else ""
        log(f"{cfg['method']:<12} seed {seed}: mIoU {metrics['miou']:.2f}  ({time.perf_counter() - t0:.0f} s{pre})")
        results.append(metrics)
    return results


def compare_methods(file_config, out_dir, seeds, methods=COMPARED, overrides=(), progress=None, log=print):
    """Every method of `methods` with the same data, model and seeds -> {method: [metrics per seed]}.
    source_only runs first: the methods that start from a source-trained network (init
    "@source_only") start from its run of the same seed. The self-supervised source pretraining a
    ProDA student may start from ("@ssl_source") is trained once per seed, when first needed, into
    `out_dir/ssl_source` (its `ssl_source` config from the same file), and reused."""
    runs = {}
    source_runs = None
    ssl_config = resolve_config(file_config, "ssl_source", overrides)
    ssl_runs = {s: _seed_dir(os.path.join(out_dir, "ssl_source"), s, len(seeds) > 1) for s in seeds}
    # every config first, so that a bad key in the last method's stops the comparison before it trains
    configs = {name: resolve_config(file_config, name, overrides) for name in methods}
    for name, config in configs.items():
        folder = os.path.join(out_dir, name)
        runs[name] = run_seeds(config, folder, seeds, progress=progress, source_runs=source_runs, log=log,
                               ssl_runs=ssl_runs, ssl_config=ssl_config)
        if name == "source_only":
            source_runs = {s: _seed_dir(folder, s, len(seeds) > 1) for s in seeds}
    return runs


def mean_std(values: Iterable[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    """(mean, sample standard deviation) of `values`, each rounded to 2 decimals, leaving out None
    and NaN; 0.0 as the deviation of one value, (None, None) of none."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return round(mean, 2), round(std, 2)


def summarize(runs, preset=None):
    """The results file's dict from `compare_methods`' runs."""
    methods = {}
    for name, per_seed in runs.items():
        mean, std = mean_std([m["miou"] for m in per_seed])
        entry = {"miou_mean": mean, "miou_std": std, "seeds": [m["seed"] for m in per_seed],
                 "miou_per_seed": [round(m["miou"], 2) for m in per_seed],
                 "per_class_iou": {c: mean_std([m["per_class_iou"].get(c) for m in per_seed])[0]
                                   for c in per_seed[0]["per_class_iou"]},
                 "sec_per_iter": round(statistics.fmean(m["sec_per_iter"] for m in per_seed), 4),
                 "iters": per_seed[0]["iters"], "backend": per_seed[0]["backend"]}
        if len(per_seed[0].get("stages") or {}) > 1:
            entry["stages"] = {}
            for stage in per_seed[0]["stages"]:
                s_mean, s_std = mean_std([m["stages"][stage]["miou"] for m in per_seed])
                entry["stages"][stage] = {"miou_mean": s_mean, "miou_std": s_std}
        for key in sorted({k for m in per_seed for k in m if k.startswith("miou_before_")}):
            entry[f"{key}_mean"], entry[f"{key}_std"] = mean_std([m.get(key) for m in per_seed])
        quality = _label_quality(per_seed)
        if quality:
            entry["pseudo_labels"] = quality
        if any("pretrain_s" in m for m in per_seed):  # a pretraining run first (0 where reused)
            entry["pretrain_s"] = round(statistics.fmean(m.get("pretrain_s", 0.0) for m in per_seed), 3)
        if all("best" in m for m in per_seed):
            entry["best_miou_mean"], entry["best_miou_std"] = mean_std([m["best"]["miou"] for m in per_seed])
        methods[name] = entry
    return {"methods": methods, "preset": preset, "commit": git_commit()}


#: the class means of metrics.json's "pseudo_labels" that the results show
LABEL_FIGURES = ("coverage_total", "precision_mean", "recall_mean", "accuracy")


def _label_quality(per_seed):
    """{stage: {label set: {figure: mean over seeds, in percent}}} of the runs' pseudo-label quality."""
    out = {}
    for stage, sets in (per_seed[0].get("pseudo_labels") or {}).items():
        for name in sets:
            figures = {}
            for key in LABEL_FIGURES:
                values = [m.get("pseudo_labels", {}).get(stage, {}).get(name, {}).get(key) for m in per_seed]
                mean, _ = mean_std([None if v is None else 100 * v for v in values])
                figures[key] = mean
            out.setdefault(stage, {})[name] = figures
    return out


def _quality_cell(entry):
    """"coverage / precision / recall" (class means, %) of the last label set the method made."""
    quality = entry.get("pseudo_labels")
    if not quality:
        return "-"
    stage = list(quality)[-1]
    name = list(quality[stage])[-1]
    f = quality[stage][name]
    cells = [("-" if f[k] is None else f"{f[k]:.1f}") for k in ("coverage_total", "precision_mean", "recall_mean")]
    return f"{' / '.join(cells)} ({name}, {stage})"


def git_commit() -> Optional[str]:
    """The short hash of the checkout udafast runs from, for the results files (None outside git)."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def format_results(results):
    """A Markdown table: method, mIoU mean ± std over the seeds, seconds per iteration."""
    seeds = next(iter(results["methods"].values()))["seeds"] if results["methods"] else []
    lines = [f"| Method | mIoU (mean ± std over seeds {', '.join(map(str, seeds))}) | s/iter | iters | "
             f"pseudo-labels: coverage / precision / recall, class means % |",
             "|---|---|---|---|---|"]
    for name, m in results["methods"].items():
        before = "".join(f" ({k[len('miou_before_'):-len('_mean')].replace('_', ' ')}: before {v:.2f})"
                         for k, v in m.items() if k.startswith("miou_before_") and k.endswith("_mean") and v is not None)
        lines.append(f"| {name} | {m['miou_mean']:.2f} ± {m['miou_std']:.2f}{before} | {m['sec_per_iter']:.3f} | "
                     f"{m['iters']} | {_quality_cell(m)} |")
        for stage, s in (m.get("stages") or {}).items():
            lines.append(f"| &nbsp;&nbsp;{name} after {stage} | {s['miou_mean']:.2f} ± {s['miou_std']:.2f} | | | |")
    return "\n".join(lines)


def write_results(results, path):
    """`path` (JSON), and beside it the Markdown table (.md) and a bar chart (.png); under torchrun,
    by rank 0 only."""
    from udafast.engine.distributed import rank
    path = os.fspath(path)
    if rank() != 0:
        return path
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem = path[:-5] if path.endswith(".json") else path
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)
    with open(stem + ".md", "w") as f:
        f.write(format_results(results) + "\n")
    _chart(results, stem + ".png")
    return path


def _chart(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels, means, stds, colours = [], [], [], []
    for name, m in results["methods"].items():
        stages = m.get("stages") or {}
        for stage, s in list(stages.items())[:-1]:
            labels.append(f"{name}\n{stage}")
            means.append(s["miou_mean"])
            stds.append(s["miou_std"])
            colours.append("#9ecae1")
        labels.append(f"{name}\n{list(stages)[-1]}" if stages else name)
        means.append(m["miou_mean"])
        stds.append(m["miou_std"])
        colours.append("#969696" if name in CONTROLS else "#3182bd")
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(labels)), 3.6))
    ax.bar(range(len(labels)), means, yerr=stds, color=colours, capsize=3)
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=0)
    ax.set_ylabel("target val mIoU")
    seeds = next(iter(results["methods"].values()))["seeds"] if results["methods"] else []
    ax.set_title(f"{results.get('preset') or 'comparison'}: mean ± std over seeds {seeds}", fontsize=9)
    for i, v in enumerate(means):
        ax.text(i, v + 0.5, f"{v:.1f}", ha="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare_backends(config, out_dir, *, iters=5, rtol=1e-3, fast="auto", log=print):
    """Run `config`'s method from the same seed with backend="reference" and `fast` (after a
    warm-up run of `fast`), for `iters` iterations of each stage, and compare the losses of each
    iteration and the time per iteration and of each stage's set-up (pseudo-labels, prototypes)
    -> a report dict."""
    import csv
    reports = {}
    # the fast backend runs first as a warm-up whose timings are dropped: the first run of a process
    # pays for one-time work (generating the embedded benchmark's scenes, allocator and kernel warm-up)
    for backend in (fast, "reference", fast):
        cfg = copy.deepcopy(config)
        cfg["backend"] = backend
        cfg["deterministic"] = True
        cfg["train"] = merge(cfg["train"], {"iters": iters, "stage_iters": iters, "eval_every": 0, "ckpt_every": 0,
                                            "panels": 0})
        folder = os.path.join(out_dir, f"backend_{backend}")
        shutil.rmtree(folder, ignore_errors=True)
        metrics = run_method(cfg, folder, log=log)
        with open(os.path.join(folder, "log.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
        reports[backend] = {"metrics": metrics, "rows": rows}
    ref_rows, fast_rows = reports["reference"]["rows"], reports[fast]["rows"]
    worst, mismatches = 0.0, []
    for r, q in zip(ref_rows, fast_rows):
        for key in r:
            if not key.startswith("loss_") or r[key] in ("", None) or q.get(key) in ("", None):
                continue
            a, b = float(r[key]), float(q[key])
            err = abs(a - b) / max(abs(a), 1e-12)
            worst = max(worst, err)
            if err > rtol:
                mismatches.append((int(r["iter"]), key[5:], a, b))
    ref_m, fast_m = reports["reference"]["metrics"], reports[fast]["metrics"]
    report = {"method": config["method"], "iters_compared": len(ref_rows), "rtol": rtol,
              "max_rel_loss_diff": worst, "agree": not mismatches, "mismatches": mismatches[:10],
              "sec_per_iter": {"reference": ref_m["sec_per_iter"], fast: fast_m["sec_per_iter"]},
              "speedup_per_iter": _ratio(ref_m["sec_per_iter"], fast_m["sec_per_iter"]),
              "stage_setup_s": {"reference": ref_m.get("stage_setup_s"), fast: fast_m.get("stage_setup_s")}}
    setups = {s: _ratio(ref_m.get("stage_setup_s", {}).get(s), fast_m.get("stage_setup_s", {}).get(s))
              for s in (ref_m.get("stage_setup_s") or {})}
    report["speedup_pseudo_labels"] = {s: r for s, r in setups.items() if r is not None}
    return report


def _ratio(a, b):
    if not a or not b:
        return None
    return round(a / b, 2)
