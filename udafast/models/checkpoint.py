"""Checkpoints: `{"format_version": 1, "config": model.config, "model": state_dict, "iter": iter,
**extra}` written atomically, read back with errors that name the file.

Files are read with `torch.load(weights_only=True)`, so `extra` values must be tensors, (nested)
dicts/lists/tuples of them and plain Python values (optimiser state dicts qualify; numpy arrays do
not).
"""
import codecs
import contextlib
import copy
import os
import pickle
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any, Dict, Union

import torch

from udafast.models.build import build_model
from udafast.models.segmentation import SegmentationModel

__all__ = ["save_checkpoint", "load_checkpoint", "load_model_checkpoint", "model_from_checkpoint", "FORMAT_VERSION"]

FORMAT_VERSION = 1
#: a checkpoint's path
PathLike = Union[str, os.PathLike]
_RESERVED = ("format_version", "config", "model", "iter")


def _unwrap(model):
    # DistributedDataParallel keeps the network in .module, torch.compile in ._orig_mod.
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_checkpoint(path: PathLike, model: torch.nn.Module, *, iter: int, **extra: Any) -> None:
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
        if isinstance(ckpt, Mapping):
            keys = ", ".join(repr(k) for k in list(ckpt)[:5]) + (", ..." if len(ckpt) > 5 else "")
            holds = f"a dict with the keys {keys}" if ckpt else "an empty dict"
        else:
            holds = f"a {type(ckpt).__name__}"
        raise ValueError(f"{where}: not a udafast checkpoint: a torch file without udafast's keys "
                         f"({', '.join(_RESERVED)}); it holds {holds}")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{where}: checkpoint format_version {ckpt['format_version']!r}, this udafast reads "
                         f"{FORMAT_VERSION}")
    if not isinstance(ckpt.get("config"), Mapping) or not isinstance(ckpt.get("model"), Mapping):
        raise ValueError(f"{where}: checkpoint lacks its 'config' or 'model' dict")


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
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
        raise ValueError(f"{path}: not a readable checkpoint: {_what_file(path, e)}") from None
    _validate(ckpt, path)
    return ckpt


#: how torch.save's legacy (non-zip) format begins: a protocol-2 pickle of its magic number
_LEGACY_TORCH = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def _what_file(path, error):
    """What a file `torch.load` failed on is, from its first bytes (the unpickler's own error,
    e.g. "IndexError: pop from empty list" for a text file, says nothing to a user)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip format keeps its index at the end
        if not zipfile.is_zipfile(path):
            return "truncated (a zip archive, as torch.save writes, without its end)"
        with zipfile.ZipFile(path) as z:
            if not any(n.endswith("/data.pkl") for n in z.namelist()):
                return "a zip archive, not a torch checkpoint"
    elif head.startswith(_LEGACY_TORCH):  # its unpickler fails on a cut file in many ways (EOFError, IndexError)
        if not _objects_refused(error):
            return f"a torch file in the legacy format, truncated or damaged ({reason})"
    elif head.startswith(b"\x80"):
        return "a Python pickle, not a torch checkpoint"
    elif _is_text(head):
        return "a text file, not a torch checkpoint"
    else:
        return f"binary data starting {head[:8]!r}, not a torch checkpoint"
    if _objects_refused(error):
        return "a torch file holding Python objects other than tensors, which udafast does not unpickle"
    return f"a torch file that does not load ({reason})"


def _objects_refused(error):
    """Whether `torch.load(weights_only=True)` refused the file's Python objects."""
    return isinstance(error, pickle.UnpicklingError) and "weights_only" in str(error)


def _is_text(head):
    if b"\0" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head)  # a character cut at 4096 bytes is fine
    except UnicodeDecodeError:
        return False
    return True


def load_model_checkpoint(path: PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
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


def model_from_checkpoint(path_or_dict: Union[PathLike, Mapping[str, Any]],
                          map_location: Any = "cpu") -> SegmentationModel:
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
