"""The reference itself against SPEC part 1 on hand-worked cases (every backend is held to it)."""
import math

import torch

import udafast.ops as ops

REF = {"backend": "reference"}


def test_class_thresholds_rank_rule():
    conf = torch.tensor([0.9, 0.6, 0.8, 0.7, 0.5, 0.3])
    pred = torch.tensor([0, 0, 0, 0, 1, 255])
    # class 0: sorted 0.9 0.8 0.7 0.6, n = floor(4 * 0.5) = 2 -> 0.8; class 1: n = floor(0.5) = 0 -> 1.0
    assert ops.class_thresholds(conf, pred, 3, 0.5, **REF).tolist() == [0.800000011920929, 1.0, 1.0]
    assert ops.class_thresholds(conf, pred, 3, 1.0, **REF)[0].item() == torch.tensor(0.6).item()
    assert ops.class_thresholds(conf, pred, 3, 0.0, **REF).tolist() == [1.0, 1.0, 1.0]


def test_class_thresholds_portion_floor_in_float64():
    # 10 * 0.3 = 3.0000000000000004 in float64: n = 3
    conf = torch.linspace(0.1, 1.0, 10, dtype=torch.float64)
    out = ops.class_thresholds(conf, torch.zeros(10, dtype=torch.int64), 1, 0.3, **REF)
    assert out.item() == conf[7].item()


def test_streaming_thresholds_are_bin_lower_edges():
    stream = ops.ClassThresholds(2, bins=4)
    stream.update(torch.tensor([0.9, 0.6, 1.0, 0.1]), torch.tensor([0, 0, 1, 1]))
    # class 0: exact threshold at portion 1 is 0.6 -> bin 2 -> 0.5; class 1 portion 0.5: exact 1.0 -> 0.75
    assert stream.thresholds(1.0).tolist() == [0.5, 0.0]
    assert stream.thresholds(0.5).tolist() == [0.75, 0.75]
    assert stream.counts.tolist() == [[0, 0, 1, 1], [1, 0, 0, 1]]
    state = stream.state_dict()
    fresh = ops.ClassThresholds(2, bins=4)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.counts, stream.counts)
    stream.reset()
    assert stream.thresholds(0.5).tolist() == [1.0, 1.0]


def test_cbst_pseudo_labels_ratio_ties_and_ignore():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.4, 0.4], [0.5, 0.5, 0.0]]).t().reshape(1, 3, 1, 3)
    thresholds = torch.tensor([0.5, 0.2, 0.9])
    # pixel 0: ratios 1.2 1.5 0.11 -> 1; pixel 1: 0.4 2.0 0.44 -> 1; pixel 2 with thresholds 1: below 1 -> ignore
    assert ops.cbst_pseudo_labels(probs, thresholds, **REF).tolist() == [[[1, 1, 1]]]
    tie = torch.tensor([0.5, 0.5, 0.0]).reshape(1, 3, 1, 1)
    assert ops.cbst_pseudo_labels(tie, torch.tensor([0.5, 0.5, 1.0]), **REF).item() == 0
    assert ops.cbst_pseudo_labels(tie, torch.ones(3), ignore_index=7, **REF).item() == 7


def test_topk_per_class_order_ties_and_padding():
    scores = torch.tensor([0.5, -0.0, 0.9, 0.0, 0.5, 0.1])
    labels = torch.tensor([0, 1, 0, 1, 0, 255])
    index, count = ops.topk_per_class(scores, labels, 3, 2, **REF)
    assert index.tolist() == [[2, 0], [1, 3], [-1, -1]]
    assert count.tolist() == [2, 2, 0]


def test_memory_bank_newest_first_and_ring():
    bank = ops.ClassMemoryBank(2, size=3, dim=1)
    feats = torch.arange(4.0).reshape(4, 1)
    bank.push(feats, torch.tensor([0, 0, 0, 1]), torch.tensor([0.1, 0.3, 0.2, 0.5]), per_class=2)
    assert bank.get(0).flatten().tolist() == [1.0, 2.0]
    bank.push(feats + 10, torch.tensor([0, 0, 255, 255]), torch.tensor([0.9, 0.8, 1.0, 1.0]), per_class=2)
    assert bank.get(0).flatten().tolist() == [10.0, 11.0, 1.0]
    assert bank.counts.tolist() == [3, 1]
    restored = ops.ClassMemoryBank(2, size=3, dim=1)
    restored.load_state_dict(bank.state_dict())
    assert restored.get(0).flatten().tolist() == [10.0, 11.0, 1.0]


