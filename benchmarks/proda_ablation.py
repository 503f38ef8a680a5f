"""The ProDA paper's ablation (its Table 4: components of stage 1, then stages 2 and 3) on the
embedded benchmark, beside the paper's GTA5 -> Cityscapes figures.

    python -m benchmarks.proda_ablation                 # seeds 0, 1, 2 of the synthetic preset
    python -m benchmarks.proda_ablation --seeds 0 --out runs/proda-ablation --results my.json

Per seed: the source-only network, one whole ProDA run (warm-up, stage 1 with everything, stages 2
and 3), and each other stage-1 row trained from that run's warm-up network and soft labels with its
own flags (`ROWS`: the `--set` overrides a user passes to `python -m udafast.train --method proda`
for the same row). Finished runs in `--out` with the same config are reused, so seeds can be run
one at a time and then summarised together. Writes `<results>.json` and `.md`: target val mIoU (mean ± std over seeds) and
the accuracy of the pseudo-labels each row trains on (the warm-up's argmax `p_t0` for the warm-up
row, `y_hat` for the stage-1 rows, the distillation labels for stages 2 and 3).
"""
import argparse
import json
import os
import shutil
import sys
import time

from benchmarks.reuse import add_seed_run_arguments, comparison_run, parse_seeds, run_or_reuse, write_results
from udafast.config import read_config
from udafast.engine.runs import git_commit, mean_std, resolve_config

#: (key, row, the paper's mIoU, the row's proda.* flags, where its mIoU comes from)
ROWS = (
    ("source_only", "source only", 36.6, None, None),
    ("warmup", "warm-up", 41.6, None, "warmup"),
    ("self_training", "stage 1: self-training (CE on argmax p_t0)", 45.2,
     ["proda.rectify=false", "proda.ce_weight=1.0", "proda.rce_weight=0.0", "proda.reg_weight=0.0",
      "proda.kl_weight=0.0"], "stage1"),
    ("sce", "+ symmetric CE (alpha 0.1, beta 1, REG 0.1)", 45.6,
     ["proda.rectify=false", "proda.kl_weight=0.0"], "stage1"),
    ("denoising", "+ prototypical denoising", 52.3, ["proda.kl_weight=0.0"], "stage1"),
    ("structure", "+ structure learning instead of denoising (KL 10)", 47.6, ["proda.rectify=false"], "stage1"),
    ("stage1", "all of stage 1", 53.7, [], "stage1"),
    ("stage2", "stage 2 (self-distillation)", 56.9, None, "stage2"),
    ("stage3", "stage 3", 57.5, None, "stage3"),
    # stage 2's student from the run's init instead of the preset's (the issue asks for both ways)
    ("stage2_run_init", "stage 2, student from the run's init", 56.9, ["proda.student_init=null"], "stage2"),
    ("stage3_run_init", "stage 3 after it", 57.5, ["proda.student_init=null"], "stage3"),
)
#: the label set each stage trains on
LABELS = {"warmup": ("stage1", "p_t0"), "stage1": ("stage1", "y_hat"), "stage2": ("stage2", "distill"),
          "stage3": ("stage3", "distill")}


def _accuracy(metrics, stage):
    where = LABELS.get(stage)
    if where is None:
        return None
    summary = metrics.get("pseudo_labels", {}).get(where[0], {}).get(where[1])
    return None if summary is None or summary["accuracy"] is None else 100 * summary["accuracy"]


