"""DANN: the gradient reversal layer, the lambda schedule, the domain loss against a hand BCE, the
step's gradients against a hand computation, a short Trainer run, resume, and option checks."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import run_and_resume, tiny_domain_batch, tiny_run_config
from udafast.engine.trainer import Trainer
from udafast.methods.base import Stage
from udafast.methods.dann import DANN, domain_loss, grad_reverse, grl_lambda
from udafast.models import build_model


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(iters=3, **section):
    return tiny_run_config("dann", train={"iters": iters, "panels": 0}, dann=section)


def make_method(**section):
    config = tiny_config(**section)
    method = DANN(config, SimpleNamespace(device=torch.device("cpu"), backend="reference"))
    model = build_model(config["model"])
    method.start_stage(Stage("train", 10), model)
    return method


# -- the gradient reversal layer and the schedule --------------------------------------------------
@pytest.mark.parametrize("lambd", [0.0, 0.37, 1.0, 2.5])
def test_grl_forward_identity_backward_negated(lambd):
    x = torch.randn(2, 5, 3, 4, requires_grad=True)
    upstream = torch.randn(2, 5, 3, 4)
    y = grad_reverse(x, lambd)
    assert torch.equal(y, x)
    y.backward(upstream)
    assert torch.equal(x.grad, upstream * -lambd)


@pytest.mark.parametrize("p, expected", [(0.0, 0.0), (0.5, 0.9866142981514305), (1.0, 0.9999092042625951)])
def test_lambda_schedule(p, expected):
    assert grl_lambda(p) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    method = make_method()
    assert method.lambda_at(int(p * 1000), 1000) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_fixed_lambda_overrides_the_schedule():
    method = make_method(grl_lambda=0.25)
    assert method.lambda_at(0, 100) == 0.25 and method.lambda_at(99, 100) == 0.25


# -- the domain loss ----------------------------------------------------------------------------------
def test_domain_loss_is_the_pixel_mean_bce():
    s = torch.randn(2, 1, 3, 4, dtype=torch.float64)
    t = torch.randn(1, 1, 5, 2, dtype=torch.float64)   # another size: every pixel counts once
    sig = torch.sigmoid
    hand = -(torch.log(1 - sig(s)).sum() + torch.log(sig(t)).sum()) / (s.numel() + t.numel())
    assert domain_loss(s, t).item() == pytest.approx(hand.item(), rel=1e-12)


# -- the step ---------------------------------------------------------------------------------------
def _captured_step(method, batch, it, iters):
    """method.step with the optimiser's step replaced by a capture of the gradients."""
    opt = method.optimizers["model"]
    grads = {}

    def capture():
        for g in opt.param_groups:
            for p in g["params"]:
                grads[p] = torch.zeros_like(p) if p.grad is None else p.grad.clone()
    opt.step = capture
    losses = method.step(batch, it, iters)
    return grads, losses


