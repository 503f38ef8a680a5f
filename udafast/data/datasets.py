"""Segmentation datasets in their official layouts (SPEC part 3), and the dataset registry.

Every dataset yields dicts `{"image": float32 [3, H, W] in [0, 1], "label": int64 [H, W] train ids
(255 = ignore; absent when the split is unlabelled), "name": file name}`, at native resolution
unless a transform is given (`transform(sample) -> sample`, see `udafast.data.transforms`).

A sample that cannot be trained on raises `BadSampleError` naming the file: an image or label that
does not decode, a label of another (H, W) than its image, or raw label values outside the
dataset's table (a value the table does not list is a corrupt or foreign file, not "ignore").
"""
import inspect
import os
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from udafast.data import io
from udafast.data.io import BadSampleError
from udafast.data.labels import CITYSCAPES_ID_TO_TRAIN, SYNTHIA_ID_TO_TRAIN, lookup_table

_REGISTRY: Dict[str, Callable] = {}


def register_dataset(name: str, factory: Optional[Callable] = None, *, overwrite: bool = False):
    """Register `factory(root, split, transform=None, **options) -> Dataset` under `name`; usable
    as a decorator (`@register_dataset("synthetic")`)."""
    key = name.lower()

    def add(f):
        if key in _REGISTRY and not overwrite and _REGISTRY[key] is not f:
            raise ValueError(f"name: dataset {name!r} is already registered")
        _REGISTRY[key] = f
        return f

    return add if factory is None else add(factory)


def dataset_names() -> List[str]:
    """The registered dataset names, sorted."""
    return sorted(_REGISTRY)


def dataset_factory(name: str) -> Callable:
    """The factory registered as `name` (any case); ValueError naming the known ones."""
    if not isinstance(name, str) or name.lower() not in _REGISTRY:
        raise ValueError(f"name: unknown dataset {name!r}; known: {', '.join(dataset_names())}")
    return _REGISTRY[name.lower()]


def dataset_options(name: str) -> Optional[Tuple[str, ...]]:
    """The options dataset `name` takes (its factory's keyword parameters beyond root, split and
    transform); None where the factory takes any (`**options`). ValueError for an unknown name."""
    params = inspect.signature(dataset_factory(name)).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in params if p.name not in ("root", "split", "transform")
                 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def build_dataset(name: str, root: Optional[Union[str, os.PathLike]], split: str = "train",
                  transform: Optional[Callable[[dict], dict]] = None, **options: Any) -> Dataset:
    """The dataset registered as `name` (gta5, cityscapes, synthia, folder, ...) under `root`
    (None for a dataset that reads no files, e.g. synthetic), its `split`, each sample passed
    through `transform`; `options`: the dataset's own keyword options (`dataset_options(name)`).
    ValueError naming the known datasets for an unknown `name`."""
    return dataset_factory(name)(root, split, transform=transform, **options)


def _require_dir(path, what="folder"):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"dataset {what} not found: {path}")


def _list_images(folder, suffixes=(".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")):
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(suffixes) and not f.startswith("."))


def _read_list_file(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"list_file not found: {path}")
    with open(path) as f:
        return [os.path.basename(line.strip()) for line in f if line.strip()]


