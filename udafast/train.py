"""Train a UDA method, or compare them all.

    python -m udafast.train                       # the main job: every method on the embedded
                                                  # benchmark (one seed), then the comparison table
    python -m udafast.train --method proda --source gta5 --source-root DATA/GTA5 \\
        --target cityscapes --target-root DATA/cityscapes --config gta5_proda --device cuda
    python -m udafast.train --method all --seeds 0,1,2 --results benchmarks/results/methods-synthetic.json
    python -m udafast.train --method cbst --compare-backends

Outputs under --out: config.yaml (resolved), metrics.json, log.csv, tensorboard/, panels/*.png,
checkpoints/last.pt (newest), iter_<N>.pt (with --ckpt-every: the newest and the
train.keep_checkpoints before it), best.pt (best on target val, with --eval-every) and, for
multi-stage methods, checkpoints/<stage>.pt.
"""
import argparse
import json
import os
import sys
import time

from udafast.config import config_names, preset_names, read_config
from udafast.methods import METHOD_NAMES
from udafast.models.build import MODEL_NAMES

DEFAULT_PRESET = "synthetic"


def _seeds(text):
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return seeds


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser():
    epilog = (f"methods: {', '.join(METHOD_NAMES)}, all\n"
              f"presets (embedded benchmark): {', '.join(preset_names())}\n"
              f"configs (authors' settings): {', '.join(config_names())}")
    p = argparse.ArgumentParser(prog="python -m udafast.train", description=__doc__.split("\n\n")[0],
                                epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default=None, choices=METHOD_NAMES + ("all",),
                   help="method to train; 'all' compares them (default: all on the preset, one method else)")
    p.add_argument("--config", default=None,
                   help=f"a YAML file, or a shipped config / preset name (default: the {DEFAULT_PRESET!r} preset)")
    p.add_argument("--source", help="source dataset name (gta5, synthia, synthetic, folder)")
    p.add_argument("--source-root", help="source dataset folder")
    p.add_argument("--target", help="target dataset name (cityscapes, synthetic, folder)")
    p.add_argument("--target-root", help="target dataset folder")
    p.add_argument("--model", choices=MODEL_NAMES, help="network")
    p.add_argument("--iters", type=_positive_int, metavar="N",
                   help="N training iterations for every stage of the run, over the config's per-stage settings: "
                        "ProDA's warmup/stage1/2/3, CBST's rounds and the pretraining runs trained first "
                        "(init @source_only, @ssl_source); sets train.iters and train.stage_iters, so --iters 2 is "
                        "a quick check of everything. Passes over the data (pseudo-labels, prototypes, BatchNorm "
                        "re-estimation) are not iterations and keep their length")
    p.add_argument("--batch-size", type=int, help="images per domain per iteration")
    p.add_argument("--backend", choices=("auto", "reference", "native", "triton"), help="ops backend")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--seeds", type=_seeds, help="comma-separated seeds, one run each (e.g. 0,1,2)")
    p.add_argument("--out", help="run folder (default runs/<method>)")
    p.add_argument("--stage", help="run one stage of a multi-stage method (e.g. proda's stage1)")
    p.add_argument("--resume", nargs="?", const=True, default=None,
                   help="continue from a checkpoint (default: <out>/checkpoints/last.pt, or the newest good "
                        "iter_<N>.pt / stage checkpoint when last.pt is missing or damaged); a run that has "
                        "finished under this config is left as it is, said so, exit status 0")
    p.add_argument("--ckpt-every", type=int, help="a checkpoint every N iterations (checkpoints/last.pt and iter_<N>.pt)")
    p.add_argument("--eval-every", type=int, help="evaluate on target val every N iterations, keeping best.pt")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms only")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="skip (and count) updates whose loss or gradients are not finite, instead of stopping")
    p.add_argument("--skip-bad-samples", action="store_true",
                   help="pass over bad training samples (files that do not decode, labels of another size or "
                        "with ids outside the table), counted in log.csv and metrics.json, instead of stopping; "
                        "evaluation still stops at a bad val sample")
    p.add_argument("--grad-accum", type=int, metavar="K", help="micro-batches per update (gradient accumulation)")
    p.add_argument("--amp", choices=("bf16", "fp16"),
                   help="autocast: bf16 = bfloat16 (Ampere and newer); fp16 = float16 with a grad scaler (V100, T4, "
                        "20-series: overflowed updates are skipped and counted); the ops accumulate in float32")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: BatchNorm statistics over the batches of every process")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute the backbone's activations in the backward pass (less memory, more time)")
    p.add_argument("--channels-last", action="store_true",
                   help="the networks' weights and inputs channels-last (faster convolutions; the preset's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (dotted key, YAML value); repeatable")
    p.add_argument("--results", help="with --method all: write the comparison JSON here (+ .md table, .png chart)")
    p.add_argument("--compare-backends", action="store_true",
                   help="run the method with backend=reference and the fast backend for --iters iterations of "
                        "each stage (default 5); compare losses and speed")
    p.add_argument("--progress", choices=("auto", "bar", "lines"), default="auto",
                   help="a progress bar, or a line every 30 s (auto: a bar on a terminal)")
    return p


def _dataset_overrides(args):
    """--source/--target and their roots as config overrides (a real target brings its val split)."""
    out = []
    if args.source:
        split = "train" if args.source in ("cityscapes", "synthetic") else "all"
        out += [f"data.source.name={args.source}", f"data.source.split={split}", "data.source.options={}"]
        if args.source == "synthetic":
            out.append("data.source.options={domain: source}")
    if args.source_root:
        out.append(f"data.source.root={json.dumps(os.path.abspath(args.source_root))}")
    if args.target:
        out += [f"data.target.name={args.target}", "data.target.split=train", "data.target.options={}",
                f"data.val.name={args.target}", "data.val.split=val", "data.val.options={}"]
        if args.target == "synthetic":
            out += ["data.target.options={domain: target}", "data.val.options={domain: target}"]
    if args.target_root:
        root = json.dumps(os.path.abspath(args.target_root))
        out += [f"data.target.root={root}", f"data.val.root={root}"]
    return out


