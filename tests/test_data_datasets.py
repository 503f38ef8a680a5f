"""Datasets in their official layouts (SPEC part 3), checked pixel by pixel on tiny fixture trees."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from udafast import data
from udafast.data import check, io
from udafast.data.labels import PALETTE

W, H = 3, 2  # every fixture image is 2 x 3 (H x W)


def rgb(seed, h=H, w=W):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save_rgb(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr, "RGB").save(path)


def save_palette(path, indices):
    """A palette PNG whose colours are NOT the indices (Cityscapes colours, scrambled)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(np.asarray(indices, np.uint8), "P")
    pal = np.zeros((256, 3), np.uint8)
    pal[:] = np.random.default_rng(1).integers(0, 256, (256, 3))
    pal[:19] = PALETTE
    im.putpalette(pal.reshape(-1).tolist())
    im.save(path)


def save_gray(path, values, dtype=np.uint8):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(values, dtype)).save(path)


def as_image(arr):
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255


# ---- GTA5: palette indices are Cityscapes label ids ----------------------------------------------
GTA_IDS = {
    "00001.png": [[7, 8, 0], [26, 1, 24]],      # 0 (unlabeled) and 1 (ego vehicle) -> 255
    "00002.png": [[11, 12, 13], [17, 19, 20]],
    "00003.png": [[21, 22, 23], [25, 9, 33]],   # 9 parking -> 255
}
GTA_TRAIN = {
    "00001.png": [[0, 1, 255], [13, 255, 11]],
    "00002.png": [[2, 3, 4], [5, 6, 7]],
    "00003.png": [[8, 9, 10], [12, 255, 18]],
}


@pytest.fixture
def gta5_root(tmp_path):
    root = tmp_path / "gta5"
    for i, (name, ids) in enumerate(GTA_IDS.items()):
        save_rgb(str(root / "images" / name), rgb(i))
        save_palette(str(root / "labels" / name), ids)
    return root


def test_gta5_pixels(gta5_root):
    ds = data.build_dataset("gta5", gta5_root, "all")
    assert len(ds) == 3 and ds.labelled
    for i, name in enumerate(GTA_IDS):
        s = ds[i]
        assert s["name"] == name
        assert s["image"].dtype == torch.float32 and s["image"].shape == (3, H, W)
        assert torch.equal(s["image"], as_image(rgb(i)))
        assert s["label"].dtype == torch.int64
        assert s["label"].tolist() == GTA_TRAIN[name], name
    assert len(data.build_dataset("gta5", gta5_root, "train")) == 3  # alias


