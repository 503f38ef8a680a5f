"""The contrastive method against the authors' code (Shathe/SemiSeg-Contrastive; repository,
commit, files and functions in the fixture's "provenance"): the figures in
tests/fixtures/authors/contrastive_golden.json came from running the authors' functions,
transcribed outside this repository, on the inputs of tests/contrastive_recipes.py (seeds inside).
Compared: the sigmoid ramp-up, the teacher momentum rule, the contrastive loss, the target CE
weighted by max-prob^6 plus the 0.01 entropy term, ClassMix masks and mixing, the class
balancing weights, the feature-memory update, and one whole iteration of the script's main loop
(losses, bank, the student's weights and buffers and the teacher's weights after the SGD step and
the EMA update)."""
import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import contrastive_recipes as R  # noqa: E402

from udafast.methods.contrastive import (ClassBalance, class_memory_loss, entropy_loss,  # noqa: E402
                                         mix, self_training_loss, sigmoid_ramp_up, teacher_momentum)
from udafast.methods.mixing import class_mask  # noqa: E402

with open(os.path.join(os.path.dirname(__file__), "fixtures", "authors", "contrastive_golden.json")) as f:
    GOLDEN = json.load(f)


# tiny tensors: one thread is faster on a shared machine (the runs set `threads: 1`)
pytestmark = pytest.mark.usefixtures("one_thread")


def close(a, b, rel=1e-9, abs_=1e-12):
    return a == pytest.approx(b, rel=rel, abs=abs_)


def test_provenance():
    p = GOLDEN["provenance"]
    assert p["repository"] == "Shathe/SemiSeg-Contrastive" and len(p["commit"]) == 40


def test_sigmoid_ramp_up():
    g = GOLDEN["sigmoid_ramp_up"]
    for it, value in zip(g["iters"], g["values"]):
        assert close(sigmoid_ramp_up(it, g["ramp_up"]), value), it


def test_momentum_rule():
    """update_ema_variables: min(1 - 1/(it+1), the main loop's 0.995 -> 1 cosine)."""
    g = GOLDEN["momentum"]
    got = [teacher_momentum(i, g["iters"], g["base"]) for i in range(g["iters"])]
    assert got == pytest.approx(g["alpha"], rel=1e-10, abs=1e-11)


def test_contrastive_loss():
    """contrastive_class_to_class_learned_memory = class_memory_loss with the feature selectors'
    scores and unit memory weights (the code's), value and gradients."""
    z, labels, memory, selectors, _ = R.loss_inputs()
    z.requires_grad_(True)
    s = torch.sigmoid(selectors(z.detach(), labels))
    loss = class_memory_loss(z, labels, s, memory, None, R.C)
    loss.backward()
    g = GOLDEN["contrastive_loss"]
    assert close(float(loss), g["loss"])
    assert close(R.probe(z.grad), g["grad_probe"]) and close(float(z.grad.norm()), g["grad_norm"])
    # the script's selectors are one nn.Sequential per class: probe each class's slice
    got = sum(R.probe(p.grad[c]) for p in selectors.parameters() for c in range(R.C))
    assert close(got, g["selector_grad_probe_sum"], rel=1e-8)


def test_self_training_ce_and_entropy():
    logits, pseudo, max_probs, weights = R.ce_inputs()
    logits.requires_grad_(True)
    g = GOLDEN["self_training"]
    ce = self_training_loss(logits, pseudo, max_probs, sigmoid_ramp_up(g["ramp_iter"], g["ramp_up"]), weights)
    ent = entropy_loss(F.softmax(logits, 1), pseudo != 255)
    total = ce + 0.01 * ent
    total.backward()
    # (the script's mask mean is float32: its normalisation rounds at ~1e-8)
    assert close(float(ce), g["ce"])
    assert close(float(ent), g["entropy"], rel=1e-7) and close(float(total), g["total"], rel=1e-7)
    assert close(R.probe(logits.grad), g["grad_probe"], rel=1e-7) and close(float(logits.grad.norm()), g["grad_norm"], rel=1e-7)


