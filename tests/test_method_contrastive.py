"""The contrastive method (Alonso et al. 2021, SPEC part 2): its loss by hand, the teacher's
momentum schedule and EMA, what enters the memory bank and when, the *code:* flags, a short run,
state round-trips and option checks."""
import json
import math
import types

import pytest
import torch
import torch.nn.functional as F

from udafast.config import DEFAULTS, merge
from udafast.engine.trainer import Trainer
from udafast.methods.base import Stage
from udafast.methods.contrastive import Contrastive, class_memory_loss, teacher_momentum
from udafast.models import build_model

C = 4


# tiny tensors: one thread is faster on a shared machine (the runs set `threads: 1`)
pytestmark = pytest.mark.usefixtures("one_thread")


# -- the loss -------------------------------------------------------------------------------------
def _hand_loss(z, labels, s, memory, r, num_classes):
    total = 0.0
    for c in range(num_classes):
        idx = [i for i in range(len(labels)) if labels[i] == c]
        m = memory[c]
        if m is None or len(m) < 2 or len(idx) < 2:
            continue
        sc = [float(s[i]) for i in idx]
        w = [x * len(sc) / sum(sc) for x in sc]
        if r is None:
            v = [1.0] * len(m)
        else:
            v = [float(x) * len(m) / float(sum(r[c])) for x in r[c]]
        acc = 0.0
        for a, i in enumerate(idx):
            for j in range(len(m)):
                zi, mj = z[i].tolist(), m[j].tolist()
                cos = sum(p * q for p, q in zip(zi, mj)) / math.sqrt(sum(p * p for p in zi) * sum(q * q for q in mj))
                acc += w[a] * v[j] * (1 - cos)
        total += acc / (len(idx) * len(m))
    return total / num_classes


@pytest.mark.parametrize("unit_memory", [False, True])
def test_loss_matches_hand_computation(unit_memory):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(9, 3, generator=g, dtype=torch.float64)
    # class 0: 3 features, class 1: 4, class 2: 1 (skipped: < 2), class 3: 1 with no memory
    labels = torch.tensor([0, 1, 0, 1, 2, 1, 0, 1, 3])
    s = torch.rand(9, generator=g, dtype=torch.float64) * 0.9 + 0.05
    memory = [torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(3, 3, generator=g, dtype=torch.float64),
              torch.randn(5, 3, generator=g, dtype=torch.float64), None]
    r = None if unit_memory else [torch.rand(len(m), generator=g, dtype=torch.float64) + 0.1 if m is not None else None
                                  for m in memory]
    got = class_memory_loss(z, labels, s, memory, r, C)
    assert got.item() == pytest.approx(_hand_loss(z, labels, s, memory, r, C), rel=1e-12)


def test_loss_skips_small_classes_and_divides_by_num_classes():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    memory = [torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), None, None]
    s = torch.full((3,), 0.5)
    # class 0: z = (1,0), (0,1): distances [[0, 2], [1, 1]], mean 1; class 1 has one bank entry
    assert class_memory_loss(z, torch.tensor([0, 0, 1]), s, memory, None, 4).item() == pytest.approx(1.0 / 4)
    assert class_memory_loss(z, torch.tensor([0, 1, 1]), s, memory, None, 4).item() == 0.0  # 1 feature of class 0
    # the feature weights: s = (0.9, 0.1) -> w = (1.8, 0.2): (1.8 * 1 + 0.2 * 2) / 4
    s2 = torch.tensor([0.9, 0.1, 0.5])
    got = class_memory_loss(z[[0, 1, 2]], torch.tensor([0, 0, 1]), s2, memory, None, 1)
    assert got.item() == pytest.approx((1.8 * (0 + 2) + 0.2 * (1 + 1)) / 4)


