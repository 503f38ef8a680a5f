"""Checkpoints: `{"format_version": 1, "config": model.config, "model": state_dict, "iter": iter,
**extra}` written atomically, read back with errors that name the file.

Files are read with `torch.load(weights_only=True)`, so `extra` values must be tensors, (nested)
dicts/lists/tuples of them and plain Python values (optimiser state dicts qualify; numpy arrays do
not).
"""
import contextlib
import copy
import os
import tempfile
import warnings
from collections.abc import Mapping

import torch

from udafast.models.build import build_model

__all__ = ["save_checkpoint", "load_checkpoint", "load_model_checkpoint", "model_from_checkpoint", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_RESERVED = ("format_version", "config", "model", "iter")


def _unwrap(model):
    # DistributedDataParallel keeps the network in .module, torch.compile in ._orig_mod.
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_checkpoint(path, model, *, iter, **extra):
    """Write the checkpoint of `model` (built by `build_model`) at iteration `iter` to `path`:
    a temporary file in the same folder, flushed and fsynced, then renamed over `path`, so a crash
    leaves either the old file or the new one. Missing parent folders are created."""
    model = _unwrap(model)
    config = getattr(model, "config", None)
    if not isinstance(config, Mapping):
        raise ValueError("model: expected a model from udafast.models.build_model (it has no config dict)")
    if isinstance(iter, bool) or not isinstance(iter, int) or iter < 0:
        raise ValueError(f"iter: expected a non-negative integer, got {iter!r}")
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"extra: key(s) {', '.join(clash)} are reserved for the checkpoint itself")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    payload = {"format_version": FORMAT_VERSION, "config": copy.deepcopy(dict(config)), "model": model.state_dict(),
               "iter": iter, **extra}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would otherwise survive the rename
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where folders can be fsynced
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _validate(ckpt, where):
    if not isinstance(ckpt, Mapping) or "format_version" not in ckpt:
        raise ValueError(f"{where}: not a udafast checkpoint (no format_version)")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{where}: checkpoint format_version {ckpt['format_version']!r}, this udafast reads "
                         f"{FORMAT_VERSION}")
    if not isinstance(ckpt.get("config"), Mapping) or not isinstance(ckpt.get("model"), Mapping):
        raise ValueError(f"{where}: checkpoint lacks its 'config' or 'model' dict")


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint written by `save_checkpoint` -> its dict. FileNotFoundError naming a
    missing `path`; ValueError naming it for a truncated, foreign or other-version file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: a checkpoint must be a file")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol is no news next to the error below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated / foreign: name the file rather than surface an unpickling error
        reason = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {reason})") from None
    _validate(ckpt, path)
    return ckpt


def load_model_checkpoint(path, map_location="cpu"):
    """`load_checkpoint`, or, for a file that is not a udafast checkpoint, one of the authors'
    released models (ProDA `.pkl`, AdaptSegNet, CRST; udafast.models.authors) as a checkpoint dict
    with the config of the network it was trained in and "authors" set to its format. For the
    model's weights only (evaluation, `init`), never to resume a run."""
    from udafast.models.authors import detect_format, read_authors_checkpoint, read_state_file

    try:
        return load_checkpoint(path, map_location)
    except ValueError as error:
        try:
            state, _ = read_state_file(path)
        except ValueError:
            raise error from None
        if detect_format(state) is None:
            raise error from None
    return read_authors_checkpoint(path, state)


def model_from_checkpoint(path_or_dict, map_location="cpu"):
    """The model of a checkpoint (a path or the dict from `load_checkpoint`), rebuilt from its
    config and loaded with its weights; the pretrained backbone file is not read again. A path may
    also be one of the authors' released models (see `load_model_checkpoint`). The model is moved
    to `map_location` when that names a device."""
    if isinstance(path_or_dict, Mapping):
        ckpt = path_or_dict
        _validate(ckpt, "checkpoint dict")
    else:
        ckpt = load_model_checkpoint(path_or_dict, map_location)
    model = build_model(ckpt["config"], load_pretrained=False)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        where = "checkpoint dict" if isinstance(path_or_dict, Mapping) else os.fspath(path_or_dict)
        raise ValueError(f"{where}: weights do not fit the model its config builds: {e}") from None
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model
