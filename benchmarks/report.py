"""The benchmarks' results: one JSON file per device, merged run by run (a new entry replaces the
old one of the same case and provider), its Markdown table and its chart. Files are written
atomically (a temporary file renamed), so an interrupted run never leaves half a file."""
import contextlib
import json
import os
import tempfile
from pathlib import Path

from benchmarks.harness import PROVIDERS, SCHEMA

def _atomic_write(path, write):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_results(path):
    try:
        with open(path) as f:
            data = json.load(f)
        if data.get("schema") == SCHEMA:
            return data
    except (OSError, ValueError):
        pass
    return None


def merge_results(old, env, entries, copy_bw, memory_check, case_order):
    """New entries replace old ones with the same (case, provider); the rest are kept."""
    run_id = env["date"]
    for entry in entries:
        entry["run"] = run_id
    kept = []
    runs = {}
    if old:
        fresh = {(e["case"], e["provider"]) for e in entries}
        kept = [e for e in old.get("results", []) if (e["case"], e["provider"]) not in fresh]
        runs = {k: v for k, v in old.get("runs", {}).items() if any(e.get("run") == k for e in kept)}
    runs[run_id] = {**env, "copy_bandwidth": copy_bw, "memory_method_check": memory_check}
    order = {name: i for i, name in enumerate(case_order)}
    prov = {p: i for i, p in enumerate(PROVIDERS)}
    results = sorted(
        kept + entries,
        key=lambda e: (order.get(e["case"], len(order)), e["case"], prov.get(e["provider"], 99)),
    )
    return {
        "schema": SCHEMA,
        "device": env["device"],
        "latest_run": run_id,
        "runs": runs,
        "results": results,
        "columns": COLUMN_DOC,
    }


COLUMN_DOC = {
    "median_ms / min_ms / q1_ms / q3_ms / iqr_ms": "wall time of one call over the timed repeats, after warm-up",
    "speedup_vs_reference": "reference median / this median (same case)",
    "speedup_vs_pytorch": "pytorch median / this median (same case)",
    "peak_bytes": "peak memory one call allocates above what existed before it (temporaries, outputs, "
                  "saved tensors, gradients); CPU: running sum of profiler allocation events, "
                  "CUDA: max_memory_allocated minus memory_allocated before",
    "bytes_min": "the minimum bytes the op must read and write (bytes_note says which)",
    "gbps": "bytes_min / median, in 1e9 bytes/s",
    "pct_copy_bw": "gbps / the machine's measured copy bandwidth (256 MB tensor copy_, read + write)",
}


def annotate(data):
    """Speedups and % of copy bandwidth, from the rows present (ratios within one case)."""
    by_case = {}
    for e in data["results"]:
        by_case.setdefault(e["case"], {})[e["provider"]] = e
    for rows in by_case.values():
        base = {p: rows[p]["median_ms"] for p in ("reference", "pytorch") if rows.get(p, {}).get("status") == "ok"}
        for e in rows.values():
            if e.get("status") != "ok":
                continue
            e["speedup_vs_reference"] = base["reference"] / e["median_ms"] if "reference" in base else None
            e["speedup_vs_pytorch"] = base["pytorch"] / e["median_ms"] if "pytorch" in base else None
            bw = data["runs"].get(e.get("run"), {}).get("copy_bandwidth", {}).get("gbps")
            e["pct_copy_bw"] = 100.0 * e["gbps"] / bw if bw else None
    return data


def write_json(path, data):
    _atomic_write(path, lambda f: f.write((json.dumps(data, indent=1) + "\n").encode()))


def fmt(value, spec, none="-"):
    return none if value is None else format(value, spec)


def _notes(e):
    status = e.get("status")
    if status != "ok":
        reason = (e.get("reason") or "").splitlines()[0] if e.get("reason") else ""
        reason = reason.replace("|", "/")
        if len(reason) > 110:
            reason = reason[:107] + "..."
        return f"{status}: {reason}"
    notes = []
    if e["provider"] == "compile":
        text = f"compile {e.get('compile_s', 0):.1f} s, {e.get('graphs', 0)} graphs, {e.get('graph_breaks', 0)} breaks"
        if not e.get("graphs") and e.get("unsupported"):
            text += "; dynamo ran it eagerly: " + e["unsupported"][0].replace("|", "/")[:110]
        notes.append(text)
    check = e.get("check", "")
    if check and check not in ("ok", "reference"):
        notes.append(check.replace("|", "/"))
    if e.get("peak_error"):
        notes.append("peak memory: " + e["peak_error"][:60])
    return "; ".join(notes)


