"""Pseudo-label quality (udafast.methods.label_quality) and the target's "truth" labels that score it:
hand-computed coverage, precision and recall, counts that add up across processes, truth aligned
with the image through every training-view step, and the run's metrics.json."""
import pytest
import torch

from conftest import tiny_run_config
from udafast.data import build_dataset
from udafast.engine.context import TrainingContext
from udafast.engine.data import TrainView, TruthLabels, collate
from udafast.methods.label_quality import LabelQuality
from udafast.methods.source_only import SourceOnly

IGN = 255


def test_coverage_precision_recall_by_hand():
    q = LabelQuality(3)
    labels = torch.tensor([0, 0, 1, IGN, 2, 2, 1, IGN])
    truth = torch.tensor([0, 1, 1, 0, IGN, 2, 2, 2])
    q.update(labels, truth)
    s = q.summary()
    assert s["pixels"] == 8
    assert s["coverage"] == [2 / 8, 2 / 8, 2 / 8] and s["coverage_total"] == pytest.approx(6 / 8)
    # class 0: labelled at 2 pixels with truth {0, 1} -> precision 1/2; truth 0 at 2 pixels, one labelled 0
    # class 1: labelled {1, 2} -> 1/2; truth 1 at 2 pixels, one labelled 1 -> 1/2
    # class 2: labelled at pixel 4 (truth unknown: not judged) and 5 (right) -> 1/1; truth 2 at 3 pixels -> 1/3
    assert s["precision"] == [0.5, 0.5, 1.0]
    assert s["recall"] == [0.5, 0.5, pytest.approx(1 / 3)]
    assert s["precision_mean"] == pytest.approx(2 / 3)
    assert s["recall_mean"] == pytest.approx((0.5 + 0.5 + 1 / 3) / 3)
    assert s["accuracy"] == pytest.approx(3 / 5)


def test_without_truth_only_coverage():
    q = LabelQuality(4)
    q.update(torch.tensor([[3, IGN], [3, 1]]))
    s = q.summary()
    assert s["coverage"] == [0.0, 0.25, 0.0, 0.5]
    assert s["precision"] is None and s["recall"] is None and s["accuracy"] is None


def test_undefined_classes_are_none_and_left_out_of_the_means():
    q = LabelQuality(3)
    q.update(torch.tensor([0, 0]), torch.tensor([0, 1]))
    s = q.summary()
    assert s["precision"] == [0.5, None, None] and s["recall"] == [1.0, 0.0, None]
    assert s["precision_mean"] == 0.5 and s["recall_mean"] == 0.5


def test_counts_add_up_like_one_meter():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (2, 40, 30), generator=g)
    labels[labels == 5] = IGN
    truth = torch.randint(0, 6, (2, 40, 30), generator=g)
    truth[truth == 5] = IGN
    whole, a, b = LabelQuality(5), LabelQuality(5), LabelQuality(5)
    whole.update(labels, truth)
    a.update(labels[0], truth[0])
    b.update(labels[1], truth[1])
    merged = LabelQuality(5)
    merged.load_counts(a.counts() + b.counts())
    assert merged.summary() == whole.summary()


def test_truth_must_match_the_labels():
    with pytest.raises(ValueError, match="truth"):
        LabelQuality(3).update(torch.zeros(4, dtype=torch.long), torch.zeros(5, dtype=torch.long))


def test_truth_follows_the_image_through_the_view():
    """Scale, crop (with padding) and flip move "truth" exactly as a training label."""
    image = torch.rand(3, 20, 30)
    label = torch.randint(0, 19, (20, 30))
    view = TrainView(resize=(24, 36), scale_range=(0.5, 1.5), crop=(16, 40), flip=0.5)
    for seed in range(6):
        out = view({"image": image, "label": label, "truth": label.clone()}, torch.Generator().manual_seed(seed))
        assert torch.equal(out["truth"], out["label"])
    batch = collate([dict(out, index=0), dict(out, index=1)])
    assert batch["truth"].shape == (2, 16, 40)


def test_truth_labels_rename_the_target_labels():
    plain = build_dataset("synthetic", None, "train", domain="target", length=3, with_labels=True)
    wrapped = TruthLabels(plain)
    sample = wrapped[1]
    assert "label" not in sample and torch.equal(sample["truth"], plain[1]["label"])
    assert len(wrapped) == 3


class _Log:
    def message(self, text):
        pass

    def track(self, *args):
        pass


def _context(tmp_path, **data):
    config = tiny_run_config("source_only", data=dict({"target": {"options": {"length": 4}}}, **data))
    return TrainingContext(config, str(tmp_path), "cpu", _Log(), type("WithTarget", (SourceOnly,), {"uses_target": True}))


def test_the_embedded_target_carries_truth_by_default(tmp_path):
    ctx = _context(tmp_path)
    assert ctx.has_truth
    batch = next(iter(ctx.target_stream))
    assert "label" not in batch and batch["truth"].shape == batch["image"].shape[:1] + batch["image"].shape[-2:]
    frames = next(ctx.target_frames(2))
    labelled = build_dataset("synthetic", None, "train", domain="target", length=4, with_labels=True,
                             **{k: v for k, v in ctx.config["data"]["target"]["options"].items()
                                if k not in ("domain", "length")})
    assert torch.equal(frames["truth"][0], labelled[0]["label"])


def test_truth_off(tmp_path):
    ctx = _context(tmp_path, target_truth=False)
    assert not ctx.has_truth and "truth" not in next(iter(ctx.target_stream))


def test_truth_option_is_checked(tmp_path):
    with pytest.raises(ValueError, match="data.target_truth"):
        _context(tmp_path, target_truth="yes")