def _overrides(args):
    out = _dataset_overrides(args)
    simple = {"model.name": args.model, "train.iters": args.iters, "train.stage_iters": args.iters,
              "data.batch_size": args.batch_size,
              "backend": args.backend, "device": args.device, "seed": args.seed,
              "train.ckpt_every": args.ckpt_every, "train.eval_every": args.eval_every}
    out += [f"{k}={v}" for k, v in simple.items() if v is not None]
    if args.deterministic:
        out.append("deterministic=true")
    flags = {"train.on_nonfinite=skip": args.skip_nonfinite, "train.sync_bn=true": args.sync_bn,
             "train.activation_checkpointing=true": args.activation_checkpointing,
             "train.channels_last=true": args.channels_last,
             "data.skip_bad_samples=true": args.skip_bad_samples}
    out += [k for k, on in flags.items() if on]
    if args.grad_accum is not None:
        out.append(f"train.grad_accum={args.grad_accum}")
    if args.amp:
        out.append(f"train.amp={args.amp}")
    return out + list(args.overrides)


def main(argv=None):
    from udafast.engine import distributed
    from udafast.engine.trainer import NonFiniteLoss

    args = build_parser().parse_args(argv)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 reports; the others only train
        sys.stdout = open(os.devnull, "w")
    try:
        return _main(args)
    except (FileNotFoundError, ValueError, NonFiniteLoss) as e:
        sys.exit(f"udafast.train: error: {e}")
    finally:
        distributed.shutdown()


def _main(args):
    from udafast.engine import runs
    from udafast.engine.devices import check_device

    if args.device is not None:
        check_device(args.device, "--device")

    file_config = read_config(args.config or DEFAULT_PRESET)
    preset = os.path.splitext(os.path.basename(args.config or DEFAULT_PRESET))[0]
    file_config.setdefault("preset", preset)
    method = args.method or ("all" if args.config is None and not args.source and not args.target else None)
    if method is None:
        method = file_config.get("method") or "source_only"
    overrides = _overrides(args)
    progress = {"auto": None, "bar": True, "lines": False}[args.progress]
    seeds = args.seeds or [args.seed if args.seed is not None else int(file_config.get("seed", 0))]
    out = args.out or os.path.join("runs", method if method != "all" else f"compare-{preset}")

    if args.compare_backends:
        if method == "all":
            raise ValueError("--compare-backends: give one --method")
        config = runs.resolve_config(file_config, method, overrides)
        report = runs.compare_backends(config, out, iters=args.iters or 5)
        print(json.dumps(report, indent=2))
        _print_backend_report(report)
        return report

    if method == "all":
        if args.stage or args.resume:
            raise ValueError("--stage and --resume apply to one method, not --method all")
        t0 = time.perf_counter()
        print(f"udafast: comparing {', '.join(runs.COMPARED)} on {preset!r}, seeds {seeds}; runs in {out}",
              file=sys.stderr)
        results = runs.summarize(runs.compare_methods(file_config, out, seeds, overrides=overrides,
                                                      progress=progress), preset=preset)
        path = runs.write_results(results, args.results or os.path.join(out, "results.json"))
        print()
        print(runs.format_results(results))
        print(f"\n{len(runs.COMPARED)} methods x {len(seeds)} seed(s) in {time.perf_counter() - t0:.0f} s; "
              f"results in {path} (+ .md, .png)")
        return results

    config = runs.resolve_config(file_config, method, overrides)
    source_config = runs.resolve_config(file_config, "source_only", overrides)
    ssl_config = runs.resolve_config(file_config, "ssl_source", overrides)
    if args.seeds and len(seeds) > 1:
        if args.stage or args.resume:
            raise ValueError("--stage and --resume apply to one seed")
        per_seed = runs.run_seeds(config, out, seeds, progress=progress, source_config=source_config,
                                  ssl_config=ssl_config)
        results = runs.summarize({method: per_seed}, preset=preset)
        path = runs.write_results(results, args.results or os.path.join(out, "results.json"))
        print(runs.format_results(results))
        return results
    config["seed"] = seeds[0]
    metrics = runs.run_method(config, out, stage=args.stage, resume=args.resume, progress=progress,
                              source_config=source_config, ssl_config=ssl_config)
    print(f"{method}: target val mIoU {metrics['miou']:.2f} after {metrics['iters']} iterations "
          f"({metrics['sec_per_iter']:.3f} s/iter); {os.path.join(out, 'metrics.json')}")
    return metrics


def _print_backend_report(report):
    verdict = "agree" if report["agree"] else "DISAGREE"
    fast = [k for k in report["sec_per_iter"] if k != "reference"][0]
    print(f"\n{report['method']}: losses of the first {report['iters_compared']} iterations {verdict} "
          f"(max relative difference {report['max_rel_loss_diff']:.2e}, tolerance {report['rtol']:.0e}); "
          f"{fast} is {report['speedup_per_iter']}x the reference per iteration", end="")
    if report["speedup_pseudo_labels"]:
        parts = ", ".join(f"{s} {r}x" for s, r in report["speedup_pseudo_labels"].items())
        print(f"; stage set-up (pseudo-labels, prototypes): {parts}")
    else:
        print()
    if not report["agree"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
