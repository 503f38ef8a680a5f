"""Golden tests: udafast's ProDA (SPEC part 2, ProDA; udafast/methods/proda.py, udafast/ops) against
the authors' code, microsoft/ProDA at commit 9ba80c7dbbd23ba1a126e3f4003a72f27d121a1f.

The authors' functions (models/adaptation_modelv2.py, calc_prototype.py, generate_pseudo_label.py,
data/cityscapes_dataset.py, models/discriminator.py, models/utils.py) were transcribed outside this
repository into plain CPU float64 functions, with the README's command values (stage 1:
--proto_rectify --moving_prototype --proto_consistW 10 --rce --regular_w 0.1, rce_alpha 0.1,
rce_beta 1.0, proto_temperature 1, train_thred 0, proto_momentum 1e-4; warm-up: gan LS, adv 0.01;
stage 2: threshold 0.95, distillation 1, S_pseudo 1), and run on the inputs that
tests/proda_authors_recipes.py draws from seeds. Their outputs are the fixtures
tests/fixtures/authors/proda_*.json (each names its file, function, commit and recipe). No authors'
code is in this repository. The authors mark ignored pixels 250, udafast 255.
"""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import proda_authors_recipes as R
from udafast.data.strong_view import warp_like
from udafast.methods.base import Stage
from udafast.methods.proda import ProDA
from udafast.ops import class_feature_sums, kl_loss, prototype_rectify, prototype_softmax, sce_loss, update_prototypes

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "authors")
COMMIT = "9ba80c7dbbd23ba1a126e3f4003a72f27d121a1f"


def fixture(name):
    with open(os.path.join(FIXTURES, f"proda_{name}.json")) as f:
        doc = json.load(f)
    for p in doc["provenance"]:
        assert p["repository"] == "microsoft/ProDA" and p["commit"] == COMMIT
    return doc


def close(actual, expected, rtol=1e-10, scale=None):
    """float64 against float64: |a - e| <= rtol |e| + rtol scale (default max|e|)."""
    a = np.asarray(actual.detach().double() if torch.is_tensor(actual) else actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    scale = max(float(np.abs(e).max(initial=0.0)), 1e-300) if scale is None else scale
    np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * scale)


def close_digest(tensor, expected, rtol=1e-10):
    got = R.digest(tensor)
    assert got["shape"] == expected["shape"]
    close(got["l1"], expected["l1"], rtol)
    for key in expected:
        if key not in ("shape", "l1"):
            close(got[key], expected[key], rtol, scale=4 * expected["l1"])


def labels_of(strings):
    """The fixtures' label strings back to int64 [B, H*W] (255 = ignored)."""
    return torch.tensor([[255 if ch == "x" else int(ch) for ch in s] for s in strings])


def ctx():
    return SimpleNamespace(device="cpu", backend="auto", rank=0)


def proda(**options):
    return ProDA({"model": {"num_classes": R.C}, "proda": options, "seed": 0}, ctx())


# 1 ------------------------------------------------------------------------------------------------
def test_stage1_sce_terms_match_authors():
    """CE + RCE + REG of stage 1 (proda_sce.json: adaptation_modelv2.py CustomModel.step's loss_CTS,
    CustomModel.rce, CustomModel.regular_loss 'MRKLD'; models/utils.py cross_entropy2d) equal
    `sce_loss(alpha=0.1, beta=1.0, reg_weight=0.1)`, term by term and in the gradient.

    Normalisation: cross_entropy2d is F.cross_entropy(ignore_index=250, mean): the mean over the n
    labelled pixels, as udafast's CE. The code's RCE divides by mask.sum() + 1e-6 with a float32 mask,
    so the 1e-6 rounds away for n > 16 (here n is exact); udafast divides by max(n, 1). With n = 0 the
    code's CE is NaN (0/0) and RCE 0; udafast's both 0."""
    doc = fixture("sce")
    out = doc["outputs"]
    x = R.sce_inputs()
    assert int((x["labels"] != R.IGNORE).sum()) == out["valid_pixels"]
    logits = x["logits"].clone().requires_grad_(True)
    loss = sce_loss(logits, x["labels"], alpha=0.1, beta=1.0, reg_weight=0.1)
    close(loss, out["loss_CTS"], 1e-12)
    close_digest(torch.autograd.grad(loss, logits)[0], out["grad_loss_CTS"], 1e-10)
    close(sce_loss(x["logits"], x["labels"], alpha=1.0, beta=0.0, reg_weight=0.0), out["ce"], 1e-12)
    close(sce_loss(x["logits"], x["labels"], alpha=0.0, beta=1.0, reg_weight=0.0), out["rce"], 1e-12)
    close(sce_loss(x["logits"], x["labels"], alpha=0.0, beta=0.0, reg_weight=1.0), out["reg"], 1e-12)
    # a float64 mask would keep the 1e-6: a relative 1e-6 / n below udafast's
    n = out["valid_pixels"]
    close(out["rce_with_float64_mask"], out["rce"] * n / (n + 1e-6), 1e-12)


