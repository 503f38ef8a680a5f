"""`python -m udafast.data.check NAME ROOT [--split S] [--option KEY=VALUE ...]`: validate a dataset.

Reports missing image/label pairs, unreadable files, image/label size mismatches and label values
outside the dataset's table (each file listed: the faults that stop training, or that
`--skip-bad-samples` passes over), then the per-class pixel shares (train ids). Exit status 0 when
no problem was found, 1 otherwise.
"""
import argparse
import inspect
import sys
from collections import defaultdict

import numpy as np
import yaml
from PIL import Image

from udafast.data.datasets import SegmentationDataset, build_dataset, dataset_factory, dataset_names
from udafast.data.io import BadSampleError
from udafast.data.labels import CLASS_NAMES, NUM_CLASSES


def check_dataset(ds, decode_images=True):
    """Check every sample of `ds` (a `SegmentationDataset` built with strict=False). Returns a
    dict: `missing` (label paths), `unreadable` ((path, error)), `size_mismatch` ((image, label,
    image (H, W), label (H, W))), `unknown_ids` ({raw value: [pixels, files, first file]}),
    `unknown_id_files` ((label, [values outside the table])), `counts` (pixels per train id,
    index 19 = ignore), `images`, `labelled`."""
    if not isinstance(ds, SegmentationDataset):
        return _check_samples(ds)
    report = {"images": len(ds), "labelled": ds.labelled, "missing": list(getattr(ds, "missing", [])),
              "unreadable": [], "size_mismatch": [], "unknown_ids": {}, "unknown_id_files": [],
              "counts": np.zeros(NUM_CLASSES + 1, np.int64)}
    known = set(int(k) for k in ds.id_table)
    missing = set(report["missing"])
    unknown = defaultdict(lambda: [0, 0, None])
    for i, image_path in enumerate(ds.images):
        try:
            with Image.open(image_path) as im:
                w, h = im.size
                if decode_images:
                    im.load()
            image_hw = (h, w)
        except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
            report["unreadable"].append((image_path, f"{type(exc).__name__}: {exc}"))
            image_hw = None
        if not ds.labelled or ds.labels[i] in missing:
            continue
        label_path = ds.labels[i]
        try:
            raw = ds.read_raw_label(i)
        except BadSampleError as exc:
            report["unreadable"].append((label_path, exc.reason))
            continue
        except Exception as exc:  # noqa: BLE001
            report["unreadable"].append((label_path, f"{type(exc).__name__}: {exc}"))
            continue
        if image_hw is not None and tuple(raw.shape) != image_hw:
            report["size_mismatch"].append((image_path, label_path, image_hw, tuple(raw.shape)))
        values, counts = np.unique(raw, return_counts=True)
        outside = []
        for v, n in zip(values.tolist(), counts.tolist()):
            if v not in known:
                entry = unknown[v]
                entry[0] += n
                entry[1] += 1
                entry[2] = entry[2] or label_path
                outside.append(v)
        if outside:
            report["unknown_id_files"].append((label_path, outside))
        train = ds.to_train_ids(raw).reshape(-1)
        train = np.where(train < NUM_CLASSES, train, NUM_CLASSES)
        report["counts"] += np.bincount(train, minlength=NUM_CLASSES + 1)
    report["unknown_ids"] = dict(sorted(unknown.items()))
    return report


def _check_samples(ds):
    """For datasets that are not file trees (e.g. generated ones): load every sample and check the
    label's size and values."""
    report = {"images": len(ds), "labelled": False, "missing": [], "unreadable": [], "size_mismatch": [],
              "unknown_ids": {}, "unknown_id_files": [], "counts": np.zeros(NUM_CLASSES + 1, np.int64)}
    unknown = defaultdict(lambda: [0, 0, None])
    for i in range(len(ds)):
        name = str(i)
        try:
            sample = ds[i]
            name = str(sample.get("name", i))
        except Exception as exc:  # noqa: BLE001
            report["unreadable"].append((name, f"{type(exc).__name__}: {exc}"))
            continue
        if "label" not in sample:
            continue
        report["labelled"] = True
        label = np.asarray(sample["label"])
        hw = tuple(sample["image"].shape[-2:])
        if tuple(label.shape) != hw:
            report["size_mismatch"].append((name, name, hw, tuple(label.shape)))
        values, counts = np.unique(label, return_counts=True)
        outside = []
        for v, n in zip(values.tolist(), counts.tolist()):
            if not (0 <= v < NUM_CLASSES or v == 255):
                entry = unknown[v]
                entry[0] += n
                entry[1] += 1
                entry[2] = entry[2] or name
                outside.append(v)
        if outside:
            report["unknown_id_files"].append((name, outside))
        flat = label.reshape(-1)
        flat = np.where((flat >= 0) & (flat < NUM_CLASSES), flat, NUM_CLASSES)
        report["counts"] += np.bincount(flat, minlength=NUM_CLASSES + 1)
    report["unknown_ids"] = dict(sorted(unknown.items()))
    return report