def test_loss_gradients_reach_features_and_scores():
    z = torch.randn(6, 5, requires_grad=True)
    s_raw = torch.randn(6, requires_grad=True)
    memory_rows = torch.randn(3, 5)
    r_raw = torch.randn(3, requires_grad=True)
    loss = class_memory_loss(z, torch.zeros(6, dtype=torch.long), torch.sigmoid(s_raw), [memory_rows],
                             [torch.sigmoid(r_raw)], 1)
    loss.backward()
    for t in (z, s_raw, r_raw):
        assert t.grad is not None and t.grad.abs().sum() > 0


# -- the teacher ----------------------------------------------------------------------------------
@pytest.mark.parametrize("it,iters,expected", [(0, 100, 0.0), (1, 100, 0.5), (100, 100, 1 - 1 / 101),
                                               (5000, 10000, 0.9975),
                                               (3000, 10000, 1 - 0.005 * (math.cos(math.pi * 0.3) + 1) / 2)])
def test_momentum_schedule(it, iters, expected):
    """The cosine 0.995 -> 1, capped by the script's early rule 1 - 1/(it+1) (update_ema_variables)."""
    assert teacher_momentum(it, iters) == pytest.approx(expected, abs=1e-12)


def test_momentum_rises_monotonically():
    values = [teacher_momentum(i, 400, 0.99) for i in range(401)]
    assert values[0] == 0.0 and values[99] == pytest.approx(0.99, abs=1e-3) and values[-1] == pytest.approx(1 - 1 / 401)
    assert all(a <= b for a, b in zip(values, values[1:]))