# 3 ------------------------------------------------------------------------------------------------
def _weak_features(feats):
    from udafast.data.transforms import frame_to_view
    view = (R.WEAK_VIEW[0] // 4, R.WEAK_VIEW[1] // 4)
    return frame_to_view(feats, R.weak_geometry(), R.FRAME, view)


def test_frame_to_view_matches_full2weak():
    """The teacher's full-frame features taken into the weak view (proda_rectify.json 'full2weak':
    adaptation_modelv2.py CustomModel.full2weak with RandomSized (h, w), RandomCrop (y1, y2, x1, x2),
    RandomHorizontallyFlip as data/augmentations.py records them) equal `frame_to_view` with the
    geometry rows [scaled_h, scaled_w, crop_top, crop_left, flipped]."""
    doc = fixture("rectify")
    assert doc["settings"]["weak_params"] == R.WEAK_PARAMS
    close_digest(_weak_features(R.rectify_inputs()["feats"]), doc["outputs"]["full2weak"], 1e-12)


# 2 ------------------------------------------------------------------------------------------------
def test_prototype_weights_and_rectified_labels_match_authors():
    """Prototype weights of the teacher's weak-view features and the rectified labels
    argmax_c(w_c p_c) (proda_rectify.json: CustomModel.get_prototype_weight, feat_prototype_distance,
    the proto_rectify block of CustomModel.step, proto_temperature 1, train_thred 0) equal
    `prototype_softmax` and `prototype_rectify`. The code subtracts the nearest distance before the
    softmax (the same softmax) and multiplies the distance by proto_temperature where udafast divides
    by tau: the same at 1, inverse otherwise."""
    doc = fixture("rectify")
    out = doc["outputs"]
    x = R.rectify_inputs()
    weak = _weak_features(x["feats"])
    close_digest(prototype_softmax(weak, x["prototypes"], 1.0), out["weights"], 1e-10)
    labels = prototype_rectify(weak, x["prototypes"], x["soft"], 1.0)
    assert torch.equal(labels.flatten(1), labels_of(out["labels"]))
    # as the method forms them (its defaults: rectify, tau 1, rectify_threshold 0)
    m = proda()
    m.prototypes = x["prototypes"]
    y_hat, z = m.stage1_targets(weak, x["soft"], tuple(weak.shape[-2:]))
    assert torch.equal(y_hat.flatten(1), labels_of(out["labels"]))
    close_digest(z, out["weights"], 1e-10)
    # train_thred 0 ignores nothing (udafast: rectify_threshold 0)
    assert ProDA.defaults["rectify_threshold"] == 0.0
    assert min(min(r) for r in out["normalised_max"]["axis1"]) > 0


# 4 ------------------------------------------------------------------------------------------------
def test_structure_kl_matches_authors():
    """The structure-learning KL (proda_kl.json: the proto_consistW block of CustomModel.step:
    (F.kl_div(log_softmax(-d_student), softmax(-d_teacher)) * mask).sum() / mask.sum(), the teacher's
    distances taken into the strong view by CustomModel.label_strong_T (Hflip, CutoutAbs; padding 250
    = the mask)) equals `kl_loss(prototype log-softmax of the student, the teacher's prototype softmax
    warped by warp_like, valid_mask)` as ProDA.stage1_targets / stage1_losses form them, value and
    gradient. mask.sum() counts n * C elements, kl_loss divides by n * C."""
    doc = fixture("kl")
    out = doc["outputs"]
    x = R.kl_inputs()
    params = R.strong_params()
    z = prototype_softmax(x["teacher"], x["prototypes"], 1.0)
    z_strong = warp_like(z, params, "bilinear")
    valid = warp_like(torch.ones(R.B, R.H, R.W), params, "nearest", fill=0.0, cutout_fill=0.0) > 0.5
    assert [("".join(str(int(v)) for v in m.flatten().tolist())) for m in valid] == out["mask"]
    close_digest(z_strong * valid[:, None], out["teacher"], 1e-10)
    student = x["student"].clone().requires_grad_(True)
    log_w = prototype_softmax(student, x["prototypes"], 1.0, log=True)
    kl = kl_loss(log_w, z_strong, valid_mask=valid)
    close(kl, out["loss_consist"], 1e-10)
    close_digest(torch.autograd.grad(kl, student)[0], out["grad_student"], 1e-9)
    # as the method forms it (ProDA.structure_loss, tau 1)
    m = proda()
    m.prototypes = x["prototypes"]
    student = x["student"].clone().requires_grad_(True)
    kl = m.structure_loss({"features": student}, z, params, (R.H, R.W))
    close(kl, out["loss_consist"], 1e-10)
    close_digest(torch.autograd.grad(kl, student)[0], out["grad_student"], 1e-9)
    # the SPEC's form, kl_loss(-d_student / tau, ...), is the same loss
    d = torch.cdist(x["student"].permute(0, 2, 3, 1).reshape(R.B, -1, R.D), x["prototypes"][None].expand(R.B, -1, -1))
    d = d.reshape(R.B, R.H, R.W, R.C).permute(0, 3, 1, 2)
    close(kl_loss(-d, z_strong, valid_mask=valid), out["loss_consist"], 1e-10)


# 5 ------------------------------------------------------------------------------------------------
def test_moving_prototype_update_matches_authors():
    """One moving-prototype update from the teacher's features and logits (proda_update.json:
    CustomModel.calculate_mean_vector with labels and thresh None, then update_objective_SingleVector
    with start_mean=False, proto_momentum 1e-4, classes under 10 pixels skipped) equals
    `class_feature_sums` of the teacher's argmax + `update_prototypes(momentum=0.9999, min_pixels=10)`.
    The change (1e-4 of the distance) is compared, not only the prototypes."""
    doc = fixture("update")
    out = doc["outputs"]
    x = R.update_inputs()
    sums, counts = class_feature_sums(x["feats"], x["logits"].argmax(1), R.C)
    assert counts.tolist() == out["pixels_per_class"]
    assert [c for row in counts.tolist() for c in range(R.C) if row[c] >= 10] == out["ids"]
    assert len(out["ids"]) < R.B * R.C  # a class is skipped somewhere
    o = proda().options
    prototypes = x["prototypes"].clone()
    update_prototypes(prototypes, sums, counts, momentum=o["proto_momentum"], min_pixels=o["proto_min_pixels"])
    close(prototypes - x["prototypes"], out["delta"], 1e-9)
    close(prototypes, out["prototypes"], 1e-12)


# 6 ------------------------------------------------------------------------------------------------
def test_initial_prototypes_match_calc_prototype():
    """Initial prototypes (proda_init.json: calc_prototype.py, target branch, opt.epochs = 4 over the
    unshuffled set, Class_Features.calculate_mean_vector per image (classes of 10+ pixels), then
    update_objective_SingleVector 'mean' with the count capped at 3000, i.e. an average that turns
    into a 1/3001 moving average once a class has 3000 image means) equal
    `udafast.methods.proda.initial_prototypes(sums, counts, min_pixels=10, epochs=4, cap=3000)`.
    Class 0 passes the cap (3200 image means); the result differs from the plain pixel mean."""
    from udafast.methods.proda import initial_prototypes
    doc = fixture("init")
    out = doc["outputs"]
    assert out["objective_vectors_num"][0] == 3000
    x = R.init_inputs()
    sums, counts = class_feature_sums(x["feats"], x["logits"].argmax(1), R.C)
    got = initial_prototypes(sums, counts, min_pixels=10, epochs=4, cap=3000)
    o = proda().options
    assert (o["proto_init"], o["proto_min_pixels"], o["proto_init_epochs"], o["proto_init_cap"]) == \
        ("image_mean", 10, 4, 3000)
    close(got, out["prototypes"], 1e-10)
    assert not np.allclose(out["prototypes"], out["plain_pixel_mean"], rtol=1e-3)


# 7 ------------------------------------------------------------------------------------------------
def test_distillation_labels_match_generate_pseudo_label():
    """Stage 2/3 hard labels (proda_distill_labels.json: generate_pseudo_label.py validate --flip:
    softmax of the image's and the mirror image's logits, each upsampled bilinearly (align_corners)
    to the image size, the mirror's flipped back, averaged; argmax and max; then
    data/cityscapes_dataset.py's lp[conf <= 0.95] = 250) equal
    `udafast.methods.proda.distillation_labels(logits, flipped_logits, size, threshold)`.
    The code stores the confidence as float16 before the comparison, which changes the label of the
    fixture's 'float16_conf_labels_differ_at' pixels (5 of 3072 here: confidences in (0.95, 0.95044)
    round to float16(0.95) = 0.9502 or below and are ignored by the code); the fixture's labels are
    the rule with the confidence unrounded, which udafast follows."""
    from udafast.methods.proda import distillation_labels
    doc = fixture("distill_labels")
    out = doc["outputs"]
    x = R.distill_label_inputs()
    o = proda().options
    assert (o["distill_threshold"], o["distill_flip"]) == (x["threshold"], True)
    got = distillation_labels(x["logits"], x["flipped"], R.FRAME, x["threshold"])
    got = got[0] if isinstance(got, tuple) else got
    assert got.dtype == torch.int64 and tuple(got.shape) == (R.B,) + R.FRAME
    assert torch.equal(got.flatten(1), labels_of(out["labels"]))
    assert int((got != R.IGNORE).sum()) == out["kept_pixels"]


# 8 ------------------------------------------------------------------------------------------------
def _conv_layers(module):
    return [[m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0]]
            for m in module.modules() if isinstance(m, nn.Conv2d)]


