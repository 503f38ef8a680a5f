"""A run's checkpoint folder: rotation of the periodic checkpoints, and the checkpoint to resume from.

With `train.ckpt_every`, each checkpoint is written once, as `last.pt`, then given its name
`iter_<N>.pt` (N: the run's iteration) by a hard link (a copy where the filesystem has none); of
the older `iter_<N>.pt`, the newest `train.keep_checkpoints` (K) stay. The folder then holds
`last.pt`, the same file as `iter_<newest>.pt`, and the K checkpoints before it. Every file is
written to a temporary file, flushed, fsynced and renamed over its name (`save_checkpoint`; the
link too is made under a temporary name and renamed), so `last.pt` is at every moment the newest
complete checkpoint, and a kill leaves at worst a stray temporary, which the next write removes.

`--resume` without a path resumes from `last.pt`; when it is missing, truncated or not a training
checkpoint it falls back to the newest readable `iter_<N>.pt`, then to the stage checkpoints
(`<stage>.pt`, the highest iteration first), and says which file was bad and why. A path given
explicitly is used or refused (an error naming it), never replaced by another: the user chose that
point of the run.
"""
import contextlib
import os
import re
import shutil
import tempfile

from udafast.models.checkpoint import load_checkpoint

__all__ = ["LAST", "iter_name", "iter_checkpoints", "publish", "write_last", "find_resume",
           "load_resumable"]

LAST = "last.pt"
BEST = "best.pt"
_ITER = re.compile(r"^iter_(\d+)\.pt$")
#: what `Trainer._save` writes beyond the model: a checkpoint without them holds no training position
TRAINING_KEYS = ("stage", "stage_iter", "method", "streams", "rng", "trainer")


def iter_name(n):
    return f"iter_{n}.pt"


def iter_checkpoints(folder):
    """[(N, path)] of the `iter_<N>.pt` files in `folder`, oldest (lowest N) first."""
    found = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        m = _ITER.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(folder, name)))
    return sorted(found)


def publish(folder, iteration, keep, write):
    """Write the checkpoint of run iteration `iteration` as `last.pt` with `write(path)` (an atomic
    writer, e.g. `save_checkpoint`), link it as iter_<iteration>.pt, and delete the `iter_<N>.pt`
    older than the `keep` before it. Files of later iterations (from a run that went further before
    it was resumed from an earlier checkpoint) are left: this run replaces them on reaching them."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ValueError(f"train.keep_checkpoints: expected an integer >= 0, got {keep!r}")
    last = os.path.join(folder, LAST)
    write(last)
    _replace_with(last, os.path.join(folder, iter_name(iteration)))
    older = [p for n, p in iter_checkpoints(folder) if n < iteration]
    for old in older[:max(0, len(older) - keep)]:
        os.unlink(old)
    _remove_stray_temporaries(folder)


def write_last(folder, write):
    """Write `last.pt` with `write(path)` alone (runs without periodic checkpoints)."""
    write(os.path.join(folder, LAST))
    _remove_stray_temporaries(folder)


def _replace_with(source, dest):
    """Make `dest` the file `source` atomically: a hard link (or, without them, a fsynced copy) under
    a temporary name, renamed over `dest`."""
    folder = os.path.dirname(dest)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(dest)}.", suffix=".tmp")
    os.close(fd)
    try:
        os.unlink(tmp)
        try:
            os.link(source, tmp)
        except OSError:  # no hard links here (some network and FUSE filesystems)
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _remove_stray_temporaries(folder):
    """Temporaries of writes a kill interrupted (`.<name>.<random>.tmp`); one process writes a run's
    checkpoints, so after its own write completes every temporary left is stray."""
    for name in os.listdir(folder):
        if name.startswith(".") and name.endswith(".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, name))


def load_resumable(path):
    """The checkpoint at `path` if training can continue from it; FileNotFoundError or ValueError
    naming it otherwise."""
    ckpt = load_checkpoint(path)
    missing = [k for k in TRAINING_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: a model checkpoint without the training state ({', '.join(missing)}); "
                         f"resume from last.pt or an iter_<N>.pt of a run")
    if ckpt["stage_iter"] is None:
        raise ValueError(f"{path}: the best-on-val checkpoint holds no training position; resume from "
                         f"last.pt or an iter_<N>.pt")
    return ckpt


def find_resume(folder, log):
    """(checkpoint, path) to resume the run whose checkpoints are in `folder`: `last.pt`, else the
    newest good fallback (see the module docstring), each bad file and the one used reported through
    `log(text)`. FileNotFoundError naming `last.pt` when the folder has no checkpoint at all;
    ValueError naming every file tried when none is good."""
    last = os.path.join(folder, LAST)
    candidates = [last] + [p for _, p in reversed(iter_checkpoints(folder))]
    bad = []
    for path in candidates:
        if not os.path.exists(path):
            continue
        try:
            ckpt = load_resumable(path)
        except (OSError, ValueError) as e:
            bad.append(str(e))
            continue
        return _chosen(ckpt, path, last, bad, log)
    # the stage checkpoints: their iterations are inside them, so each is read
    best = None
    for path in _stage_checkpoints(folder):
        try:
            ckpt = load_resumable(path)
        except (OSError, ValueError) as e:
            bad.append(str(e))
            continue
        if best is None or ckpt["iter"] > best[0]["iter"]:
            best = (ckpt, path)
    if best is not None:
        return _chosen(*best, last, bad, log)
    if not bad:
        raise FileNotFoundError(f"checkpoint not found: {last} (and no iter_<N>.pt or stage checkpoint in {folder})")
    raise ValueError(f"no checkpoint to resume from in {folder}: " + "; ".join(bad))


def _stage_checkpoints(folder):
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [os.path.join(folder, n) for n in names
            if n.endswith(".pt") and n not in (LAST, BEST) and not _ITER.match(n) and not n.startswith(".")]


def _chosen(ckpt, path, last, bad, log):
    for reason in bad:
        log(f"resume: skipping a bad checkpoint: {reason}")
    if path != last:
        why = "is not there" if not os.path.exists(last) else "is not usable"
        log(f"resume: {last} {why}; resuming from {path} (iteration {ckpt['iter']}), the newest good checkpoint")
    return ckpt, path
