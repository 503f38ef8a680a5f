"""python -m udafast.predict: label PNGs and overlays for any images, with a stand-in model."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import TinySeg
from udafast import evaluate, predict
from udafast.data.labels import colorize


@pytest.fixture
def tiny_model(monkeypatch):
    model = TinySeg()

    def load(path, device="cpu"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return model.to(device).eval()

    monkeypatch.setattr(evaluate, "load_model", load)
    return model


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)).save(folder / "b.jpg")
    (folder / "notes.txt").write_text("not an image")
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"stand-in")
    return folder, ckpt


def test_predict_folder_writes_labels_and_overlays(tmp_path, images, tiny_model, capsys):
    folder, ckpt = images
    out = tmp_path / "out"
    written = predict.main(["--checkpoint", str(ckpt), str(folder), "--out", str(out), "--input-size", "32x16",
                            "--device", "cpu", "--quiet"])
    assert written == [str(out / "a.png"), str(out / "b.png")]
    assert tiny_model.inputs == [(1, 3, 16, 32)] * 2
    for stem, (h, w) in (("a", (40, 48)), ("b", (24, 30))):
        label = np.array(Image.open(out / f"{stem}.png"))
        assert label.shape == (h, w) and label.max() < 19
        overlay = np.array(Image.open(out / "overlay" / f"{stem}.png"))
        assert overlay.shape == (h, w, 3)
    # the overlay is half image, half palette colour of the written label
    image = np.array(Image.open(folder / "a.png")).astype(np.float32)
    expected = np.round(0.5 * image + 0.5 * colorize(np.array(Image.open(out / "a.png")).astype(np.int64)))
    assert np.abs(np.array(Image.open(out / "overlay" / "a.png")).astype(np.float32) - expected).max() <= 1
    assert "wrote 2 predictions" in capsys.readouterr().out


def test_predict_native_size_matches_argmax(tmp_path, images, tiny_model):
    folder, ckpt = images
    out = tmp_path / "out"
    predict.main(["--checkpoint", str(ckpt), str(folder / "a.png"), "--out", str(out), "--quiet"])
    assert tiny_model.inputs == [(1, 3, 40, 48)]
    x = torch.from_numpy(np.array(Image.open(folder / "a.png"))).permute(2, 0, 1).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        logits = tiny_model((x - mean)[None] / std)["logits"]
    ref = F.interpolate(logits, size=(40, 48), mode="bilinear", align_corners=True)[0].argmax(0)
    assert np.array_equal(np.array(Image.open(out / "a.png")), ref.numpy().astype(np.uint8))


def test_predict_errors(tmp_path, images, tiny_model):
    folder, ckpt = images
    with pytest.raises(SystemExit) as e:
        predict.main(["--checkpoint", str(tmp_path / "none.pth"), str(folder), "--out", str(tmp_path / "o")])
    assert str(tmp_path / "none.pth") in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        predict.main(["--checkpoint", str(ckpt), str(tmp_path / "missing.png"), "--out", str(tmp_path / "o")])
    assert str(tmp_path / "missing.png") in str(e.value.code)
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(other / "a.png")
    with pytest.raises(SystemExit) as e:
        predict.main(["--checkpoint", str(ckpt), str(folder), str(other), "--out", str(tmp_path / "o")])
    assert "a.png" in str(e.value.code) and "both" in str(e.value.code)


def test_bad_files_do_not_stop_the_others(tmp_path, images, tiny_model, capsys):
    """A damaged image and a non-image among good ones: every good one is written, each bad one is
    listed with its reason at the end, and the exit status is 1."""
    folder, ckpt = images
    good = (folder / "a.png").read_bytes()
    (folder / "0_cut.png").write_bytes(good[: len(good) // 3])
    (folder / "c_text.jpg").write_text("not an image either")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        predict.main(["--checkpoint", str(ckpt), str(folder), str(folder / "notes.txt"), "--out", str(out), "--quiet"])
    assert e.value.code == "udafast.predict: error: 3 of 5 input files could not be read (listed above)"
    assert sorted(os.listdir(out)) == ["a.png", "b.png", "overlay"]
    assert sorted(os.listdir(out / "overlay")) == ["a.png", "b.png"]
    captured = capsys.readouterr()
    assert "wrote 2 predictions" in captured.out
    lines = captured.err.strip().splitlines()
    assert [line.split(": cannot be decoded (")[0] for line in lines] == [
        f"udafast.predict: could not read {folder / name}" for name in ("0_cut.png", "c_text.jpg", "notes.txt")]
    assert "truncated" in lines[0].lower() and "cannot identify image file" in lines[1]
