"""AdaptSegNet: the adversarial losses (vanilla and LS-GAN) against hand values, the generator's
gradients against a hand computation of CE_main + 0.1 CE_aux + adv terms, the discriminators kept
out of the generator step, 1 vs 2 levels, a short Trainer run, resume, and option checks."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import run_and_resume, tiny_domain_batch, tiny_run_config
from udafast.engine.trainer import Trainer, apply_schedule
from udafast.methods.adaptsegnet import AdaptSegNet
from udafast.methods.adversarial import OutputSpaceAdversary
from udafast.methods.base import Stage, build_optimizer
from udafast.models import build_model
from udafast.models.heads import Discriminator
from udafast.models.segmentation import SegmentationModel


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(iters=3, **section):
    return tiny_run_config("adaptsegnet", train={"iters": iters, "panels": 0}, adaptsegnet={"ndf": 8, **section})


def make_method(**section):
    config = tiny_config(**section)
    method = AdaptSegNet(config, SimpleNamespace(device=torch.device("cpu"), backend="reference"))
    method.start_stage(Stage("train", 10), build_model(config["model"]))
    return method


def _up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


# -- the adversarial losses -----------------------------------------------------------------------
@pytest.mark.parametrize("gan", ["vanilla", "lsgan"])
def test_generator_loss_values_and_no_discriminator_gradient(gan):
    adv = OutputSpaceAdversary(("main",), 5, gan=gan, ndf=4)
    d = adv.discriminators["main"]
    logits = torch.randn(2, 5, 8, 16, requires_grad=True)
    loss = adv.generator_loss({"main": logits}, (32, 64))["main"]
    with torch.no_grad():
        out = d(F.softmax(_up(logits, (32, 64)), dim=1))
    # toward the source label 0: BCE = softplus(d), squared error = d^2
    hand = F.softplus(out).mean() if gan == "vanilla" else (out ** 2).mean()
    assert loss.item() == pytest.approx(hand.item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is None for p in d.parameters())
    assert all(p.requires_grad for p in d.parameters())
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("gan", ["vanilla", "lsgan"])
def test_generator_gradient_pushes_target_toward_source_label(gan):
    adv = OutputSpaceAdversary(("main",), 5, gan=gan, ndf=4)
    d = adv.discriminators["main"]
    logits = torch.randn(2, 5, 32, 64, requires_grad=True)
    score = lambda x: d(F.softmax(x, dim=1)).mean().item()  # noqa: E731 (D's logit: 0 source, 1 target)
    before = score(logits)
    adv.generator_loss({"main": logits}, (32, 64))["main"].backward()
    with torch.no_grad():
        stepped = logits - 50.0 * logits.grad / logits.grad.norm()
    target_value = 0.0
    if gan == "lsgan":   # squared error: D's output moves toward 0
        assert abs(score(stepped) - target_value) < abs(before - target_value)
    else:                # BCE toward label 0: D's logit decreases
        assert score(stepped) < before


@pytest.mark.parametrize("gan", ["vanilla", "lsgan"])
def test_discriminator_loss_values(gan):
    adv = OutputSpaceAdversary(("main", "aux"), 5, gan=gan, ndf=4)
    src = {lv: torch.randn(2, 5, 4, 8) for lv in ("main", "aux")}
    tgt = {lv: torch.randn(1, 5, 4, 8) for lv in ("main", "aux")}
    hand = {}
    with torch.no_grad():
        for lv, d in adv.discriminators.items():
            ds, dt = d(F.softmax(_up(src[lv], (32, 64)), 1)), d(F.softmax(_up(tgt[lv], (32, 96)), 1))
            if gan == "vanilla":   # 0.5 BCE(source, 0) + 0.5 BCE(target, 1)
                hand[lv] = 0.5 * F.softplus(ds).mean() + 0.5 * F.softplus(-dt).mean()
            else:                  # 0.5 MSE(source, 0) + 0.5 MSE(target, 1)
                hand[lv] = 0.5 * (ds ** 2).mean() + 0.5 * ((dt - 1) ** 2).mean()
    before = {lv: [p.clone() for p in d.parameters()] for lv, d in adv.discriminators.items()}
    losses = adv.discriminator_step(src, tgt, (32, 64), (32, 96))
    for lv in ("main", "aux"):
        assert losses[lv].item() == pytest.approx(hand[lv].item(), rel=1e-6)
        assert any(not torch.equal(a, b) for a, b in zip(before[lv], adv.discriminators[lv].parameters()))


# -- the method -------------------------------------------------------------------------------------
@pytest.mark.parametrize("multi_level, levels", [(True, {"main", "aux"}), (False, {"main"})])
def test_levels_make_their_discriminators(multi_level, levels):
    method = make_method(multi_level=multi_level)
    assert set(method.modules) == {f"disc_{lv}" for lv in levels}
    assert set(method.optimizers) == {"model", "disc"}
    disc = method.optimizers["disc"]
    assert isinstance(disc, torch.optim.Adam) and disc.param_groups[0]["betas"] == (0.9, 0.99)
    assert disc.param_groups[0]["initial_lr"] == 1e-4
    losses = method.step(tiny_domain_batch(), 0, 10)
    assert set(losses) == {f"{k}_{lv}" for k in ("seg", "adv", "d") for lv in levels}
    assert all(math.isfinite(float(v)) for v in losses.values())


@pytest.mark.parametrize("multi_level, gan", [(True, "vanilla"), (False, "vanilla"), (True, "lsgan")])
def test_generator_gradients_match_hand_computation(multi_level, gan):
    w = {"seg_weight_aux": 0.3, "adv_weight_main": 0.5, "adv_weight_aux": 0.2}  # large: the adv terms show
    method = make_method(multi_level=multi_level, gan=gan, **w)
    discs = {lv: [p.clone() for p in d.parameters()] for lv, d in method.adversary.discriminators.items()}
    grads = {}
    opt = method.optimizers["model"]
    opt.step = lambda: grads.update({p: p.grad.clone() for g in opt.param_groups for p in g["params"]
                                     if p.grad is not None})
    batch = tiny_domain_batch()
    method.step(batch, 0, 10)

    # hand: the same loss with the discriminators as they were during the generator step
    model = method.model
    for lv, d in method.adversary.discriminators.items():
        with torch.no_grad():
            for p, old in zip(d.parameters(), discs[lv]):
                p.copy_(old)
    out_s = model(method.normalize(batch["source"]["image"]))
    out_t = model(method.normalize(batch["target"]["image"]))
    labels = batch["source"]["label"]
    adv_label = F.binary_cross_entropy_with_logits if gan == "vanilla" else F.mse_loss

    def adv(lv, key):
        out = method.adversary.discriminators[lv](F.softmax(_up(out_t[key], (32, 64)), 1))
        return adv_label(out, torch.zeros_like(out))
    loss = F.cross_entropy(_up(out_s["logits"], (32, 64)), labels) + w["adv_weight_main"] * adv("main", "logits")
    if multi_level:
        loss = loss + w["seg_weight_aux"] * F.cross_entropy(_up(out_s["aux"], (32, 64)), labels) \
            + w["adv_weight_aux"] * adv("aux", "aux")
    params = [p for p in model.parameters() if p.requires_grad]
    expected = torch.autograd.grad(loss, params, materialize_grads=True)
    for p, e in zip(params, expected):
        torch.testing.assert_close(grads.get(p, torch.zeros_like(p)), e, rtol=1e-4, atol=1e-7)
    if not multi_level:
        assert model.aux_classifier.weight not in grads or not grads[model.aux_classifier.weight].any()


@pytest.mark.parametrize("scale, size", [(1.0, (64, 128)), (0.5, (32, 64))])
def test_adv_scale_sets_the_discriminators_input_size(scale, size):
    method = make_method(multi_level=False, adv_scale=scale)
    seen = []
    method.adversary.discriminators["main"].register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[-2:])))
    g = torch.Generator().manual_seed(1)
    batch = {"source": {"image": torch.rand(1, 3, 64, 128, generator=g),
                        "label": torch.randint(0, 19, (1, 64, 128), generator=g)},
             "target": {"image": torch.rand(1, 3, 64, 128, generator=g)}}
    method.step(batch, 0, 10)
    assert seen == [size] * 3   # generator (target), discriminator (source, target)


# -- runs --------------------------------------------------------------------------------------------
def test_trainer_run_writes_metrics(tmp_path):
    metrics = Trainer(tiny_config(iters=3, gan="lsgan"), tmp_path, tensorboard=False).run()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["method"] == "adaptsegnet" and saved["iters"] == 3
    assert math.isfinite(saved["miou"]) and saved["miou"] == metrics["miou"]
    assert "d_aux" in (tmp_path / "log.csv").read_text()


def test_resume_continues_identically(tmp_path):
    a, b = run_and_resume(tiny_config(iters=4), tmp_path)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for name in ("disc_main", "disc_aux"):
        da, db = a["method"]["modules"][name], b["method"]["modules"][name]
        assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da), name


# -- options -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("section, name", [
    ({"multi_level": "yes"}, "multi_level"), ({"gan": "wgan"}, "gan"), ({"adv_weight_main": -0.001}, "adv_weight_main"),
    ({"adv_weight_aux": "x"}, "adv_weight_aux"), ({"seg_weight_aux": None}, "seg_weight_aux"), ({"ndf": 0}, "ndf"),
    ({"adv_scale": 0}, "adv_scale"), ({"adv_scale": 1.5}, "adv_scale"),
    ({"discriminator": {"lr": 0}}, "discriminator"), ({"discriminator": {"name": "rmsprop"}}, "discriminator"),
    ({"lambda_adv": 0.001}, "lambda_adv"),
])
def test_bad_options_raise_naming_the_option(section, name):
    with pytest.raises(ValueError, match=name):
        AdaptSegNet(tiny_config(**section), SimpleNamespace(device=torch.device("cpu"), backend="reference"))


def test_partial_discriminator_section_keeps_the_defaults():
    method = make_method(discriminator={"lr": 2e-4})
    g = method.optimizers["disc"].param_groups[0]
    assert g["initial_lr"] == 2e-4 and g["betas"] == (0.9, 0.99)


# -- golden: one training iteration against the authors' code --------------------------------------
GOLDEN = Path(__file__).parent / "fixtures" / "authors" / "adaptsegnet_iteration.json"


class _TinyBackbone(torch.nn.Module):
    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer3 = nn.Conv2d(8, 16, 3, stride=4, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.layer4 = nn.Conv2d(16, 16, 3, padding=2, dilation=2, bias=False)
        self.bn4 = nn.BatchNorm2d(16)


class _TinyMulti(SegmentationModel):
    """The golden run's stand-in for DeeplabMulti (same parameters in the same creation order):
    aux head on the layer3 stand-in, main head on layer4, BatchNorm affines frozen, inputs as is."""
    normalization = "unit"

    def __init__(self, num_classes=5):
        super().__init__()
        self.backbone = _TinyBackbone()
        self.aux_classifier = torch.nn.Conv2d(16, num_classes, 3, padding=1)
        self.classifier = torch.nn.Conv2d(16, num_classes, 3, padding=1)
        for bn in (self.backbone.bn1, self.backbone.bn3, self.backbone.bn4):
            for p in bn.parameters():
                p.requires_grad_(False)

    def forward(self, x, return_backbone=False):
        b = self.backbone
        x = F.relu(b.bn1(b.conv1(x)))
        x3 = F.relu(b.bn3(b.layer3(x)))
        return {"aux": self.aux_classifier(x3), "logits": self.classifier(F.relu(b.bn4(b.layer4(x3))))}


def golden_recipe(num_classes=5, ndf=8):
    """The inputs the fixture was computed from: seed 0 -> network, D_aux, D_main (float32 init, then
    float64); a generator seeded 1 -> two batches (source 2x3x48x64 with labels, 10% 255; target 2x3x40x56)."""
    torch.manual_seed(0)
    model = _TinyMulti(num_classes).double()
    d_aux, d_main = Discriminator(num_classes, ndf).double(), Discriminator(num_classes, ndf).double()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        xs = torch.rand(2, 3, 48, 64, generator=g, dtype=torch.float32).double()
        ys = torch.randint(0, num_classes, (2, 48, 64), generator=g)
        ys[torch.rand(2, 48, 64, generator=g) < 0.1] = 255
        xt = torch.rand(2, 3, 40, 56, generator=g, dtype=torch.float32).double()
        batches.append({"source": {"image": xs, "label": ys}, "target": {"image": xt}})
    return model, d_aux, d_main, batches


def test_two_iterations_equal_the_authors_code():
    """Losses and every weight, BatchNorm statistic and discriminator weight after two iterations
    equal wasidennis/AdaptSegNet's training loop (pytorch_0.4/train_gta2cityscapes_multi.py,
    model/discriminator.py at fca9ff0f; provenance in the fixture), with the code's poly horizon
    (NUM_STEPS, here 10) longer than the run: SGD 2.5e-4 (heads x10), momentum 0.9, wd 5e-4; Adam
    1e-4 (0.9, 0.99) for the discriminators, both on the poly schedule."""
    golden = json.loads(GOLDEN.read_text())
    model, d_aux, d_main, batches = golden_recipe()
    config = tiny_config(iters=6, discriminator={"name": "adam", "lr": 1e-4, "betas": [0.9, 0.99],
                                                 "weight_decay": 0.0, "schedule": "poly", "power": 0.9,
                                                 "poly_iters": 10})
    config["model"]["num_classes"] = 5
    config["optimizer"] = {"name": "sgd", "lr": 2.5e-4, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "poly",
                           "power": 0.9, "poly_iters": 10}
    method = AdaptSegNet(config, SimpleNamespace(device=torch.device("cpu"), backend="reference"))
    method.start_stage(Stage("train", 6), model)
    for level, d in (("aux", d_aux), ("main", d_main)):   # the same Parameter objects, in float64
        method.adversary.discriminators[level].double().load_state_dict(d.state_dict())
    model.train()
    for it, batch in enumerate(batches):
        apply_schedule(method.optimizers, it, 6)
        losses = method.step(batch, it, 6)
        for name, value in golden["losses"][it].items():
            assert losses[name].item() == pytest.approx(value, rel=1e-9, abs=1e-12), (it, name)

    def check(module, expected):
        state = {k: v for k, v in module.state_dict().items() if v.is_floating_point()}
        assert len(state) == len(expected)
        for (k, v), (name, figures) in zip(state.items(), expected.items()):
            v = v.double()
            got = [float(v.sum()), float((v ** 2).sum()), float(v.reshape(-1)[0]), float(v.reshape(-1)[-1])]
            assert got == pytest.approx(figures, rel=1e-9, abs=1e-12), (k, name)
    check(model, golden["model"])
    check(method.adversary.discriminators["aux"], golden["D_aux"])
    check(method.adversary.discriminators["main"], golden["D_main"])


def test_shipped_configs_run_the_authors_schedule_and_frozen_bn_affines():
    """train_gta2cityscapes_multi.py: poly over NUM_STEPS 250000 for the network and the
    discriminators, stopped at NUM_STEPS_STOP 150000; deeplab_multi.py freezes every BatchNorm
    affine (the paper is silent on both, so the code is the default)."""
    from udafast.config import read_config
    from udafast.engine.runs import resolve_config
    for name in ("gta5_adaptsegnet", "synthia_adaptsegnet"):
        config = resolve_config(read_config(name), "adaptsegnet")
        assert config["train"]["iters"] == 150000 and config["optimizer"]["poly_iters"] == 250000
        assert config["adaptsegnet"]["discriminator"]["poly_iters"] == 250000
        assert config["model"]["freeze_bn_affine"] is True and config["model"].get("aspp", "four") == "four"


def test_poly_horizon_longer_than_the_run():
    opt = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))]}],
                          {"name": "sgd", "lr": 1.0, "poly_iters": 250000})
    apply_schedule({"model": opt}, 149999, 150000)
    assert opt.param_groups[0]["lr"] == pytest.approx((1 - 149999 / 250000) ** 0.9, rel=1e-12)
    with pytest.raises(ValueError, match="poly_iters"):
        build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))]}], {"name": "sgd", "lr": 1.0, "poly_iters": 0})


def test_deeplab_batchnorm_affines_frozen_by_default_explicit_choice_wins():
    """model/deeplab_multi.py freezes every BatchNorm affine (the paper is silent: the code's default)."""
    assert AdaptSegNet.model_overrides({"name": "deeplabv2_r101"}) == {"freeze_bn_affine": True}
    assert AdaptSegNet.model_overrides({"name": "deeplabv2_r101", "freeze_bn_affine": False}) == {}
    assert AdaptSegNet.model_overrides({"name": "small"}) == {}


def test_aspp_biases_keep_the_conv_default_initialisation():
    """The authors' Classifier_Module draws weights N(0, 0.01) and leaves the biases at nn.Conv2d's
    default (uniform in +-1/sqrt(fan_in)), not zero."""
    from udafast.models.segmentation import ASPPClassifier
    torch.manual_seed(0)
    head = ASPPClassifier(64, 5)
    bound = 1 / math.sqrt(64 * 9)
    for conv in head.conv2d_list:
        assert conv.bias.abs().max() > 0 and conv.bias.abs().max() <= bound
        assert abs(conv.weight.std().item() - 0.01) < 0.002
