"""Rare-class sampling (RCS) of source images: DAFormer's (Hoyer et al., CVPR 2022, section 3.3).

A source image is drawn by first drawing a class c with probability softmax((1 - f_c) / T) over
the classes' pixel frequencies f_c in the source set, then an image holding more than
`min_pixels` pixels of c. The pixel counts are taken once per dataset from its full-size train-id
labels (lhoyer/DAFormer `tools/convert_datasets/gta.py` writes them as `sample_class_stats.json`
beside the data) and cached beside the dataset here too (`class_stats`). The probabilities and the
per-class image lists are `get_rcs_class_probs` and `UDADataset.__init__` of lhoyer/DAFormer
`mmseg/datasets/uda_dataset.py`; the crop re-draws of `get_rare_class_sample` are the stream's
(udafast.engine.data.RareClassStream).
"""
import json
import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from udafast.data.labels import IGNORE_INDEX

__all__ = ["class_pixel_counts", "class_stats", "rcs_class_probabilities", "samples_with_class", "STATS_FILE"]

#: the cache file beside a dataset with a root folder (one per split)
STATS_FILE = "udafast_class_stats_{split}.json"

#: in-process cache for datasets without a folder (the embedded benchmark: generated, deterministic)
_MEMORY: Dict[str, List[Dict[int, int]]] = {}


def _label(dataset, index) -> np.ndarray:
    """Sample `index`'s full-size train ids, without decoding its image where the dataset can."""
    if hasattr(dataset, "train_label"):
        return dataset.train_label(index)
    return np.asarray(dataset[index]["label"])


def class_pixel_counts(dataset) -> List[Dict[int, int]]:
    """Per sample, {train id: pixel count} of the classes present (the ignore label left out), as
    DAFormer's gta.py counts them."""
    stats = []
    for i in range(len(dataset)):
        ids, counts = np.unique(_label(dataset, i), return_counts=True)
        stats.append({int(c): int(n) for c, n in zip(ids, counts) if c != IGNORE_INDEX})
    return stats


def class_stats(dataset, log: Optional[Callable[[str], None]] = None) -> List[Dict[int, int]]:
    """`class_pixel_counts(dataset)`, computed once: cached in `<root>/udafast_class_stats_<split>.json`
    for a dataset with a root folder (checked against its sample names when read back), in memory
    otherwise. A root that cannot be written is said in the log, and the counts are used uncached."""
    names = list(getattr(dataset, "names", []) or [])
    root = getattr(dataset, "root", None)
    path = None
    if root is not None and os.path.isdir(str(root)):
        path = os.path.join(str(root), STATS_FILE.format(split=getattr(dataset, "split", "all")))
    key = repr(dataset)
    if path is None and key in _MEMORY:
        return _MEMORY[key]
    if path is not None and os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("names") == names and len(cached.get("counts", ())) == len(dataset):
            return [{int(c): int(n) for c, n in s.items()} for s in cached["counts"]]
        if log:
            log(f"rare-class sampling: {path} is for other samples; counting again")
    if log:
        log(f"rare-class sampling: counting the classes' pixels of {len(dataset)} source labels (once per dataset)")
    stats = class_pixel_counts(dataset)
    if path is None:
        _MEMORY[key] = stats
        return stats
    partial = f"{path}.{os.getpid()}.partial"
    try:
        with open(partial, "w") as f:
            json.dump({"dataset": key, "names": names, "counts": [{str(c): n for c, n in s.items()} for s in stats]}, f)
        os.replace(partial, path)  # never a half-written cache
    except OSError as e:
        if os.path.exists(partial):
            os.remove(partial)
        if log:
            log(f"rare-class sampling: could not cache the class counts in {path} ({e.strerror}); using them uncached")
    return stats


def rcs_class_probabilities(stats: Sequence[Mapping[int, int]], temperature: float) -> Tuple[List[int], torch.Tensor]:
    """(classes, probabilities): the classes present in `stats` in ascending order of their total
    pixels (ties in the order they first appear), and softmax((1 - frequency) / `temperature`)
    over them (float64; DAFormer's float32 agrees within a relative 2e-5)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
    totals: Dict[int, int] = {}
    for sample in stats:
        for c, n in sample.items():
            totals[int(c)] = totals.get(int(c), 0) + int(n)
    if not totals:
        raise ValueError("rare-class sampling: the source labels hold no labelled pixel")
    ordered = sorted(totals.items(), key=lambda item: item[1])
    freq = torch.tensor([n for _, n in ordered], dtype=torch.float64)
    freq = 1 - freq / freq.sum()
    return [c for c, _ in ordered], torch.softmax(freq / temperature, dim=0)


def samples_with_class(stats: Sequence[Mapping[int, int]], classes: Sequence[int], min_pixels: int) -> Dict[int, List[int]]:
    """{class: the indices of the samples with more than `min_pixels` pixels of it} for `classes`."""
    out: Dict[int, List[int]] = {int(c): [] for c in classes}
    for i, sample in enumerate(stats):
        for c, n in sample.items():
            if int(c) in out and int(n) > min_pixels:
                out[int(c)].append(i)
    return out
