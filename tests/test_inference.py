"""Test-time augmentation (udafast.inference): mirror and multi-scale averaging and
sliding-window inference against hand computations on a tiny network whose output depends on
position, and the flags and config keys that reach it."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from conftest import TinySeg, tiny_run_config
from udafast import evaluate, predict as predict_cli
from udafast.data.transforms import normalize
from udafast.engine import evaluation
from udafast.inference import InferenceOptions, infer_probabilities, slide_windows, upsample


class PositionNet(nn.Module):
    """A 3x3 convolution with an asymmetric kernel and zero padding (so the mirror and the window
    borders change its output), then 2x2 average pooling (so logits need resizing), float64."""
    normalization = "imagenet"

    def __init__(self, classes=5):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv = nn.Conv2d(3, classes, 3, padding=1).double()
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g, dtype=torch.float64) * 2)
            self.conv.bias.copy_(torch.randn(classes, generator=g, dtype=torch.float64))
        self.inputs = []

    def forward(self, x):
        self.inputs.append(tuple(x.shape[-2:]))
        return {"logits": F.avg_pool2d(self.conv(x.double()), 2, ceil_mode=True)}


def up(logits, size):
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def softmax(z):
    """numpy softmax over the class axis 1."""
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def net_probs(net, x, size):
    """softmax(resize(f(x))) written out: the one-view prediction at `size`, numpy."""
    with torch.no_grad():
        return softmax(up(net(x)["logits"], size).numpy())


@pytest.fixture
def image():
    return torch.rand(2, 3, 12, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_flip_is_the_mean_of_the_image_and_the_mirror_mirrored_back(image):
    net, size = PositionNet(), (12, 20)
    plain = net_probs(net, image, size)
    mirror = net_probs(net, image.flip(-1), size)[..., ::-1]
    expected = (plain + mirror) / 2
    got = infer_probabilities(net, image, size, InferenceOptions(flip=True))
    assert got.dtype == torch.float32 and np.allclose(got.numpy(), expected, atol=1e-6)
    assert not np.allclose(plain, expected, atol=1e-3)  # the mirror matters for this network
    assert np.allclose(infer_probabilities(net, image, size).numpy(), plain, atol=1e-6)


def test_scales_resize_infer_resize_back_and_average(image):
    net, size = PositionNet(), (12, 20)
    views = []
    for s, scaled in ((0.5, (6, 10)), (1.0, (12, 20)), (1.5, (18, 30))):
        x = image if s == 1.0 else F.interpolate(image, size=scaled, mode="bilinear", align_corners=False)
        views.append(net_probs(net, x, size))
        views.append(net_probs(net, x.flip(-1), size)[..., ::-1])
    net.inputs.clear()
    got = infer_probabilities(net, image, size, InferenceOptions(flip=True, scales=(0.5, 1.0, 1.5)))
    assert net.inputs == [(6, 10)] * 2 + [(12, 20)] * 2 + [(18, 30)] * 2
    assert np.allclose(got.numpy(), sum(views) / 6, atol=1e-6)
    # without the mirror: the three scales alone
    got = infer_probabilities(net, image, size, InferenceOptions(scales=(0.5, 1.0, 1.5)))
    assert np.allclose(got.numpy(), sum(views[::2]) / 3, atol=1e-6)


def test_a_scale_applies_before_normalize():
    """The methods' passes resize the [0, 1] images, then normalise (crst_seg.py `val`)."""
    net, seen = PositionNet(), []
    images = torch.rand(1, 3, 10, 10, dtype=torch.float64)
    infer_probabilities(net, images, (10, 10), InferenceOptions(scales=(0.8,)),
                        normalize=lambda x: seen.append(tuple(x.shape[-2:])) or x - 0.5)
    assert seen == [(8, 8)]


def test_slide_windows_as_mmseg_lays_them():
    assert slide_windows((6, 10), (4, 4), (2, 3)) == [(0, 4, 0, 4), (0, 4, 3, 7), (0, 4, 6, 10),
                                                      (2, 6, 0, 4), (2, 6, 3, 7), (2, 6, 6, 10)]
    # the last window flush with the edge
    assert slide_windows((6, 9), (4, 4), (4, 4)) == [(0, 4, 0, 4), (0, 4, 4, 8), (0, 4, 5, 9),
                                                     (2, 6, 0, 4), (2, 6, 4, 8), (2, 6, 5, 9)]
    # a window larger than the image is the image
    assert slide_windows((3, 5), (8, 8), (4, 4)) == [(0, 3, 0, 5)]


