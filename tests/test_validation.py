"""Every bad input of SPEC 1.0 raises ValueError naming the argument, on every backend."""
import pytest
import torch

import udafast.ops as ops

F32 = torch.float32


def conf_pred(n=12, c=3):
    return torch.rand(n), torch.randint(0, c, (n,))


def logits_target(b=1, c=4, h=3, w=5):
    return torch.randn(b, c, h, w), torch.randint(0, c, (b, h, w))


BAD_CALLS = {
    # class_thresholds
    "thresholds conf int": ("conf", lambda: ops.class_thresholds(torch.ones(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), 2, 0.5)),
    "thresholds pred float": ("pred", lambda: ops.class_thresholds(torch.rand(4), torch.zeros(4), 2, 0.5)),
    "thresholds shape": ("pred", lambda: ops.class_thresholds(torch.rand(4), torch.zeros(5, dtype=torch.int64), 2, 0.5)),
    "thresholds num_classes": ("num_classes", lambda: ops.class_thresholds(*conf_pred(), 0, 0.5)),
    "thresholds portion high": ("portion", lambda: ops.class_thresholds(*conf_pred(), 3, 1.5)),
    "thresholds portion low": ("portion", lambda: ops.class_thresholds(*conf_pred(), 3, -0.1)),
    "thresholds label range": ("pred", lambda: ops.class_thresholds(torch.rand(3), torch.tensor([0, 7, 1]), 3, 0.5)),
    "thresholds negative label": ("pred", lambda: ops.class_thresholds(torch.rand(3), torch.tensor([0, -1, 1]), 3, 0.5)),
    "thresholds conf > 1": ("conf", lambda: ops.class_thresholds(torch.tensor([0.5, 1.5]), torch.tensor([0, 1]), 3, 0.5)),
    "thresholds conf NaN": ("conf", lambda: ops.class_thresholds(torch.tensor([0.5, float("nan")]), torch.tensor([0, 1]), 3, 0.5)),
    "thresholds tensor": ("conf", lambda: ops.class_thresholds([0.5], torch.tensor([0]), 3, 0.5)),
    # ClassThresholds
    "bins not power of two": ("bins", lambda: ops.ClassThresholds(3, bins=1000)),
    "bins too many": ("bins", lambda: ops.ClassThresholds(3, bins=2**25)),
    "streaming num_classes": ("num_classes", lambda: ops.ClassThresholds(0)),
    "streaming conf": ("conf", lambda: ops.ClassThresholds(3).update(torch.tensor([2.0]), torch.tensor([0]))),
    "streaming pred": ("pred", lambda: ops.ClassThresholds(3).update(torch.tensor([0.2]), torch.tensor([3]))),
    "streaming portion": ("portion", lambda: ops.ClassThresholds(3).thresholds(2.0)),
    # cbst_pseudo_labels
    "pseudo probs dims": ("probs", lambda: ops.cbst_pseudo_labels(torch.rand(3, 4, 5), torch.ones(3))),
    "pseudo thresholds length": ("thresholds", lambda: ops.cbst_pseudo_labels(torch.rand(1, 3, 4, 5), torch.ones(4))),
    "pseudo thresholds zero": ("thresholds", lambda: ops.cbst_pseudo_labels(torch.rand(1, 3, 4, 5), torch.tensor([0.5, 0.0, 1.0]))),
    "pseudo thresholds > 1": ("thresholds", lambda: ops.cbst_pseudo_labels(torch.rand(1, 3, 4, 5), torch.tensor([0.5, 1.5, 1.0]))),
    "pseudo probs dtype": ("probs", lambda: ops.cbst_pseudo_labels(torch.rand(1, 3, 4, 5).half(), torch.ones(3))),
    # topk_per_class
    "topk scores dims": ("scores", lambda: ops.topk_per_class(torch.rand(2, 3), torch.zeros(6, dtype=torch.int64), 3, 2)),
    "topk labels float": ("labels", lambda: ops.topk_per_class(torch.rand(6), torch.zeros(6), 3, 2)),
    "topk length": ("labels", lambda: ops.topk_per_class(torch.rand(6), torch.zeros(5, dtype=torch.int64), 3, 2)),
    "topk k": ("k", lambda: ops.topk_per_class(torch.rand(6), torch.zeros(6, dtype=torch.int64), 3, 0)),
    "topk num_classes": ("num_classes", lambda: ops.topk_per_class(torch.rand(6), torch.zeros(6, dtype=torch.int64), 0, 2)),
    "topk NaN": ("scores", lambda: ops.topk_per_class(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]), 3, 2)),
    "topk label range": ("labels", lambda: ops.topk_per_class(torch.rand(2), torch.tensor([0, 3]), 3, 2)),
    # ClassMemoryBank
    "bank size": ("size", lambda: ops.ClassMemoryBank(3, 0, 4)),
    "bank dim": ("dim", lambda: ops.ClassMemoryBank(3, 2, 0)),
    "bank features": ("features", lambda: ops.ClassMemoryBank(3, 2, 4).push(torch.rand(5, 3), torch.zeros(5, dtype=torch.int64), torch.rand(5), 1)),
    "bank scores": ("scores", lambda: ops.ClassMemoryBank(3, 2, 4).push(torch.rand(5, 4), torch.zeros(5, dtype=torch.int64), torch.rand(4), 1)),
    "bank per_class": ("per_class", lambda: ops.ClassMemoryBank(3, 2, 4).push(torch.rand(5, 4), torch.zeros(5, dtype=torch.int64), torch.rand(5), 0)),
    "bank get": ("c", lambda: ops.ClassMemoryBank(3, 2, 4).get(3)),
    # prototype_softmax / rectify / class_feature_sums
    "proto features dims": ("features", lambda: ops.prototype_softmax(torch.rand(2, 8, 3), torch.rand(4, 8))),
    "proto prototypes dims": ("prototypes", lambda: ops.prototype_softmax(torch.rand(1, 8, 3, 3), torch.rand(4, 8, 1))),
    "proto D mismatch": ("prototypes", lambda: ops.prototype_softmax(torch.rand(1, 8, 3, 3), torch.rand(4, 7))),
    "proto tau zero": ("tau", lambda: ops.prototype_softmax(torch.rand(1, 8, 3, 3), torch.rand(4, 8), tau=0.0)),
    "proto tau negative": ("tau", lambda: ops.prototype_softmax(torch.rand(1, 8, 3, 3), torch.rand(4, 8), tau=-1)),
    "proto int features": ("features", lambda: ops.prototype_softmax(torch.ones(1, 8, 3, 3, dtype=torch.int32),
                                                                      torch.rand(4, 8))),
    "proto log flag": ("log", lambda: ops.prototype_softmax(torch.rand(1, 8, 3, 3), torch.rand(4, 8), log=1)),
    "rectify soft shape": ("soft_labels", lambda: ops.prototype_rectify(torch.rand(1, 8, 3, 3), torch.rand(4, 8), torch.rand(1, 5, 3, 3))),
    "sums labels dims": ("labels", lambda: ops.class_feature_sums(torch.rand(1, 8, 3, 3), torch.zeros(3, 3, dtype=torch.int64), 4)),
    "sums labels shape": ("labels", lambda: ops.class_feature_sums(torch.rand(1, 8, 3, 3), torch.zeros(1, 3, 4, dtype=torch.int64), 4)),
    "sums labels range": ("labels", lambda: ops.class_feature_sums(torch.rand(1, 8, 1, 2), torch.tensor([[[0, 9]]]), 4)),
    "sums num_classes": ("num_classes", lambda: ops.class_feature_sums(torch.rand(1, 8, 1, 2), torch.zeros(1, 1, 2, dtype=torch.int64), 0)),
    # sce_loss
    "sce logits dims": ("logits", lambda: ops.sce_loss(torch.rand(4, 3, 5), torch.zeros(1, 3, 5, dtype=torch.int64))),
    "sce target dtype": ("target", lambda: ops.sce_loss(torch.rand(1, 4, 3, 5), torch.zeros(1, 3, 5))),
    "sce target shape": ("target", lambda: ops.sce_loss(torch.rand(1, 4, 3, 5), torch.zeros(1, 3, 4, dtype=torch.int64))),
    "sce target range": ("target", lambda: ops.sce_loss(torch.rand(1, 4, 1, 2), torch.tensor([[[0, 4]]]))),
    "sce alpha": ("alpha", lambda: ops.sce_loss(*logits_target(), alpha="0.1")),
    "sce logits int": ("logits", lambda: ops.sce_loss(torch.ones(1, 4, 3, 5, dtype=torch.int64), logits_target()[1])),
    # kl_loss
    "kl target shape": ("target_probs", lambda: ops.kl_loss(torch.rand(1, 4, 3, 5), torch.rand(1, 3, 3, 5))),
    "kl mask dtype": ("valid_mask", lambda: ops.kl_loss(torch.rand(1, 4, 3, 5), torch.rand(1, 4, 3, 5), valid_mask=torch.ones(1, 3, 5))),
    "kl mask shape": ("valid_mask", lambda: ops.kl_loss(torch.rand(1, 4, 3, 5), torch.rand(1, 4, 3, 5), valid_mask=torch.ones(1, 3, 4, dtype=torch.bool))),
    "kl logits dims": ("logits", lambda: ops.kl_loss(torch.rand(4, 3, 5), torch.rand(4, 3, 5))),
    # the backend keyword
    "unknown backend": ("backend", lambda: ops.sce_loss(*logits_target(), backend="cuda")),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_raises_value_error_naming_the_argument(case):
    argument, call = BAD_CALLS[case]
    with pytest.raises(ValueError, match=argument):
        call()


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(ValueError, match="auto, reference, native, triton"):
        ops.topk_per_class(torch.rand(4), torch.zeros(4, dtype=torch.int64), 2, 1, backend="fast")


