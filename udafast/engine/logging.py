"""Training logs: a CSV file, TensorBoard events and a progress bar (iteration, ETA, running losses)."""
import csv
import math
import os
import sys
import time

__all__ = ["RunLogger"]


class RunLogger:
    """Writes `log.csv` and TensorBoard events under `out_dir` (`tensorboard/`), and draws a tqdm
    progress bar on stderr when `progress` (default: when stderr is a terminal)."""

    def __init__(self, out_dir, total_iters, *, progress=None, tensorboard=True, rank=0):
        self.out_dir = out_dir
        self.enabled = rank == 0
        self.total = total_iters
        self._csv_file = self._csv = None
        self._fields = None
        self._writer = None
        self._bar = None
        self._running = {}
        self._running_stage = None
        self._tracked = {}
        self._last_line = 0.0
        if not self.enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        if progress is None:
            progress = sys.stderr.isatty()
        if progress:
            from tqdm import tqdm
            self._bar = tqdm(total=total_iters, dynamic_ncols=True, file=sys.stderr, smoothing=0.1)

    def set_total(self, total):
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def set_position(self, done):
        if self._bar is not None:
            self._bar.n = done
            self._bar.refresh()

    def resume(self, global_iter):
        """The run continues after iteration `global_iter`: what an interrupted run logged past it
        (it is done again) leaves log.csv, and TensorBoard hides those events."""
        if not self.enabled:
            return
        path = os.path.join(self.out_dir, "log.csv")
        if os.path.exists(path) and self._csv_file is None:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                fields = list(reader.fieldnames or [])
                rows = [r for r in reader if int(r["iter"]) <= global_iter]
            with open(path + ".tmp", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
            os.replace(path + ".tmp", path)
        if self._writer is not None:
            from torch.utils.tensorboard import SummaryWriter
            log_dir = self._writer.log_dir
            self._writer.close()
            self._writer = SummaryWriter(log_dir, purge_step=global_iter + 1)

    def set_description(self, text):
        if self._bar is not None:
            self._bar.set_description(text)

    def track(self, name, value):
        """A column `name` of log.csv (and a TensorBoard scalar `run/name`): `value()` at each
        iteration (e.g. a running count)."""
        self._tracked[name] = value

    def log_iteration(self, global_iter, stage, stage_iter, losses, lrs, sec_per_iter):
        """Record one iteration's losses (floats), learning rates and time, and the tracked values."""
        if not self.enabled:
            return
        if stage != self._running_stage:  # a stage's own losses: the previous stage's may not apply
            self._running, self._running_stage = {}, stage
        for k, v in losses.items():  # exponential running mean for the bar
            self._running[k] = v if k not in self._running else 0.9 * self._running[k] + 0.1 * v
        tracked = {k: f() for k, f in self._tracked.items()}
        row = {"iter": global_iter, "stage": stage, "stage_iter": stage_iter, "sec_per_iter": round(sec_per_iter, 5),
               **{f"lr_{k}": v for k, v in lrs.items()}, **{f"loss_{k}": v for k, v in losses.items()}, **tracked}
        self._write_csv(row)
        if self._writer is not None:
            for k, v in losses.items():
                self._writer.add_scalar(f"loss/{k}", v, global_iter)
            for k, v in lrs.items():
                self._writer.add_scalar(f"lr/{k}", v, global_iter)
            for k, v in tracked.items():
                self._writer.add_scalar(f"run/{k}", v, global_iter)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in self._running.items()}, refresh=False)
        elif time.monotonic() - self._last_line > 30 or global_iter == self.total:
            # no terminal: a line now and then instead of a bar
            self._last_line = time.monotonic()
            eta = sec_per_iter * (self.total - global_iter)
            losses_text = " ".join(f"{k} {v:.3g}" for k, v in self._running.items())
            print(f"  [{stage}] iter {global_iter}/{self.total}  {losses_text}  "
                  f"({sec_per_iter:.3f} s/iter, ETA {_duration(eta)})", file=sys.stderr, flush=True)

    def _write_csv(self, row):
        path = os.path.join(self.out_dir, "log.csv")
        if self._fields is None or set(row) - set(self._fields):
            # a new column (a loss that starts later, a new stage): rewrite the header with it
            old = []
            if self._csv_file is not None:
                self._csv_file.close()
                with open(path, newline="") as f:
                    old = list(csv.DictReader(f))
            elif os.path.exists(path):
                with open(path, newline="") as f:
                    reader = csv.DictReader(f)
                    old = list(reader)
                    self._fields = list(reader.fieldnames or [])
            self._fields = list(dict.fromkeys((self._fields or []) + list(row)))
            self._csv_file = open(path, "w", newline="")
            self._csv = csv.DictWriter(self._csv_file, fieldnames=self._fields)
            self._csv.writeheader()
            self._csv.writerows(old)
        self._csv.writerow(row)
        self._csv_file.flush()

    def log_scalars(self, prefix, values, global_iter):
        if self._writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._writer.add_scalar(f"{prefix}/{k}", v, global_iter)

    def message(self, text):
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._csv_file is not None:
            self._csv_file.close()


def _duration(seconds):
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
