"""Peak memory and time per iteration of each method's training under its GTA5 -> Cityscapes config:
``python -m benchmarks.memory`` (see benchmarks/README.md).

For every method and variant (float32, bf16 autocast, bf16 + activation checkpointing of the
backbone) a fresh process trains a few iterations through the real `Trainer` with the config's
network, batch size and views; only the data (the embedded synthetic scenes, generated at the
size the config's views resize to, so that every crop is the config's) and the weights (random:
no pretrained backbone, no source-only init) differ from a real run. Multi-stage methods are
measured in their heaviest stage: ProDA's stage 1 (teacher, prototypes, soft labels; its warm-up
network from one warm-up iteration) and CBST's first round (after its two pseudo-labelling passes).
The contrastive method's bank and loss are on from the first iteration, the bank full (random
features) from the start.

CUDA: `torch.cuda.max_memory_allocated()` over the training steps (`method.step`, wrapped for the
run: forward, backward and optimiser steps, with the network, optimiser state and method state
resident), over the set-up before the first step (network, the stage's passes over the target
set) and over the whole run (evaluation of one val image and checkpoints included), plus the
allocator's reserved peak. CPU (only with --quick, toy sizes): the process's peak RSS
(`ru_maxrss`, reset as the trainer starts) and its growth over the run.

Results: benchmarks/results/memory-<device-slug>.json and .md (with --quick: memory-<slug>-quick.*,
never merged with full-size results); a new run's (method, variant) rows replace the old ones.
"""
import argparse
import contextlib
import datetime
import importlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import harness, report  # noqa: E402

SCHEMA = 1
METHODS = ("source_only", "dann", "adaptsegnet", "cbst", "contrastive", "proda", "dacs", "daformer", "mic")
VARIANTS = ("fp32", "bf16", "bf16+ckpt")
#: the config each method is measured under; source_only has none of its own: AdaptSegNet's data,
#: network and optimiser, the source-only baseline of that setup (which CBST's config names for its
#: pre-training)
CONFIGS = {"source_only": "gta5_adaptsegnet"}
#: the stage measured: the heaviest of a multi-stage method (None: the only one)
MEASURED_STAGE = {"cbst": "round0", "proda": "stage1"}
#: a stage trained for one iteration first, whose network the measured stage starts from
PREPARED_STAGE = {"proda": "warmup"}
#: native (H, W) of the real datasets, for views without a resize
GTA5_SIZE, CITYSCAPES_SIZE = (1052, 1914), (1024, 2048)
#: --quick: every size divided by this, and this small network instead of the config's
QUICK_DIVISOR = 8
QUICK_MODEL = {"name": "small", "num_classes": 19, "width": 8, "feature_dim": 32}
GIB = 2 ** 30


# ---------------------------------------------------------------------------------------------
# the measured configs


def parse_variant(text):
    """"fp32", "bf16", optionally "+ckpt" -> the train-section options it sets."""
    precision, *rest = text.split("+")
    if precision not in ("fp32", "bf16") or any(r != "ckpt" for r in rest) or len(rest) > 1:
        raise ValueError(f"--variants: expected fp32 or bf16, optionally with +ckpt (e.g. bf16+ckpt), got {text!r}")
    return {"amp": "bf16" if precision == "bf16" else None, "activation_checkpointing": bool(rest)}


def _scaled(size, divisor):
    """A resize / crop / input size (an int, a pair or None) divided by `divisor`."""
    if size is None or divisor == 1:
        return size
    if isinstance(size, int):
        return max(1, round(size / divisor))
    return [max(1, round(int(s) / divisor)) for s in size]


def _frame(view, native, divisor):
    """(H, W) to generate scenes at: the view's resize when it is a pair (the resize is then the
    identity), else the real dataset's size."""
    resize = view.get("resize")
    if resize is not None and not isinstance(resize, int):
        return [int(s) for s in resize]
    return _scaled(list(native), divisor)