@pytest.mark.parametrize("weight, fixed", [(0.5, None), (0.5, 0.3), (2.0, 0.0)])
def test_step_gradients_match_hand_computation(weight, fixed):
    method = make_method(weight=weight, grl_lambda=fixed)
    batch = tiny_domain_batch()
    it, iters = 3, 10
    lambd = fixed if fixed is not None else grl_lambda(it / iters)
    grads, losses = _captured_step(method, batch, it, iters)

    model, cls = method.model, method.classifier
    out_s = model(method.normalize(batch["source"]["image"]), return_backbone=True)
    out_t = model(method.normalize(batch["target"]["image"]), return_backbone=True)
    ce = F.cross_entropy(F.interpolate(out_s["logits"], size=(32, 64), mode="bilinear", align_corners=True),
                         batch["source"]["label"])
    dom = domain_loss(cls(out_s["backbone"]), cls(out_t["backbone"]))
    params = [p for p in model.parameters() if p.requires_grad]
    g_ce = torch.autograd.grad(ce, params, retain_graph=True, materialize_grads=True)
    g_dom = torch.autograd.grad(dom, params + list(cls.parameters()), materialize_grads=True)
    assert losses["seg"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert losses["domain"].item() == pytest.approx(dom.item(), rel=1e-5)
    for p, gc, gd in zip(params, g_ce, g_dom[:len(params)]):
        # the network descends CE and ascends the domain loss (reversed, times weight * lambda)
        torch.testing.assert_close(grads[p], gc - lambd * weight * gd, rtol=1e-4, atol=1e-6)
    for p, gd in zip(cls.parameters(), g_dom[len(params):]):
        # the classifier descends the full, unweighted domain loss (SPEC part 2 DANN)
        torch.testing.assert_close(grads[p], gd, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("weight, fixed", [(0.001, 0.6), (0.1, None)])
def test_classifier_gradient_unscaled_feature_gradient_reversed_and_scaled(weight, fixed):
    """After one step's backward: the domain classifier's gradient is the gradient of the unweighted
    BCE (it would be `weight` times it if the weight scaled the whole domain loss); the gradient
    reaching the target features (which feed no other loss) is -weight * lambda_p times the BCE's."""
    method = make_method(weight=weight, grl_lambda=fixed)
    batch = tiny_domain_batch()
    it, iters = 4, 10
    lambd = fixed if fixed is not None else grl_lambda(it / iters)
    model, cls = method.model, method.classifier
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kept = []
    forward = model.forward

    def keeping(images, return_backbone=False):
        out = forward(images, return_backbone=return_backbone)
        out["backbone"].retain_grad()
        kept.append(out["backbone"])
        return out
    model.forward = keeping
    grads, _ = _captured_step(method, batch, it, iters)
    model.forward = forward

    # the same BCE on the same features, without the reversal, by hand
    model.load_state_dict(before)
    f_s, f_t = (kept[0].detach().requires_grad_(), kept[1].detach().requires_grad_())
    bce = domain_loss(cls(f_s), cls(f_t))
    cls_params = list(cls.parameters())
    g = torch.autograd.grad(bce, cls_params + [f_t])
    for p, gp in zip(cls_params, g[:-1]):
        torch.testing.assert_close(grads[p], gp, rtol=1e-5, atol=1e-8)
        assert not torch.allclose(grads[p], weight * gp, rtol=1e-3, atol=0.0)   # not scaled
    torch.testing.assert_close(kept[1].grad, -weight * lambd * g[-1], rtol=1e-5, atol=1e-12)


def test_classifier_is_a_group_of_the_model_optimiser_at_the_heads_lr():
    method = make_method()
    assert set(method.optimizers) == {"model"} and set(method.modules) == {"domain_classifier"}
    groups = {g.get("name"): g for g in method.optimizers["model"].param_groups}
    assert groups["domain_classifier"]["initial_lr"] == groups["heads"]["initial_lr"] == 10 * groups["backbone"]["lr"]
    ids = {id(p) for p in method.classifier.parameters()}
    assert ids == {id(p) for p in groups["domain_classifier"]["params"]}
    assert method.classifier.layers[0].in_channels == method.model.backbone.out_channels[-1]


# -- runs --------------------------------------------------------------------------------------------
def test_trainer_run_writes_metrics(tmp_path):
    metrics = Trainer(tiny_config(iters=3), tmp_path, tensorboard=False).run()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["method"] == "dann" and saved["iters"] == 3
    assert math.isfinite(saved["miou"]) and saved["miou"] == metrics["miou"]
    log = (tmp_path / "log.csv").read_text()
    assert "domain" in log and "lambda" in log


def test_resume_continues_identically(tmp_path):
    a, b = run_and_resume(tiny_config(iters=4), tmp_path)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ca, cb = a["method"]["modules"]["domain_classifier"], b["method"]["modules"]["domain_classifier"]
    assert ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)


# -- options -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("section, name", [
    ({"weight": -1.0}, "weight"), ({"weight": True}, "weight"), ({"grl_lambda": "fast"}, "grl_lambda"),
    ({"grl_lambda": -0.5}, "grl_lambda"), ({"hidden": 0}, "hidden"), ({"hidden": 2.5}, "hidden"),
    ({"lamda": 1.0}, "lamda"),
])
def test_bad_options_raise_naming_the_option(section, name):
    with pytest.raises(ValueError, match=name):
        DANN(tiny_config(**section), SimpleNamespace(device=torch.device("cpu"), backend="reference"))