def problem_count(report):
    return (len(report["missing"]) + len(report["unreadable"]) + len(report["size_mismatch"])
            + len(report["unknown_ids"]) + (1 if report["images"] == 0 else 0))


def format_report(report, title="", max_list=20):
    lines = [title] if title else []
    lines.append(f"images: {report['images']} ({'labelled' if report['labelled'] else 'unlabelled'})")

    def listing(header, items, fmt):
        lines.append(f"{header}: {len(items)}")
        for item in items[:max_list]:
            lines.append("  " + fmt(item))
        if len(items) > max_list:
            lines.append(f"  ... and {len(items) - max_list} more")

    if report["images"] == 0:
        lines.append("PROBLEM: no images found")
    listing("missing label files", report["missing"], str)
    listing("unreadable files", report["unreadable"], lambda t: f"{t[0]}: {t[1]}")
    listing("image/label size mismatches", report["size_mismatch"],
            lambda t: f"{t[0]} is {t[2][0]}x{t[2][1]} (HxW) but {t[1]} is {t[3][0]}x{t[3][1]}")
    unknown = list(report["unknown_ids"].items())
    listing("label ids outside the table", unknown,
            lambda kv: f"id {kv[0]}: {kv[1][0]} pixels in {kv[1][1]} files (first: {kv[1][2]})")
    listing("label files with ids outside the table", report["unknown_id_files"],
            lambda t: f"{t[0]}: {', '.join(str(v) for v in t[1])}")
    if report["labelled"]:
        counts = report["counts"]
        total = int(counts.sum())
        lines.append(f"class pixel shares (of {total} labelled pixels):")
        for c in range(NUM_CLASSES):
            share = 100.0 * counts[c] / total if total else 0.0
            lines.append(f"  {c:>3} {CLASS_NAMES[c]:<14} {share:7.3f}%")
        share = 100.0 * counts[NUM_CLASSES] / total if total else 0.0
        lines.append(f"  255 {'ignore':<14} {share:7.3f}%")
    n = problem_count(report)
    lines.append("OK: no problems found" if n == 0 else f"PROBLEMS: {n}")
    return "\n".join(lines)


def _parse_option(text):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, yaml.safe_load(value)


def _accepts(factory, name):
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m udafast.data.check", description=__doc__.splitlines()[0])
    parser.add_argument("name", help=f"dataset name ({', '.join(dataset_names())})")
    parser.add_argument("root", help="dataset root folder")
    parser.add_argument("--split", default=None, help="split (default: train for cityscapes, all otherwise)")
    parser.add_argument("--option", "-o", action="append", type=_parse_option, default=[],
                        help="dataset option KEY=VALUE (e.g. mapping=labels.yaml for folder); repeatable")
    parser.add_argument("--no-decode-images", action="store_true", help="read image headers only (faster)")
    parser.add_argument("--max-list", type=int, default=20, help="list at most this many files per problem")
    args = parser.parse_args(argv)
    split = args.split or ("train" if args.name.lower() == "cityscapes" else "all")
    try:
        options = dict(args.option)
        if _accepts(dataset_factory(args.name), "strict"):
            options.setdefault("strict", False)  # collect every missing label instead of stopping at one
        ds = build_dataset(args.name, args.root, split, **options)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report = check_dataset(ds, decode_images=not args.no_decode_images)
    print(format_report(report, f"{args.name} {args.root} split={split}", args.max_list))
    return 1 if problem_count(report) else 0


if __name__ == "__main__":
    sys.exit(main())