def measurement_config(method, variant, *, device, iters, quick=False, threads=None):
    """The run config measuring `method` (its GTA5 config) in `variant` for `iters` iterations of
    the measured stage, on synthetic scenes of the config's sizes (see the module docstring)."""
    from udafast.config import merge, read_config
    from udafast.engine.runs import resolve_config
    if method not in METHODS:
        raise ValueError(f"--methods: expected some of {', '.join(METHODS)}, got {method!r}")
    config = resolve_config(read_config(CONFIGS.get(method, f"gta5_{method}")), method)
    divisor = QUICK_DIVISOR if quick else 1
    data = config["data"]
    batch = int(data["batch_size"])
    views = {}
    for key in ("source_view", "target_view"):
        view = dict(data.get(key) or {})
        for k in ("resize", "crop"):
            view[k] = _scaled(view.get(k), divisor)
        views[key] = view

    def scenes(domain, split, size, length):
        return {"name": "synthetic", "root": None, "split": split,
                "options": {"domain": domain, "size": size, "length": length, "cache": True}}

    train = {"iters": iters, "stage_iters": iters, "eval_every": 0, "ckpt_every": 0, "panels": 0, "grad_accum": 1,
             **parse_variant(variant)}
    config = merge(config, {
        "device": device, "threads": threads, "init": None, "backend": "auto", "deterministic": False,
        "data": {"source": scenes("source", "train", _frame(views["source_view"], GTA5_SIZE, divisor), batch),
                 "target": scenes("target", "train", _frame(views["target_view"], CITYSCAPES_SIZE, divisor), batch),
                 "val": scenes("target", "val", _scaled(list(CITYSCAPES_SIZE), divisor), 1),
                 "num_workers": 0, **views},
        "train": train,
        "eval": {"max_images": 1, "input_size": _scaled(config["eval"].get("input_size"), divisor)},
    })
    if quick:
        config["model"] = dict(QUICK_MODEL)
    else:
        config["model"]["pretrained"] = None
    if method == "contrastive":
        config["contrastive"] = merge(config.get("contrastive") or {}, {"bank_start": 0, "loss_start": 0})
    if method in ("daformer", "mic"):
        # a couple of generated scenes need not hold 3000 pixels of every class; the sampling is
        # the loader's work, not the device's
        config[method] = merge(config.get(method) or {}, {"rcs_min_pixels": 0})
    return config


def _input_size(view, frame):
    """The (H, W) the network trains on: the crop, else the resized frame."""
    size = view.get("crop") or frame
    return f"{size[0]}x{size[1]}"


# ---------------------------------------------------------------------------------------------
# one measurement (in its own process)


def _rss_bytes():
    """The process's resident memory now (Linux /proc), or None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _max_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _reset_peak_rss():
    """Start the process's peak resident memory afresh (Linux: "5" to /proc/self/clear_refs resets
    VmHWM, which ru_maxrss reads), so the peak is the measured run's, not the imports' or an earlier
    load's. Where that is refused the peak stays the process's, and the growth may be understated."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class StepMeter:
    """Wraps a method class's `step` for one run: the memory peak before the first step (the
    set-up) and over the steps, and each step's time (synchronised on CUDA)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.times = []
        self.setup_peak = self.step_peak = self.step_reserved = None

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def attached(self, cls):
        """A context in which `cls.step` is measured."""
        def wrap(original):
            def measured(method, batch, it, iters):
                self._sync()
                if not self.times:
                    if self.cuda:
                        self.setup_peak = torch.cuda.max_memory_allocated(self.device)
                        torch.cuda.reset_peak_memory_stats(self.device)
                    else:
                        self.setup_peak = _max_rss_bytes()
                t0 = time.perf_counter()
                out = original(method, batch, it, iters)
                self._sync()
                self.times.append(time.perf_counter() - t0)
                if self.cuda:
                    self.step_peak = max(self.step_peak or 0, torch.cuda.max_memory_allocated(self.device))
                    self.step_reserved = max(self.step_reserved or 0, torch.cuda.max_memory_reserved(self.device))
                return out
            return measured
        return patched(cls, "step", wrap)


@contextlib.contextmanager
def patched(cls, name, wrap):
    """`cls.<name>` replaced by `wrap(cls.<name>)` for the block."""
    own = name in cls.__dict__
    original = getattr(cls, name)
    setattr(cls, name, wrap(original))
    try:
        yield
    finally:
        if own:
            setattr(cls, name, original)
        else:
            delattr(cls, name)


def _fill_bank(method):
    """The contrastive memory bank full (`bank_size` random features per class), as after its
    filling period, so that the loss compares each pixel with a whole class's entries."""
    bank = method.bank
    device = bank.features.device
    n = bank.num_classes * bank.size
    labels = torch.arange(bank.num_classes, device=device).repeat_interleave(bank.size)
    bank.push(torch.randn(n, bank.dim, device=device), labels, torch.rand(n, device=device), bank.size)


