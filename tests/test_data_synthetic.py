"""The embedded benchmark `synthetic`: samples, determinism, layout, domain differences, splits."""
import numpy as np
import pytest
import torch

from udafast.data import build_dataset, dataset_names
from udafast.data.labels import CLASS_NAMES
from udafast.data.synthetic import SyntheticStreets, generate

SIZE = (64, 128)
ROAD, SIDEWALK, POLE, SKY, PERSON, CAR = (CLASS_NAMES.index(n) for n in
                                          ("road", "sidewalk", "pole", "sky", "person", "car"))


def dataset(domain="source", split="train", **options):
    options.setdefault("size", SIZE)
    return build_dataset("synthetic", None, split, domain=domain, **options)


def labels(domain, n, size=SIZE, split="train"):
    ds = dataset(domain, split, size=size, length=n, with_labels=True)
    return [ds[i]["label"].numpy() for i in range(n)]


def test_registered_and_sample_format():
    assert "synthetic" in dataset_names()
    ds = dataset(length=5)
    assert isinstance(ds, SyntheticStreets) and len(ds) == 5
    s = ds[3]
    assert s["image"].dtype == torch.float32 and s["image"].shape == (3, *SIZE)
    assert 0 <= s["image"].min() and s["image"].max() <= 1
    assert s["label"].dtype == torch.int64 and s["label"].shape == SIZE
    assert s["label"].min() >= 0 and s["label"].max() < 19  # every pixel has a class
    assert s["name"] == "synthetic_source_train_000003.png"
    assert ds[-2]["name"] == ds[3]["name"]
    with pytest.raises(IndexError):
        ds[5]


def test_default_size_and_lengths():
    ds = build_dataset("synthetic", None, "val", domain="target")
    assert ds.size == (128, 256) and ds[0]["image"].shape == (3, 128, 256)
    assert len(ds) == 200 and len(build_dataset("synthetic", None, "train")) == 2000


def test_deterministic_by_seed():
    a, b = dataset(length=4), dataset(length=4)
    for i in (2, 0, 3):  # any order
        sa, sb = a[i], b[i]
        assert torch.equal(sa["image"], sb["image"]) and torch.equal(sa["label"], sb["label"])
    assert not torch.equal(a[0]["image"], a[1]["image"])
    # the sample seed depends on (seed, domain, split, index) only
    assert not torch.equal(a[0]["label"], dataset("target", length=4, with_labels=True)[0]["label"])
    assert not torch.equal(dataset("target", "val", length=4)[0]["label"],
                           dataset("target", "train", length=4, with_labels=True)[0]["label"])
    assert not torch.equal(a[0]["label"], dataset(length=4, seed=1)[0]["label"])
    assert torch.equal(dataset(length=100)[2]["image"], a[2]["image"])  # the length changes no sample


def test_cache_returns_the_same_samples():
    cached, plain = dataset(length=3, cache=True), dataset(length=3)
    for _ in range(2):
        for i in range(3):
            assert torch.equal(cached[i]["image"], plain[i]["image"])
            assert torch.equal(cached[i]["label"], plain[i]["label"])


def test_splits_and_labels():
    assert "label" in dataset("source", "train", length=1)[0]
    assert "label" not in dataset("target", "train", length=1)[0]  # unlabelled for adaptation
    assert "label" in dataset("target", "train", length=1, with_labels=True)[0]  # the oracle's
    assert "label" in dataset("target", "val", length=1)[0]
    assert not dataset("target", "train", length=1).labelled


