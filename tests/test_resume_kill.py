"""Exact resume after SIGKILL: `python -m udafast.train --deterministic` killed at a point after a
checkpoint (as soon as one appears, or while a later one is being written), then continued with
`--resume`, ends with the same network, method state (optimiser, EMA teacher, memory bank, heads,
generator), stream positions and RNGs, bit for bit, as the run that was not interrupted; its log
holds each iteration once, with the same losses."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

import udafast
from conftest import assert_bitwise_equal, tiny_config_file
from udafast import train
from udafast.models.checkpoint import load_checkpoint

ITERS = 16
METHODS = {
    "source_only": {},
    # the bank fills from iteration 1 and the contrastive loss (pixels subsampled with the method's
    # generator) starts at 2, so the teacher, bank, heads and generator all carry state
    "contrastive": {"contrastive": {"bank_start": 1, "loss_start": 2, "bank_threshold": 0.0, "dim": 16,
                                    "bank_size": 8, "max_pixels_per_class": 16}},
}


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    config = tiny_config_file(train={"iters": ITERS, "panels": 0, "keep_checkpoints": 1},
                              **{k: v for section in METHODS.values() for k, v in section.items()})
    path.write_text(yaml.safe_dump(config))
    return path


def _args(config_file, method, out):
    return ["--config", str(config_file), "--method", method, "--out", str(out), "--ckpt-every", "1",
            "--deterministic", "--progress", "lines"]


@pytest.fixture(scope="module")
def reference(config_file, tmp_path_factory):
    """method -> the run folder of its uninterrupted run (made in this process on first use)."""
    done = {}

    def get(method):
        if method not in done:
            out = tmp_path_factory.mktemp(f"reference_{method}")
            train.main(_args(config_file, method, out))
            done[method] = out
        return done[method]
    return get


def _wait(proc, condition, interval, what, output):
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{output.read_text()[-3000:]}")
        if interval:
            time.sleep(interval)


def _temporaries(folder):
    return [n for n in os.listdir(folder) if n.endswith(".tmp")] if folder.is_dir() else []


def _reached(folder, n):
    """A condition: the run has written a checkpoint of iteration >= n (older ones get deleted)."""
    def condition():
        return folder.is_dir() and any(name.startswith("iter_") and name.endswith(".pt") and int(name[5:-3]) >= n
                                       for name in os.listdir(folder))
    return condition


def _run_and_kill(args, out, kill_point):
    """Start the run in a subprocess and SIGKILL it at `kill_point`: "checkpoint" (iter_3.pt has just
    appeared) or "writing" (after iter_5.pt, as soon as a checkpoint's temporary file is seen, or at
    iter_9.pt if polling never catches one) -> whether a write was in progress at the kill. (A
    loaded machine may kill later; any point after a checkpoint will do.)"""
    ckpts = out / "checkpoints"
    output = out.parent / f"{out.name}.log"
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(udafast.__file__))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    with open(output, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "udafast.train", *args], stdout=log, stderr=subprocess.STDOUT,
                                env=env)
    try:
        writing = False
        if kill_point == "checkpoint":
            _wait(proc, _reached(ckpts, 3), 0.002, "iter_3.pt", output)
        else:
            _wait(proc, _reached(ckpts, 5), 0.002, "iter_5.pt", output)
            late = _reached(ckpts, 9)

            def caught():
                nonlocal writing
                writing = bool(_temporaries(ckpts))
                return writing or late()
            _wait(proc, caught, 0, "iter_9.pt", output)  # busy: a small checkpoint's write takes a millisecond
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "metrics.json").exists()
    return writing


def _log(folder):
    with open(folder / "log.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "sec_per_iter"} for row in csv.DictReader(f)]


@pytest.mark.parametrize("method, kill_point", [("source_only", "checkpoint"), ("contrastive", "checkpoint"),
                                                ("contrastive", "writing")])
def test_killed_run_resumes_bitwise(config_file, reference, tmp_path, method, kill_point):
    out = tmp_path / "run"
    writing = _run_and_kill(_args(config_file, method, out), out, kill_point)
    print(f"{method}: killed at {sorted(os.listdir(out / 'checkpoints'))}, a write in progress: {writing}")
    train.main(_args(config_file, method, out) + ["--resume"])

    full = reference(method)
    expected, got = load_checkpoint(full / "checkpoints" / "last.pt"), load_checkpoint(out / "checkpoints" / "last.pt")
    assert got["iter"] == ITERS
    assert_bitwise_equal(expected, got, "checkpoint")
    if method == "contrastive":
        assert int(got["method"]["modules"]["bank"]["counts"].sum()) > 0  # the state compared is not empty
    assert _log(out) == _log(full)
    metrics = [json.loads((folder / "metrics.json").read_text()) for folder in (full, out)]
    for m in metrics:
        m.pop("sec_per_iter"), m.pop("stage_setup_s")
    assert metrics[0] == metrics[1]
    assert not _temporaries(out / "checkpoints")
