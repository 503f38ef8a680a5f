"""The shared benchmark harness: cases, providers, timing, peak memory, bandwidth (the results'
files, tables and charts are benchmarks/report.py).

A benchmark module (bench_*.py) declares a list ``CASES`` of :class:`Case`. For every case the
harness builds its inputs once, then runs each selected provider back to back in this process:

- ``reference``: the public op with ``backend="reference"`` (pure PyTorch, the specification);
- ``pytorch``: the module's best pure-PyTorch version (no Python loop over classes), same quantity;
- ``compile``: ``torch.compile`` of the ``udafast.ops.reference`` function (first call under a
  time budget; compile time is reported apart and excluded from the timings);
- ``native``: the public op with ``backend="native"`` (the compiled C++/CUDA extension);
- ``triton``: the public op with ``backend="triton"``.

Each provider's first call is checked once against the reference's output.
"""
import contextlib
import dataclasses
import datetime
import gc
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch

PROVIDERS = ("reference", "pytorch", "compile", "native", "triton")
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results"
SCHEMA = 1

# Share of pixels per Cityscapes train id (road, sidewalk, building, ..., bicycle), roughly as in
# the Cityscapes / GTA5 label statistics: a few classes dominate, several are rare. Benchmarks
# draw labels from it so per-class work is as unbalanced as in training.
CLASS_FREQUENCIES = (
    0.368, 0.061, 0.228, 0.0066, 0.0088, 0.0123, 0.0021, 0.0055, 0.159, 0.0116,
    0.040, 0.0122, 0.0014, 0.070, 0.0027, 0.0024, 0.0023, 0.0010, 0.0041,
)


def generator(seed):
    return torch.Generator().manual_seed(seed)


def class_labels(shape, num_classes, gen, *, ignore_fraction=0.0, ignore_index=255):
    """int64 labels of `shape` drawn with Cityscapes-like class frequencies; a share set to ignore."""
    freq = torch.tensor(CLASS_FREQUENCIES[:num_classes], dtype=torch.float64)
    if len(freq) < num_classes:
        freq = torch.cat([freq, freq.new_full((num_classes - len(freq),), float(freq.min()))])
    numel = math.prod(shape)
    labels = torch.multinomial(freq, numel, replacement=True, generator=gen)
    if ignore_fraction > 0:
        drop = torch.rand(numel, generator=gen) < ignore_fraction
        labels = torch.where(drop, ignore_index, labels)
    return labels.reshape(shape)


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclasses.dataclass
class Case:
    """One benchmarked call of one hot path at one realistic shape.

    api(inputs, backend) -> call(): the public udafast.ops call with that backend.
    ref_call(inputs, impl) -> call(): calls `impl` (a function with the reference function's
        positional signature: reference_fn, pytorch_fn or their torch.compile) on the inputs.
    Calls return the op's output (which the harness checks against the reference's).
    backward: the input key whose gradient the call also computes (a "fwd+bwd" case); the
        harness then times forward + backward (with inputs["grad_out"] for a non-scalar output).
    """

    name: str
    op: str
    kernels: tuple  # op names resolve() checks for native/triton, the first is the op itself
    shapes: str
    make_inputs: Callable[[torch.device], dict]
    api: Callable[[dict, str], Callable[[], Any]]
    ref_call: Callable[[dict, Callable], Callable[[], Any]]
    reference_fn: Callable
    pytorch_fn: Callable
    bytes_min: Callable[[dict], int]
    bytes_note: str
    backward: Optional[str] = None
    label_tolerance: float = 0.0  # share of integer outputs allowed to differ (argmax near-ties)
    module: str = ""


@dataclasses.dataclass
class Settings:
    device: torch.device
    repeats: int = 10
    warmup: int = 2
    min_repeats: int = 3
    max_seconds: float = 30.0  # per provider: stop repeating past this (after min_repeats)
    compile_budget: float = 180.0  # seconds for torch.compile's first call (compilation)
    compile_total_budget: Optional[float] = None  # seconds of compilation for the whole run
    compile_spent: float = 0.0
    measure_memory: bool = True
    log: Callable[[str], None] = print


