"""Bad data (issue 6, item 4): an image that does not decode, a label of another size than its
image, label values outside the dataset's table -> BadSampleError naming the file; under
`data.skip_bad_samples` training replaces such samples (the same with any number of loader
workers) and counts them, the passes over the target set leave them out, evaluation still stops."""
import csv
import json
import os
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_and_resume, tiny_run_config
from udafast import train
from udafast.config import merge
from udafast.data import BadSampleError, build_dataset, check, io
from udafast.engine.context import TrainingContext
from udafast.engine.data import BatchStream, SkipLog, TrainView
from udafast.engine.logging import RunLogger
from udafast.engine.trainer import Trainer
from udafast.methods import method_class
from udafast.models.checkpoint import load_checkpoint

H, W = 32, 48
GOOD_IDS = (7, 11, 23, 26)  # Cityscapes label ids of road, building, sky, car
SYNTHIA_GOOD = (3, 2, 1, 8)  # the same classes in SYNTHIA's ids


def rgb(seed, h=H, w=W):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def ids(seed, values, h=H, w=W):
    return np.random.default_rng(seed).choice(np.asarray(values), (h, w)).astype(np.uint8)


def save(path, array, mode=None, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array, mode).save(path, fmt)


def truncate(path):
    """Cut a valid image file to half its bytes."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def garbage(path):
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())


# ---- fixture trees in the official layouts: sample i of each is -----------------------------------
# 0 good, 1 an image that does not decode, 2 a label of another size, 3 a label value outside the
# table, 4 and 5 good
BAD = {1: "cannot be decoded", 2: "is (16, 24) (H, W) but its image", 3: "is not in the"}


def _write_label(name, path, values):
    if name == "gta5":  # palette PNG: the indices are the ids
        label = Image.fromarray(values, "P")
        label.putpalette(np.random.default_rng(1).integers(0, 256, 768).tolist())
        os.makedirs(os.path.dirname(path), exist_ok=True)
        label.save(path)
    elif name == "synthia":  # 16 bits per channel, the class id in red
        os.makedirs(os.path.dirname(path), exist_ok=True)
        arr = np.zeros(values.shape + (3,), np.uint16)
        arr[..., 0] = values
        arr[..., 1] = 1000  # instance ids, in the other channels
        io.write_png16(path, arr)
    else:
        save(path, values, "L")


def make_tree(root, name, n=6, bad=(1, 2, 3), corrupt=truncate):
    """A dataset tree of `n` samples; the samples in `bad` are broken as BAD says. Returns
    (image paths, label paths)."""
    root = str(root)
    images, labels = [], []
    for i in range(n):
        if name == "gta5":
            image, label = (os.path.join(root, d, f"{i + 1:05d}.png") for d in ("images", "labels"))
        elif name == "synthia":
            image = os.path.join(root, "RGB", f"{i + 1:07d}.png")
            label = os.path.join(root, "GT", "LABELS", f"{i + 1:07d}.png")
        elif name == "cityscapes":
            stem = f"aachen_{i:06d}_000019"
            image = os.path.join(root, "leftImg8bit", "train", "aachen", f"{stem}_leftImg8bit.png")
            label = os.path.join(root, "gtFine", "train", "aachen", f"{stem}_gtFine_labelIds.png")
        else:  # folder: JPEG images, grey PNG labels, a YAML mapping
            image = os.path.join(root, "images", f"frame{i}.jpg")
            label = os.path.join(root, "labels", f"frame{i}.png")
        save(image, rgb(i), fmt="JPEG" if name == "folder" else None)
        values = SYNTHIA_GOOD if name == "synthia" else GOOD_IDS
        label_ids = ids(i, values)
        if i in bad and i % 3 == 2:
            label_ids = label_ids[: H // 2, : W // 2]
        if i in bad and i % 3 == 0:
            label_ids[5, 7] = {"synthia": 40, "folder": 9}.get(name, 34)  # 34: past the Cityscapes table
        _write_label(name, label, label_ids)
        if i in bad and i % 3 == 1:
            corrupt(image)
        images.append(image)
        labels.append(label)
    if name == "folder":
        with open(os.path.join(root, "labels.yaml"), "w") as f:
            f.write("mapping: {7: 0, 11: 2, 23: 10, 26: 13}\n")
    return images, labels


@pytest.mark.parametrize("name", ["gta5", "synthia", "cityscapes", "folder"])
def test_each_fault_raises_naming_the_file(tmp_path, name):
    images, labels = make_tree(tmp_path / name, name, n=4)
    ds = build_dataset(name, tmp_path / name, "train")
    assert ds[0]["label"].shape == (H, W) and set(ds[0]["label"].unique().tolist()) <= {0, 2, 10, 13}
    for i, at_fault in ((1, images[1]), (2, labels[2]), (3, labels[3])):
        with pytest.raises(BadSampleError) as info:
            ds[i]
        assert info.value.path == at_fault and str(info.value).startswith(at_fault + ": ")
        assert BAD[i] in info.value.reason, info.value.reason
        assert isinstance(info.value, ValueError)
    # the reasons say what is wrong
    value, table = {"gta5": (34, "the Cityscapes label ids (0-33)"),
                    "cityscapes": (34, "the Cityscapes label ids (0-33)"),
                    "synthia": (40, "the SYNTHIA class ids (0-22)"),
                    "folder": (9, f"the mapping {tmp_path / name / 'labels.yaml'} (7, 11, 23, 26)")}[name]
    with pytest.raises(BadSampleError, match=re.escape(f"label value {value} is not in {table}")):
        ds[3]
    # the error crosses process boundaries whole (loader workers pickle it)
    with pytest.raises(BadSampleError) as info:
        ds[2]
    again = pickle.loads(pickle.dumps(info.value))
    assert (again.path, again.reason, str(again)) == (info.value.path, info.value.reason, str(info.value))


def test_garbage_image_and_label_files(tmp_path):
    images, labels = make_tree(tmp_path / "cs", "cityscapes", n=3, bad=(1,), corrupt=garbage)
    garbage(labels[2])
    ds = build_dataset("cityscapes", tmp_path / "cs", "train")
    with pytest.raises(BadSampleError, match="cannot be decoded") as info:
        ds[1]
    assert info.value.path == images[1]
    with pytest.raises(BadSampleError, match="cannot be decoded") as info:
        ds[2]
    assert info.value.path == labels[2]
    # unlabelled target training still reads the image, and still finds it bad
    with pytest.raises(BadSampleError, match=images[1]):
        build_dataset("cityscapes", tmp_path / "cs", "train", labels=False)[1]
    assert "label" not in build_dataset("cityscapes", tmp_path / "cs", "train", labels=False)[2]


def test_check_lists_every_bad_file(tmp_path, capsys):
    images, labels = make_tree(tmp_path / "gta5", "gta5", n=7, bad=(1, 2, 3, 4, 6))  # 4 and 6: outside too
    assert check.main(["gta5", str(tmp_path / "gta5")]) == 1
    out = capsys.readouterr().out
    assert f"unreadable files: 2\n  {images[1]}: " in out and f"\n  {images[4]}: " in out
    assert f"image/label size mismatches: 1\n  {images[2]} is 32x48 (HxW) but {labels[2]} is 16x24" in out
    assert f"label files with ids outside the table: 2\n  {labels[3]}: 34\n  {labels[6]}: 34\n" in out


# ---- training streams -----------------------------------------------------------------------------
def gta5_stream(root, workers, skip_log, seed=3):
    ds = build_dataset("gta5", root, "all")
    return BatchStream(ds, 2, TrainView(crop=(16, 16), flip=0.5), seed=seed, num_workers=workers, skip_log=skip_log)


def test_stream_replaces_bad_samples_the_same_with_workers(tmp_path):
    images, _ = make_tree(tmp_path / "gta5", "gta5")
    bad_names = {os.path.basename(images[i]) for i in BAD}
    runs = {}
    for workers in (0, 2):
        log = SkipLog()
        stream = gta5_stream(tmp_path / "gta5", workers, log)
        runs[workers] = ([next(stream) for _ in range(6)], log)  # two epochs of 3 batches
    (a, log_a), (b, log_b) = runs[0], runs[2]
    for x, y in zip(a, b):
        assert torch.equal(x["index"], y["index"]) and x["name"] == y["name"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
        assert "skipped" not in x
        assert not set(x["name"]) & bad_names and not set(x["index"].tolist()) & set(BAD)
    # every bad sample was met in each epoch (at least once: a replacement may meet one again)
    assert log_a.state_dict() == log_b.state_dict()
    assert sorted(log_a.files) == sorted(p for i, p in enumerate(_paths(tmp_path / "gta5")) if i in BAD)
    assert log_a.count >= 2 * len(BAD)
    # a replacement is the next good sample of the epoch's order
    order = gta5_stream(tmp_path / "gta5", 0, SkipLog())._order(0)
    expected = [next(order[(p + k) % 6] for k in range(6) if order[(p + k) % 6] not in BAD) for p in range(6)]
    assert torch.cat([x["index"] for x in a[:3]]).tolist() == expected


def _paths(root):
    ds = build_dataset("gta5", root, "all")
    return [ds.labels[i] if i in (2, 3) else ds.images[i] for i in range(len(ds))]


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_without_skipping_raises_cleanly(tmp_path, workers):
    images, labels = make_tree(tmp_path / "gta5", "gta5")
    stream = gta5_stream(tmp_path / "gta5", workers, None)
    with pytest.raises(BadSampleError) as info:
        for _ in range(3):
            next(stream)
    assert info.value.path in (images[1], labels[2], labels[3])
    assert "Traceback" not in str(info.value) and "worker" not in str(info.value)


def test_stream_of_only_bad_samples(tmp_path):
    make_tree(tmp_path / "gta5", "gta5", n=3, bad=(0, 1, 2))
    with pytest.raises(ValueError, match="every sample .* is bad"):
        next(gta5_stream(tmp_path / "gta5", 0, SkipLog()))


# ---- runs -----------------------------------------------------------------------------------------
def make_gta5_cityscapes(tmp_path, source_bad=tuple(BAD)):
    """GTA5 (6 frames, `source_bad` bad) -> Cityscapes (4 train frames, frame 1 bad; 2 val frames)."""
    gta, cs = tmp_path / "gta5", tmp_path / "cityscapes"
    make_tree(gta, "gta5", bad=source_bad)
    make_tree(cs, "cityscapes", n=4, bad=(1,))
    for i in range(2):
        stem = f"lindau_{i:06d}_000019"
        save(str(cs / "leftImg8bit" / "val" / "lindau" / f"{stem}_leftImg8bit.png"), rgb(10 + i))
        save(str(cs / "gtFine" / "val" / "lindau" / f"{stem}_gtFine_labelIds.png"), ids(10 + i, GOOD_IDS), "L")
    return gta, cs


TARGET_BAD = os.path.join("{}", "cityscapes", "leftImg8bit", "train", "aachen", "aachen_000001_000019_leftImg8bit.png")


def gta5_cityscapes_config(tmp_path, method, source_bad=tuple(BAD), **sections):
    """A tiny run on `make_gta5_cityscapes`' trees, skipping bad samples."""
    gta, cs = make_gta5_cityscapes(tmp_path, source_bad)
    config = tiny_run_config(method, **merge({"train": {"iters": 3, "panels": 0}}, sections))
    config["data"].update({"source": {"name": "gta5", "root": str(gta), "split": "all", "options": {}},
                           "target": {"name": "cityscapes", "root": str(cs), "split": "train", "options": {}},
                           "val": {"name": "cityscapes", "root": str(cs), "split": "val", "options": {}},
                           "skip_bad_samples": True})
    return config


