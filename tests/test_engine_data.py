"""Training views and batch streams: maps follow their images, streams are seeded and resumable."""
import pytest
import torch

from udafast.engine.data import BatchStream, TrainView, collate


class Frames(torch.utils.data.Dataset):
    """Images whose pixels encode their own (y, x) position, with a matching label."""

    def __init__(self, n=6, h=32, w=48):
        self.n, self.h, self.w = n, h, w

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        ys = torch.arange(self.h, dtype=torch.float32)[:, None].expand(self.h, self.w)
        xs = torch.arange(self.w, dtype=torch.float32)[None, :].expand(self.h, self.w)
        image = torch.stack([ys / 100, xs / 100, torch.full_like(ys, i / 100)])
        label = (ys.long() // 8) * 10 + xs.long() // 8
        return {"image": image, "label": label, "name": f"f{i}"}


def stride8_map(h, w):
    """A frame map at stride 8 whose cell (r, c) holds r * 10 + c, as the labels above."""
    r = torch.arange(h // 8)[:, None].expand(h // 8, w // 8)
    c = torch.arange(w // 8)[None, :].expand(h // 8, w // 8)
    return (r * 10 + c).float()[None]


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_crop_and_flip_keep_label_and_maps_aligned(flip):
    view = TrainView(crop=(16, 24), flip=flip, align=8)
    sample = Frames()[0]
    for seed in range(10):
        out = view(sample, torch.Generator().manual_seed(seed), {"soft": stride8_map(32, 48)})
        assert out["image"].shape == (3, 16, 24) and out["label"].shape == (16, 24)
        assert out["maps"]["soft"].shape == (1, 2, 3)
        # the map at stride 8 equals the label sampled at each cell's first pixel
        expect = out["label"][::8, ::8] if flip == 0 else out["label"][::8, 7::8]
        assert torch.equal(out["maps"]["soft"][0].long(), expect)
        # the label still matches the image's encoded positions
        ys, xs = (out["image"][0] * 100).round().long(), (out["image"][1] * 100).round().long()
        assert torch.equal(out["label"], (ys // 8) * 10 + xs // 8)


def test_extras_label_and_crop_center():
    view = TrainView(crop=(8, 8), flip=0.0)
    sample = Frames()[0]
    pseudo = torch.full((32, 48), 7, dtype=torch.int64)
    out = view(sample, torch.Generator().manual_seed(0), {"label": pseudo, "crop_center": (30, 2)})
    assert torch.equal(out["label"], torch.full((8, 8), 7))
    ys, xs = (out["image"][0] * 100).round(), (out["image"][1] * 100).round()
    assert ys.min() == 24 and xs.min() == 0  # the crop holds the centre pixel, clamped into the frame
    with pytest.raises(ValueError, match="extras"):
        view(sample, torch.Generator(), {"label": torch.zeros(3, 3, dtype=torch.int64)})


def test_resize_and_padding():
    view = TrainView(resize=(16, 24), crop=(20, 30), flip=0.0)
    out = view(Frames()[0], torch.Generator().manual_seed(0))
    assert out["image"].shape == (3, 20, 30)
    assert (out["label"][16:] == 255).all() and (out["label"][:, 24:] == 255).all()


def _one_class_with_a_corner(h=32, w=48, corner=12):
    """Class 1 everywhere but a `corner` x `corner` block of class 2 at the top left."""
    label = torch.ones(h, w, dtype=torch.int64)
    label[:corner, :corner] = 2
    return {"image": torch.rand(3, h, w), "label": label, "name": "one"}


def _replayed_offsets(seed, n, h=32, w=48, ch=16, cw=16):
    """The first `n` crop offsets a view's generator draws (two integers per crop)."""
    g = torch.Generator().manual_seed(seed)
    return [(int(torch.randint(h - ch + 1, (), generator=g)), int(torch.randint(w - cw + 1, (), generator=g)))
            for _ in range(n)]


def test_cat_max_ratio_redraws_crops_as_mmseg_randomcrop():
    """DAFormer's GTA5 pipeline: RandomCrop(cat_max_ratio=0.75) keeps the first of up to 10 draws
    that holds two classes, none on >= 75% of the labelled pixels, else the 11th as it is."""
    sample = _one_class_with_a_corner()
    view = TrainView(crop=(16, 16), flip=0.0, cat_max_ratio=0.75)
    kept_draws = []
    for seed in range(40):
        out = view(sample, torch.Generator().manual_seed(seed))
        offsets = _replayed_offsets(seed, 11)
        passing = [i for i, (y, x) in enumerate(offsets[:10])
                   if (sample["label"][y:y + 16, x:x + 16] == 2).sum() > 64]  # class 2 over a quarter
        kept = passing[0] if passing else 10
        y, x = offsets[kept]
        assert torch.equal(out["image"], sample["image"][:, y:y + 16, x:x + 16]), seed
        kept_draws.append(kept)
    assert 0 in kept_draws and any(k > 0 for k in kept_draws)  # some crops were drawn again
    # off (1.0, the default) and for single-class labels: the first draw, resp. the 11th
    plain = TrainView(crop=(16, 16), flip=0.0)(sample, torch.Generator().manual_seed(3))
    y, x = _replayed_offsets(3, 1)[0]
    assert torch.equal(plain["image"], sample["image"][:, y:y + 16, x:x + 16])
    single = dict(sample, label=torch.where(sample["label"] == 2, 255, sample["label"]))
    out = view(single, torch.Generator().manual_seed(3))
    y, x = _replayed_offsets(3, 11)[10]
    assert torch.equal(out["image"], sample["image"][:, y:y + 16, x:x + 16])


def test_view_rejects_bad_config():
    with pytest.raises(ValueError, match="cat_max_ratio"):
        TrainView.from_config({"cat_max_ratio": 0})
    with pytest.raises(ValueError, match="unknown"):
        TrainView.from_config({"crops": 3})
    with pytest.raises(ValueError, match="flip"):
        TrainView(flip=2)
    with pytest.raises(ValueError, match="scale_range"):
        TrainView(scale_range=(2, 1))


def batches(stream, n):
    return [next(stream) for _ in range(n)]


def test_stream_is_seeded_and_resumable():
    view = TrainView(crop=(16, 16), flip=0.5)
    make = lambda seed: BatchStream(Frames(n=5), 2, view, seed=seed)  # noqa: E731
    a, b = batches(make(3), 7), batches(make(3), 7)
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["index"], y["index"])
    assert not all(torch.equal(x["image"], y["image"]) for x, y in zip(a, batches(make(4), 7)))
    # 2 batches per epoch (the last incomplete one dropped), each epoch a permutation
    first_epoch = torch.cat([a[0]["index"], a[1]["index"]])
    assert len(set(first_epoch.tolist())) == 4
    stream = make(3)
    batches(stream, 3)
    state = stream.state_dict()
    assert state == {"epoch": 1, "position": 1}
    resumed = make(3)
    resumed.load_state_dict(state)
    for x, y in zip(batches(resumed, 4), a[3:]):
        assert torch.equal(x["image"], y["image"])


def test_stream_workers_give_the_same_batches():
    view = TrainView(crop=(16, 16), flip=0.5)
    a = batches(BatchStream(Frames(n=5), 2, view, seed=1), 3)
    b = batches(BatchStream(Frames(n=5), 2, view, seed=1, num_workers=1), 3)
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])


def test_stream_extras_and_bad_batch_size():
    stream = BatchStream(Frames(n=4), 2, TrainView(flip=0.0), extras=lambda i: {"soft": torch.full((1, 4, 6), float(i))})
    batch = next(stream)
    assert torch.equal(batch["maps"]["soft"][:, 0, 0, 0], batch["index"].float())
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(Frames(n=1), 2, TrainView())
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(Frames(n=4), 0, TrainView())


def test_collate_keeps_names_and_indices():
    samples = [dict(Frames()[i], index=i) for i in range(2)]
    out = collate(samples)
    assert out["image"].shape == (2, 3, 32, 48) and out["name"] == ["f0", "f1"]
    assert out["index"].tolist() == [0, 1]