# ---------------------------------------------------------------------------------------------
# building and running a provider


def unavailable_reason(case, provider, device):
    from udafast.ops import backend

    if provider == "native":
        for kernel in case.kernels:
            reason = backend.native_unavailable_reason(kernel, device.type)
            if reason:
                return reason
    if provider == "triton":
        return backend.triton_unavailable_reason(case.kernels[0], device.type)
    if provider == "compile" and not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    return None


def with_backward(call, leaf, grad_out):
    """Forward + backward; returns (output, gradient of `leaf`)."""

    def fn():
        leaf.grad = None
        out = call()
        out.backward(grad_out)
        return out.detach(), leaf.grad

    fn.reset = lambda: setattr(leaf, "grad", None)
    return fn


def build(case, provider, inputs):
    if provider in ("reference", "native", "triton"):
        call = case.api(inputs, provider)
    elif provider == "pytorch":
        call = case.ref_call(inputs, case.pytorch_fn)
    elif provider == "compile":
        call = case.ref_call(inputs, torch.compile(case.reference_fn, dynamic=False))
    else:
        raise ValueError(f"unknown provider {provider!r}")
    if case.backward:
        call = with_backward(call, inputs[case.backward], inputs.get("grad_out"))
    return call


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def snapshot(out):
    """A detached copy of an output (state such as a histogram may change on later calls)."""
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, (tuple, list)):
        return tuple(snapshot(o) for o in out)
    return out


class _Budget:
    """SIGALRM-based wall-clock cap on a call (main thread, POSIX); `fired` tells whether it hit."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.fired = False

    def _handler(self, signum, frame):
        self.fired = True
        raise TimeoutError(f"exceeded the {self.seconds:g} s budget")

    def __enter__(self):
        self._armed = bool(self.seconds) and hasattr(signal, "SIGALRM")
        if self._armed:
            self._previous = signal.signal(signal.SIGALRM, self._handler)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc):
        if self._armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)
        return False


def _dynamo_counters():
    """(graphs compiled, graph breaks, unsupported-construct messages) so far in this process."""
    try:
        from torch._dynamo.utils import counters

        return (
            counters["stats"]["unique_graphs"],
            sum(counters["graph_break"].values()),
            dict(counters["unimplemented"]),
        )
    except Exception:
        return 0, 0, {}


def first_line(message):
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    explanation = [line for line in lines if line.startswith("Explanation:")]
    text = lines[0] if lines else ""
    if explanation:
        text += " (" + explanation[0].removeprefix("Explanation:").strip() + ")"
    return text[:240]


def _error_text(exc, limit=2000):
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[:limit] + " ..."


L2_FLUSH_BYTES = 256 * 2**20  # several times the L2 of an H100 (50 MB) or H200


class CudaTimer:
    """Times one call on the current stream with CUDA events, after writing a buffer larger than
    the L2 cache so that the call reads its inputs from device memory (the benchmark tensors
    nearly fit in an H100's L2, which would flatter memory-bound kernels)."""

    def __init__(self, device):
        self.flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.float32, device=device)
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn):
        self.flush.zero_()
        self.start.record()
        out = fn()
        self.end.record()
        self.end.synchronize()
        return out, self.start.elapsed_time(self.end) / 1e3


def time_calls(fn, settings, already_warm=1):
    """Times in seconds of repeated calls after warm-up (the first call counts as one): wall time
    on the CPU, CUDA event time with the L2 flushed before each call on a GPU."""
    reset = getattr(fn, "reset", None)
    for _ in range(max(0, settings.warmup - already_warm)):
        if reset:
            reset()
        out = fn()
        sync(settings.device)
        del out
    timer = CudaTimer(settings.device) if settings.device.type == "cuda" else None
    times = []
    started = time.perf_counter()
    while len(times) < settings.repeats:
        if reset:
            reset()
        sync(settings.device)
        if timer:
            out, seconds = timer(fn)
        else:
            t0 = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - t0
        times.append(seconds)
        del out
        if len(times) >= settings.min_repeats and time.perf_counter() - started > settings.max_seconds:
            break
    return times