def test_skipping_run_counts_and_never_trains_on_bad_samples(tmp_path, monkeypatch):
    seen = []
    next_batch = BatchStream.__next__

    def spy(stream):
        batch = next_batch(stream)
        seen.extend(batch["name"])
        return batch

    monkeypatch.setattr(BatchStream, "__next__", spy)
    config = gta5_cityscapes_config(tmp_path, "source_only")
    metrics = Trainer(config, tmp_path / "run", progress=False, tensorboard=False).run()
    bad = sorted(_paths(tmp_path / "gta5")[i] for i in BAD)
    assert sorted(metrics["bad_files"]) == bad and metrics["skipped_samples"] >= 3
    assert BAD[2] in metrics["bad_files"][bad[1]]  # the reasons are kept (labels/00003.png: the size)
    assert len(seen) == 6 and not {os.path.basename(p) for p in bad} & set(seen)
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    counts = [int(r["skipped_samples"]) for r in rows]
    assert counts == sorted(counts) and counts[-1] == metrics["skipped_samples"] > 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["skipped_samples"] == counts[-1]


def test_target_passes_leave_bad_frames_out(tmp_path):
    config = gta5_cityscapes_config(tmp_path, "cbst")
    logger = RunLogger(str(tmp_path / "ctx"), 1, progress=False, tensorboard=False)
    ctx = TrainingContext(config, str(tmp_path / "ctx"), "cpu", logger, method_class("cbst"))
    batches = list(ctx.target_frames(batch_size=2))
    assert [b["index"].tolist() for b in batches] == [[0], [2, 3]]
    assert ctx.skip_log.count == 1 and list(ctx.skip_log.files) == [ctx.target.images[1]]
    assert ctx.target_frame_size() == (H, W)
    config["data"]["skip_bad_samples"] = False
    strict = TrainingContext(config, str(tmp_path / "ctx"), "cpu", logger, method_class("cbst"))
    with pytest.raises(BadSampleError, match=strict.target.images[1]):
        list(strict.target_frames(batch_size=2))
    logger.close()


