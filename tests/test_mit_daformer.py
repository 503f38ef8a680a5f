"""DAFormer's network ("mit_b5_daformer": SegFormer MiT-B5 + the context-aware fusion head): the
authors' key names and shapes, the weights files that load by them, the forward against the
authors' classes, outputs, optimiser groups, bf16 and activation checkpointing.

Key names and shapes: tests/fixtures/authors/{mit_b5,daformer}_keys.json, the state_dict() of
lhoyer/DAFormer's classes; daformer_tiny_forward.json: their network's logits on a tiny config
(both with provenance inside). Random state dicts hold one random value per tensor, expanded to
its shape (torch.save keeps one element), so a B5-sized file stays a few kilobytes.
"""
import json
import math
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from udafast.models import build_model, load_model_checkpoint, model_from_checkpoint
from udafast.models.daformer import MiTDAFormer

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = Path(__file__).parent / "fixtures" / "authors"


def fixture_keys(name):
    return [(k, tuple(shape)) for k, shape in json.loads((FIXTURES / f"{name}_keys.json").read_text())["keys"]]


@pytest.fixture(scope="module")
def b5():
    return build_model({"name": "mit_b5_daformer"}, load_pretrained=False)


def random_state(keys, prefix="", seed=0):
    g = torch.Generator().manual_seed(seed)
    return {prefix + k: (torch.randn(1, generator=g).expand(shape) if shape else torch.tensor(7))
            for k, shape in keys}


def test_b5_has_the_authors_key_names_and_shapes(b5):
    own = {k: tuple(v.shape) for k, v in b5.state_dict().items()}
    assert own == dict(fixture_keys("daformer"))
    assert {k: tuple(v.shape) for k, v in b5.backbone.state_dict().items()} == dict(fixture_keys("mit_b5"))
    assert b5.backbone.out_channels == (64, 128, 320, 512) and len(b5.backbone.block3) == 40
    assert b5.normalization == "imagenet" and b5.config["pretrained"] is None


def test_imagenet_mit_file_loads_by_its_names(tmp_path):
    keys = fixture_keys("mit_b5")
    state = random_state(keys)
    state.update({"head.weight": torch.zeros(1000, 512), "head.bias": torch.zeros(1000)})  # the ImageNet classifier
    path = tmp_path / "mit_b5.pth"
    torch.save(state, path)
    model = build_model({"name": "mit_b5_daformer", "pretrained": str(path)})
    own = model.backbone.state_dict()
    assert all(torch.equal(own[k], state[k]) for k, _ in keys)
    assert model.config["pretrained"] == str(path)

    for edit, named in ((lambda s: s.pop("block3.39.mlp.fc2.bias"), "missing keys: block3.39.mlp.fc2.bias"),
                        (lambda s: s.update({"block5.0.attn.q.weight": torch.zeros(1)}),
                         "unexpected keys: block5.0.attn.q.weight"),
                        (lambda s: s.update({"norm4.weight": torch.zeros(256)}),
                         "shape mismatches: norm4.weight (256,)")):
        broken = dict(state)
        edit(broken)
        torch.save(broken, path)
        with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
            build_model({"name": "mit_b5_daformer", "pretrained": str(path)})


def test_daformer_uda_checkpoint_loads_the_student(tmp_path):
    keys = fixture_keys("daformer")
    student = random_state(keys, "model.")
    state = {**student, **random_state(keys, "ema_model.", 1), **random_state(keys, "imnet_model.", 2)}
    path = tmp_path / "iter_40000.pth"
    torch.save({"meta": {"iter": 40000, "CLASSES": ("road",)}, "state_dict": state}, path)
    model = model_from_checkpoint(path)
    assert model.config["name"] == "mit_b5_daformer" and model.config["num_classes"] == 19
    own = model.state_dict()
    assert all(torch.equal(own[k], student["model." + k]) for k, _ in keys)

    for edit, named in ((lambda s: s.pop("model.decode_head.fuse_layer.bottleneck.bn.running_var"),
                         "missing keys: model.decode_head.fuse_layer.bottleneck.bn.running_var"),
                        (lambda s: s.update({"model.decode_head.scale_attention.weight": torch.zeros(1)}),
                         "unexpected keys: model.decode_head.scale_attention.weight"),
                        (lambda s: s.update({"teacher.x": torch.zeros(1)}), "unexpected keys: teacher.x")):
        broken = dict(state)
        edit(broken)
        torch.save({"state_dict": broken}, path)
        with pytest.raises(ValueError, match=named):
            load_model_checkpoint(path)