#: method -> what to do after `start_stage` so that the steps run in their steady state
STEADY_STATE = {"contrastive": _fill_bank}


def _steady_state(cls, method):
    """A context in which `cls.start_stage` ends with `STEADY_STATE[method]` (if any)."""
    hook = STEADY_STATE.get(method)
    if hook is None:
        return contextlib.nullcontext()

    def wrap(original):
        def start_stage(self, *args, **kwargs):
            original(self, *args, **kwargs)
            hook(self)
        return start_stage
    return patched(cls, "start_stage", wrap)


def _pregenerate(config):
    """Generate the run's scenes into the process's cache before measuring."""
    from udafast.engine.data import build_split
    for key in ("source", "target", "val"):
        dataset = build_split(config["data"][key])
        for i in range(len(dataset)):
            dataset[i]


def _median_time(times):
    kept = times[3:] or times  # as the trainer's sec_per_iter: the first iterations warm up
    return round(statistics.median(kept), 5) if kept else None


def run_child(spec):
    """One measurement (`spec["phase"]` "measure") or the preparing run of a multi-stage method
    ("prepare") -> the result dict (also written to spec["result"])."""
    from udafast.engine.trainer import Trainer
    from udafast.methods import method_class
    method, phase = spec["method"], spec["phase"]
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    result = {"method": method, "variant": spec["variant"], "phase": phase}
    meter = StepMeter(device)
    try:
        result["device"] = harness.device_info(device)
        config = measurement_config(method, spec["variant"], device=spec["device"], iters=spec["iters"],
                                    quick=spec["quick"], threads=spec.get("threads"))
        _pregenerate(config)
        out = spec["out_dir"]
        if phase == "prepare":
            config["train"] = dict(config["train"], iters=1, stage_iters=1)
            Trainer(config, out, stage=PREPARED_STAGE[method], tensorboard=False, progress=False).run()
            result["status"] = "ok"
            return result
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)
        _reset_peak_rss()
        rss_before = _rss_bytes()
        cls = method_class(method)
        with meter.attached(cls), _steady_state(cls, method):
            metrics = Trainer(config, out, stage=MEASURED_STAGE.get(method), tensorboard=False, progress=False).run()
        result.update(status="ok", stage=MEASURED_STAGE.get(method) or "train", steps=len(meter.times),
                      sec_per_iter=metrics["sec_per_iter"], step_s=_median_time(meter.times),
                      stage_setup_s=metrics.get("stage_setup_s"))
        if device.type == "cuda":
            after = torch.cuda.max_memory_allocated(device)  # since the first step: the steps, evaluation, checkpoints
            result.update(peak_step_bytes=meter.step_peak, peak_setup_bytes=meter.setup_peak,
                          peak_run_bytes=max(meter.setup_peak or 0, after), reserved_step_bytes=meter.step_reserved,
                          resident_before_bytes=resident)
        else:
            peak = _max_rss_bytes()
            result.update(peak_rss_bytes=peak, rss_before_bytes=rss_before,
                          rss_growth_bytes=None if rss_before is None else peak - rss_before,
                          setup_rss_growth_bytes=None if rss_before is None else meter.setup_peak - rss_before)
    except torch.cuda.OutOfMemoryError as e:
        # how far it got: out of memory in the set-up, in step N, or after the steps (evaluation)
        result.update(status="oom", reason=f"after {len(meter.times)} steps: {harness.first_line(str(e))}",
                      peak_step_bytes=meter.step_peak)
    except Exception as e:
        result.update(status="error", reason=f"{type(e).__name__}: {harness.first_line(str(e))}",
                      traceback=traceback.format_exc()[-4000:])
    finally:
        if spec.get("result"):
            report.write_json(spec["result"], result)
    return result


