"""MIC against DAFormer on the embedded benchmark, taken apart: what the masked pass does to the
BatchNorm statistics, to the weights, and how well the networks label masked images.

    python -m benchmarks.mic_context --from-comparison runs/compare-synthetic   # seeds 0, 1, 2
    python -m benchmarks.mic_context --seeds 0 --rows daformer,mic,mic_bn_kept --out runs/mic-context

Per seed and row (`ROWS`: DAFormer, MIC as the preset runs it, and MIC with one `--set` change each):
- the run's target val mIoU: DAFormer's and MIC's from the comparison's runs when given (else
  trained here from the source-only network, as the comparison does), the others trained here;
- "target BN": the same weights with BatchNorm statistics re-estimated on 25 target batches (the
  preset's `adabn` run from that network), so the weights compare without the running statistics
  that the training passes left (MIC's masked pass is a third of them);
- "masked val": that network on the val images masked as MIC masks the target (the row's block size
  and ratio, the same masks for every network, images at their own size): mIoU over the visible
  pixels and over the hidden ones, i.e. how much of MIC's task, labelling what it cannot see from
  the context, the network has learned.
Finished runs in `--out` with the same config are reused. Writes `<results>.json` and `.md`.
"""
import argparse
import json
import os
import sys

import torch

from benchmarks.reuse import add_seed_run_arguments, comparison_run, parse_seeds, run_or_reuse, write_results
from udafast.config import read_config
from udafast.data.transforms import normalize
from udafast.engine.data import build_split
from udafast.engine.evaluation import ConfusionMatrix, iou_per_class, mean_iou, upsample_logits
from udafast.engine.runs import git_commit, mean_std, resolve_config
from udafast.evaluate import load_model
from udafast.methods.mic import MIC, block_mask

#: (key, row, method, its --set flags)
ROWS = (
    ("daformer", "DAFormer", "daformer", []),
    ("mic", "MIC (the preset)", "mic", []),
    ("mic_bn_kept", "MIC, its masked pass keeping BatchNorm's running statistics", "mic", ["mic.mask_bn_update=false"]),
    ("mic_block4", "MIC, mask blocks of 4", "mic", ["mic.mask_block_size=4"]),
    ("mic_block16", "MIC, mask blocks of 16", "mic", ["mic.mask_block_size=16"]),
    ("mic_ratio05", "MIC, mask ratio 0.5", "mic", ["mic.mask_ratio=0.5"]),
    ("mic_weight05", "MIC, masked loss weight 0.5", "mic", ["mic.mask_weight=0.5"]),
)
#: the score columns: (key, header)
COLUMNS = (("miou", "mIoU"), ("target_bn", "with target BN"), ("masked_visible", "masked val: visible pixels"),
           ("masked_hidden", "masked val: hidden pixels"))


def masked_scores(checkpoint: str, dataset, block_size: int, ratio: float) -> dict:
    """mIoU of the network in `checkpoint` over the visible and the hidden pixels of `dataset`'s
    images masked by `block_mask` (blocks of `block_size`, kept where U > `ratio`; masked pixels 0
    after normalisation, as MIC's student sees them), the masks drawn in order from seed 0."""
    model = load_model(checkpoint)
    g = torch.Generator().manual_seed(0)
    visible, hidden = ConfusionMatrix(), ConfusionMatrix()
    with torch.no_grad():
        for i in range(len(dataset)):
            sample = dataset[i]
            image, label = sample["image"], sample["label"].long()
            kept = block_mask(1, image.shape[-2:], block_size, ratio, g)[0, 0]
            x = normalize(image[None].float(), model.normalization) * kept
            pred = upsample_logits(model(x)["logits"].float(), tuple(label.shape[-2:]))[0].argmax(0)
            visible.update(pred, torch.where(kept.bool(), label, -1))
            hidden.update(pred, torch.where(kept.bool(), -1, label))
    return {"masked_visible": mean_iou(iou_per_class(visible.matrix)),
            "masked_hidden": mean_iou(iou_per_class(hidden.matrix))}