def tiny(**kw):
    f = json.loads((FIXTURES / "daformer_tiny_forward.json").read_text())["config"]
    return MiTDAFormer(f["num_classes"], f["channels"], embed_dims=f["embed_dims"], num_heads=f["num_heads"],
                       depths=f["depths"], sr_ratios=f["sr_ratios"], **kw)


def test_tiny_forward_matches_the_authors_network():
    ref = json.loads((FIXTURES / "daformer_tiny_forward.json").read_text())
    net = tiny().eval()
    state = {}
    for i, (k, v) in enumerate(sorted(net.state_dict().items())):  # the fixture's formula weights
        if k.endswith("num_batches_tracked"):
            state[k] = v
            continue
        x = torch.sin(torch.arange(math.prod(v.shape), dtype=torch.float64) * 0.37 + 1.3 * i)
        state[k] = (1 + 0.5 * x.abs() if k.endswith("running_var") else 0.2 * x).reshape(v.shape).float()
    net.load_state_dict(state)
    s = ref["config"]["size"]
    image = torch.sin(torch.arange(3 * s * s, dtype=torch.float64) * 0.11).reshape(1, 3, s, s).float()
    with torch.no_grad():
        out = net(image, return_backbone=True)
    expected = torch.tensor(ref["logits"]).reshape(ref["logits_shape"])
    torch.testing.assert_close(out["logits"], expected, atol=2e-5, rtol=0)
    assert [round(x.double().mean().item(), 5) for x in out["levels"]] == \
        pytest.approx([round(m, 5) for m in ref["stage_means"]], abs=2e-5)


def test_tiny_outputs_and_param_groups():
    net = tiny()
    out = net(torch.rand(2, 3, 64, 96), return_backbone=True)
    assert out["logits"].shape == (2, 3, 16, 24) and out["features"].shape == (2, 32, 16, 24)
    assert out["backbone"].shape == (2, 64, 2, 3) and [x.shape[1] for x in out["levels"]] == [16, 32, 40, 64]
    assert "aux" not in out and set(net(torch.rand(1, 3, 32, 32))) == {"logits", "features"}
    groups = net.param_groups(6e-5)
    assert [g["name"] for g in groups] == ["backbone", "backbone_norm", "heads"]
    assert [g["lr"] for g in groups] == pytest.approx([6e-5, 6e-5, 6e-4]) and groups[1]["weight_decay"] == 0.0
    layer_norms = [m for m in net.backbone.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(groups[1]["params"]) == 2 * len(layer_norms)
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in net.decode_head.parameters()}


def test_tiny_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(1)
    net = tiny(head_dropout=0.0)  # DropPath (0.1) stays on: the recomputation must redraw the same masks
    image = torch.rand(1, 3, 64, 64)
    grads = []
    for on in (False, True):
        net.zero_grad()
        net.backbone.activation_checkpointing = on
        torch.manual_seed(2)
        net(image)["logits"].square().mean().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_tiny_runs_under_bf16_autocast():
    net = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.rand(1, 3, 64, 64))
    assert out["logits"].dtype == torch.bfloat16 and torch.isfinite(out["logits"].float()).all()
    out["logits"].float().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.slow
def test_mit_b5_one_training_iteration(b5):
    """The slow one: one AdamW step of the full MiT-B5 network (DAFormer's optimiser settings) on a
    128x128 crop, batch 1 (about 10 s of CPU time on one thread)."""
    start = time.process_time()
    b5.train()
    opt = torch.optim.AdamW(b5.param_groups(6e-5), lr=6e-5, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    image, label = torch.rand(1, 3, 128, 128, generator=g), torch.randint(0, 19, (1, 128, 128), generator=g)
    before = b5.backbone.block3[39].mlp.fc2.weight.detach().clone()
    logits = b5(image)["logits"]
    assert logits.shape == (1, 19, 32, 32)
    loss = F.cross_entropy(F.interpolate(logits, size=(128, 128), mode="bilinear", align_corners=False), label)
    loss.backward()
    assert all(p.grad is not None for p in b5.parameters())  # every parameter is used
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, b5.backbone.block3[39].mlp.fc2.weight)
    assert time.process_time() - start < 60
