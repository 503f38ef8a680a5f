"""Where one training step of the mean-teacher methods spends its time, at their GTA5 configs' sizes:
``python -m benchmarks.profile_step`` (issue 15's hot-path question).

For each method a `Trainer` runs its GTA5 config as `benchmarks.memory` measures it (the config's
network, batch and crops on synthetic scenes of the views' sizes, random weights), `--warmup`
steps, then one step under `torch.profiler`. The table gives the step's wall time and the share of
it inside the methods' profiler labels (`udafast::teacher_forward`, `udafast::pseudo_labels`: the
teacher's softmax-max-threshold pass, `udafast::class_mix`, `udafast::reference_forward`,
`udafast::feature_distance`, `udafast::masked_view`) and the heaviest aten ops. A label is a
candidate for the op layer when it is a real share of the step; the network's passes are not ops.

Results: benchmarks/results/profile-step-<device-slug>.md (and .json).
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks import harness, memory  # noqa: E402

LABELS = ("udafast::teacher_forward", "udafast::pseudo_labels", "udafast::class_mix", "udafast::reference_forward",
          "udafast::feature_distance", "udafast::masked_view")
DEFAULT_METHODS = ("dacs", "daformer", "mic")


def profile_method(method: str, *, device: str, warmup: int, threads: int, quick: bool) -> dict:
    """One profiled step of `method` after `warmup` steps -> {step_s, labels: {label: s}, top_ops}."""
    from udafast.engine.trainer import Trainer
    from udafast.methods import method_class
    config = memory.measurement_config(method, "fp32", device=device, iters=warmup + 1, quick=quick, threads=threads)
    config["eval"]["max_images"] = 1
    seen, out = {"n": 0}, {}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])

    def wrap(original):
        def step(self, batch, it, iters):
            seen["n"] += 1
            if seen["n"] <= warmup:
                return original(self, batch, it, iters)
            with profile(activities=activities) as prof:
                start = time.perf_counter()
                result = original(self, batch, it, iters)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                out["step_s"] = time.perf_counter() - start
            events = prof.key_averages()
            out["labels"] = {e.key: e.cpu_time_total / 1e6 for e in events if e.key in LABELS}
            ops = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: e.self_cpu_time_total,
                         reverse=True)
            out["top_ops"] = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in ops[:8]]
            return result
        return step

    with memory.patched(method_class(method), "step", wrap), tempfile.TemporaryDirectory() as folder:
        Trainer(config, os.path.join(folder, "run"), progress=False, tensorboard=False).run()
    out.update(model=config["model"]["name"], batch=config["data"]["batch_size"],
               crop=config["data"]["source_view"].get("crop"), config=memory.CONFIGS.get(method, f"gta5_{method}"))
    return out


def markdown(rows: dict, env: dict) -> str:
    lines = [f"# One training step, profiled ({env['device']}, {env['threads']} threads, torch {env['torch']})", "",
             f"{env['date']}; `python -m benchmarks.profile_step {' '.join(env['argv'])}`. Shares of the step's wall "
             "time inside each profiler label (CPU time of the ops under it).", "",
             "| method | config | network | batch, crop | step s | " + " | ".join(l.split("::")[1] for l in LABELS) + " |",
             "|---" * (5 + len(LABELS)) + "|"]
    for method, r in rows.items():
        shares = [f"{100 * r['labels'][l] / r['step_s']:.2f}%" if l in r["labels"] else "-" for l in LABELS]
        lines.append(f"| {method} | {r['config']} | {r['model']} | {r['batch']}, {r['crop']} | {r['step_s']:.2f} | "
                     + " | ".join(shares) + " |")
    lines += ["", "Heaviest aten ops (self CPU time, calls):", ""]
    for method, r in rows.items():
        lines.append(f"- {method}: " + ", ".join(f"{k} {1e3 * s:.1f} ms ({n})" for k, s, n in r["top_ops"]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--quick", action="store_true", help="toy sizes (benchmarks.memory --quick): checks the script")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in memory.METHODS]
    if unknown:
        p.error(f"--methods: expected some of {', '.join(memory.METHODS)}, got {', '.join(unknown)}")
    rows = {m: profile_method(m, device=args.device, warmup=args.warmup, threads=args.threads, quick=args.quick)
            for m in methods}
    torch.set_num_threads(args.threads)  # as the runs had it: the name and slug say the thread count
    device = harness.device_info(torch.device(args.device))
    name = device["name"]
    env = {"device": name, "threads": args.threads, "torch": torch.__version__, "argv": argv if argv is not None else sys.argv[1:],
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    stem = Path(args.out) / f"profile-step-{device['slug']}{'-quick' if args.quick else ''}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    stem.with_suffix(".md").write_text(markdown(rows, env))
    print(markdown(rows, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