def test_gta5_list_file(gta5_root, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("00003.png\n00001.png\n")
    ds = data.build_dataset("gta5", gta5_root, "all", list_file=str(lst))
    assert [ds[i]["name"] for i in range(len(ds))] == ["00003.png", "00001.png"]


def test_gta5_missing_label_names_path(gta5_root):
    os.remove(gta5_root / "labels" / "00002.png")
    with pytest.raises(FileNotFoundError, match=str(gta5_root / "labels" / "00002.png")):
        data.build_dataset("gta5", gta5_root, "all")


# ---- Cityscapes -----------------------------------------------------------------------------------
CS = {  # (split, city, stem) -> labelIds
    ("train", "aachen", "aachen_000000_000019"): [[7, 8, 1], [26, 24, 33]],
    ("train", "bremen", "bremen_000001_000019"): [[4, 23, 31], [32, 28, 27]],
    ("val", "lindau", "lindau_000000_000019"): [[7, 7, 7], [7, 7, 7]],
}
CS_TRAIN = {
    "aachen_000000_000019": [[0, 1, 255], [13, 11, 18]],
    "bremen_000001_000019": [[255, 10, 16], [17, 15, 14]],
}


@pytest.fixture
def cs_root(tmp_path):
    root = tmp_path / "cityscapes"
    for i, ((split, city, stem), ids) in enumerate(CS.items()):
        save_rgb(str(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"), rgb(10 + i))
        if split == "train":  # val is unlabelled: no gtFine/val
            save_gray(str(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"), ids)
    return root


def test_cityscapes_pixels(cs_root):
    ds = data.build_dataset("cityscapes", cs_root, "train")
    assert len(ds) == 2 and ds.labelled
    for i, stem in enumerate(CS_TRAIN):
        s = ds[i]
        assert s["name"] == f"{stem}_leftImg8bit.png"
        assert torch.equal(s["image"], as_image(rgb(10 + i)))
        assert s["label"].tolist() == CS_TRAIN[stem]


def test_cityscapes_unlabelled_split(cs_root):
    ds = data.build_dataset("cityscapes", cs_root, "val")
    assert len(ds) == 1 and not ds.labelled
    s = ds[0]
    assert "label" not in s and s["image"].shape == (3, H, W)
    # target training reads no labels even where they exist
    assert "label" not in data.build_dataset("cityscapes", cs_root, "train", labels=False)[0]


def test_cityscapes_missing_label_in_labelled_split(cs_root):
    missing = cs_root / "gtFine" / "train" / "bremen" / "bremen_000001_000019_gtFine_labelIds.png"
    os.remove(missing)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        data.build_dataset("cityscapes", cs_root, "train")
    # ...but target training, which needs no labels, still works
    assert len(data.build_dataset("cityscapes", cs_root, "train", labels=False)) == 2


# ---- SYNTHIA: 16-bit RGB, class id in red -------------------------------------------------------
SY_RED = {
    "0000001.png": [[3, 4, 2], [21, 0, 13]],       # 0 void, 13 parking-slot -> 255
    "0000002.png": [[5, 7, 15], [22, 14, 16]],     # 22 lanemarking, 14, 16 terrain: no train id -> 255
}
SY_TRAIN = {
    "0000001.png": [[0, 1, 2], [3, 255, 255]],
    "0000002.png": [[4, 5, 6], [255, 255, 255]],
}


def save_synthia_label(path, red, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 65536, (H, W, 3)).astype(np.uint16)  # instance ids etc.
    arr[..., 0] = red
    io.write_png16(path, arr, filters=(0, 1, 2, 3, 4))


@pytest.fixture
def synthia_root(tmp_path):
    root = tmp_path / "synthia"
    for i, (name, red) in enumerate(SY_RED.items()):
        save_rgb(str(root / "RGB" / name), rgb(20 + i))
        save_synthia_label(str(root / "GT" / "LABELS" / name), red, i)
    return root


def test_synthia_pixels(synthia_root):
    ds = data.build_dataset("synthia", synthia_root, "train")
    assert len(ds) == 2
    for i, name in enumerate(SY_RED):
        s = ds[i]
        assert s["name"] == name
        assert torch.equal(s["image"], as_image(rgb(20 + i)))
        assert s["label"].tolist() == SY_TRAIN[name], name


def test_png16_decoders_agree(tmp_path):
    arr = np.random.default_rng(5).integers(0, 65536, (9, 11, 3)).astype(np.uint16)
    path = str(tmp_path / "x.png")
    io.write_png16(path, arr, filters=(0, 1, 2, 3, 4))
    assert np.array_equal(io._read_png16_pillow(path), arr)
    assert np.array_equal(io._read_png16_numpy(path), arr)
    assert np.array_equal(io.read_label(path), arr[..., 0])


# ---- folder + YAML --------------------------------------------------------------------------------
@pytest.fixture
def folder_root(tmp_path):
    root = tmp_path / "mine"
    save_rgb(str(root / "images" / "a.png"), rgb(30))
    save_rgb(str(root / "images" / "b.png"), rgb(31))
    save_gray(str(root / "labels" / "a.png"), [[10, 20, 30], [0, 10, 20]])
    save_gray(str(root / "labels" / "b.png"), [[1000, 30, 40], [20, 0, 10]], np.uint16)  # 16-bit grey
    (root / "labels.yaml").write_text("mapping:\n  0: 255\n  10: 0\n  20: 5\n  30: 18\n  40: 255\n  1000: 2\n")
    return root


def test_folder_pixels(folder_root):
    ds = data.build_dataset("folder", folder_root)
    assert [ds[i]["name"] for i in range(2)] == ["a.png", "b.png"]
    assert ds[0]["label"].tolist() == [[0, 5, 18], [255, 0, 5]]
    assert ds[1]["label"].tolist() == [[2, 18, 255], [5, 255, 0]]  # 40 is mapped to ignore
    assert torch.equal(ds[1]["image"], as_image(rgb(31)))


def test_folder_flat_yaml_elsewhere(folder_root, tmp_path):
    other = tmp_path / "map.yaml"
    other.write_text("0: 255\n10: 1\n20: 1\n30: 1\n")
    ds = data.build_dataset("folder", folder_root, mapping=str(other))
    assert ds[0]["label"].tolist() == [[1, 1, 1], [255, 1, 1]]
    other.write_text("10: 19\n")
    with pytest.raises(ValueError, match="mapping"):
        data.build_dataset("folder", folder_root, mapping=str(other))


# ---- errors, registry, labels ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gta5", "cityscapes", "synthia", "folder"])
def test_missing_root_names_path(tmp_path, name):
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(root)):
        data.build_dataset(name, root, "train")


def test_unknown_name_and_split(gta5_root, cs_root):
    with pytest.raises(ValueError, match="name"):
        data.build_dataset("gta6", gta5_root, "all")
    with pytest.raises(ValueError, match="split"):
        data.build_dataset("gta5", gta5_root, "val")
    with pytest.raises(ValueError, match="split"):
        data.build_dataset("cityscapes", cs_root, "all")


def test_registry():
    calls = []

    def factory(root, split, transform=None, **options):
        calls.append((root, split, options))
        return [{"image": torch.zeros(3, 2, 2)}]

    data.register_dataset("test-dummy", factory)
    try:
        assert "test-dummy" in data.dataset_names()
        assert data.build_dataset("test-dummy", "r", "s", size=4)[0]["image"].shape == (3, 2, 2)
        assert calls == [("r", "s", {"size": 4})]
        with pytest.raises(ValueError, match="name"):
            data.register_dataset("test-dummy", lambda *a, **k: None)
    finally:
        data.datasets._REGISTRY.pop("test-dummy")


def test_transform_is_applied(gta5_root):
    from udafast.data import transforms as T

    ds = data.build_dataset("gta5", gta5_root, "all", transform=T.RandomHorizontalFlip(p=1.0))
    assert ds[0]["label"].tolist() == [row[::-1] for row in GTA_TRAIN["00001.png"]]


def test_labels_module():
    assert len(data.CLASS_NAMES) == 19 and data.CLASS_NAMES[0] == "road" and data.CLASS_NAMES[18] == "bicycle"
    assert data.SYNTHIA_16 == (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
    assert data.SYNTHIA_13 == (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
    out = data.colorize(torch.tensor([[0, 10], [255, 18]]))
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [128, 64, 128] and out[0, 1].tolist() == [70, 130, 180]
    assert out[1, 0].tolist() == [0, 0, 0] and out[1, 1].tolist() == [119, 11, 32]


# ---- check ----------------------------------------------------------------------------------------
def test_check_clean(cs_root, capsys):
    assert check.main(["cityscapes", str(cs_root)]) == 0
    out = capsys.readouterr().out
    assert "OK: no problems found" in out
    # 12 labelled pixels in 2 images: road 1, ignore 2 (labelIds 1 and 4)
    assert f"road           {100 / 12:7.3f}%" in out and f"ignore         {200 / 12:7.3f}%" in out


def test_check_reports_problems(gta5_root, capsys):
    save_palette(str(gta5_root / "labels" / "00002.png"), [[7, 7], [7, 7]])          # 2x2 vs 2x3 image
    save_palette(str(gta5_root / "labels" / "00003.png"), [[7, 40, 7], [7, 7, 7]])   # 40: outside the table
    save_rgb(str(gta5_root / "images" / "00004.png"), rgb(4))                        # no label
    assert check.main(["gta5", str(gta5_root)]) == 1
    out = capsys.readouterr().out
    assert "size mismatches: 1" in out and "00002.png" in out
    assert "id 40: 1 pixels in 1 files" in out
    assert f"label files with ids outside the table: 1\n  {gta5_root / 'labels' / '00003.png'}: 40" in out
    assert str(gta5_root / "labels" / "00004.png") in out
    assert "PROBLEMS: 3" in out


@pytest.mark.filterwarnings("ignore:'udafast.data.check' found in sys.modules")
def test_check_as_main_module(synthia_root, monkeypatch, capsys):
    """`python -m udafast.data.check ...` (run in this process: a new interpreter costs seconds)."""
    import runpy

    save_synthia_label(str(synthia_root / "GT" / "LABELS" / "0000002.png"), [[5, 7, 15], [259, 300, 16]], 1)
    monkeypatch.setattr(sys, "argv", ["check", "synthia", str(synthia_root), "--split", "all"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("udafast.data.check", run_name="__main__", alter_sys=True)
    out = capsys.readouterr().out
    assert exit_info.value.code == 1, out
    # 259 (= 256 + 3) and 300 are outside SYNTHIA's table; 16 (terrain) is a SYNTHIA class without a train id
    assert "id 259" in out and "id 300" in out and "id 16:" not in out