# ---------------------------------------------------------------------------------------------
# the parent: one process per measurement


def _spawn(spec, folder, timeout):
    """Run `spec` in a fresh process -> its result (an error result if it died or timed out)."""
    folder.mkdir(parents=True, exist_ok=True)
    spec_path, result_path, log_path = folder / "spec.json", folder / "result.json", folder / "log.txt"
    spec = dict(spec, result=str(result_path))
    spec_path.write_text(json.dumps(spec))
    base = {"method": spec["method"], "variant": spec["variant"], "phase": spec["phase"]}
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--child", str(spec_path)],
                                  cwd=harness.REPO, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            return {**base, "status": "timeout", "reason": f"over {timeout} s (log: {log_path})"}
    try:
        return json.loads(result_path.read_text())
    except (OSError, ValueError):
        tail = log_path.read_text()[-1500:].strip().splitlines()
        return {**base, "status": "error",
                "reason": f"the process exited with code {code} without a result: {tail[-1] if tail else ''}",
                "log_tail": "\n".join(tail[-20:])}


def measure(methods, variants, *, device, iters, quick, threads, timeout, workdir, keep=False, on_row=None,
            log=print):
    """Every (method, variant) in its own process -> result rows (each also given to `on_row` as
    it comes)."""
    rows = []
    for method in methods:
        prepared = None
        if method in PREPARED_STAGE:
            folder = workdir / method / "prepare"
            spec = {"method": method, "variant": "fp32", "phase": "prepare", "device": device, "iters": 1,
                    "quick": quick, "threads": threads, "out_dir": str(folder / "run")}
            t0 = time.perf_counter()
            done = _spawn(spec, folder, timeout)
            if done["status"] != "ok":
                log(f"{method}: the {PREPARED_STAGE[method]} run failed: {done.get('reason')}")
                prepared = f"the {PREPARED_STAGE[method]} run before the measured stage failed: {done.get('reason')}"
            else:
                prepared = folder / "run" / "checkpoints" / f"{PREPARED_STAGE[method]}.pt"
                log(f"{method}: {PREPARED_STAGE[method]} network ready ({time.perf_counter() - t0:.0f} s)")
        for variant in variants:
            folder = workdir / method / variant.replace("+", "_")
            spec = {"method": method, "variant": variant, "phase": "measure", "device": device, "iters": iters,
                    "quick": quick, "threads": threads, "out_dir": str(folder / "run")}
            t0 = time.perf_counter()
            if isinstance(prepared, str):
                result = {"method": method, "variant": variant, "status": "error", "reason": prepared}
            else:
                if prepared is not None:
                    (folder / "run" / "checkpoints").mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(prepared, folder / "run" / "checkpoints" / prepared.name)
                result = _spawn(spec, folder, timeout)
            result["wall_s"] = round(time.perf_counter() - t0, 1)
            result.update(_describe(method, quick))
            rows.append(result)
            log(_line(result))
            if on_row is not None:
                on_row(result)
            if not keep:
                shutil.rmtree(folder / "run", ignore_errors=True)
        if not keep and method in PREPARED_STAGE:
            shutil.rmtree(workdir / method / "prepare" / "run", ignore_errors=True)
    return rows


def _describe(method, quick):
    """What a row measured: the config, network, batch and training input sizes."""
    config = measurement_config(method, "fp32", device="cpu", iters=1, quick=quick)
    data = config["data"]
    return {"config": CONFIGS.get(method, f"gta5_{method}"), "model": config["model"]["name"],
            "stage": MEASURED_STAGE.get(method) or "train", "batch_size": int(data["batch_size"]),
            "source_input": _input_size(data["source_view"], data["source"]["options"]["size"]),
            "target_input": _input_size(data["target_view"], data["target"]["options"]["size"])}


def _gib(value):
    return "-" if value is None else f"{value / GIB:.2f}"