def markdown(data):
    runs = data["runs"]
    latest = runs[data["latest_run"]]
    dev = data["device"]
    lines = [f"# udafast op benchmarks: {dev['name']}", ""]
    for run_id, run in sorted(runs.items()):
        git = run.get("git", {})
        commit = (git.get("commit") or "unknown")[:12] + (" (dirty)" if git.get("dirty") else "")
        bw = run.get("copy_bandwidth", {})
        s = run.get("settings", {})
        lines.append(
            f"- run {run_id}: torch {run['torch']}, {run['device']['torch_threads']} threads "
            f"({run['device']['cpu_model']}, {run['device']['cpu_count']} CPUs), commit {commit}; "
            f"copy bandwidth {fmt(bw.get('gbps'), '.2f')} GB/s; up to {s.get('repeats')} repeats after "
            f"{s.get('warmup')} warm-up calls (at least {s.get('min_repeats')} within "
            f"{s.get('max_seconds_per_provider'):g} s); peak-memory method check "
            f"{'ok' if (run.get('memory_method_check') or {}).get('ok') else 'FAILED or not run'}; load average at start "
            f"{', '.join(f'{x:.2f}' for x in run['load_average_at_start']) if run.get('load_average_at_start') else '-'}"
        )
    if latest.get("device", {}).get("type") == "cuda":
        lines.append(f"- device: {dev['name']}, CUDA {latest['device'].get('cuda_version')}")
    multi = len(runs) > 1
    header = ["op", "provider", "median ms", "min ms", "IQR ms", "x vs reference", "x vs pytorch",
              "peak MB", "GB/s", "% copy BW", "notes"]
    if multi:
        header.insert(-1, "run")
    lines += ["", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for e in data["results"]:
        ok = e.get("status") == "ok"
        peak = e.get("peak_bytes")
        row = [
            e["case"], e["provider"],
            fmt(e.get("median_ms") if ok else None, ".3f"),
            fmt(e.get("min_ms") if ok else None, ".3f"),
            fmt(e.get("iqr_ms") if ok else None, ".3f"),
            fmt(e.get("speedup_vs_reference") if ok else None, ".2f"),
            fmt(e.get("speedup_vs_pytorch") if ok else None, ".2f"),
            fmt(peak / 2**20 if ok and peak is not None else None, ".1f"),
            fmt(e.get("gbps") if ok else None, ".2f"),
            fmt(e.get("pct_copy_bw") if ok else None, ".1f"),
            _notes(e),
        ]
        if multi:
            row.insert(-1, e.get("run", "")[:19])
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Cases (float32; validation off):", ""]
    seen = set()
    for e in data["results"]:
        if e["case"] in seen:
            continue
        seen.add(e["case"])
        lines.append(f"- **{e['case']}**: {e['shapes']}. Minimum traffic {e['bytes_min'] / 1e6:.1f} MB: {e['bytes_note']}.")
    lines += [
        "",
        "median/min/IQR: wall time of one call after warm-up. x vs reference / x vs pytorch: that "
        "provider's median over this one's. peak MB: memory one call allocates above its inputs "
        "(MB = 2^20 bytes). GB/s: the op's minimum bytes read + written / median (GB = 1e9 bytes); "
        "% copy BW: that against this machine's copy bandwidth. See benchmarks/README.md.",
        "",
    ]
    return "\n".join(lines)


def write_markdown(path, text):
    _atomic_write(path, lambda f: f.write(text.encode()))


def write_chart(path, data):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cases = []
    for e in data["results"]:
        if e["case"] not in cases:
            cases.append(e["case"])
    values = {}
    for e in data["results"]:
        if e.get("status") == "ok" and e.get("speedup_vs_pytorch"):
            values[(e["case"], e["provider"])] = e["speedup_vs_pytorch"]
    providers = [p for p in PROVIDERS if any(k[1] == p for k in values)]
    cases = [c for c in cases if any(k[0] == c for k in values)]
    fig, ax = plt.subplots(figsize=(max(8.0, 1.25 * len(cases) + 2), 5.0))
    if not values:
        ax.text(0.5, 0.5, "no speedups to show (the pytorch provider did not run)", ha="center", va="center")
        ax.set_axis_off()
    else:
        width = 0.8 / max(1, len(providers))
        colors = {"reference": "#9e9e9e", "pytorch": "#1f77b4", "compile": "#ff7f0e",
                  "native": "#2ca02c", "triton": "#d62728"}
        for j, provider in enumerate(providers):
            xs, ys = [], []
            for i, case in enumerate(cases):
                if (case, provider) in values:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(values[(case, provider)])
            bars = ax.bar(xs, ys, width, label=provider, color=colors.get(provider))
            for bar, y in zip(bars, ys):
                ax.annotate(f"{y:.2g}x", (bar.get_x() + bar.get_width() / 2, y), ha="center",
                            va="bottom", fontsize=6, rotation=90, xytext=(0, 2), textcoords="offset points")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("speedup vs pytorch (higher is faster)")
        ax.legend(fontsize=8)
        ax.margins(y=0.15)
    ax.set_title(f"udafast ops: speedup vs best pure PyTorch, {data['device']['name']}", fontsize=10)
    fig.tight_layout()

    def save(f):
        fig.savefig(f, format="png", dpi=120)

    _atomic_write(path, save)
    plt.close(fig)