# -- a method instance without the trainer ---------------------------------------------------------
def _config(**section):
    config = merge(DEFAULTS, {"method": "contrastive", "model": {"name": "small", "num_classes": C, "width": 4},
                              "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0}})
    config["contrastive"] = {"dim": 8, "bank_size": 6, **section}
    return config


def _method(**section):
    config = _config(**section)
    ctx = types.SimpleNamespace(device=torch.device("cpu"), backend="auto")
    method = Contrastive(config, ctx)
    torch.manual_seed(0)
    method.start_stage(None, build_model(config["model"]))
    return method


def _batch(b=2, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"source": {"image": torch.rand(b, 3, h, w, generator=g),
                       "label": torch.randint(0, C, (b, h, w), generator=g)},
            "target": {"image": torch.rand(b, 3, h, w, generator=g)}}


def test_teacher_is_an_ema_of_student_parameters_only():
    method = _method(bank_start=10**6, loss_start=10**6)
    method.step(_batch(), 0, 10)  # momentum 0 at it 0: the teacher's parameters become the student's
    before_teacher = {k: v.clone() for k, v in method.teacher.model.state_dict().items()}
    method.step(_batch(seed=1), 1, 10)
    student = method.student.state_dict()
    m = teacher_momentum(1, 10, 0.995)
    assert m == 0.5
    for name, p in method.teacher.model.named_parameters():
        expected = m * before_teacher[name] + (1 - m) * student[name]
        assert torch.allclose(p, expected, atol=1e-7), name
    assert any(n.startswith("heads.projection") for n, _ in method.teacher.model.named_parameters())
    # its buffers are its own (the script's create_ema_model copies parameters only): its running
    # statistics come from its own forwards, not the student's
    buffers = dict(method.teacher.model.named_buffers())
    name = "net.feature_head.1.running_mean"
    assert not torch.allclose(buffers[name], student[name])


def test_teacher_forward_runs_in_train_mode():
    """The script's ema_model.train(): the teacher's BatchNorm layers normalise with batch statistics."""
    method = _method(bank_start=0, loss_start=10**6, bank_threshold=0.0)
    modes = []
    hooks = [m.register_forward_hook(lambda mod, i, o: modes.append(mod.training))
             for m in method.teacher.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    method.step(_batch(), 0, 10)
    for h in hooks:
        h.remove()
    assert modes and all(modes)


def test_one_optimiser_group_at_one_learning_rate():
    """The script's optim_parameters: every trainable parameter (network and heads) in one group."""
    method = _method()
    groups = method.optimizers["model"].param_groups
    assert len(groups) == 1 and groups[0]["lr"] == pytest.approx(0.01)
    trainable = {id(p) for p in method.student.parameters() if p.requires_grad}
    assert {id(p) for p in groups[0]["params"]} == trainable


def _fixed_teacher(method, logits_fn):
    """Replace the teacher network's forward by a fixed prediction (logits from the labels)."""
    net = method.teacher.model["net"]
    original = net.forward

    def forward(x, return_backbone=False):
        out = original(x, return_backbone=True)
        out["logits"] = logits_fn(out["logits"].shape)
        return out
    net.forward = forward


def test_bank_fills_only_with_correct_confident_pixels_after_bank_start(monkeypatch):
    import udafast.methods.contrastive as module
    monkeypatch.setattr(module, "augment_samples", lambda images, labels, probs, *a, **k: (images, labels, probs))
    method = _method(bank_start=3, loss_start=10**6, per_class=2)
    batch = _batch(b=2, h=32, w=32)
    labels = batch["source"]["label"]
    down = F.interpolate(labels[:, None].float(), size=(4, 4), mode="nearest")[:, 0].long()
    # the teacher predicts class 1 everywhere, confidently on the left half, unsure on the right
    def logits(shape):
        out = torch.zeros(shape)
        out[:, 1, :, :2] = 20.0
        out[:, 1, :, 2:] = 1.0
        return out
    _fixed_teacher(method, logits)
    for it in range(3):
        method.step(batch, it, 10)
        assert int(method.bank.counts.sum()) == 0
    method.step(batch, 3, 10)
    counts = method.bank.counts
    assert counts[[0, 2, 3]].tolist() == [0, 0, 0]
    # the script's test: softmax at the input size, then nearest-downsampled to the features
    probs = F.softmax(F.interpolate(logits((2, C, 4, 4)), size=(32, 32), mode="bilinear", align_corners=True), 1)
    confident = F.interpolate(probs[:, 1:2], size=(4, 4), mode="nearest")[:, 0] > 0.95
    assert bool(confident[:, :, 0].all()) and not bool(confident[:, :, 3].any())
    eligible = int(((down == 1) & confident).sum())
    # per class over the batch: per_class x B = 4 (feature_memory.py's elements_per_class)
    assert int(counts[1]) == min(eligible, 4) > 0


@pytest.mark.parametrize("ascending", [False, True])
def test_selection_keeps_highest_or_code_lowest(ascending):
    """Per class and batch the per_class x B best by the teacher's selector (here 1 x 1)."""
    method = _method(per_class=1, code_ascending_selection=ascending)
    z = torch.randn(10, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(10, dtype=torch.long)
    with torch.no_grad():
        s = torch.sigmoid(method.teacher.model["heads"]["selectors"](z, labels))
    method._push(z, labels, 1)
    assert int(method.bank.counts[0]) == 1
    pick = int(s.argmin() if ascending else s.argmax())
    assert torch.allclose(method.bank.get(0)[0], z[pick], atol=1e-6)


@pytest.mark.parametrize("unit", [False, True])
def test_memory_weights_flag(unit):
    method = _method(code_unit_memory_weights=unit)
    g = torch.Generator().manual_seed(3)
    method.bank.push(torch.randn(8, 8, generator=g), torch.tensor([0, 0, 0, 1, 1, 2, 3, 3]),
                     torch.rand(8, generator=g), 4)
    memory, scores = method._memory()
    assert memory[2] is None and memory[0].shape[0] == 3
    if unit:
        assert scores is None
    else:
        assert scores[0].shape == (3,) and scores[2] is None
        assert bool(((scores[0] > 0) & (scores[0] < 1)).all())


def test_loss_starts_at_loss_start():
    method = _method(bank_start=0, loss_start=1, max_pixels_per_class=3, bank_threshold=0.0)
    batch = _batch()
    out0 = method.step(batch, 0, 10)
    assert "contrast_src" not in out0 and {"seg", "self_training", "entropy"} <= set(out0)
    out1 = method.step(batch, 1, 10)
    assert math.isfinite(out1["contrast_src"]) and math.isfinite(out1["contrast_tgt"])


def test_sample_limits_pixels_per_class():
    method = _method(max_pixels_per_class=3)
    labels = torch.tensor([0] * 10 + [1] * 2 + [255] * 5 + [2] * 4)
    rows = method._sample(labels)
    picked = labels[rows]
    assert (picked == 255).sum() == 0
    assert [(picked == c).sum().item() for c in range(3)] == [3, 2, 3]


@pytest.mark.parametrize("key,value", [("weight", -1), ("momentum", 1.5), ("bank_size", 0), ("per_class", 1.5),
                                       ("bank_start", -1), ("bank_threshold", 1.0), ("ramp_up", -1),
                                       ("max_pixels_per_class", 1), ("target_batch", 0), ("target_views", 0),
                                       ("entropy_weight", "x"), ("bn_update_iters", 1.5), ("final_bn_update", 1),
                                       ("class_balance", "yes"), ("code_ascending_selection", 1)])
def test_bad_options_raise(key, value):
    ctx = types.SimpleNamespace(device=torch.device("cpu"), backend="auto")
    with pytest.raises(ValueError, match=f"contrastive.{key}"):
        Contrastive(_config(**{key: value}), ctx)


# -- runs -----------------------------------------------------------------------------------------
def _run_config(iters):
    tiny = {"name": "synthetic", "split": "train", "options": {"size": [32, 64], "length": 8}}
    return merge(DEFAULTS, {
        "method": "contrastive", "threads": 1, "seed": 0,
        "model": {"name": "small", "num_classes": 19, "width": 4},
        "data": {"source": merge(tiny, {"options": {"domain": "source"}}),
                 "target": merge(tiny, {"options": {"domain": "target"}}),
                 "val": {"name": "synthetic", "split": "val", "options": {"domain": "target", "size": [32, 64],
                                                                          "length": 4}},
                 "batch_size": 2},
        "optimizer": {"name": "adam", "lr": 1e-3},
        "train": {"iters": iters, "panels": 0, "ckpt_every": 2},
        "contrastive": {"bank_start": 0, "loss_start": 1, "ramp_up": 1, "bank_threshold": 0.0, "dim": 16,
                        "max_pixels_per_class": 16, "bn_update_iters": 3},
    })


def test_trainer_run_writes_metrics_and_resumes_identically(tmp_path):
    config = _run_config(4)
    metrics = Trainer(config, tmp_path / "a", tensorboard=False).run()
    assert math.isfinite(metrics["miou"])
    written = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert written["method"] == "contrastive"
    # the final BatchNorm re-estimation: scored before and after
    assert math.isfinite(written["miou_before_bn_update"]) and written["miou"] == metrics["miou"]
    assert written["stages"]["train"]["miou_before_bn_update"] == written["miou_before_bn_update"]
    full = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)
    assert int(full["method"]["modules"]["bank"]["counts"].sum()) > 0
    # resumed from the checkpoint after iteration 2 of 4: the same network, teacher and bank
    resumed_dir = tmp_path / "c"
    Trainer(config, resumed_dir, resume=str(tmp_path / "a" / "checkpoints" / "iter_2.pt"), tensorboard=False).run()
    again = torch.load(resumed_dir / "checkpoints" / "last.pt", weights_only=True)
    for k, v in full["model"].items():
        assert torch.allclose(v.float(), again["model"][k].float(), atol=1e-6), k
    for k, v in full["method"]["modules"]["teacher"].items():
        assert torch.allclose(v.float(), again["method"]["modules"]["teacher"][k].float(), atol=1e-6), k
    assert torch.equal(full["method"]["modules"]["bank"]["counts"], again["method"]["modules"]["bank"]["counts"])
    assert torch.allclose(full["method"]["modules"]["bank"]["features"], again["method"]["modules"]["bank"]["features"],
                          atol=1e-6)


def test_state_round_trip():
    a = _method(bank_start=0, loss_start=1)
    for it in range(2):
        a.step(_batch(seed=it), it, 10)
    state = a.state_dict()
    b = _method(bank_start=0, loss_start=1)
    b.load_state_dict(state)
    for (k, v), (_, w) in zip(a.heads.state_dict().items(), b.heads.state_dict().items()):
        assert torch.equal(v, w), k
    for (k, v), (_, w) in zip(a.teacher.state_dict().items(), b.teacher.state_dict().items()):
        assert torch.equal(v, w), k
    assert torch.equal(a.bank.features, b.bank.features) and torch.equal(a.bank.counts, b.bank.counts)


def test_final_bn_update_reestimates_statistics_on_target_batches_only():
    """update_BN_weak_unlabeled_data: forwards in train mode on `bn_update_iters` target batches of
    `target_batch` images; the weights stay, the BatchNorm statistics move; off with the flag."""
    for on in (True, False):
        method = _method(final_bn_update=on, bn_update_iters=4)
        seen = []
        stream = iter([{"image": torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(i))}
                       for i in range(10)])
        method.ctx.target_stream = stream
        method.model.eval()
        hook = method.model.register_forward_hook(lambda mod, i, o: seen.append((mod.training, i[0].shape[0])))
        weights = {k: v.clone() for k, v in method.model.named_parameters()}
        stats = {k: v.clone() for k, v in method.model.named_buffers()}
        name = method.finish_stage(None)
        hook.remove()
        assert all(torch.equal(v, weights[k]) for k, v in method.model.named_parameters())
        if on:
            assert name == "bn_update" and seen == [(True, 2)] * 4  # half the batch, the script's unlabelled batch
            assert not torch.allclose(dict(method.model.named_buffers())["feature_head.1.running_mean"],
                                      stats["feature_head.1.running_mean"])
            assert not method.model.training  # its mode is given back
        else:
            assert name is None and seen == []


def _weights(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g))


def test_code_reload_best_restores_the_best_student_after_a_fifth_without_improvement():
    """trainSSL_domain_adaptation_targetCity.py: best_model.pth keeps the best validation; after more
    than num_iterations / 5 iterations of validations without a better one, the student reloads it
    and the teacher restarts as its copy; the count restarts."""
    config = _config(code_reload_best=True)
    config["train"]["eval_every"] = 10
    method = Contrastive(config, types.SimpleNamespace(device=torch.device("cpu"), backend="auto",
                                                       log=lambda message: None))
    torch.manual_seed(0)
    stage = Stage("train", 100)
    method.start_stage(stage, build_model(config["model"]))
    method.observe_validation(stage, 30.0, 10)
    best = _weights(method.student)
    _perturb(method.student, 1)
    method.observe_validation(stage, 29.0, 20)   # 10 iterations without improvement
    method.observe_validation(stage, 30.0, 30)   # 20: not more than 100 / 5
    assert not torch.equal(method.model.classifier.weight, best["net.classifier.weight"])
    method.observe_validation(stage, 25.0, 40)   # 30 > 20: back to the best
    assert all(torch.equal(v, best[k]) for k, v in method.student.state_dict().items())
    teacher = method.teacher.model.state_dict()
    assert all(torch.equal(v, best[k]) for k, v in teacher.items() if k in best and v.is_floating_point())
    assert method.best["stale"] == 0
    _perturb(method.student, 2)
    method.observe_validation(stage, 31.0, 50)   # a better one replaces the kept network
    better = _weights(method.student)
    _perturb(method.student, 3)
    method.observe_validation(stage, 20.0, 100)  # the end-of-training validation never reloads ...
    assert not torch.equal(method.model.classifier.weight, better["net.classifier.weight"])
    method.ctx.target_stream = None
    assert method.finish_stage(stage) == "best_reload"  # ... but the final step starts from the best
    assert all(torch.equal(v, better[k]) for k, v in method.student.state_dict().items())
    # the kept network travels with the checkpoint
    again = Contrastive(config, method.ctx)
    again.start_stage(stage, build_model(config["model"]))
    again.load_extra_state(method.extra_state())
    assert again.best["miou"] == 31.0 and torch.equal(again.best["weights"]["net.classifier.weight"],
                                                      better["net.classifier.weight"])


def test_code_reload_best_is_off_by_default_and_needs_validation():
    method = _method()
    method.observe_validation(Stage("train", 100), 30.0, 10)
    assert method.best is None
    with pytest.raises(ValueError, match="contrastive.code_reload_best: .*train.eval_every"):
        Contrastive(_config(code_reload_best=True), types.SimpleNamespace(device=torch.device("cpu"),
                                                                          backend="auto"))


def test_views_classmix_only_after_ramp_up_and_labels_follow_images(monkeypatch):
    """The student's target views: ClassMix (probability 0.75) only once it > ramp_up; the pseudo-labels
    and max-probabilities go through the same masks and geometry as the images (here: every
    view is checked against the teacher's labels warped by the recorded masks)."""
    import udafast.methods.contrastive as module
    calls = []
    real = module.augment_samples

    def spy(images, labels, probs, do_classmix, weak, generator, ignore_index=255):
        calls.append((weak, do_classmix))
        return real(images, labels, probs, do_classmix, weak, generator, ignore_index)
    monkeypatch.setattr(module, "augment_samples", spy)
    method = _method(ramp_up=5, bank_start=10**6, loss_start=10**6)
    for it in range(12):
        method.step(_batch(b=4, seed=it), it, 12)
    strong = [(i // 3, mixed) for i, (weak, mixed) in enumerate(calls) if not weak]
    weak = [w for w, _ in calls].count(True)
    assert weak == 12 and len(strong) == 24  # one weak source view and two strong target views per step
    assert not any(mixed for it, mixed in strong if it <= 5)
    assert any(mixed for it, mixed in strong if it > 5)


def test_augment_samples_warps_labels_and_probs_with_the_images():
    """Mix, scale and flip move images, labels and probabilities alike (colour and blur touch the
    images only). Labels in 6x6 blocks, probabilities a function of the label: after augmentation
    they still agree away from block borders (bilinear against nearest), and padding is ignored
    with probability 0."""
    from udafast.methods.contrastive import augment_samples
    B, H, W = 3, 48, 48
    blocks = torch.randint(0, 4, (B, H // 6, W // 6), generator=torch.Generator().manual_seed(0))
    labels = blocks.repeat_interleave(6, 1).repeat_interleave(6, 2)
    probs = labels.double() / 10 + 0.5
    images = (labels.double() / 4)[:, None].expand(B, 3, H, W).contiguous()
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        x, y, p = augment_samples(images, labels, probs, True, False, g)
        assert x.shape == images.shape and y.shape == labels.shape and p.shape == probs.shape
        valid = y != 255
        agree = ((p[valid] - (y[valid].double() / 10 + 0.5)).abs() < 1e-6).double().mean()
        assert agree > 0.6  # by chance: about 0.3
        assert bool((p[~valid] == 0).all())


def test_self_training_weight_is_max_prob_to_the_6_with_ramp():
    from udafast.methods.contrastive import self_training_loss
    logits = torch.zeros(1, 2, 1, 2, dtype=torch.float64)
    pseudo = torch.tensor([[[0, 255]]])
    probs = torch.tensor([[[0.5, 0.9]]], dtype=torch.float64)
    # one valid pixel of two: log 2 * 0.5**6 * ramp, averaged over both pixels
    got = self_training_loss(logits, pseudo, probs, 0.3)
    assert float(got) == pytest.approx(math.log(2) * 0.5 ** 6 * 0.3 / 2)


def test_teacher_labels_are_recorded_against_truth():
    method = _method(bank_start=10**6, loss_start=10**6)
    batch = _batch(b=4)
    batch["target"]["truth"] = torch.randint(0, C, (4, 32, 32))
    method.step(batch, 0, 10)
    assert "teacher" in method.label_quality