def test_prototype_softmax_definition_and_constant_prototypes():
    features = torch.randn(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    prototypes = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    out = ops.prototype_softmax(features, prototypes, tau=0.5, **REF)
    f = features.detach()[0].permute(1, 2, 0).reshape(4, 1, 3)
    d = (f - prototypes.detach()[None]).pow(2).sum(-1).sqrt()  # [pixels, C]
    expected = torch.softmax(-d / 0.5, dim=1).t().reshape(1, 4, 2, 2)
    torch.testing.assert_close(out, expected)
    log_out = ops.prototype_softmax(features, prototypes, tau=0.5, log=True, **REF)
    torch.testing.assert_close(log_out.exp(), expected)
    out.sum().backward()
    assert prototypes.grad is None and features.grad is not None


def test_prototype_gradient_is_zero_where_a_feature_equals_a_prototype():
    prototypes = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    features = prototypes[0].reshape(1, 2, 1, 1).clone().requires_grad_()
    out = ops.prototype_softmax(features, prototypes, log=True, **REF)
    out[0, 0].sum().backward()
    assert torch.isfinite(features.grad).all()


def test_prototype_rectify_and_feature_sums():
    prototypes = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    features = torch.tensor([[[[0.0, 9.0]], [[0.0, 9.0]]]])  # [1, 2, 1, 2]: near class 0 then class 1
    soft = torch.tensor([[[[0.5, 0.9]], [[0.5, 0.1]]]])
    assert ops.prototype_rectify(features, prototypes, soft, **REF).tolist() == [[[0, 1]]]
    sums, counts = ops.class_feature_sums(features, torch.tensor([[[1, 1]]]), 3, **REF)
    assert sums[0, 1].tolist() == [9.0, 9.0] and counts.tolist() == [[0, 2, 0]]


def test_update_prototypes_rule():
    prototypes = torch.zeros(2, 1)
    sums = torch.tensor([[[20.0], [5.0]], [[40.0], [0.0]]])
    counts = torch.tensor([[10, 5], [10, 0]])
    ops.update_prototypes(prototypes, sums, counts)
    first = 0.0001 * 2.0
    assert math.isclose(prototypes[0].item(), 0.9999 * first + 0.0001 * 4.0, rel_tol=1e-6)
    assert prototypes[1].item() == 0.0  # 5 pixels < 10: no update


def test_sce_loss_formula():
    logits = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    target = torch.randint(0, 5, (2, 3, 4))
    target[0, 0, 0] = 255
    p = torch.softmax(logits, 1).permute(0, 2, 3, 1).reshape(-1, 5)
    y = target.reshape(-1)
    valid = y != 255
    pv, yv = p[valid], y[valid]
    ce = -torch.log(pv[torch.arange(len(yv)), yv]).mean()
    others = torch.ones_like(pv, dtype=torch.bool)
    others[torch.arange(len(yv)), yv] = False
    rce = (-math.log(1e-4) * (pv.clamp(1e-7, 1) * others).sum(1)).mean()
    reg = -torch.log(p).mean()
    loss = ops.sce_loss(logits, target, alpha=0.3, beta=0.7, reg_weight=0.2, **REF)
    torch.testing.assert_close(loss, 0.3 * ce + 0.7 * rce + 0.2 * reg)


def test_sce_loss_all_ignored_is_zero_without_gradient():
    logits = torch.randn(1, 4, 2, 2, requires_grad=True)
    loss = ops.sce_loss(logits, torch.full((1, 2, 2), 255), **REF)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_kl_loss_formula_and_empty_mask():
    logits = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    t = torch.rand(1, 3, 2, 2, dtype=torch.float64)
    t[0, 0, 0, 0] = 0.0
    mask = torch.tensor([[[True, False], [True, True]]])
    log_q = torch.log_softmax(logits, 1)
    terms = torch.where(t > 0, t * torch.log(t.clamp_min(1e-300)), 0) - t * log_q
    expected = terms.sum(1)[mask].sum() / (3 * 3)
    torch.testing.assert_close(ops.kl_loss(logits, t, valid_mask=mask, **REF), expected)
    assert ops.kl_loss(logits, t, valid_mask=torch.zeros_like(mask), **REF).item() == 0.0
