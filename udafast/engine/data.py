"""Training data: the datasets of a run config, their training views, and endless seeded batch streams.

A sample's view is a pure function of (stream seed, epoch, position), whatever the number of
loader workers, so that a run is reproducible and a stream can resume from `(epoch, position)`.
Methods can attach per-sample data to a stream (`extras(index) -> dict`): a `"label"` (pseudo-labels
in the frame of the resized image) follows the image pixel for pixel, as does a sample's `"truth"`
(the target's true labels, kept apart from the training labels to score pseudo-labels); `"frame": True`
adds the whole resized frame as the sample's "frame" (ProDA's teacher sees it, then takes its outputs
into the view with `udafast.data.transforms.frame_to_view` and the sample's "geometry", which every
view records: [scaled height, scaled width, crop top, crop left, flipped]); `"crop_center"` (y, x) in
that frame centres the random crop on a pixel (or None); any other tensor [..., h, w]
is a map of the whole frame at any resolution (e.g. soft labels at the network's output stride) and
is cropped and flipped proportionally, so crops are aligned to the map's stride.

A bad sample (`BadSampleError`: a file that does not decode, a label of another size, label values
outside the table) stops a stream with that error, raised in the main process as it is; a stream
given a `SkipLog` instead replaces it by the next sample of the epoch's order that reads, the same
with any number of workers, and records it there.
"""
import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from udafast.data import BadSampleError, build_dataset
from udafast.data.labels import IGNORE_INDEX
from udafast.data.transforms import Resize, resize_image, resize_label, size_pair

__all__ = ["TrainView", "BatchStream", "RareClassStream", "MixedSet", "SkipLog", "TruthLabels", "build_split", "collate"]


def build_split(spec, transform=None, **override):
    """The dataset of a `data.source`/`data.target`/`data.val` config entry."""
    options = dict(spec.get("options") or {})
    options.update(override)
    return build_dataset(spec["name"], spec.get("root"), spec.get("split", "train"), transform=transform, **options)


class TruthLabels(Dataset):
    """A labelled target dataset whose samples carry their labels as "truth" instead of "label":
    read to score pseudo-labels, never trained on."""

    #: no training labels (the oracle's test): its samples have "truth", not "label"
    labelled = False

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        sample = dict(self.dataset[index])
        sample["truth"] = sample.pop("label")
        return sample

    def __getattr__(self, name):  # the wrapped dataset's other attributes (e.g. `files`)
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __repr__(self):
        return f"TruthLabels({self.dataset!r})"


def _rand(generator):
    return torch.rand((), generator=generator).item()


def _randint(generator, high):
    return int(torch.randint(high, (), generator=generator).item())


