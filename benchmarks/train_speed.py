"""Seconds per training iteration of every compared method on the embedded benchmark, before and
after the training-path changes, in one process: ``python -m benchmarks.train_speed``.

Each method trains `--iters` iterations of its `synthetic` preset settings (random weights: no
source-only init, so no method waits for another; the data, network, batch and method options are
the preset's), once per setting, the settings alternating over `--repeats` rounds; the figure is the
median over rounds of each run's median step time (`method.step`: forward, backward, optimiser and
the method's own passes; the set-up passes of CBST's rounds and the evaluation are not steps). The
settings (SETTINGS: the training path before issue 15's changes and after them) alternate in one
process, so every round re-runs the baseline beside the changes. Results: benchmarks/results/train-speed-<device-slug>.md and .json.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import harness, memory  # noqa: E402

#: name -> (train section, upsample by matrix products): the training path before issue 15's
#: changes, with the logits' upsampling by matrix products, and with channels-last networks too
SETTINGS = {"before": ({"channels_last": False}, False), "upsample": ({"channels_last": False}, True),
            "after": ({"channels_last": True}, True)}
#: the compared methods whose steps are timed (adabn trains nothing; its passes are BatchNorm's)
METHODS = ("source_only", "dann", "adaptsegnet", "cbst", "contrastive", "proda", "dacs", "daformer", "mic", "oracle")


def step_times(method: str, setting: tuple, iters: int, threads: int) -> list:
    """The wall time of each `method.step` of a short run of `method` under the preset with
    `setting` (see SETTINGS)."""
    from udafast import inference
    from udafast.config import merge, read_config
    from udafast.engine.runs import resolve_config
    from udafast.engine.trainer import Trainer
    from udafast.methods import method_class
    train, inference.UPSAMPLE_BY_MATMUL = setting
    config = resolve_config(read_config("synthetic"), method)
    # 64 images a domain: the passes over the target set (CBST's, ProDA's) are not what is timed
    scenes = {"options": {"length": 64}}
    config = merge(config, {"init": None, "threads": threads, "eval": {"max_images": 1},
                            "data": {"source": scenes, "target": scenes},
                            "train": {"iters": iters, "stage_iters": iters, "panels": 0, "eval_every": 0,
                                      "ckpt_every": 0, **train}})
    if method == "proda":
        config["proda"]["student_init"] = None
    times = []

    def wrap(original):
        def step(self, batch, it, total):
            start = time.perf_counter()
            out = original(self, batch, it, total)
            times.append(time.perf_counter() - start)
            return out
        return step

    try:
        with memory.patched(method_class(method), "step", wrap), tempfile.TemporaryDirectory() as folder:
            Trainer(config, os.path.join(folder, "run"), progress=False, tensorboard=False).run()
    finally:
        inference.UPSAMPLE_BY_MATMUL = True
    return times[2:] or times  # the first steps warm the allocator and oneDNN's kernel cache


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_speed", description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: expected some of {', '.join(METHODS)}, got {', '.join(unknown)}")
    runs = {m: {s: [] for s in SETTINGS} for m in methods}
    for _ in range(args.repeats):
        for m in methods:
            for name, setting in SETTINGS.items():
                runs[m][name].append(statistics.median(step_times(m, setting, args.iters, args.threads)))
    rows = {m: {s: statistics.median(v) for s, v in per.items()} for m, per in runs.items()}
    torch.set_num_threads(args.threads)  # as the runs had it: the slug names the thread count
    device = harness.device_info(torch.device("cpu"))
    cpu = device["cpu_model"]
    env = {"cpu": cpu, "threads": args.threads, "torch": torch.__version__, "iters": args.iters,
           "repeats": args.repeats, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "argv": argv if argv is not None else sys.argv[1:]}
    lines = [f"# Training step time on the embedded benchmark ({cpu}, {args.threads} threads, torch {torch.__version__})",
             "", f"{env['date']}; `python -m benchmarks.train_speed {' '.join(env['argv'])}`: median over {args.repeats} "
             f"alternating rounds of each run's median step ({args.iters} iterations, the first two left out).", "",
             "before: F.interpolate's bilinear upsampling of the logits, contiguous networks (the path as it "
             "was); upsample: `udafast.inference.upsample` by two matrix products where a gradient flows back; "
             "after: and `train.channels_last` (the preset's).", "",
             "| method | before s/step | upsample s/step | after s/step | speed-up after / before |",
             "|---|---|---|---|---|"]
    for m, r in rows.items():
        lines.append(f"| {m} | {r['before']:.4f} | {r['upsample']:.4f} | {r['after']:.4f} | "
                     f"{r['before'] / r['after']:.2f}x |")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = device["slug"]
    (out / f"train-speed-{slug}.json").write_text(json.dumps({"env": env, "rows": rows, "runs": runs}, indent=2))
    (out / f"train-speed-{slug}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