def run_seed(file_config, out, seed, rows=ROWS, overrides=(), comparison=None, log=print):
    """{row key: {"miou", "target_bn", "masked_visible", "masked_hidden"}} for one seed, runs under `out`."""
    seeded = [*overrides, f"seed={seed}"]
    if comparison is not None:
        source_dir = comparison_run(comparison, "source_only", seed)
    else:
        source_dir = os.path.join(out, "source_only")
        run_or_reuse(resolve_config(file_config, "source_only", seeded), source_dir, log=log)
    # the same BatchNorm re-estimation and val images for every row
    adabn_config = resolve_config(file_config, "adabn", seeded)
    val = build_split(adabn_config["data"]["val"])
    results = {}
    for key, name, method, flags in rows:
        if comparison is not None and not flags:
            run_dir = comparison_run(comparison, method, seed)
            with open(os.path.join(run_dir, "metrics.json")) as f:
                metrics = json.load(f)
        else:
            run_dir = os.path.join(out, key)
            metrics = run_or_reuse(resolve_config(file_config, method, [*seeded, *flags]), run_dir,
                                   source_run=source_dir, log=log)
        adabn_dir = os.path.join(out, f"{key}_target_bn")
        adabn = run_or_reuse(adabn_config, adabn_dir, source_run=run_dir, log=log)
        # every row's networks see the masks of its MIC settings (DAFormer's row: the preset's)
        mask = {**MIC.defaults, **(resolve_config(file_config, "mic", [*seeded, *flags]).get("mic") or {})}
        row = {"miou": metrics["miou"], "target_bn": adabn["miou"],
               **masked_scores(os.path.join(adabn_dir, "checkpoints", "last.pt"), val, mask["mask_block_size"],
                               mask["mask_ratio"])}
        log(f"seed {seed} {name}: " + ", ".join(f"{header} {row[k]:.2f}" for k, header in COLUMNS))
        results[key] = row
    return results


def summarize(per_seed, seeds, rows, preset):
    table = []
    for key, name, method, flags in rows:
        entry = {"key": key, "row": name, "method": method, "flags": flags}
        for column, _ in COLUMNS:
            values = [r[key][column] for r in per_seed]
            entry[f"{column}_mean"], entry[f"{column}_std"] = mean_std(values)
            entry[f"{column}_per_seed"] = [round(v, 2) for v in values]
        table.append(entry)
    return {"rows": table, "seeds": list(seeds), "preset": preset, "commit": git_commit()}


def format_table(results):
    seeds = ", ".join(map(str, results["seeds"]))
    lines = [f"| row (mean ± std over seeds {seeds}) | " + " | ".join(h for _, h in COLUMNS) + " | flags (`--set`) |",
             "|---|" + "---|" * (len(COLUMNS) + 1)]
    for r in results["rows"]:
        cells = [f"{r[f'{c}_mean']:.2f} ± {r[f'{c}_std']:.2f}" for c, _ in COLUMNS]
        flags = " ".join(f"`{f}`" for f in r["flags"]) or "-"
        lines.append(f"| {r['row']} | " + " | ".join(cells) + f" | {flags} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mic_context", description=__doc__.split("\n\n")[0])
    add_seed_run_arguments(parser, "runs/mic-context", "benchmarks/results/mic-context-synthetic.json",
                           "take the source-only, DAFormer and MIC runs of each seed from this comparison folder "
                           "(python -m udafast.train --method all with the same preset), e.g. runs/compare-synthetic")
    parser.add_argument("--rows", default=None, help="comma-separated row keys (default: all: "
                        + ", ".join(r[0] for r in ROWS) + ")")
    args = parser.parse_args(argv)
    seeds = parse_seeds(parser, args.seeds)
    known = {r[0]: r for r in ROWS}
    keys = args.rows.split(",") if args.rows else list(known)
    unknown = [k for k in keys if k not in known]
    if unknown:
        parser.error(f"--rows: unknown row(s) {', '.join(unknown)}; expected some of {', '.join(known)}")
    rows = [known[k] for k in keys]
    try:
        file_config = read_config(args.config)
        per_seed = [run_seed(file_config, os.path.join(args.out, f"seed_{s}"), s, rows, args.set,
                             comparison=args.from_comparison) for s in seeds]
    except (ValueError, FileNotFoundError) as e:
        print(f"mic_context: error: {e}", file=sys.stderr)
        return 2
    results = summarize(per_seed, seeds, rows, args.config)
    write_results(results, args.results, format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