def _link(src, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if not os.path.exists(dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)


def run_seed(file_config, out, seed, overrides=(), log=print, comparison=None):
    """The rows' {key: {"miou", "accuracy"}} for one seed, runs under `out` (finished runs there
    with the same config are reused). `comparison`: the folder of a comparison of the same preset
    (`python -m udafast.train --method all --seeds ...`) whose source-only and ProDA runs of this
    seed are taken as they are."""
    if comparison is not None:
        source_dir, full_dir = comparison_run(comparison, "source_only", seed), comparison_run(comparison, "proda", seed)
        with open(os.path.join(source_dir, "metrics.json")) as f:
            rows = {"source_only": {"miou": json.load(f)["miou"], "accuracy": None}}
        with open(os.path.join(full_dir, "metrics.json")) as f:
            full = json.load(f)
    else:
        source_config = resolve_config(file_config, "source_only", [*overrides, f"seed={seed}"])
        source_dir = os.path.join(out, "source_only")
        rows = {"source_only": {"miou": run_or_reuse(source_config, source_dir, log=log)["miou"], "accuracy": None}}
        full_dir = os.path.join(out, "proda")
        config = resolve_config(file_config, "proda", [*overrides, f"seed={seed}"])
        full = run_or_reuse(config, full_dir, source_run=source_dir, log=log)
    for key, _, _, flags, stage in ROWS:
        if (stage is not None and flags is None) or key == "stage1":  # rows the whole run gives
            rows[key] = {"miou": full["stages"][stage]["miou"], "accuracy": _accuracy(full, stage)}
    for key, name, _, flags, stage in ROWS:
        if flags is None or key == "stage1":
            continue
        folder = os.path.join(out, f"{stage}_{key}")
        # the row starts from the whole run's previous stage (stage 1 rows: its warm-up network and soft
        # labels; the second stage-2 row: its stage-1 network; the stage-3 row after it: that stage 2)
        previous = {"stage1": "warmup", "stage2": "stage1", "stage3": "stage2"}[stage]
        source_folder = os.path.join(out, "stage2_stage2_run_init") if stage == "stage3" else full_dir
        for kept in (f"{previous}.pt", f"{previous}_best.pt"):  # _best: where validation ran within the stage
            if kept == f"{previous}.pt" or os.path.isfile(os.path.join(source_folder, "checkpoints", kept)):
                _link(os.path.join(source_folder, "checkpoints", kept), os.path.join(folder, "checkpoints", kept))
        if stage == "stage1":
            _link(os.path.join(full_dir, "proda", "soft_labels.npy"), os.path.join(folder, "proda", "soft_labels.npy"))
        variant = resolve_config(file_config, "proda", [*overrides, f"seed={seed}", *flags])
        t0 = time.perf_counter()
        metrics = run_or_reuse(variant, folder, stage=stage, source_run=source_dir, log=log)
        rows[key] = {"miou": metrics["miou"], "accuracy": _accuracy(metrics, stage)}
        log(f"seed {seed} {name}: mIoU {metrics['miou']:.2f} ({time.perf_counter() - t0:.0f} s)")
    return rows


def summarize(per_seed, seeds, preset):
    rows = []
    for key, name, paper, flags, _ in ROWS:
        miou = mean_std([r[key]["miou"] for r in per_seed])
        acc = mean_std([r[key]["accuracy"] for r in per_seed])
        rows.append({"key": key, "row": name, "paper_miou": paper, "flags": flags,
                     "miou_mean": miou[0], "miou_std": miou[1], "miou_per_seed": [round(r[key]["miou"], 2) for r in per_seed],
                     "label_accuracy_mean": acc[0], "label_accuracy_std": acc[1]})
    return {"rows": rows, "seeds": list(seeds), "preset": preset, "commit": git_commit()}


def format_table(results):
    seeds = ", ".join(map(str, results["seeds"]))
    lines = [f"| row | mIoU here (mean ± std, seeds {seeds}) | pseudo-label accuracy % | paper (GTA5 -> Cityscapes) "
             f"| flags (`--set`) |", "|---|---|---|---|---|"]
    for r in results["rows"]:
        acc = "-" if r["label_accuracy_mean"] is None else f"{r['label_accuracy_mean']:.1f} ± {r['label_accuracy_std']:.1f}"
        flags = "-" if r["flags"] is None else (" ".join(f"`{f}`" for f in r["flags"]) or "(defaults)")
        lines.append(f"| {r['row']} | {r['miou_mean']:.2f} ± {r['miou_std']:.2f} | {acc} | {r['paper_miou']} | {flags} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.proda_ablation", description=__doc__.split("\n\n")[0])
    add_seed_run_arguments(parser, "runs/proda-ablation", "benchmarks/results/proda-ablation-synthetic.json",
                           "take the source-only and whole ProDA runs of each seed from this comparison folder "
                           "(python -m udafast.train --method all with the same preset), e.g. runs/compare-synthetic")
    args = parser.parse_args(argv)
    seeds = parse_seeds(parser, args.seeds)
    try:
        file_config = read_config(args.config)
        per_seed = [run_seed(file_config, os.path.join(args.out, f"seed_{s}"), s, args.set,
                             comparison=args.from_comparison) for s in seeds]
    except (ValueError, FileNotFoundError) as e:
        print(f"proda_ablation: error: {e}", file=sys.stderr)
        return 2
    results = summarize(per_seed, seeds, args.config)
    write_results(results, args.results, format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