def test_transform_is_applied():
    def halve(sample):
        sample["image"] = sample["image"][:, ::2, ::2]
        return sample
    assert dataset(length=1, transform=halve)[0]["image"].shape == (3, SIZE[0] // 2, SIZE[1] // 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(domain="other"), "domain"),
    (dict(domain="source", split="val"), "split"),
    (dict(domain="target", split="test"), "split"),
    (dict(size=(16, 16)), "size"),
    (dict(size=(64,)), "size"),
    (dict(size=(64.5, 128)), "size"),
    (dict(length=0), "length"),
    (dict(seed=-1), "seed"),
    (dict(with_labels="yes"), "with_labels"),
])
def test_bad_arguments(kwargs, match):
    split = kwargs.pop("split", "train")
    domain = kwargs.pop("domain", "source")
    with pytest.raises(ValueError, match=match):
        build_dataset("synthetic", None, split, domain=domain, **kwargs)
    if match in ("domain", "size"):
        with pytest.raises(ValueError, match=match):
            generate(0, domain, kwargs.get("size", SIZE))


@pytest.mark.parametrize("domain", ["source", "target"])
def test_layout(domain):
    maps = labels(domain, 8, size=(128, 256))
    rows = np.arange(128)[:, None]
    present = set()
    for lab in maps:
        present |= set(np.unique(lab).tolist())
        sky, road = lab == SKY, lab == ROAD
        assert sky.any() and road.any()
        assert rows.repeat(256, 1)[sky].mean() < rows.repeat(256, 1)[road].mean()  # sky above road
        assert (lab[0] == ROAD).sum() == 0  # no road on the top row
    assert len(present) >= 10, [CLASS_NAMES[c] for c in sorted(present)]
    assert {ROAD, SIDEWALK, SKY, CAR, POLE} <= present
    # thin poles: runs of pole pixels along a row are a few pixels wide
    widths = []
    for lab in maps:
        for row in lab:
            edges = np.diff(np.concatenate([[0], (row == POLE).astype(np.int8), [0]]))
            widths += (np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).tolist()
    assert widths and np.median(widths) <= 4


def test_sidewalks_beside_the_road():
    for lab in labels("source", 6, size=(128, 256)):
        road, walk = lab == ROAD, lab == SIDEWALK
        # sidewalks touch the road sideways, and lie outside it in every row
        assert ((road[:, 1:] & walk[:, :-1]) | (road[:, :-1] & walk[:, 1:])).any()
        for y in np.flatnonzero(walk.any(1) & road.any(1)):
            cols, road_cols = np.flatnonzero(walk[y]), np.flatnonzero(road[y])
            assert ((cols < road_cols.min()) | (cols > road_cols.max())).mean() > 0.9
        assert np.flatnonzero(walk.any(1)).min() >= np.flatnonzero(road.any(1)).min() - 1


def test_domains_differ_in_appearance():
    n = 8
    src = dataset("source", length=n)
    tgt = dataset("target", length=n, with_labels=True)
    stats = {}
    for name, ds in (("source", src), ("target", tgt)):
        images = torch.stack([ds[i]["image"] for i in range(n)])
        sat = (images.max(1).values - images.min(1).values).mean()
        # high-frequency energy inside the sky, away from edges: noise and texture
        grain = []
        for i in range(n):
            s = ds[i]
            sky = (s["label"] == SKY)
            inner = sky[:, 1:] & sky[:, :-1]
            grain.append((s["image"][:, :, 1:] - s["image"][:, :, :-1]).abs().mean(0)[inner].mean())
        stats[name] = dict(mean=images.mean((0, 2, 3)), bright=images.mean(), sat=sat, grain=torch.stack(grain).mean())
    assert (stats["source"]["mean"] - stats["target"]["mean"]).abs().max() > 0.03
    assert stats["source"]["bright"] > stats["target"]["bright"]
    assert stats["source"]["sat"] > stats["target"]["sat"] + 0.05
    assert stats["target"]["grain"] > 1.5 * stats["source"]["grain"]


def test_domains_differ_in_class_frequencies():
    counts = {d: np.bincount(np.concatenate([m.ravel() for m in labels(d, 24)]), minlength=19)
              for d in ("source", "target")}
    assert counts["target"][CAR] > 1.5 * counts["source"][CAR]  # more, bigger cars
    assert counts["source"][PERSON] > 2 * counts["target"][PERSON]  # more persons