def test_slide_sums_the_windows_logits_and_divides_by_the_count(image):
    net, size = PositionNet(), (12, 20)
    windows = [(y, y + 8, x, x + 8) for y in (0, 4) for x in (0, 6, 12)]  # crop 8x8, stride 4x6, by hand
    total, count = np.zeros((2, 5, 12, 20)), np.zeros((12, 20))
    with torch.no_grad():
        for y1, y2, x1, x2 in windows:
            total[:, :, y1:y2, x1:x2] += up(net(image[..., y1:y2, x1:x2])["logits"], (8, 8)).numpy()
            count[y1:y2, x1:x2] += 1
    assert count.min() == 1 and count.max() == 4
    expected = softmax(total / count)
    net.inputs.clear()
    got = infer_probabilities(net, image, size, InferenceOptions(crop=(8, 8), stride=(4, 6)))
    assert net.inputs == [(8, 8)] * 6
    assert np.allclose(got.numpy(), expected, atol=1e-6)
    assert not np.allclose(got.numpy(), net_probs(net, image, size), atol=1e-3)  # the windows' borders matter
    # with the mirror: each view is slid over, the mirror's result mirrored back
    mirrored = np.zeros((2, 5, 12, 20))
    flipped = image.flip(-1)
    with torch.no_grad():
        for y1, y2, x1, x2 in windows:
            mirrored[:, :, y1:y2, x1:x2] += up(net(flipped[..., y1:y2, x1:x2])["logits"], (8, 8)).numpy()
    expected = (expected + softmax(mirrored / count)[..., ::-1]) / 2
    got = infer_probabilities(net, image, size, InferenceOptions(flip=True, crop=(8, 8), stride=(4, 6)))
    assert np.allclose(got.numpy(), expected, atol=1e-6)


def test_a_window_larger_than_the_image_is_whole_image_inference(image):
    net = PositionNet()
    whole = infer_probabilities(net, image, (12, 20))
    assert torch.equal(infer_probabilities(net, image, (12, 20), InferenceOptions(crop=(16, 32), stride=(8, 8))), whole)


def test_resize_probabilities_softmaxes_first(image):
    """ProDA's generate_pseudo_label.py: softmax at the output stride, then upsampled."""
    net = PositionNet()
    with torch.no_grad():
        plain = up(F.softmax(net(image)["logits"], 1), (12, 20)).numpy()
        mirror = up(F.softmax(net(image.flip(-1))["logits"], 1), (12, 20)).numpy()[..., ::-1]
    got = infer_probabilities(net, image, (12, 20), InferenceOptions(flip=True), resize_probabilities=True)
    assert np.allclose(got.numpy(), (plain + mirror) / 2, atol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    ({"flip": 1}, "--flip: expected true or false, got 1"),
    ({"scales": []}, "--scales: expected a number > 0 or a list of them, got []"),
    ({"scales": [1.0, 0]}, "--scales: expected a number > 0 or a list of them, got [1.0, 0]"),
    ({"crop": (8, 8)}, "--stride: needed with --slide (sliding-window inference takes both)"),
    ({"stride": (8, 8)}, "--slide: needed with --stride (sliding-window inference takes both)"),
    ({"crop": (8, 0), "stride": (4, 4)}, "--slide: expected two positive ints [H, W], got (8, 0)"),
    ({"crop": (8, 8), "stride": (4, 9)}, "--stride: [4, 9] is larger than the window --slide [8, 8], "
                                         "which would leave pixels out"),
])
def test_bad_options_name_the_flag(kwargs, message):
    with pytest.raises(ValueError) as e:
        InferenceOptions.create(**kwargs, names=("--flip", "--scales", "--slide", "--stride"))
    assert str(e.value) == message