class TrainView:
    """Resize -> extras -> random scale -> random crop -> horizontal flip, over the image, its
    label and the frame maps of `sample["maps"]` (see the module docstring).

    `resize`: (H, W), or an int for the shorter side; `scale_range`: (low, high) of the resized
    size; `crop`: (H, W), padded with 0 / 255 when the image is smaller; `align`: crop offsets are
    multiples of it (the maps' stride, so that their crops are exact); `cat_max_ratio`: below 1,
    mmseg's `RandomCrop(cat_max_ratio)` (mmseg/datasets/pipelines/transforms.py), which DAFormer's
    GTA5 and SYNTHIA pipelines use (0.75): a crop is drawn again, up to 10 times, while its label
    holds fewer than two classes or one class covers `cat_max_ratio` or more of its labelled pixels
    (the 11th draw is kept as it is)."""

    def __init__(self, resize=None, scale_range=None, crop=None, flip=0.5, align=1, cat_max_ratio=1.0):
        self.resize = None if resize is None else Resize(resize if isinstance(resize, int)
                                                         else size_pair(resize, "resize"))
        if scale_range is not None:
            lo, hi = (float(s) for s in scale_range)
            if not 0 < lo <= hi:
                raise ValueError(f"scale_range: expected 0 < low <= high, got {scale_range}")
            scale_range = (lo, hi)
        self.scale_range = scale_range
        self.crop = None if crop is None else size_pair(crop, "crop")
        if not 0.0 <= float(flip) <= 1.0:
            raise ValueError(f"flip: expected a probability, got {flip}")
        self.flip = float(flip)
        self.align = int(align)
        if isinstance(cat_max_ratio, bool) or not isinstance(cat_max_ratio, (int, float)) or not 0 < cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio: expected a number in (0, 1], got {cat_max_ratio!r}")
        self.cat_max_ratio = float(cat_max_ratio)

    @classmethod
    def from_config(cls, view, align=1):
        view = dict(view or {})
        unknown = sorted(set(view) - {"resize", "scale_range", "crop", "flip", "cat_max_ratio"})
        if unknown:
            raise ValueError(f"view: unknown key(s) {unknown}")
        return cls(view.get("resize"), view.get("scale_range"), view.get("crop"), view.get("flip", 0.5), align,
                   view.get("cat_max_ratio", 1.0))

    def resized(self, sample):
        """Only the resize step: the frame in which extras and pseudo-labels are defined."""
        return sample if self.resize is None else self.resize(sample)

    def __call__(self, sample, generator, extras=None):
        sample = self.resized(sample)
        if extras:
            sample = dict(sample)
            maps = dict(sample.get("maps") or {})
            for key, value in extras.items():
                if key == "crop_center":
                    sample["crop_center"] = value
                elif key == "frame":
                    if value:
                        sample["frame"] = sample["image"]
                elif key == "label":
                    if tuple(value.shape) != tuple(sample["image"].shape[-2:]):
                        raise ValueError(f"extras: label of shape {tuple(value.shape)} for an image of "
                                         f"{tuple(sample['image'].shape[-2:])}")
                    sample["label"] = value
                else:
                    maps[key] = value
            sample["maps"] = maps
        image = sample["image"]
        labels = {k: sample[k] for k in _LABEL_KEYS if sample.get(k) is not None}
        maps = dict(sample.get("maps") or {})
        offset, flipped = (0, 0), False
        if self.scale_range is not None:
            lo, hi = self.scale_range
            s = lo + (hi - lo) * _rand(generator)
            size = (max(1, round(image.shape[-2] * s)), max(1, round(image.shape[-1] * s)))
            image = resize_image(image, size)
            labels = {k: resize_label(v, size) for k, v in labels.items()}
        scaled = tuple(image.shape[-2:])
        if self.crop is not None:
            center = sample.get("crop_center")
            if center is not None and self.scale_range is not None:
                center = (center[0] * image.shape[-2] / sample["image"].shape[-2],
                          center[1] * image.shape[-1] / sample["image"].shape[-1])
            image, labels, maps, offset = self._crop(image, labels, maps, generator, center)
        if self.flip > 0 and _rand(generator) < self.flip:
            flipped = True
            image = image.flip(-1)
            labels = {k: v.flip(-1) for k, v in labels.items()}
            maps = {k: v.flip(-1) for k, v in maps.items()}
        out = dict(sample)
        out["image"] = image.contiguous()
        out.update({k: v.contiguous() for k, v in labels.items()})
        out["geometry"] = torch.tensor([*scaled, *offset, int(flipped)], dtype=torch.int64)
        out.pop("maps", None)
        out.pop("crop_center", None)
        if maps:
            out["maps"] = {k: v.contiguous() for k, v in maps.items()}
        return out

    def _crop(self, image, labels, maps, generator, center=None):
        ch, cw = self.crop
        h, w = image.shape[-2:]
        if h < ch or w < cw:
            pad = (0, max(0, cw - w), 0, max(0, ch - h))
            image = F.pad(image, pad, value=0.0)
            labels = {k: F.pad(v, pad, value=IGNORE_INDEX) for k, v in labels.items()}
            maps = {k: _pad_map(v, h, w, max(h, ch), max(w, cw)) for k, v in maps.items()}
            h, w = image.shape[-2:]
        a = self.align

        def draw():
            return _randint(generator, (h - ch) // a + 1) * a, _randint(generator, (w - cw) // a + 1) * a
        y0, x0 = draw()
        if center is not None:  # a crop around this pixel (CBST's rare-class mining)
            cy, cx = center
            y0 = min(max(0, int(cy) - ch // 2), h - ch) // a * a
            x0 = min(max(0, int(cx) - cw // 2), w - cw) // a * a
        elif self.cat_max_ratio < 1 and labels.get("label") is not None:
            for _ in range(CAT_MAX_DRAWS):
                if _mixed_enough(labels["label"][..., y0:y0 + ch, x0:x0 + cw], self.cat_max_ratio):
                    break
                y0, x0 = draw()
        image = image[..., y0:y0 + ch, x0:x0 + cw]
        labels = {k: v[..., y0:y0 + ch, x0:x0 + cw] for k, v in labels.items()}
        maps = {k: _crop_map(v, h, w, y0, x0, ch, cw) for k, v in maps.items()}
        return image, labels, maps, (y0, x0)

    def __repr__(self):
        return (f"TrainView(resize={self.resize}, scale_range={self.scale_range}, crop={self.crop}, "
                f"flip={self.flip}, align={self.align}, cat_max_ratio={self.cat_max_ratio})")


#: mmseg's RandomCrop: the crops checked against cat_max_ratio before one is kept unchecked
CAT_MAX_DRAWS = 10


def _mixed_enough(label, cat_max_ratio):
    """mmseg RandomCrop's test: more than one class in `label` and none covering `cat_max_ratio` of
    its labelled pixels."""
    counts = torch.bincount(label[label != IGNORE_INDEX].reshape(-1).long())
    counts = counts[counts > 0]
    return counts.numel() > 1 and float(counts.max()) / float(counts.sum()) < cat_max_ratio


#: per-pixel label maps of a sample that follow the image through every geometric step
_LABEL_KEYS = ("label", "truth")


def _pad_map(m, h, w, nh, nw):
    mh, mw = m.shape[-2:]
    ph, pw = math.ceil(mh * nh / h) - mh, math.ceil(mw * nw / w) - mw
    fill = IGNORE_INDEX if not m.dtype.is_floating_point else 0.0
    return F.pad(m, (0, pw, 0, ph), value=fill)


def _crop_map(m, h, w, y0, x0, ch, cw):
    """The part of a frame map covering the image crop (y0, x0, ch, cw) of an h x w frame."""
    mh, mw = m.shape[-2:]
    sy, sx = mh / h, mw / w
    top, left = round(y0 * sy), round(x0 * sx)
    size = (max(1, round(ch * sy)), max(1, round(cw * sx)))
    out = m[..., top:top + size[0], left:left + size[1]]
    if tuple(out.shape[-2:]) != size:  # a crop not aligned to the map's stride: resample
        src = m.float() if not m.dtype.is_floating_point else m
        out = F.interpolate(src.reshape(1, -1, mh, mw), size=size, mode="nearest")[0].reshape(*m.shape[:-2], *size)
        out = out.to(m.dtype)
    return out


class SkipLog:
    """The bad samples passed over under `data.skip_bad_samples`: `count` skips in all (a file
    met twice counts twice) and `files` {path: reason}, in the order first met. `log(text)` hears
    of each file the first time it is skipped."""

    def __init__(self, log=None):
        self.count, self.files, self._log = 0, {}, log

    def record(self, path, reason):
        self.count += 1
        if path not in self.files:
            self.files[path] = reason
            if self._log is not None:
                self._log(f"data: skipping a bad sample: {path}: {reason}")

    def state_dict(self):
        return {"count": self.count, "files": dict(self.files)}

    def load_state_dict(self, state):
        self.count, self.files = int(state["count"]), dict(state["files"])

    @staticmethod
    def merge(states):
        """One state of several `state_dict()`s (e.g. every process's): the counts added, the files
        joined."""
        files = {}
        for state in states:
            for path, reason in state["files"].items():
                files.setdefault(path, reason)
        return {"count": sum(int(s["count"]) for s in states), "files": files}


def _first_readable(dataset, candidates, skip_bad, exhausted):
    """(index, tag, sample, skipped) of the first (index, tag) of `candidates` whose sample reads,
    with the (path, reason) of the bad ones before it; without `skip_bad` a bad sample gives
    {"error": its BadSampleError}, and {"error": ...} `exhausted` when none reads."""
    skipped = []
    for index, tag in candidates:
        try:
            return index, tag, dataset[index], skipped
        except BadSampleError as exc:
            if not skip_bad:
                return {"error": exc}
            skipped.append((exc.path, exc.reason))
    return {"error": ValueError(f"data: {exhausted}, e.g. {skipped[0][0]}: {skipped[0][1]}")}


class _Views(Dataset):
    """Indexed by (position, seed): the sample at `position` of the epoch's `order` through `view`
    with a generator of `seed`, its dataset index in "index".

    A bad sample is, with `skip_bad`, replaced by the next one in `order` that reads (wrapping
    around), its (path, reason) listed in "skipped"; without, the sample is only {"error": the
    BadSampleError}, for the main process to raise (a loader worker's exception would come back
    wrapped in its traceback)."""

    def __init__(self, dataset, view, extras, order, skip_bad=False):
        self.dataset, self.view, self.extras = dataset, view, extras
        self.order, self.skip_bad = order, skip_bad

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        position, seed = key
        candidates = ((self.order[(position + step) % len(self.order)], None) for step in range(len(self.order)))
        found = _first_readable(self.dataset, candidates, self.skip_bad, f"every sample of {self.dataset!r} is bad")
        if isinstance(found, dict):
            return found
        index, _, sample, skipped = found
        extras = self.extras(index) if self.extras is not None else None
        out = self.view(sample, torch.Generator().manual_seed(seed), extras)
        out["index"] = index
        if self.skip_bad:
            out["skipped"] = skipped
        return out


class MixedSet(Dataset):
    """The union of `parts`, each (dataset, view, extras or None), as one dataset for one
    `BatchStream` (CBST trains on source subset + pseudo-labelled target as one shuffled set, as
    crst_seg.py's ConcatDataset does): index i is part k's sample i - offset_k, and each sample
    goes through its own part's view and extras (`view` and `extras` dispatch on it). Picklable for
    loader workers when its parts are."""

    def __init__(self, parts):
        self.parts = [tuple(p) for p in parts]
        self.offsets, total = [], 0
        for dataset, _, _ in self.parts:
            self.offsets.append(total)
            total += len(dataset)
        self.total = total

    def __len__(self):
        return self.total

    def locate(self, index):
        """(part, index in that part) of a union index."""
        if not 0 <= index < self.total:
            raise IndexError(f"MixedSet: index {index} out of range for {self.total} samples")
        k = max(i for i, start in enumerate(self.offsets) if start <= index and len(self.parts[i][0]) > 0)
        return k, index - self.offsets[k]

    def __getitem__(self, index):
        k, j = self.locate(index)
        sample = dict(self.parts[k][0][j])
        sample["_part"] = k
        return sample

    def extras(self, index):
        k, j = self.locate(index)
        extras = self.parts[k][2]
        return None if extras is None else extras(j)

    def view(self, sample, generator, extras=None):
        sample = dict(sample)
        return self.parts[sample.pop("_part")][1](sample, generator, extras)

    def __repr__(self):
        return f"MixedSet({', '.join(f'{len(d)} of {d!r}' for d, _, _ in self.parts)})"


def collate(samples):
    """Stack the samples' tensors (images, labels, maps), indices as int64, names as a list, and
    concatenate their "skipped" lists; a sample with an "error" makes the batch {"error": it}."""
    errors = [s["error"] for s in samples if "error" in s]
    if errors:
        return {"error": errors[0]}
    out = {"image": torch.stack([s["image"] for s in samples]),
           "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
           "name": [s.get("name") for s in samples]}
    for key in _LABEL_KEYS + ("frame", "geometry"):
        if samples and all(key in s for s in samples):
            out[key] = torch.stack([s[key] for s in samples])
    if samples and all("rare_class" in s for s in samples):
        out["rare_class"] = torch.tensor([s["rare_class"] for s in samples], dtype=torch.int64)
    if samples and "maps" in samples[0]:
        out["maps"] = {k: torch.stack([s["maps"][k] for s in samples]) for k in samples[0]["maps"]}
    if any("skipped" in s for s in samples):
        out["skipped"] = [bad for s in samples for bad in s.get("skipped", ())]
    return out


class BatchStream:
    """Endless batches of `batch_size` views of `dataset`: each epoch a permutation drawn from
    (seed, epoch), the last incomplete batch dropped; the view of the sample at (epoch, position)
    uses a generator seeded from (seed, epoch, position). `state_dict()` is (epoch, position) of the
    next batch.

    Under several processes (`rank` of `world`), the epoch's order is `DistributedSampler`'s (the
    same permutation, every `world`-th sample from `rank`, the tail that does not divide dropped)
    and positions count in the whole permutation, so one process (`world=1`) sees exactly the
    single-process stream.

    `skip_log`: a `SkipLog`: a bad sample is replaced by the next one of this process's order for
    the epoch that reads, and recorded there; None: a bad sample raises its BadSampleError."""

    def __init__(self, dataset, batch_size, view, *, seed=0, num_workers=0, extras=None, rank=0, world=1,
                 skip_log=None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if not 0 <= rank < world:
            raise ValueError(f"rank: expected 0 <= rank < world ({world}), got {rank!r}")
        if len(dataset) // world < batch_size:
            raise ValueError(f"batch_size: {batch_size} per process is more than the {len(dataset)} samples of "
                             f"{dataset!r} shared by {world} process(es)")
        self.dataset, self.batch_size, self.view = dataset, batch_size, view
        self.seed, self.num_workers = int(seed), int(num_workers)
        self.rank, self.world = int(rank), int(world)
        self.extras = extras
        self.skip_log = skip_log
        self.epoch, self.position = 0, 0
        self._iter = None

    @property
    def batches_per_epoch(self):
        return len(self.dataset) // self.world // self.batch_size

    def set_extras(self, extras):
        """Attach (or, with None, detach) per-sample extras; restarts the prefetching."""
        self.extras = extras
        self._iter = None

    def close(self):
        """Stop the prefetching and its loader workers now (not when the iterator is collected,
        which a reference cycle can delay by seconds per worker); the next batch starts it again."""
        shutdown = getattr(self._iter, "_shutdown_workers", None)  # torch's multi-process loader iterator
        if shutdown is not None:
            shutdown()
        self._iter = None

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._iter = None

    def _draw(self, generator):
        """The epoch's order over the whole dataset: a permutation."""
        return torch.randperm(len(self.dataset), generator=generator)

    def _order(self, epoch):
        """This process's dataset indices for the epoch, in order: `_draw` from a generator seeded
        seed * 1_000_003 + epoch, the tail that does not divide by `world` dropped, every world-th
        from `rank` (DistributedSampler(shuffle=True, drop_last=True, seed=seed * 1_000_003)'s order)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        used = len(self.dataset) // self.world * self.world
        return self._draw(g)[:used][self.rank::self.world].tolist()

    def _keys(self, epoch, start):
        """(position in this process's order of the epoch, view seed) of each sample of batches
        `start`...."""
        base = (self.seed * 1_000_003 + epoch) * 65_537
        for b in range(start, self.batches_per_epoch):
            positions = range(b * self.batch_size, (b + 1) * self.batch_size)
            yield [(p, base + p * self.world + self.rank) for p in positions]

    def _epoch_iter(self):
        keys = self._keys(self.epoch, self.position)
        views = _Views(self.dataset, self.view, self.extras, self._order(self.epoch), self.skip_log is not None)
        if self.num_workers == 0:
            return (collate([views[k] for k in batch]) for batch in keys)
        return iter(DataLoader(views, batch_sampler=list(keys), collate_fn=collate, num_workers=self.num_workers,
                               persistent_workers=False))

    def __iter__(self):
        return self

    def __next__(self):
        if self._iter is None:
            self._iter = self._epoch_iter()
        try:
            batch = next(self._iter)
        except StopIteration:
            self.epoch, self.position = self.epoch + 1, 0
            self._iter = self._epoch_iter()
            batch = next(self._iter)
        if "error" in batch:
            self.close()  # stops the loader's workers now, not whenever the stream is collected
            raise batch["error"]
        for path, reason in batch.pop("skipped", ()):
            self.skip_log.record(path, reason)
        self.position += 1
        return batch


class UniformDrawStream(BatchStream):
    """A `BatchStream` whose epoch order is drawn uniformly with replacement (an image may come
    twice in an "epoch", another not at all) where the plain stream draws a permutation, from the
    same seed (seed, epoch) and shared among processes the same way, so it resumes from (epoch,
    position) and reads the same with any number of workers. DAFormer's target under rare-class
    sampling (mmseg/datasets/uda_dataset.py `get_rare_class_sample`: `np.random.choice(range(len(
    self.target)))` per sample)."""

    def _draw(self, generator):
        n = len(self.dataset)
        return torch.randint(n, (n,), generator=generator)


class _RareClassViews(Dataset):
    """Indexed by (position, seed): a rare-class sample (lhoyer/DAFormer `mmseg/datasets/
    uda_dataset.py` `get_rare_class_sample`): from a generator of `seed`, a class by `probs`, one of
    its images uniformly, and its view; while the view holds no more than `min_crop_pixels` pixels
    of the class, up to `crop_tries` new views of the same image. A bad image is, with `skip_bad`,
    replaced by a new draw and listed in "skipped"."""

    def __init__(self, dataset, view, classes, probs, with_class, min_crop_pixels, crop_tries=10, skip_bad=False):
        self.dataset, self.view = dataset, view
        self.classes, self.probs, self.with_class = list(classes), probs, with_class
        self.min_crop_pixels, self.crop_tries, self.skip_bad = min_crop_pixels, crop_tries, skip_bad

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        _, seed = key
        generator = torch.Generator().manual_seed(seed)
        found = _first_readable(self.dataset, self._draws(generator, 100), self.skip_bad,
                                "100 rare-class draws in a row hit bad samples")
        if isinstance(found, dict):
            return found
        index, c, sample, skipped = found
        out = self.view(sample, generator)
        for _ in range(self.crop_tries):
            if int((out["label"] == c).sum()) > self.min_crop_pixels:
                break
            out = self.view(sample, generator)
        out["index"] = index
        out["rare_class"] = c
        if self.skip_bad:
            out["skipped"] = skipped
        return out

    def _draws(self, generator, n):
        """`n` draws (dataset index, class): a class by the probabilities, then one of its images."""
        for _ in range(n):
            c = self.classes[int(torch.multinomial(self.probs, 1, generator=generator))]
            images = self.with_class[c]
            yield images[_randint(generator, len(images))], c


class RareClassStream(BatchStream):
    """A source stream of rare-class samples (udafast.data.rare_class; DAFormer's RCS): every
    sample drawn with replacement from a generator seeded by (seed, epoch, position, rank), so the
    stream is reproducible with any number of workers and resumes from (epoch, position) as a
    `BatchStream` does. An "epoch" is as many batches as the dataset's plain stream has. Batches
    carry "rare_class", the class each sample was drawn for. `classes`, `probs`: the classes and
    their probabilities; `with_class`: {class: dataset indices holding more than `min_pixels` of it};
    `min_crop_pixels`: the pixels of the class a view must hold (min_pixels * min_crop_ratio)."""

    def __init__(self, dataset, batch_size, view, classes, probs, with_class, min_crop_pixels, **kwargs):
        super().__init__(dataset, batch_size, view, **kwargs)
        self.classes, self.probs = list(classes), torch.as_tensor(probs, dtype=torch.float64)
        self.with_class, self.min_crop_pixels = with_class, min_crop_pixels

    def _epoch_iter(self):
        keys = self._keys(self.epoch, self.position)
        views = _RareClassViews(self.dataset, self.view, self.classes, self.probs, self.with_class,
                                self.min_crop_pixels, skip_bad=self.skip_log is not None)
        if self.num_workers == 0:
            return (collate([views[k] for k in batch]) for batch in keys)
        return iter(DataLoader(views, batch_sampler=list(keys), collate_fn=collate, num_workers=self.num_workers,
                               persistent_workers=False))
