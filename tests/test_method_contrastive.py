"""The contrastive method (Alonso et al. 2021, SPEC part 2): its loss by hand, the teacher's
momentum schedule and EMA, what enters the memory bank and when, the *code:* flags, a short run,
state round-trips and option checks."""
import json
import math
import types

import pytest
import torch
import torch.nn.functional as F

from udafast.engine.config import DEFAULTS, merge
from udafast.engine.trainer import Trainer
from udafast.methods.contrastive import Contrastive, class_memory_loss, teacher_momentum
from udafast.models import build_model

C = 4


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is faster on a shared machine (the runs set `threads: 1`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
@pytest.mark.parametrize("it,iters,expected", [(0, 100, 0.995), (100, 100, 1.0), (50, 100, 0.9975),
                                               (25, 100, 1 - 0.005 * (math.cos(math.pi / 4) + 1) / 2)])
def test_momentum_schedule(it, iters, expected):
    assert teacher_momentum(it, iters) == pytest.approx(expected, abs=1e-12)


def test_momentum_rises_monotonically():
    values = [teacher_momentum(i, 40, 0.99) for i in range(41)]
    assert values[0] == pytest.approx(0.99) and values[-1] == pytest.approx(1.0)
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


def test_teacher_is_an_ema_of_student_and_heads():
    method = _method(bank_start=10**6, loss_start=10**6)
    before_teacher = {k: v.clone() for k, v in method.teacher.model.state_dict().items()}
    method.step(_batch(), 0, 10)
    student = method.student.state_dict()
    m = teacher_momentum(0, 10, 0.995)
    for name, p in method.teacher.model.named_parameters():
        expected = m * before_teacher[name] + (1 - m) * student[name]
        assert torch.allclose(p, expected, atol=1e-7), name
    assert any(n.startswith("heads.projection") for n, _ in method.teacher.model.named_parameters())
    # the heads train in the model's optimiser, at heads_lr_mult x lr
    group = [g for g in method.optimizers["model"].param_groups if g.get("name") == "contrastive"][0]
    assert group["lr"] == pytest.approx(0.1)
    assert {id(p) for p in method.heads.parameters()} == {id(p) for p in group["params"]}


def _fixed_teacher(method, logits_fn):
    """Replace the teacher network's forward by a fixed prediction (logits from the labels)."""
    net = method.teacher.model["net"]
    original = net.forward

    def forward(x, return_backbone=False):
        out = original(x, return_backbone=True)
        out["logits"] = logits_fn(out["logits"].shape)
        return out
    net.forward = forward


def test_bank_fills_only_with_correct_confident_pixels_after_bank_start():
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
    eligible = [int((down[b, :, :2] == 1).sum()) for b in range(2)]
    assert int(counts[1]) == sum(min(n, 2) for n in eligible) > 0


def _selection_setup(ascending):
    """One image whose class-0 pixels all qualify; the teacher's selector scores are known."""
    method = _method(bank_start=0, loss_start=10**6, per_class=1, code_ascending_selection=ascending)
    batch = _batch(b=1)
    batch["source"]["label"].zero_()
    _fixed_teacher(method, lambda shape: torch.cat([torch.full((shape[0], 1, *shape[2:]), 20.0),
                                                    torch.zeros(shape[0], shape[1] - 1, *shape[2:])], 1))
    teacher = method.teacher.model
    with torch.no_grad():
        out = teacher["net"](method.normalize(batch["source"]["image"]), return_backbone=True)
        z = teacher["heads"]["projection"](out["backbone"].permute(0, 2, 3, 1).reshape(-1, out["backbone"].shape[1]))
        s = torch.sigmoid(teacher["heads"]["selectors"](z, torch.zeros(len(z), dtype=torch.long)))
    method.step(batch, 0, 10)
    return method, z, s


@pytest.mark.parametrize("ascending", [False, True])
def test_selection_keeps_highest_or_code_lowest(ascending):
    method, z, s = _selection_setup(ascending)
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


def test_loss_starts_at_loss_start_and_pseudo_threshold():
    method = _method(bank_start=0, loss_start=1, max_pixels_per_class=3)
    batch = _batch()
    out0 = method.step(batch, 0, 10)
    assert "contrast_src" not in out0
    out1 = method.step(batch, 1, 10)
    assert math.isfinite(out1["contrast_src"]) and math.isfinite(out1["contrast_tgt"])
    # a threshold no prediction reaches leaves no target pixel
    method.options["pseudo_threshold"] = 0.999999
    labels = method._pseudo_labels(method.normalize(batch["target"]["image"]), (4, 4))
    assert bool((labels == 255).all())


def test_sample_limits_pixels_per_class():
    method = _method(max_pixels_per_class=3)
    labels = torch.tensor([0] * 10 + [1] * 2 + [255] * 5 + [2] * 4)
    rows = method._sample(labels)
    picked = labels[rows]
    assert (picked == 255).sum() == 0
    assert [(picked == c).sum().item() for c in range(3)] == [3, 2, 3]


@pytest.mark.parametrize("key,value", [("weight", -1), ("momentum", 1.5), ("bank_size", 0), ("per_class", 1.5),
                                       ("bank_start", -1), ("bank_threshold", 1.0), ("pseudo_threshold", "x"),
                                       ("max_pixels_per_class", 1), ("heads_lr_mult", 0),
                                       ("code_ascending_selection", 1)])
def test_bad_options_raise(key, value):
    ctx = types.SimpleNamespace(device=torch.device("cpu"), backend="auto")
    with pytest.raises(ValueError, match=key):
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
        "contrastive": {"bank_start": 0, "loss_start": 1, "bank_threshold": 0.0, "dim": 16,
                        "max_pixels_per_class": 16},
    })


def test_trainer_run_writes_metrics_and_resumes_identically(tmp_path):
    config = _run_config(4)
    metrics = Trainer(config, tmp_path / "a", tensorboard=False).run()
    assert math.isfinite(metrics["miou"])
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["method"] == "contrastive"
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
