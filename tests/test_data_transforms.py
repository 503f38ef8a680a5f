"""Transforms keep image and label aligned; the strong view's recorded geometry warps labels and
maps exactly as it warped the image; everything is deterministic given a torch.Generator."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import default_collate

from conftest import gen
from udafast.data import strong_view as S
from udafast.data import transforms as T

GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


def block_sample(h=48, w=64, block=8, seed=0):
    """A label of constant blocks (ids 0..18) and an image whose channel 0 is label / 32: the
    label is a function of the image wherever the image is not blended across blocks."""
    g = gen(seed)
    coarse = torch.randint(0, 19, (h // block + 1, w // block + 1), generator=g)
    label = coarse.repeat_interleave(block, 0).repeat_interleave(block, 1)[:h, :w].contiguous()
    image = torch.stack([label.float() / 32, torch.rand(h, w, generator=g), torch.full((h, w), 0.25)])
    return {"image": image, "label": label, "name": "x.png"}


def interior(label, r=2):
    """Pixels whose (2r+1)^2 neighbourhood in `label` is one value, away from the border (where
    the image may have been blended with pixels cropped away)."""
    x = label.float()[None, None]
    hi = F.max_pool2d(x, 2 * r + 1, 1, r)
    lo = -F.max_pool2d(-x, 2 * r + 1, 1, r)
    out = (hi == lo)[0, 0]
    out[:r], out[-r:], out[:, :r], out[:, -r:] = False, False, False, False
    return out


def assert_aligned(sample):
    img, lab = sample["image"], sample["label"]
    assert img.shape[-2:] == lab.shape
    ok = interior(lab, 1) & (lab != 255)
    assert ok.sum() > 0.2 * (lab != 255).sum()
    assert torch.allclose(img[0][ok] * 32, lab[ok].float(), atol=1e-3)
    pad = lab == 255
    assert torch.all(img[:, pad] == 0)  # only padding makes 255 here, and pads images with 0


@pytest.mark.parametrize("seed", range(4))
def test_weak_pipeline_keeps_alignment(seed):
    t = T.Compose([T.RandomScale((0.5, 1.5)), T.RandomCrop((40, 56)), T.RandomHorizontalFlip(0.5)])
    out = t(block_sample(block=12), generator=gen(seed))
    assert out["image"].shape == (3, 40, 56) and out["label"].shape == (40, 56)
    assert out["label"].dtype == torch.int64
    assert_aligned(out)


def test_resize_and_flip_exact():
    s = block_sample(block=16)
    out = T.Resize((24, 32))(s)
    assert out["image"].shape == (3, 24, 32) and out["label"].shape == (24, 32)
    assert torch.equal(out["label"], s["label"][1::2, 1::2])  # nearest at pixel centres
    assert_aligned(out)
    assert T.Resize(24)(s)["image"].shape == (3, 24, 32)  # shorter side
    f = T.RandomHorizontalFlip(p=1.0)(s)
    assert torch.equal(f["label"], s["label"].flip(-1)) and torch.equal(f["image"], s["image"].flip(-1))


def test_crop_pads_small_samples():
    s = block_sample(h=16, w=16)
    out = T.RandomCrop((24, 20))(s, generator=gen(0))
    assert out["label"].shape == (24, 20)
    assert torch.all(out["label"][16:] == 255) and torch.all(out["label"][:, 16:] == 255)
    assert torch.all(out["image"][:, 16:] == 0) and torch.all(out["image"][:, :, 16:] == 0)
    assert torch.equal(out["label"][:16, :16], s["label"])


def test_normalize_modes():
    img = torch.tensor([1.0, 0.0, 0.5]).view(3, 1, 1).expand(3, 2, 2).clone()
    caffe = T.normalize(img, "caffe")
    expected = torch.tensor([127.5 - 104.00698793, 0 - 116.66876762, 255 - 122.67891434])
    assert torch.allclose(caffe[:, 0, 0], expected, atol=1e-4)
    imnet = T.normalize(img, "imagenet")
    assert torch.allclose(imnet[:, 0, 0], torch.tensor([(1 - .485) / .229, (0 - .456) / .224, (.5 - .406) / .225]))
    for mode in ("caffe", "imagenet"):
        assert torch.allclose(T.denormalize(T.normalize(img, mode), mode), img, atol=1e-5)
    out = T.Normalize("caffe")({"image": img, "image_strong": img, "label": torch.zeros(2, 2, dtype=torch.long)})
    assert torch.equal(out["image"], caffe) and torch.equal(out["image_strong"], caffe)
    with pytest.raises(ValueError, match="mode"):
        T.Normalize("bgr")


def test_strong_view_deterministic_by_seed():
    s = block_sample()
    a = S.StrongView()(s, generator=gen(3))
    b = S.StrongView()(s, generator=gen(3))
    assert torch.equal(a["image_strong"], b["image_strong"]) and torch.equal(a["label_strong"], b["label_strong"])
    for k in ("theta", "flip", "cutout"):
        assert torch.equal(a["strong_params"][k], b["strong_params"][k])
    others = [S.StrongView()(s, generator=gen(seed))["image_strong"] for seed in range(4, 8)]
    assert any(not torch.equal(a["image_strong"], o) for o in others)
    assert torch.equal(a["image"], s["image"])  # the weak image stays


@pytest.mark.parametrize("seed", range(6))
def test_strong_view_geometry_matches_label(seed):
    """Geometric ops only (always applied), no cutout: the strong image's channel 0 is still
    label / 32 wherever it is not blended, with the label from warp_like / StrongView."""
    s = block_sample()
    view = S.StrongView(ops=GEOMETRIC, op_p=1.0, cutout_p=0.0)
    out = view(s, generator=gen(seed))
    params = out["strong_params"]
    assert not torch.equal(params["theta"], torch.eye(2, 3))
    lab = S.warp_like(s["label"], params, "nearest")
    assert torch.equal(lab, out["label_strong"])
    soft = S.warp_like(s["label"].float(), params, "bilinear", fill=255.0)
    unblended = (soft == lab.float()) & (lab != 255) & interior(lab, 1)
    assert unblended.sum() > 0.2 * lab.numel()
    assert torch.allclose(out["image_strong"][0][unblended] * 32, lab[unblended].float(), atol=1e-3)
    # outside the source: grey 0.5 in the image, 255 in the label
    _, mask = S.warp_like(s["label"], params, "nearest", return_mask=True)
    assert torch.equal(~mask, lab == 255)


@pytest.mark.parametrize("seed", range(3))
def test_warp_like_any_resolution(seed):
    """A map at half resolution warps to (nearly) the half-resolution strong label."""
    s = block_sample(h=96, w=128, block=16)
    out = S.StrongView(ops=GEOMETRIC, op_p=1.0)(s, generator=gen(seed))
    half = F.interpolate(s["label"][None, None].float(), size=(48, 64), mode="nearest-exact")[0, 0].long()
    warped = S.warp_like(half, out["strong_params"], "nearest")
    ref = F.interpolate(out["label_strong"][None, None].float(), size=(48, 64), mode="nearest-exact")[0, 0].long()
    assert (warped == ref).float().mean() > 0.9
    # soft labels / features [C, h, w]
    onehot = F.one_hot(half.clamp(max=18), 19).permute(2, 0, 1).float()
    soft = S.warp_like(onehot, out["strong_params"], "bilinear")
    agree = (soft.argmax(0) == warped) | (warped == 255)
    assert agree.float().mean() > 0.9


def test_flip_and_cutout_only():
    s = block_sample()
    out = S.StrongView(ops=("Identity",), flip_p=1.0, cutout_p=1.0, label_cutout_ignore=True)(s, generator=gen(0))
    p = out["strong_params"]
    assert torch.equal(p["theta"], torch.eye(2, 3)) and bool(p["flip"])
    x0, y0, x1, y1 = p["cutout"].tolist()
    h, w = s["label"].shape
    box = (slice(round(y0 * h), round(y1 * h)), slice(round(x0 * w), round(x1 * w)))
    assert box[0].stop - box[0].start == min(h, w) // 3 == box[1].stop - box[1].start
    expected_img = s["image"].flip(-1).clone()
    expected_img[:, box[0], box[1]] = 0.5
    assert torch.equal(out["image_strong"], expected_img)
    expected_lab = s["label"].flip(-1).clone()
    expected_lab[box] = 255
    assert torch.equal(out["label_strong"], expected_lab)
    # without the cutout fill, warp_like only flips
    assert torch.equal(S.warp_like(s["label"], p, "nearest"), s["label"].flip(-1))


def test_identity_view_is_exact():
    s = block_sample()
    out, p = S.strong_augment(s["image"], gen(0), ops=("Identity",), flip_p=0.0, cutout_p=0.0)
    assert torch.equal(out, s["image"])


@pytest.mark.parametrize("op", S.RANDAUGMENT_OPS)
def test_each_op_runs(op):
    img = torch.rand(3, 20, 24, generator=gen(1))
    out, p = S.strong_augment(img, gen(2), ops=(op,), op_p=1.0, flip_p=0.0, cutout_p=0.0)
    assert out.shape == img.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert p["ops"].startswith(op)
    if op == "Identity":
        assert torch.equal(out, img)
    elif op in GEOMETRIC:
        assert not torch.equal(p["theta"], torch.eye(2, 3))
    else:
        assert torch.equal(p["theta"], torch.eye(2, 3)) and not torch.equal(out, img)


def test_equalize_matches_pillow():
    arr = np.random.default_rng(0).integers(40, 120, (16, 20, 3), dtype=np.uint8)
    img = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    ours = (S._equalize(img, 0.5) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(ours, np.asarray(ImageOps.equalize(Image.fromarray(arr))))


def test_batched_params_and_collate():
    samples = [block_sample(seed=i) for i in range(3)]
    g = gen(0)
    view = S.StrongView()
    outs = [view(s, generator=g) for s in samples]
    batch = default_collate(outs)
    p = batch["strong_params"]
    assert p["theta"].shape == (3, 2, 3) and p["flip"].shape == (3,) and p["cutout"].shape == (3, 4)
    assert torch.equal(S.warp_like(batch["label"], p, "nearest"), batch["label_strong"])
    feats = torch.rand(3, 5, 12, 16, generator=gen(1))
    together = S.warp_like(feats, p, "bilinear")
    for i in range(3):
        one = {k: v[i] for k, v in p.items()}
        assert torch.equal(S.warp_like(feats[i], one, "bilinear"), together[i])
    # strong_augment on a batch: the same draws as one by one
    imgs = torch.stack([s["image"] for s in samples])
    b_out, b_p = S.strong_augment(imgs, gen(5))
    g = gen(5)
    for i in range(3):
        o, pi = S.strong_augment(imgs[i], g)
        assert torch.equal(o, b_out[i]) and torch.equal(pi["theta"], b_p["theta"][i])


def test_bad_arguments():
    s = block_sample()
    with pytest.raises(ValueError, match="ops"):
        S.StrongView(ops=("Invert",))
    with pytest.raises(ValueError, match="mode"):
        S.warp_like(s["label"], {"theta": torch.eye(2, 3), "flip": torch.tensor(False), "cutout": torch.zeros(4)},
                    "bilinear")
    with pytest.raises(ValueError, match="size"):
        T.RandomCrop((0, 4))