def test_classmix_masks_and_mix():
    labels, classes, images, probs = R.mix_inputs()
    g = GOLDEN["classmix"]
    masks = torch.stack([class_mask(labels[i], classes[i]) for i in range(3)])
    assert masks.tolist() == g["masks"]
    d, t, p = mix(masks, images, labels, probs)
    assert t.tolist() == g["target"]
    assert close(R.probe(d), g["data_probe"]) and close(R.probe(p), g["probs_probe"])


def test_classmix_picks_half_the_classes_plus_one():
    from udafast.methods.contrastive import class_mix_masks
    gen = torch.Generator().manual_seed(0)
    for n, picked in GOLDEN["classmix"]["picked"].items():
        lab = torch.arange(int(n)).repeat_interleave(3)[None].expand(1, -1)[:, :, None].expand(1, -1, 2).clone()
        lab[0, 0, 0] = 255  # the ignore label is not a class to pick
        mask = class_mix_masks(lab, gen)[0]
        chosen = torch.unique(lab[0][mask.bool()])
        assert len(chosen) == picked and 255 not in chosen.tolist(), n


def test_class_balance_weights():
    g = GOLDEN["class_balance"]
    cb = ClassBalance(5, g["labelled_iters"], g["unlabelled_iters"])
    gen = torch.Generator().manual_seed(6)
    for expected in g["weights"]:
        lab = torch.randint(0, 5, (2, 6, 6), generator=gen)
        lab[0, 0] = 255
        pl = torch.randint(0, 4, (1, 6, 6), generator=gen)
        cb.add(lab, pl)
        assert cb.weights().tolist() == pytest.approx(expected, rel=1e-10)


def test_feature_memory_update():
    """add_features_from_sample_learned (ascending sort, the code's flag): per class the 2 x batch
    lowest-scored of each push, 6 per class, FIFO. Compared as sets of rows per class: where a
    class has no more features than it may keep, the script keeps them in their order and udafast
    by score (the order inside the bank does not enter the loss)."""
    m, pushes = R.memory_inputs()
    for z, labels in pushes:
        m._push(z, labels, 2)
    for c, expected in enumerate(GOLDEN["feature_memory"]["memory"]):
        got = m.bank.get(c)
        if expected is None:
            assert got.shape[0] == 0
        else:
            def rows(t):
                return sorted(tuple(round(x, 5) for x in r) for r in t.tolist())
            assert rows(got) == rows(torch.tensor(expected)), c


def test_one_iteration_equals_the_script():
    """One iteration on given views: the losses, what enters the bank, then the student's weights
    and buffers after SGD (one group, one lr, momentum 0.9, wd 5e-4) and the teacher's weights after
    the EMA. The memory-side selectors are left out: under the code's unit memory weights they take
    no part in the loss; the script still hands them an exactly-zero gradient, so SGD decays them,
    where udafast never computes them."""
    m, views = R.step_setup()
    before = {k: v.clone() for k, v in m.student.named_parameters()}
    before_teacher = {k: v.clone() for k, v in m.teacher.model.named_parameters()}
    losses = m._train_step(*views, R.ITER, R.ITERS)
    g = GOLDEN["one_step"]
    assert close(float(losses["seg"]), g["labeled_loss"], rel=1e-5)
    assert close(float(losses["self_training"]), g["ce_unlabeled"], rel=1e-5)
    assert close(float(losses["contrast_src"]), g["contrast_src"], rel=1e-5)
    assert close(float(losses["contrast_tgt"]), g["contrast_tgt"], rel=1e-5)
    assert m.bank.counts.tolist() == g["bank_counts"]
    # parameters: the step's change (after - before); buffers: their values
    student = {k: v - before[k] if k in before else v for k, v in m.student.state_dict().items()}
    teacher = {k: v - before_teacher[k] for k, v in m.teacher.model.named_parameters()}
    assert set(g["student"]) == {k for k, v in student.items() if ".memory_selectors." not in k and v.is_floating_point()}
    for k, expected in g["student"].items():
        assert R.probe(student[k]) == pytest.approx(expected, rel=1e-4, abs=1e-6), k
    for k, expected in g["teacher"].items():
        assert R.probe(teacher[k]) == pytest.approx(expected, rel=1e-4, abs=1e-6), k
    assert math.isfinite(sum(float(v) for v in losses.values()))