class SegmentationDataset(Dataset):
    """Pairs of (image path, label path or None) and a raw value -> train id table.

    `missing` lists the label files of a labelled dataset that are not there; with `strict`
    (the default) construction raises FileNotFoundError naming the first of them.
    """

    #: raw label value -> train id (255 = ignore); a label holding a value absent from it is bad
    id_table: Dict[int, int] = {}
    #: what the table is, for error messages
    id_table_name = "the dataset's table"
    #: which channel of a colour label PNG holds the class id
    label_channel = 0

    def __init__(self, root, split, transform=None, strict=True):
        self.root = str(root)
        self.split = split
        self.transform = transform
        self.images: List[str] = []
        self.labels: Optional[List[Optional[str]]] = None
        self.missing: List[str] = []
        self.names: List[str] = []
        self._lut = lookup_table(self.id_table)
        self._known = np.zeros(self._lut.size, dtype=bool)
        self._known[[int(k) for k in self.id_table]] = True
        self._strict = strict

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def _set_pairs(self, images, labels, names):
        self.images, self.names = list(images), list(names)
        self.labels = None if labels is None else list(labels)
        if self.labels is not None:
            self.missing = [p for p in self.labels if not os.path.isfile(p)]
            if self.missing and self._strict:
                more = f" (and {len(self.missing) - 1} more)" if len(self.missing) > 1 else ""
                raise FileNotFoundError(f"label file not found: {self.missing[0]}{more}")

    def __len__(self):
        return len(self.images)

    def read_raw_label(self, index) -> np.ndarray:
        """The raw label values of sample `index` (int64 [H, W])."""
        return io.read_label(self.labels[index], channel=self.label_channel)

    def to_train_ids(self, raw: np.ndarray) -> np.ndarray:
        """Raw values -> train ids, values outside the table -> 255 (see `train_label` for the check)."""
        clipped = np.where((raw >= 0) & (raw < self._lut.size), raw, 0)
        out = self._lut[clipped]
        out[(raw < 0) | (raw >= self._lut.size)] = 255
        return out

    def unknown_ids(self, raw: np.ndarray) -> np.ndarray:
        """The distinct values of `raw` that the table does not list, sorted (empty when none)."""
        if raw.size and 0 <= raw.min() and raw.max() < self._known.size:
            known = self._known[raw]
        else:
            known = self._known[np.clip(raw, 0, self._known.size - 1)] & (raw >= 0) & (raw < self._known.size)
        return np.empty(0, np.int64) if known.all() else np.unique(raw[~known])

    def train_label(self, index, size=None) -> np.ndarray:
        """The train ids of sample `index` (uint8 [H, W]); BadSampleError names the label file
        when it does not decode, is not `size` (H, W), or holds values outside the table."""
        path = self.labels[index]
        raw = self.read_raw_label(index)
        if size is not None and tuple(raw.shape) != tuple(size):
            raise BadSampleError(path, f"the label is {tuple(raw.shape)} (H, W) but its image "
                                       f"{self.images[index]} is {tuple(size)}")
        unknown = self.unknown_ids(raw)
        if unknown.size:
            shown = ", ".join(str(v) for v in unknown[:10]) + (" ..." if unknown.size > 10 else "")
            what = "label value {} is" if unknown.size == 1 else "label values {} are"
            raise BadSampleError(path, f"{what.format(shown)} not in {self.id_table_name} "
                                       f"({_ranges(self.id_table)})")
        return self._lut[raw]

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index = index % len(self)
        image = io.load_image(self.images[index])
        sample = {"image": image, "name": self.names[index]}
        if self.labels is not None:
            sample["label"] = torch.from_numpy(self.train_label(index, size=image.shape[1:]).astype(np.int64))
        if self.transform is not None:
            sample = self.transform(sample)
        return sample

    def __repr__(self):
        return (f"{type(self).__name__}(root={self.root!r}, split={self.split!r}, {len(self)} samples, "
                f"{'labelled' if self.labelled else 'unlabelled'})")


def _ranges(values):
    """Integers as runs: [0, 1, 2, 3, 7] -> "0-3, 7"."""
    values, runs = sorted(int(v) for v in values), []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


class _NumberedPairs(SegmentationDataset):
    """GTA5 and SYNTHIA: one folder of images, one of labels with the same file names."""
    image_dir = label_dir = ""
    splits = ("all", "train")

    def __init__(self, root, split="all", transform=None, list_file=None, strict=True):
        if split not in self.splits:
            raise ValueError(f"split: {type(self).__name__} has the splits {self.splits}, got {split!r}")
        super().__init__(root, split, transform, strict)
        _require_dir(self.root, "root")
        image_dir = os.path.join(self.root, self.image_dir)
        label_dir = os.path.join(self.root, self.label_dir)
        _require_dir(image_dir)
        _require_dir(label_dir)
        if list_file is not None:
            names = _read_list_file(list_file)
            missing = [n for n in names if not os.path.isfile(os.path.join(image_dir, n))]
            if missing:
                raise FileNotFoundError(f"image file not found: {os.path.join(image_dir, missing[0])}")
        else:
            names = _list_images(image_dir)
        self._set_pairs([os.path.join(image_dir, n) for n in names],
                        [os.path.join(label_dir, n) for n in names], names)


@register_dataset("gta5")
class GTA5(_NumberedPairs):
    """GTA5: `images/NNNNN.png`, `labels/NNNNN.png` (palette PNGs whose indices are Cityscapes
    label ids). Split `all` (alias `train`); `list_file` restricts to the names listed."""
    image_dir, label_dir = "images", "labels"
    id_table = CITYSCAPES_ID_TO_TRAIN
    id_table_name = "the Cityscapes label ids"


@register_dataset("synthia")
class Synthia(_NumberedPairs):
    """SYNTHIA-RAND-CITYSCAPES: `RGB/NNNNNNN.png`, `GT/LABELS/NNNNNNN.png` (16 bits per channel,
    the class id in the red channel). Split `all` (alias `train`)."""
    image_dir, label_dir = "RGB", os.path.join("GT", "LABELS")
    id_table = SYNTHIA_ID_TO_TRAIN
    id_table_name = "the SYNTHIA class ids"