def test_warmup_discriminator_architecture_matches_authors():
    """The discriminator of ProDA's warm-up (proda_adversarial.json 'architecture': models/discriminator.py
    FCDiscriminator, here planes = 4) against the one ProDA's warm-up builds (ndf = 4): the same convs,
    and the same function given the same weights."""
    from udafast.models.heads import ProDADiscriminator
    arch = fixture("adversarial")["settings"]["architecture"]
    ours = ProDADiscriminator(R.C, ndf=4).double()
    assert _conv_layers(ours) == [a["conv"] for a in arch if "conv" in a]
    theirs = _authors_architecture(arch)
    ours.load_state_dict(dict(zip(ours.state_dict(), theirs.state_dict().values())))
    x = torch.randn(2, R.C, 32, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ours(x), theirs(x))


def _authors_architecture(arch):
    """A conv stack built from the fixture's layer list (conv [in, out, k, stride, pad] / activations)."""
    layers = []
    for a in arch:
        if "conv" in a:
            i, o, k, s, p = a["conv"]
            layers.append(nn.Conv2d(i, o, k, stride=s, padding=p))
        else:
            layers.append({"relu": nn.ReLU(), "leaky_relu_0.2": nn.LeakyReLU(0.2)}[a["act"]])
    return nn.Sequential(*layers).double()


