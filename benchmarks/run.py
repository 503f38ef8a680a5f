"""Run the udafast op benchmarks: ``python -m benchmarks`` or ``python benchmarks/run.py``.

Every selected case runs all selected providers back to back in this process; results are merged
into benchmarks/results/<device-slug>.json (a new measurement of a (case, provider) replaces the
old one) and rendered to <device-slug>.md and <device-slug>.png. See benchmarks/README.md.
"""
import argparse
import importlib
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import harness, report  # noqa: E402

MODULES = (
    "bench_class_thresholds",
    "bench_topk_per_class",
    "bench_prototype_softmax",
    "bench_class_feature_sums",
    "bench_sce_loss",
    "bench_kl_loss",
)


def all_cases():
    cases = []
    for name in MODULES:
        module = importlib.import_module(f"benchmarks.{name}")
        for case in module.CASES:
            case.module = name
            cases.append(case)
    return cases


def _tokens(values):
    return [t.strip() for v in values or [] for t in v.split(",") if t.strip()]


def select_cases(cases, filters):
    tokens = [t.lower() for t in _tokens(filters)]
    if not tokens:
        return cases

    def keys(case):
        return {case.name.lower(), case.name.split()[0].lower(), case.op.lower(), case.module.lower()}

    unknown = [t for t in tokens if not any(t in keys(c) for c in cases)]
    if unknown:
        valid = sorted({k for c in cases for k in keys(c)})
        raise SystemExit(f"--ops: unknown {', '.join(unknown)}; valid: {', '.join(valid)}")
    return [c for c in cases if keys(c) & set(tokens)]


def select_providers(filters):
    tokens = [t.lower() for t in _tokens(filters)]
    if not tokens:
        return list(harness.PROVIDERS)
    unknown = [t for t in tokens if t not in harness.PROVIDERS]
    if unknown:
        raise SystemExit(f"--providers: unknown {', '.join(unknown)}; valid: {', '.join(harness.PROVIDERS)}")
    return [p for p in harness.PROVIDERS if p in tokens]


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark udafast's hot-path ops across providers (reference, pytorch, compile, native, triton).",
    )
    p.add_argument("--quick", action="store_true",
                   help="fewer repeats and a shorter compile budget, same shapes (a few minutes on 2 cores)")
    p.add_argument("--ops", action="append", metavar="NAMES",
                   help="comma-separated cases, ops or modules to run (default all); see --list")
    p.add_argument("--providers", action="append", metavar="NAMES",
                   help=f"comma-separated providers (default all): {', '.join(harness.PROVIDERS)}")
    p.add_argument("--repeats", type=int, help="timed calls per provider (default 10, --quick 3)")
    p.add_argument("--warmup", type=int, help="untimed calls first, the first one included (default 2, --quick 1)")
    p.add_argument("--max-seconds", type=float,
                   help="stop repeating a provider after this many seconds, once 3 calls (--quick: 2) are timed "
                        "(default 30, --quick 5)")
    p.add_argument("--compile-budget", type=float,
                   help="seconds torch.compile's first call may take before the compile provider is skipped "
                        "(default 180, --quick 60)")
    p.add_argument("--compile-total-budget", type=float,
                   help="seconds of compilation for the whole run, after which the compile provider is "
                        "skipped (default unlimited, --quick 240)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", default=str(harness.DEFAULT_OUT), help="results folder (default benchmarks/results)")
    p.add_argument("--fresh", action="store_true", help="discard the device's earlier results instead of merging")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    args = p.parse_args(argv)
    for name in ("repeats", "warmup", "threads"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            p.error(f"--{name} must be >= {0 if name == 'warmup' else 1}")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cases = all_cases()
    if args.list:
        for case in cases:
            print(f"{case.name:<28} op={case.op:<20} {case.module}: {case.shapes}")
        return 0
    cases = select_cases(cases, args.ops)
    providers = select_providers(args.providers)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = args.quick
    settings = harness.Settings(
        device=device,
        repeats=args.repeats or (3 if quick else 10),
        warmup=args.warmup if args.warmup is not None else (1 if quick else 2),
        max_seconds=args.max_seconds or (5.0 if quick else 30.0),
        compile_budget=args.compile_budget or (60.0 if quick else 180.0),
        compile_total_budget=args.compile_total_budget or (240.0 if quick else None),
        min_repeats=2 if quick else 3,
        measure_memory=not args.no_memory,
        log=lambda msg: print(msg, flush=True),
    )
    settings.min_repeats = min(settings.min_repeats, settings.repeats)

    import udafast.ops

    udafast.ops.set_validation(False)  # time the kernels, not the value checks
    started = time.perf_counter()
    env = harness.environment(device, settings)
    env["quick"] = quick
    env["providers"] = providers
    dev = env["device"]
    print(f"udafast benchmarks on {dev['name']} ({device}), torch {env['torch']}, "
          f"commit {(env['git']['commit'] or 'unknown')[:12]}{' (dirty)' if env['git']['dirty'] else ''}")
    if env["extension_error"]:
        print(f"native extension: {env['extension_error']}")
    memory_check = None
    if settings.measure_memory:
        try:
            memory_check = harness.verify_memory_method(device)
        except Exception as exc:
            memory_check = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            settings.measure_memory = False
            print(f"warning: peak memory is not measured: the method failed ({memory_check['error']})")
        else:
            if not memory_check["ok"]:
                print(f"warning: the peak-memory method measured {memory_check['measured_bytes']} bytes for a "
                      f"known {memory_check['expected_bytes']}; peak memory figures are unreliable here")
    copy_bw = harness.copy_bandwidth(device, repeats=5 if quick else 10)
    print(f"copy bandwidth: {copy_bw['gbps']:.2f} GB/s (256 MB copy_, read + write)")

    entries = []
    for case in cases:
        entries += harness.run_case(case, providers, settings)

    out = Path(args.out)
    json_path = out / f"{dev['slug']}.json"
    old = None if args.fresh else report.load_results(json_path)
    data = report.merge_results(old, env, entries, copy_bw, memory_check, [c.name for c in all_cases()])
    report.annotate(data)
    report.write_json(json_path, data)
    text = report.markdown(data)
    report.write_markdown(out / f"{dev['slug']}.md", text)
    written = [json_path, out / f"{dev['slug']}.md"]
    if not args.no_chart:
        try:
            report.write_chart(out / f"{dev['slug']}.png", data)
            written.append(out / f"{dev['slug']}.png")
        except Exception as exc:  # a missing matplotlib must not lose the measurements
            print(f"chart not written: {type(exc).__name__}: {exc}")
    print()
    print(text)
    print("wrote " + ", ".join(str(p) for p in written))
    print(f"total {time.perf_counter() - started:.1f} s")
    failed = [e for e in entries if e.get("status") == "error" or str(e.get("check", "")).startswith("MISMATCH")]
    for e in failed:
        print(f"FAILED {e['case']} / {e['provider']}: {e.get('reason') or e.get('check')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