VALUE_CHECKS = [
    lambda: ops.class_thresholds(torch.rand(3), torch.tensor([0, 7, 1]), 3, 0.5, backend="reference"),
    lambda: ops.topk_per_class(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]), 3, 2, backend="reference"),
]


@pytest.mark.parametrize("call", VALUE_CHECKS)
def test_set_validation_false_skips_value_checks(call):
    ops.set_validation(False)
    try:
        call()  # no ValueError: the value pass is off (shape checks stay on)
        with pytest.raises(ValueError, match="num_classes"):
            ops.topk_per_class(torch.rand(2), torch.tensor([0, 1]), 0, 1)
    finally:
        ops.set_validation(True)


def test_validate_keyword_turns_value_checks_off_per_call():
    ops.topk_per_class(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]), 3, 2, backend="reference", validate=False)
    with pytest.raises(ValueError, match="scores"):
        ops.topk_per_class(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]), 3, 2, backend="reference")


def test_set_validation_needs_a_bool():
    with pytest.raises(ValueError, match="enabled"):
        ops.set_validation(0)


@pytest.mark.parametrize(
    "argument, call",
    [
        ("pred", lambda: ops.class_thresholds(torch.rand(4), torch.zeros(4, dtype=torch.int64, device="meta"), 2, 0.5)),
        ("prototypes", lambda: ops.prototype_softmax(torch.rand(1, 8, 3, 3), torch.rand(4, 8, device="meta"))),
        ("target", lambda: ops.sce_loss(torch.rand(1, 4, 3, 5), torch.zeros(1, 3, 5, dtype=torch.int64, device="meta"))),
    ],
)
def test_mismatched_devices(argument, call):
    with pytest.raises(ValueError, match=argument):
        call()