def test_cbst_run_gives_bad_target_frames_no_pseudo_labels(tmp_path):
    config = gta5_cityscapes_config(tmp_path, "cbst", source_bad=(), cbst={"rounds": 1, "label_batch_size": 2})
    metrics = Trainer(config, tmp_path / "run", progress=False, tensorboard=False).run()
    stored = np.load(tmp_path / "run" / "cbst" / "round0_labels.npy")
    assert stored.shape == (4, H, W) and (stored[1] == 255).all() and (stored[[0, 2, 3]] != 255).any()
    assert list(metrics["bad_files"]) == [TARGET_BAD.format(tmp_path)]
    assert metrics["skipped_samples"] >= 2  # the two passes of the round, and the stream's replacements


def test_cli_names_the_bad_file_and_evaluation_never_skips(tmp_path):
    make_gta5_cityscapes(tmp_path)
    argv = ["--method", "source_only", "--source", "gta5", "--source-root", str(tmp_path / "gta5"),
            "--target", "cityscapes", "--target-root", str(tmp_path / "cityscapes"), "--iters", "1",
            "--batch-size", "2", "--out", str(tmp_path / "out"), "--set", "threads=1", "--set", "train.panels=0",
            "--set", "model.width=4", "--set", "model.feature_dim=32", "--set", "data.num_workers=2"]
    with pytest.raises(SystemExit) as info:
        train.main(argv)
    message = str(info.value)
    assert message.startswith("udafast.train: error: ") and "Traceback" not in message
    assert any(p in message for p in _paths(tmp_path / "gta5")[1:4]), message
    # with --skip-bad-samples training goes on, but a bad val frame still stops the run
    bad_val = tmp_path / "cityscapes" / "gtFine" / "val" / "lindau" / "lindau_000001_000019_gtFine_labelIds.png"
    save(str(bad_val), ids(0, GOOD_IDS, H // 2, W), "L")
    with pytest.raises(SystemExit, match=re.escape(f"error: {bad_val}: the label is (16, 48) (H, W)")):
        # (no loader workers here: the failed run's loader would be collected later, its queues first,
        # and its workers then take 5 s each to give up)
        train.main(argv + ["--skip-bad-samples", "--set", "data.num_workers=0"])
    rows = list(csv.DictReader(open(tmp_path / "out" / "log.csv")))  # it trained, then stopped at evaluation
    assert [r["iter"] for r in rows] == ["1"] and "skipped_samples" in rows[0]


def test_skip_bad_samples_must_be_a_bool(tmp_path):
    config = tiny_run_config("source_only", data={"skip_bad_samples": "yes"})
    with pytest.raises(ValueError, match="data.skip_bad_samples"):
        Trainer(config, tmp_path, progress=False, tensorboard=False).run()


def test_resume_keeps_the_count(tmp_path):
    config = gta5_cityscapes_config(tmp_path, "source_only", train={"iters": 4, "panels": 0})
    full, resumed = run_and_resume(config, tmp_path)
    assert full["skipped"]["count"] > 0 and resumed["skipped"] == full["skipped"]


def test_proda_passes_over_a_bad_target_frame(tmp_path):
    config = gta5_cityscapes_config(tmp_path, "proda", source_bad=(), train={"iters": 2, "stage_iters": 1, "panels": 0},
                                    data={"target_view": {"resize": [H, W]}})
    metrics = Trainer(config, tmp_path / "run", progress=False, tensorboard=False).run()
    assert list(metrics["bad_files"]) == [TARGET_BAD.format(tmp_path)]


def test_two_processes_count_every_processs_skips(tmp_path):
    """Under torchrun each process replaces within its share; metrics.json and the checkpoint hold
    the skips of both."""
    from test_distributed import torchrun

    gta, cs = make_gta5_cityscapes(tmp_path, source_bad=(1, 2))
    out = tmp_path / "out"
    torchrun("-m", "udafast.train", "--method", "source_only", "--source", "gta5", "--source-root", gta,
             "--target", "cityscapes", "--target-root", cs, "--iters", "3", "--batch-size", "1", "--out", out,
             "--skip-bad-samples", "--set", "threads=1", "--set", "train.panels=0", "--set", "model.width=4",
             "--set", "model.feature_dim=32")
    # the source stream (seed 2 * 0 + 1) gives each process one of the bad samples
    source = build_dataset("gta5", gta, "all")
    shares = [BatchStream(source, 1, None, seed=1, rank=r, world=2)._order(0) for r in (0, 1)]
    assert 2 in shares[0] and 1 in shares[1]
    metrics = json.loads((out / "metrics.json").read_text())
    bad = [_paths(gta)[i] for i in (1, 2)]
    # 3 iterations of one image per process: the whole epoch, so both bad samples were met
    assert metrics["processes"] == 2 and sorted(metrics["bad_files"]) == bad and metrics["skipped_samples"] >= 2
    assert load_checkpoint(out / "checkpoints" / "last.pt")["skipped"] == {"count": metrics["skipped_samples"],
                                                                            "files": metrics["bad_files"]}
