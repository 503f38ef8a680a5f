"""Every method runs alone on GTA5 -> Cityscapes data in the official layouts, given local roots
(tiny fixture trees: 4 GTA5 frames of 56x96, 4 Cityscapes train and 2 val frames of 48x96)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from udafast import train
from udafast.data.labels import CITYSCAPES_ID_TO_TRAIN
from udafast.methods import METHOD_NAMES

LABEL_IDS = np.array(sorted(CITYSCAPES_ID_TO_TRAIN), dtype=np.uint8)


def scene(rng, h, w):
    """A frame: coloured horizontal bands with their Cityscapes label ids (sky, building, road)."""
    ids = np.empty((h, w), np.uint8)
    ids[: h // 3], ids[h // 3: 2 * h // 3], ids[2 * h // 3:] = 23, 11, 7
    ids[rng.integers(0, h, 20), rng.integers(0, w, 20)] = rng.choice(LABEL_IDS, 20)
    colours = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    image = colours[ids] // 2 + rng.integers(0, 128, (h, w, 3), dtype=np.uint8)
    return image.astype(np.uint8), ids


def save(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array, mode).save(path)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("official")
    rng = np.random.default_rng(0)
    gta, cs = base / "GTA5", base / "cityscapes"
    for i in range(4):
        image, ids = scene(rng, 56, 96)
        save(str(gta / "images" / f"{i + 1:05d}.png"), image)
        label = Image.fromarray(ids, "P")
        label.putpalette(rng.integers(0, 256, 768).tolist())  # colours that are not the ids
        os.makedirs(gta / "labels", exist_ok=True)
        label.save(gta / "labels" / f"{i + 1:05d}.png")
    for split, n in (("train", 4), ("val", 2)):
        for i in range(n):
            image, ids = scene(rng, 48, 96)
            stem = f"aachen_{i:06d}_000019"
            save(str(cs / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png"), image)
            save(str(cs / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelIds.png"), ids)
    return gta, cs


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_method_runs_on_official_layouts(method, roots, tmp_path):
    gta, cs = roots
    out = tmp_path / method
    argv = ["--method", method, "--source", "gta5", "--source-root", str(gta), "--target", "cityscapes",
            "--target-root", str(cs), "--model", "small", "--iters", "1", "--batch-size", "2", "--out", str(out),
            "--set", "threads=1", "--set", "train.stage_iters=1", "--set", "train.panels=1",
            "--set", "pretrain={iters: 1}", "--set", "model.width=4", "--set", "model.feature_dim=32",
            "--set", "data.source_view={resize: [48, 80], crop: [32, 64]}",
            "--set", "data.target_view={resize: [48, 96], crop: [32, 64]}", "--set", "eval.input_size=[96, 48]"]
    if method in ("daformer", "mic"):  # tiny labels: no image holds 3000 pixels of a class
        argv += ["--set", f"{method}.rcs_min_pixels=0", "--set", f"{method}.ignore_bottom=8"]
    if method == "mic":
        argv += ["--set", "mic.mask_block_size=8"]
    metrics = train.main(argv)
    assert metrics["method"] == method
    on_disk = json.loads((out / "metrics.json").read_text())
    assert 0 <= on_disk["miou"] <= 100
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "panels").is_dir()


def test_missing_root_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(SystemExit) as e:
        train.main(["--method", "source_only", "--source", "gta5", "--source-root", str(missing),
                    "--out", str(tmp_path / "o")])
    assert str(missing) in str(e.value)