@register_dataset("cityscapes")
class Cityscapes(SegmentationDataset):
    """Cityscapes: `leftImg8bit/{split}/{city}/*_leftImg8bit.png` with labels
    `gtFine/{split}/{city}/*_gtFine_labelIds.png`. A split is labelled when `gtFine/{split}`
    exists; `labels=False` never reads labels (target training)."""
    splits = ("train", "val", "test")
    id_table = CITYSCAPES_ID_TO_TRAIN
    id_table_name = "the Cityscapes label ids"
    IMAGE_SUFFIX = "_leftImg8bit.png"
    LABEL_SUFFIX = "_gtFine_labelIds.png"

    def __init__(self, root, split="train", transform=None, labels=None, list_file=None, strict=True):
        if split not in self.splits:
            raise ValueError(f"split: Cityscapes has the splits {self.splits}, got {split!r}")
        super().__init__(root, split, transform, strict)
        _require_dir(self.root, "root")
        image_root = os.path.join(self.root, "leftImg8bit", split)
        _require_dir(image_root)
        label_root = os.path.join(self.root, "gtFine", split)
        has_labels = os.path.isdir(label_root)
        if labels is None:
            labels = has_labels
        elif labels and not has_labels:
            raise FileNotFoundError(f"labels=True but the label folder is missing: {label_root}")
        rel = []
        for city in sorted(os.listdir(image_root)):
            city_dir = os.path.join(image_root, city)
            if os.path.isdir(city_dir):
                rel += [(city, f) for f in sorted(os.listdir(city_dir)) if f.endswith(self.IMAGE_SUFFIX)]
        if list_file is not None:
            wanted = set(_read_list_file(list_file))
            found = {f for _, f in rel}
            lost = sorted(wanted - found)
            if lost:
                raise FileNotFoundError(f"image file not found under {image_root}: {lost[0]}")
            rel = [(c, f) for c, f in rel if f in wanted]
        images = [os.path.join(image_root, c, f) for c, f in rel]
        label_paths = None
        if labels:
            label_paths = [os.path.join(label_root, c, f[: -len(self.IMAGE_SUFFIX)] + self.LABEL_SUFFIX) for c, f in rel]
        self._set_pairs(images, label_paths, [f for _, f in rel])


@register_dataset("folder")
class Folder(SegmentationDataset):
    """A user's own data: images in `root/{image_dir}` (default `images`), label PNGs with the same
    stem in `root/{label_dir}` (default `labels`; no such folder = unlabelled), and a YAML file
    `mapping` (default `root/labels.yaml`) mapping label values to train ids:

        mapping: {0: 255, 1: 0, 2: 1}    # or the same mapping at the top level

    The mapping lists every value the labels hold (map ignored ones to 255, e.g. `255: 255`); a
    label with a value it does not list raises BadSampleError. Split `all`/`train`
    read the folders themselves unless `images/{split}` exists; any other split reads
    `images/{split}` and `labels/{split}`."""

    def __init__(self, root, split="all", transform=None, mapping=None, image_dir="images",
                 label_dir="labels", label_channel=0, strict=True):
        self.id_table, path = _load_mapping(mapping if mapping is not None else os.path.join(str(root), "labels.yaml"),
                                            root)
        self.id_table_name = f"the mapping {path}"
        self.label_channel = label_channel
        super().__init__(root, split, transform, strict)
        _require_dir(self.root, "root")
        if not isinstance(split, str) or not split:
            raise ValueError(f"split: expected a folder name or 'all', got {split!r}")
        image_root = os.path.join(self.root, image_dir)
        label_root = os.path.join(self.root, label_dir)
        _require_dir(image_root)
        if os.path.isdir(os.path.join(image_root, split)) or split not in ("all", "train"):
            image_root, label_root = os.path.join(image_root, split), os.path.join(label_root, split)
            if not os.path.isdir(image_root):
                raise ValueError(f"split: no split {split!r} here (no folder {image_root})")
        names = _list_images(image_root)
        labels = None
        if os.path.isdir(label_root):
            labels = [os.path.join(label_root, os.path.splitext(n)[0] + ".png") for n in names]
        self._set_pairs([os.path.join(image_root, n) for n in names], labels, names)


def _load_mapping(path, root):
    import yaml

    path = str(path)
    if not os.path.isabs(path) and not os.path.isfile(path):
        path = os.path.join(str(root), path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"label mapping YAML not found: {path}")
    with open(path) as f:
        doc = yaml.safe_load(f)
    table = doc.get("mapping", doc) if isinstance(doc, dict) else None
    if not isinstance(table, dict) or not table:
        raise ValueError(f"mapping: {path} must hold a mapping of label values to train ids")
    try:
        table = {int(k): int(v) for k, v in table.items()}
    except (TypeError, ValueError):
        raise ValueError(f"mapping: {path}: label values and train ids must be integers") from None
    for k, v in table.items():
        if not 0 <= k < 65536:
            raise ValueError(f"mapping: {path}: label value {k} outside [0, 65536)")
        if not (0 <= v < 19 or v == 255):
            raise ValueError(f"mapping: {path}: train id {v} (for label value {k}) is neither in [0, 19) nor 255")
    return table, path