def summarize(times):
    ms = sorted(t * 1e3 for t in times)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    return {
        "median_ms": statistics.median(ms),
        "min_ms": ms[0],
        "q1_ms": q1,
        "q3_ms": q3,
        "iqr_ms": q3 - q1,
        "repeats": len(ms),
    }


# ---------------------------------------------------------------------------------------------
# peak memory of one call, above what existed before it


@contextlib.contextmanager
def _quiet_kineto():
    """Drop Kineto's 'USDT: ... profiler_start/stop' lines from stderr; keep every other line."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines(keepends=True):
                if not line.startswith("USDT:"):
                    sys.stderr.write(line)


def cpu_call_with_peak(fn):
    """(fn(), peak bytes): the peak of the running sum of CPU allocations minus frees during the
    call, from the profiler's memory events (profile_memory=True) in time order. Counts everything
    the call allocates (temporaries, outputs, saved tensors, gradients); the sum starts at 0, so
    what existed before the call (the inputs) is excluded."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # no collection of older garbage inside the measured call
    try:
        with _quiet_kineto():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                out = fn()
    finally:
        if gc_was_enabled:
            gc.enable()
    events = [
        e for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        running += e.nbytes()
        peak = max(peak, running)
    return out, peak


def peak_memory_bytes(fn, device):
    reset = getattr(fn, "reset", None)
    if reset:
        reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak
    out, peak = cpu_call_with_peak(fn)
    del out
    return peak


def verify_memory_method(device):
    """Check the peak-memory method on a call with a known answer: 32 MiB then 16 + 64 MiB -> 80."""
    mib = 1 << 20

    def known():
        a = torch.empty(8 * mib, device=device)  # 32 MiB, freed before the peak
        b = torch.empty(4 * mib, device=device)  # 16 MiB
        del a
        c = torch.empty(16 * mib, device=device)  # 64 MiB
        return b, c

    got = peak_memory_bytes(known, device)
    return {"expected_bytes": 80 * mib, "measured_bytes": got, "ok": got == 80 * mib}


# ---------------------------------------------------------------------------------------------
# machine


def copy_bandwidth(device, mbytes=256, repeats=10):
    """Bytes read + written per second of a `mbytes` MB float32 tensor copy_ (median of repeats)."""
    n = mbytes * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    sync(device)
    times = []
    timer = CudaTimer(device) if device.type == "cuda" else None
    for _ in range(repeats):
        sync(device)
        if timer:
            times.append(timer(lambda: dst.copy_(src))[1])
            continue
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    moved = 2 * n * 4
    del src, dst
    return {"bytes": moved, "median_ms": median * 1e3, "gbps": moved / median / 1e9, "repeats": repeats}


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_info(device):
    info = {
        "type": device.type,
        "torch_threads": torch.get_num_threads(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["name"] = torch.cuda.get_device_name(device)
        info["cuda_memory_bytes"] = props.total_memory
        info["cuda_version"] = torch.version.cuda
        slug = f"cuda-{info['name']}"
    else:
        info["name"] = f"{info['cpu_model']}, {info['torch_threads']} threads"
        slug = f"cpu-{info['cpu_model']}-{info['torch_threads']}t"
    info["slug"] = re.sub(r"[^a-z0-9]+", "-", slug.lower()).strip("-")
    return info


def git_info():
    def git(*args):
        try:
            return subprocess.run(
                ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except Exception:
            return ""

    commit = git("rev-parse", "HEAD") or None
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results"))
    return {"commit": commit, "dirty": dirty}


def environment(device, settings):
    import udafast
    from udafast.ops import backend

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "udafast": getattr(udafast, "__version__", None),
        "extension_error": backend.EXTENSION_ERROR,
        "git": git_info(),
        "device": device_info(device),
        "load_average_at_start": load,
        "validation": False,
        "settings": {
            "repeats": settings.repeats,
            "warmup": settings.warmup,
            "min_repeats": settings.min_repeats,
            "max_seconds_per_provider": settings.max_seconds,
            "compile_budget_s": settings.compile_budget,
            "compile_total_budget_s": settings.compile_total_budget,
        },
    }


# ---------------------------------------------------------------------------------------------
# agreement with the reference


def _flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    return []


def compare(ref, out, label_tolerance=0.0, rtol=1e-3):
    """(ok, detail): integer outputs must match (up to `label_tolerance` of them for argmax
    labels); float outputs within rtol of the reference's largest magnitude."""
    refs, outs = _flatten(ref), _flatten(out)
    if len(refs) != len(outs):
        return False, f"{len(outs)} outputs, the reference has {len(refs)}"
    notes = []
    ok = True
    for i, (r, o) in enumerate(zip(refs, outs)):
        name = f"output {i}" if len(refs) > 1 else "output"
        if tuple(r.shape) != tuple(o.shape):
            return False, f"{name}: shape {tuple(o.shape)}, the reference's {tuple(r.shape)}"
        r, o = r.detach().cpu(), o.detach().cpu()
        if r.dtype.is_floating_point:
            scale = float(r.double().abs().max()) if r.numel() else 0.0
            err = float((o.double() - r.double()).abs().max()) if r.numel() else 0.0
            if not math.isfinite(err) or err > rtol * scale + 1e-12:
                ok = False
                notes.append(f"{name}: max abs error {err:.3g} vs max |ref| {scale:.3g}")
        else:
            differ = int((o.to(r.dtype) != r).sum())
            if differ:
                share = differ / max(1, r.numel())
                allowed = share <= label_tolerance
                ok = ok and allowed
                notes.append(f"{name}: {differ}/{r.numel()} differ" + (" (near ties)" if allowed else ""))
    return ok, "; ".join(notes)


# ---------------------------------------------------------------------------------------------
# running one case


class _Skipped(Exception):
    pass


def _first_call(fn, provider, settings, entry):
    """The first call: warm-up, the output checked against the reference, and
    - for compile: the compilation, under its time budget, timed apart (compile_s);
    - on CPU otherwise: the peak-memory measurement (the CPU allocator keeps no cache, so the
      first call allocates as every later one does; this saves a call of the slow providers)."""
    device = settings.device
    reset = getattr(fn, "reset", None)
    if reset:  # drop state an earlier provider left (a gradient) outside the measured call
        reset()
    if provider != "compile":
        if settings.measure_memory and device.type == "cpu":
            first, peak = cpu_call_with_peak(fn)
            entry["peak_bytes"] = int(peak)
            return first
        first = fn()
        sync(device)
        return first
    budget_s = settings.compile_budget
    if settings.compile_total_budget is not None:
        left = settings.compile_total_budget - settings.compile_spent
        if left <= 0:
            raise _Skipped(f"this run's total compile budget of {settings.compile_total_budget:g} s is spent")
        budget_s = min(budget_s, left) if budget_s else left
    budget = _Budget(budget_s)
    graphs_before, breaks_before, unsupported_before = _dynamo_counters()
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught, budget:
            warnings.simplefilter("always")
            first = fn()
            sync(device)
    except BaseException as exc:
        if budget.fired:
            raise TimeoutError(
                f"torch.compile's first call (compilation) exceeded its {budget_s:g} s budget"
            ) from None
        raise
    finally:
        settings.compile_spent += time.perf_counter() - t0
    if budget.fired:  # dynamo caught the budget's exception somewhere and went on: frames may have
        # fallen back to eager, so this is no fair measure of the compiled function
        raise TimeoutError(
            f"torch.compile's first call (compilation) exceeded its {budget_s:g} s budget "
            f"(took {time.perf_counter() - t0:.1f} s)"
        )
    entry["compile_s"] = time.perf_counter() - t0
    graphs, breaks, unsupported = _dynamo_counters()
    entry["graphs"] = graphs - graphs_before
    entry["graph_breaks"] = breaks - breaks_before
    fresh = [k for k, v in unsupported.items() if v > unsupported_before.get(k, 0)]
    if fresh:
        entry["unsupported"] = [first_line(k) for k in fresh[:3]]
    messages = []
    for w in caught:
        text = str(w.message).strip().splitlines()[0][:200]
        if text not in messages:
            messages.append(text)
    if messages:
        entry["compile_warnings"] = messages[:5]
    return first


def run_case(case, providers, settings):
    log = settings.log
    device = settings.device
    torch.manual_seed(0)
    inputs = case.make_inputs(device)
    bytes_min = int(case.bytes_min(inputs))
    entries, outputs = [], {}
    log(f"== {case.name}: {case.shapes}")
    for provider in providers:
        entry = {
            "case": case.name, "op": case.op, "module": case.module, "shapes": case.shapes,
            "provider": provider, "bytes_min": bytes_min, "bytes_note": case.bytes_note,
        }
        entries.append(entry)
        reason = unavailable_reason(case, provider, device)
        if reason:
            entry.update(status="unavailable", reason=reason)
            log(f"   {provider:<9} unavailable: {reason}")
            continue
        fn = None
        try:
            fn = build(case, provider, inputs)
            first = _first_call(fn, provider, settings, entry)
            outputs[provider] = snapshot(first)
            del first
            times = time_calls(fn, settings)
            entry.update(summarize(times))
            entry["status"] = "ok"
        except Exception as exc:
            if isinstance(exc, _Skipped):
                status = "skipped"
            elif isinstance(exc, TimeoutError) and provider == "compile":
                status = "compile_timeout"
            else:
                status = "compile_failed" if provider == "compile" else "error"
            entry.update(status=status, reason=_error_text(exc))
            log(f"   {provider:<9} {status}: {entry['reason'].splitlines()[0][:200]}")
            outputs.pop(provider, None)
            if provider == "compile":
                torch._dynamo.reset()
            continue
        if settings.measure_memory and "peak_bytes" not in entry:
            try:
                entry["peak_bytes"] = int(peak_memory_bytes(fn, device))
            except Exception as exc:
                entry["peak_bytes"] = None
                entry["peak_error"] = _error_text(exc, 300)
        entry["gbps"] = bytes_min / (entry["median_ms"] / 1e3) / 1e9
        extra = (
            f", compile {entry['compile_s']:.1f} s ({entry['graphs']} graphs, {entry['graph_breaks']} breaks)"
            if provider == "compile" else ""
        )
        peak = entry.get("peak_bytes")
        log(
            f"   {provider:<9} median {entry['median_ms']:10.3f} ms  min {entry['min_ms']:10.3f}  "
            f"n={entry['repeats']}" + (f"  peak {peak / 2**20:.1f} MB" if peak is not None else "") + extra
        )
        del fn
        gc.collect()
    # agreement with the reference, once
    checked = [p for p in outputs if p != "reference"]
    if checked and "reference" not in outputs:
        try:
            outputs["reference"] = snapshot(build(case, "reference", inputs)())
        except Exception as exc:
            for entry in entries:
                if entry["provider"] in checked:
                    entry["check"] = f"not checked: the reference failed ({_error_text(exc, 200)})"
            checked = []
    for entry in entries:
        if entry["provider"] in checked:
            ok, detail = compare(outputs["reference"], outputs[entry["provider"]], case.label_tolerance)
            entry["check"] = ("ok" if ok else "MISMATCH") + (f": {detail}" if detail else "")
            if not ok:
                log(f"   {entry['provider']:<9} disagrees with the reference: {detail}")
        elif entry["provider"] == "reference" and entry.get("status") == "ok":
            entry["check"] = "reference"
    del inputs, outputs
    gc.collect()
    return entries