def test_config_options_name_their_keys():
    assert InferenceOptions.from_config({"flip": True, "scales": [0.5, 1], "slide": {"crop": [8, 8], "stride": 4}}) \
        == InferenceOptions(True, (0.5, 1.0), (8, 8), (4, 4))
    assert InferenceOptions.from_config({"flip": False, "scales": [1.0], "slide": {"crop": None, "stride": None}}).plain
    with pytest.raises(ValueError, match=r"^eval\.slide\.stride: needed with eval\.slide\.crop"):
        InferenceOptions.from_config({"slide": {"crop": [8, 8]}})
    with pytest.raises(ValueError, match=r"^eval\.slide: expected \{crop: \[H, W\], stride: \[H, W\]\}, got"):
        InferenceOptions.from_config({"slide": {"crop": [8, 8], "strides": [4, 4]}})
    with pytest.raises(ValueError, match=r"^cbst\.label_scale: expected a number > 0"):
        InferenceOptions.from_config({"label_scale": -1}, "cbst", scales="label_scale")


# -- evaluation and prediction --------------------------------------------------------------------
def test_predict_without_options_is_unchanged():
    """No flags: the same logits, bit for bit, as the one-view code path has always made."""
    model = TinySeg().eval()
    img = torch.rand(3, 20, 36, generator=torch.Generator().manual_seed(2))
    old = F.interpolate(model(normalize(img, "imagenet")[None])["logits"].float(), size=(20, 36),
                        mode="bilinear", align_corners=True)[0]
    assert torch.equal(evaluation.predict(model, img), old)
    assert torch.equal(evaluation.predict(model, img, inference=InferenceOptions()), old)


def test_predict_with_options_averages_the_views_of_the_network_input():
    net = PositionNet()
    img = torch.rand(3, 12, 20, generator=torch.Generator().manual_seed(2))
    x = normalize(img, "imagenet")[None]
    x = F.interpolate(x, size=(8, 16), mode="bilinear", align_corners=False, antialias=True)  # --input-size 16x8
    expected = (net_probs(net, x, (12, 20)) + net_probs(net, x.flip(-1), (12, 20))[..., ::-1]) / 2
    got = evaluation.predict(net, img, input_size=(16, 8), inference=InferenceOptions(flip=True))
    assert got.shape == (5, 12, 20) and np.allclose(got.numpy(), expected[0], atol=1e-6)


class Samples:
    def __init__(self, n=2):
        g = torch.Generator().manual_seed(4)
        self.samples = [{"image": torch.rand(3, 12, 20, generator=g),
                         "label": torch.randint(0, 5, (12, 20), generator=g), "name": f"s{i}.png"} for i in range(n)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def test_evaluate_model_scores_the_averaged_prediction():
    net, data = PositionNet(), Samples()
    options = InferenceOptions(flip=True, scales=(0.5, 1.0))
    preds = {}
    result = evaluation.evaluate_model(net, data, inference=options,
                                       on_prediction=lambda i, s, p: preds.__setitem__(i, p))
    cm = evaluation.ConfusionMatrix()
    for i, sample in enumerate(data.samples):
        x = normalize(sample["image"], "imagenet")[None]
        half = F.interpolate(x, size=(6, 10), mode="bilinear", align_corners=False)
        views = [net_probs(net, v, (12, 20)) for v in (half, x)]
        views += [net_probs(net, v.flip(-1), (12, 20))[..., ::-1] for v in (half, x)]
        expected = torch.from_numpy(sum(views)[0].argmax(0))
        assert torch.equal(preds[i], expected)
        cm.update(expected, sample["label"])
    assert result["confusion_matrix"] == cm.matrix.tolist()
    # no options: the same scores as before they existed
    plain = evaluation.evaluate_model(net, data)
    same = evaluation.evaluate_model(net, data, inference=InferenceOptions())
    assert plain["confusion_matrix"] == same["confusion_matrix"] and plain["miou"] == same["miou"]
    assert plain["confusion_matrix"] != result["confusion_matrix"]


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
    model = TinySeg()
    monkeypatch.setattr(evaluate, "load_model", lambda path, device="cpu": model.to(device).eval())
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"stand-in")
    return model, ckpt