def _mib(value):
    return "-" if value is None else f"{value / 2**20:.0f}"


def _line(r):
    head = f"{r['method']:<12} {r['variant']:<10}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r.get('reason', '')}"
    if "peak_step_bytes" in r:
        return (f"{head} peak {_gib(r['peak_step_bytes'])} GiB in steps, {_gib(r['peak_run_bytes'])} GiB run, "
                f"{r['sec_per_iter']} s/iter ({r['wall_s']} s)")
    return f"{head} peak RSS +{_gib(r['rss_growth_bytes'])} GiB (CPU), {r['sec_per_iter']} s/iter ({r['wall_s']} s)"


# ---------------------------------------------------------------------------------------------
# results


COLUMNS = {
    "peak_step_bytes": "CUDA: torch.cuda.max_memory_allocated() over the training steps (method.step: forward, "
                       "backward, optimiser steps), weights, optimiser and method state included",
    "peak_setup_bytes": "CUDA: the same before the first step (network, the stage's passes over the target set)",
    "peak_run_bytes": "CUDA: the same over the whole run (set-up, steps, evaluation of one val image, checkpoints)",
    "reserved_step_bytes": "CUDA: torch.cuda.max_memory_reserved() over the steps (the caching allocator's footprint)",
    "peak_rss_bytes / rss_growth_bytes": "CPU (--quick only): the process's peak resident memory (ru_maxrss, "
                                         "reset when the trainer starts), and it minus the resident memory then",
    "sec_per_iter": "the trainer's median seconds per iteration after the first 3 (data loading on the main "
                    "process included)",
    "step_s": "median seconds of method.step alone (synchronised on CUDA), same iterations",
}


def environment(device, iters, quick, threads):
    """The run's record; `device`: `harness.device_info` of the measured device (or None, for later)."""
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(), "git": harness.git_info(),
            "device": device, "load_average_at_start": load,
            "settings": {"iters": iters, "quick": quick, "threads": threads}}


def merge_results(old, env, rows, order):
    """New rows replace old ones of the same (method, variant); the rest are kept."""
    run_id = env["date"]
    for row in rows:
        row["run"] = run_id
    kept, runs = [], {}
    if old:
        fresh = {(r["method"], r["variant"]) for r in rows}
        kept = [r for r in old.get("results", []) if (r["method"], r["variant"]) not in fresh]
        runs = {k: v for k, v in old.get("runs", {}).items() if any(r.get("run") == k for r in kept)}
    runs[run_id] = env
    method_at = {m: i for i, m in enumerate(METHODS)}
    variant_at = {v: i for i, v in enumerate(dict.fromkeys(order))}
    results = sorted(kept + rows, key=lambda r: (method_at.get(r["method"], 99), variant_at.get(r["variant"], 99),
                                                 r["variant"]))
    return {"schema": SCHEMA, "device": env["device"], "quick": env["settings"]["quick"], "latest_run": run_id,
            "runs": runs, "results": results, "columns": COLUMNS}


def load_results(path):
    try:
        data = json.loads(Path(path).read_text())
        return data if data.get("schema") == SCHEMA else None
    except (OSError, ValueError):
        return None


def _cell(r):
    if r is None:
        return "-"
    if r["status"] != "ok":
        return r["status"].upper() if r["status"] == "oom" else r["status"]
    if "peak_step_bytes" in r:
        return f"{_gib(r['peak_step_bytes'])} GiB, {r['sec_per_iter']:.3f} s"
    return f"+{_mib(r['rss_growth_bytes'])} MiB RSS, {r['sec_per_iter']:.3f} s"