def test_warmup_adversarial_losses_match_authors():
    """The warm-up's LS-GAN losses (proda_adversarial.json: CustomModel.step_adv, gan 'LS' = MSELoss,
    adv 0.01: generator MSE(D(softmax(up(target))), 0) * 0.01; discriminator
    MSE(D(softmax(up(source))), 0) + MSE(D(softmax(up(target))), 1), summed, not halved; up = bilinear,
    align_corners, to the image) equal OutputSpaceAdversary's with `disc_weights=(1.0, 1.0)`, given
    the authors' discriminator (architecture and weights from the fixture's recipe)."""
    from udafast.methods.adversarial import OutputSpaceAdversary
    doc = fixture("adversarial")
    out = doc["outputs"]
    x = R.adversarial_inputs()
    disc = R.discriminator_weights(_authors_architecture(doc["settings"]["architecture"]), x["generator"])
    adversary = OutputSpaceAdversary(("main",), R.C, "lsgan", ndf=4, disc_weights=(1.0, 1.0))
    adversary.discriminators["main"] = disc
    adv = adversary.generator_loss({"main": x["target"]}, R.FRAME)["main"]
    close(adv, out["loss_adv_G_unweighted"], 1e-12)
    close(ProDA.defaults["adv_weight"] * adv, out["loss_adv_G"], 1e-12)
    loss_d = adversary.discriminator_step({"main": x["source"]}, {"main": x["target"]}, R.FRAME, R.FRAME)["main"]
    close(loss_d, out["loss_D"], 1e-12)