def _hand_flip_scales(model, path, scales):
    """argmax of the softmax averaged over `scales` and mirrors, by hand, for the image file `path`."""
    x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    x = normalize(x, "imagenet")[None]
    size = tuple(x.shape[-2:])
    total = 0
    with torch.no_grad():
        for s in scales:
            v = x if s == 1 else F.interpolate(x, size=(round(size[0] * s), round(size[1] * s)), mode="bilinear",
                                               align_corners=False)
            total = total + softmax(up(model(v)["logits"], size).numpy())
            total = total + softmax(up(model(v.flip(-1))["logits"], size).numpy())[..., ::-1]
    return total[0].argmax(0)


def test_predict_cli_flags(tmp_path, stand_in):
    model, ckpt = stand_in
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    predict_cli.main(["--checkpoint", str(ckpt), str(tmp_path / "a.png"), "--out", str(out), "--quiet",
                      "--flip", "--scales", "0.5", "1"])
    assert model.inputs == [(1, 3, 20, 24)] * 2 + [(1, 3, 40, 48)] * 2
    expected = _hand_flip_scales(model, tmp_path / "a.png", (0.5, 1.0))
    assert np.array_equal(np.array(Image.open(out / "a.png")), expected.astype(np.uint8))
    with pytest.raises(SystemExit) as e:
        predict_cli.main(["--checkpoint", str(ckpt), str(tmp_path / "a.png"), "--out", str(out), "--slide", "8", "8"])
    assert str(e.value.code) == "udafast.predict: error: --stride: needed with --slide (sliding-window inference " \
                                "takes both)"


def test_evaluate_cli_flags(tmp_path, stand_in):
    from test_evaluation import make_cityscapes

    model, ckpt = stand_in
    root = tmp_path / "cs"
    make_cityscapes(root)
    args = ["--checkpoint", str(ckpt), "--root", str(root), "--device", "cpu", "--quiet"]
    evaluate.main(args + ["--slide", "16", "32", "--stride", "16", "16", "--json", str(tmp_path / "r.json")])
    assert set(model.inputs) == {(1, 3, 16, 32)} and len(model.inputs) == 2 * 6  # 2 images x 2x3 windows
    meta = json.loads((tmp_path / "r.json").read_text())["inference"]
    assert meta == {"flip": False, "scales": [1.0], "slide": {"crop": [16, 32], "stride": [16, 16]}}
    with pytest.raises(SystemExit) as e:
        evaluate.main(args + ["--scales", "1", "0"])
    assert str(e.value.code) == "udafast.evaluate: error: --scales: expected a number > 0 or a list of them, " \
                                "got [1.0, 0.0]"


# -- the trainer's validation ---------------------------------------------------------------------
def test_trainer_validation_uses_the_eval_options(tmp_path, monkeypatch, one_thread):
    from udafast.engine import trainer

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["inference"])
        return evaluation.evaluate_model(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate_model", spy)
    config = tiny_run_config(eval={"flip": True, "scales": [0.5, 1.0],
                                   "slide": {"crop": [16, 32], "stride": [16, 16]}, "max_images": 1},
                             train={"panels": 0})
    trainer.Trainer(config, tmp_path / "run", progress=False, tensorboard=False).run()
    assert seen and all(o == InferenceOptions(True, (0.5, 1.0), (16, 32), (16, 16)) for o in seen)
    bad = tiny_run_config(eval={"flip": "yes"})
    with pytest.raises(ValueError, match=r"^eval\.flip: expected true or false, got 'yes'$"):
        trainer.Trainer(bad, tmp_path / "bad", progress=False, tensorboard=False).run()


@pytest.mark.parametrize("size_in,size_out", [((16, 32), (128, 256)), ((7, 5), (33, 70)), ((1, 9), (4, 4)),
                                              ((12, 12), (5, 7)), ((3, 1), (3, 8))])
def test_upsample_with_gradient_equals_interpolate(size_in, size_out):
    """The matrix-product form (taken when a gradient flows) gives F.interpolate's values and
    gradients to float rounding, up- and downsampling, with a side of 1."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *size_in, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, *size_out, generator=g, dtype=torch.float64)
    ours = upsample(x, size_out)
    (ours * y).sum().backward()
    grad, x.grad = x.grad.clone(), None
    ref = F.interpolate(x, size=size_out, mode="bilinear", align_corners=True)
    (ref * y).sum().backward()
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, x.grad, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        assert torch.equal(upsample(x, size_out), F.interpolate(x, size=size_out, mode="bilinear", align_corners=True))