def markdown(data):
    dev, quick = data["device"], data.get("quick")
    cuda = dev.get("type") == "cuda"
    lines = [f"# udafast training memory per method{' (TOY SIZES, --quick)' if quick else ''}: {dev['name']}", ""]
    if quick:
        lines += [f"**Toy run, not the GTA5 -> Cityscapes footprint**: the small network ({QUICK_MODEL['width']} "
                  f"channels wide) instead of DeepLabV2-ResNet-101 and every resize, crop and evaluation size divided "
                  f"by {QUICK_DIVISOR}; it checks the measurement, nothing more."
                  + ("" if cuda else " CPU: peak resident memory growth of the process (ru_maxrss), not GPU memory."),
                  ""]
    for run_id, run in sorted(data["runs"].items()):
        git = run.get("git", {})
        commit = (git.get("commit") or "unknown")[:12] + (" (dirty)" if git.get("dirty") else "")
        extra = (f", CUDA {run['device'].get('cuda_version')}, {run['device']['cuda_memory_bytes'] / GIB:.1f} GiB"
                 if run["device"].get("type") == "cuda" else f", {run['device']['torch_threads']} threads")
        lines.append(f"- run {run_id}: torch {run['torch']}{extra}, commit {commit}; {run['settings']['iters']} "
                     f"iterations of the measured stage per measurement")
    variants = list(dict.fromkeys(r["variant"] for r in data["results"]))
    by_key = {(r["method"], r["variant"]): r for r in data["results"]}
    methods = list(dict.fromkeys(r["method"] for r in data["results"]))
    what = "peak GiB allocated in the training steps, s/iter" if cuda else "peak RSS growth, s/iter"
    lines += ["", f"Per variant: {what}.", "",
              "| method | config | stage | network | batch / domain | source, target input | "
              + " | ".join(variants) + " |",
              "|" + "|".join(["---"] * (6 + len(variants))) + "|"]
    for m in methods:
        first = next(r for r in data["results"] if r["method"] == m)
        lines.append(f"| {m} | {first.get('config', '-')} | {first.get('stage', '-')} | {first.get('model', '-')} | "
                     f"{first.get('batch_size', '-')} | {first.get('source_input', '-')}, "
                     f"{first.get('target_input', '-')} | " + " | ".join(_cell(by_key.get((m, v))) for v in variants)
                     + " |")
    if cuda:
        header = ["method", "variant", "steps GiB", "set-up GiB", "run GiB", "reserved GiB", "s/iter", "step s",
                  "notes"]
    else:
        header = ["method", "variant", "peak RSS GiB", "RSS growth MiB", "set-up growth MiB", "s/iter", "step s",
                  "notes"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for r in data["results"]:
        ok = r["status"] == "ok"
        note = "" if ok else f"{r['status']}: {(r.get('reason') or '').replace('|', '/')[:160]}"
        if cuda:
            cells = [_gib(r.get("peak_step_bytes")), _gib(r.get("peak_setup_bytes")), _gib(r.get("peak_run_bytes")),
                     _gib(r.get("reserved_step_bytes"))]
        else:
            cells = [_gib(r.get("peak_rss_bytes")), _mib(r.get("rss_growth_bytes")),
                     _mib(r.get("setup_rss_growth_bytes"))]
        lines.append("| " + " | ".join([r["method"], r["variant"], *cells, report.fmt(r.get("sec_per_iter"), ".3f"),
                                         report.fmt(r.get("step_s"), ".3f"), note]) + " |")
    lines += ["", "Synthetic scenes at the sizes the configs' views resize to (the crops are the configs'), "
              "random weights; ProDA measured in stage 1 (from one warm-up iteration), CBST in round 0 (after its "
              "pseudo-labelling passes), the contrastive bank full and its loss on from the first iteration. "
              "GiB = 2^30 bytes. See benchmarks/README.md.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def _tokens(values):
    return [t.strip() for v in values or [] for t in v.split(",") if t.strip()]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory",
                                description="Peak memory and s/iter of each method's training under its GTA5 -> "
                                            "Cityscapes config, per precision / checkpointing variant.")
    p.add_argument("--device", help="cuda[:N] or cpu (default: cuda when available); cpu needs --quick")
    p.add_argument("--methods", action="append", metavar="NAMES",
                   help=f"comma-separated (default all): {', '.join(METHODS)}")
    p.add_argument("--variants", action="append", metavar="NAMES",
                   help=f"comma-separated fp32 / bf16, each optionally +ckpt (default {','.join(VARIANTS)})")
    p.add_argument("--iters", type=int, help="iterations of the measured stage per measurement (default 8, --quick 3)")
    p.add_argument("--quick", action="store_true",
                   help=f"toy sizes: the small network, every size divided by {QUICK_DIVISOR} (results: *-quick.*)")
    p.add_argument("--threads", type=int, help="torch threads in each measurement (default torch's)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per measurement process (default 900)")
    p.add_argument("--out", default=str(harness.DEFAULT_OUT), help="results folder (default benchmarks/results)")
    p.add_argument("--keep", metavar="DIR", help="keep the run folders and logs under DIR (default: a temp folder, "
                                                 "removed)")
    p.add_argument("--fresh", action="store_true", help="start the device's results over instead of merging")
    p.add_argument("--child", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return args
    args.methods = _tokens(args.methods) or list(METHODS)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {', '.join(unknown)}; valid: {', '.join(METHODS)}")
    args.variants = list(dict.fromkeys(_tokens(args.variants) or VARIANTS))
    for v in args.variants:
        try:
            parse_variant(v)
        except ValueError as e:
            p.error(str(e))
    if args.iters is None:
        args.iters = 3 if args.quick else 8
    if args.iters < 1:
        p.error(f"--iters: expected a positive number, got {args.iters}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads: expected a positive number, got {args.threads}")
    if args.timeout <= 0:
        p.error(f"--timeout: expected a positive number of seconds, got {args.timeout}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device: expected cuda[:N] or cpu, got {args.device!r}")
    if device.type not in ("cuda", "cpu"):
        p.error(f"--device: expected cuda[:N] or cpu, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    if device.type == "cpu" and not args.quick:
        p.error("--device cpu: the full-size configs (DeepLabV2-ResNet-101 at the authors' crops) need a GPU; "
                "on the CPU only --quick (toy sizes) runs")
    return args


class ResultsFile:
    """The device's results file, rewritten after each measurement (so that a run stopped part way
    keeps what it measured). The device is named by the first measurement process that reports it:
    the parent holds no CUDA context while the measurements run."""

    def __init__(self, out, args):
        self.out, self.args = Path(out), args
        self.env = environment(None, args.iters, args.quick, args.threads)  # the date and load now
        self.path = self.old = None
        self.rows = []

    def add(self, row):
        device = row.pop("device", None)
        self.rows.append(row)
        if self.path is None and device is not None:
            self._start(device)
        if self.path is not None:
            self.write()

    def _start(self, device):
        self.env["device"] = device
        self.path = self.out / f"memory-{device['slug']}{'-quick' if self.args.quick else ''}.json"
        self.old = None if self.args.fresh else load_results(self.path)

    def finish(self):
        """Write (naming the device here if no measurement did) -> the Markdown text."""
        if self.path is None:
            self._start(harness.device_info(torch.device(self.args.device)))
        return self.write()

    def write(self):
        data = merge_results(self.old, self.env, list(self.rows), list(VARIANTS) + self.args.variants)
        report.write_json(self.path, data)
        text = markdown(data)
        report.write_markdown(self.path.with_suffix(".md"), text)
        return text


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        result = run_child(json.loads(Path(args.child).read_text()))
        return 0 if result["status"] in ("ok", "oom") else 1
    try:  # once here, rather than in every measurement process
        importlib.import_module("udafast.engine.trainer")
    except ModuleNotFoundError as e:
        raise SystemExit(f"benchmarks.memory: the trainer cannot be imported ({e}); install udafast's dependencies "
                         f"(an image with torch but without cityscapesscripts: pip install --no-deps "
                         f"cityscapesscripts, a pure-Python wheel)") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="udafast-memory-"))
    results = ResultsFile(args.out, args)
    t0 = time.perf_counter()
    try:
        rows = measure(args.methods, args.variants, device=args.device, iters=args.iters, quick=args.quick,
                       threads=args.threads, timeout=args.timeout, workdir=workdir, keep=bool(args.keep),
                       on_row=results.add)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(results.finish())
    print(f"results: {results.path} and {results.path.with_suffix('.md')} ({time.perf_counter() - t0:.0f} s)")
    failed = [r for r in rows if r["status"] not in ("ok", "oom")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