def test_proda_warmup_sums_the_discriminator_losses(monkeypatch):
    """ProDA's warm-up builds its adversary with the code's summed discriminator loss,
    disc_weights=(1.0, 1.0) (models/adaptation_modelv2.py step_adv), and LS-GAN."""
    import udafast.methods.proda as proda_module
    seen = {}
    real = proda_module.OutputSpaceAdversary

    def spy(*args, **kwargs):
        seen.update(kwargs, args=args)
        return real(*args, **kwargs)

    monkeypatch.setattr(proda_module, "OutputSpaceAdversary", spy)
    m = proda(disc_ndf=4)
    m.config["optimizer"] = {"name": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0}
    m.ctx.target_stream = SimpleNamespace(set_extras=lambda extras: None)
    model = nn.Conv2d(3, R.C, 1)
    model.param_groups = lambda lr: [{"params": list(model.parameters()), "lr": lr}]
    m.start_stage(Stage("warmup", 1), model)
    assert seen["args"][2] == "lsgan" or seen.get("gan") == "lsgan"
    assert m.options["adv_weight"] == 0.01
    assert tuple(seen.get("disc_weights", (0.5, 0.5))) == (1.0, 1.0)


# 9 ------------------------------------------------------------------------------------------------
def test_distill_losses_match_step_distillation():
    """The stage-2 target loss (proda_distill_loss.json: CustomModel.step_distillation, distillation 1,
    no --rce: cross_entropy2d on the hard labels + (F.kl_div(softmax(student), teacher) *
    (teacher != 250)).sum() / mask.sum(), i.e. averaged over every element: the code's softmax where
    log-softmax belongs) equals ProDA.distill_losses with `code_kl_softmax=True`; with it off the KD
    term is the KL of the log-softmax (F.kl_div(log_softmax(student), teacher) averaged the same way)
    = `kl_loss`."""
    doc = fixture("distill_loss")
    out = doc["outputs"]
    x = R.distill_loss_inputs()
    teacher = F.softmax(x["teacher"], dim=1)
    student = x["student"].clone().requires_grad_(True)
    losses = proda(code_kl_softmax=True).distill_losses(student, teacher, x["labels"])
    close(losses["ce"], out["ce"], 1e-12)
    close(losses["kd"], out["loss_kd"], 1e-12)
    total = losses["ce"] + ProDA.defaults["distill_kl_weight"] * losses["kd"]
    close(total, out["loss"], 1e-12)
    close_digest(torch.autograd.grad(total, student)[0], out["grad_loss"], 1e-10)

    student = x["student"].clone().requires_grad_(True)
    kd = proda().distill_losses(student, teacher, x["labels"])["kd"]
    close(kd, out["kl_log_softmax"], 1e-10)
    close_digest(torch.autograd.grad(kd, student)[0], out["grad_kl_log_softmax"], 1e-9)
    close(kl_loss(x["student"], teacher), out["kl_log_softmax"], 1e-10)
