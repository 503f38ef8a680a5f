"""udafast.models: shapes and output stride, the ASPP variants, backbone weights in both formats,
the methods' heads, parameter groups and checkpoints."""
import os

import pytest
import torch
import torch.nn as nn

from udafast.models import (
    ASPPClassifier, ClassSelectors, Discriminator, DomainClassifier, PredictionHead, ProjectionHead, build_model,
    load_checkpoint, model_from_checkpoint, save_checkpoint,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """One ResNet-101 backbone's weights saved in torchvision's layout (with an fc head) and in the
    DeepLab layout (`Scale.` prefix, no num_batches_tracked, the init's own layer5 classifier)."""
    torch.manual_seed(1)
    backbone = build_model({"name": "deeplabv2_r101"}).backbone.state_dict()
    folder = tmp_path_factory.mktemp("weights")
    tv = dict(backbone, **{"fc.weight": torch.randn(1000, 2048), "fc.bias": torch.zeros(1000)})
    deeplab = {"Scale." + k: v for k, v in backbone.items() if not k.endswith("num_batches_tracked")}
    deeplab["Scale.layer5.conv2d_list.0.weight"] = torch.randn(21, 2048, 3, 3)
    torch.save(tv, folder / "resnet101_tv.pth")
    torch.save(deeplab, folder / "deeplab_init.pth")
    return backbone, folder / "resnet101_tv.pth", folder / "deeplab_init.pth"


def _shapes(out):
    return {k: tuple(v.shape) for k, v in out.items()}


@pytest.mark.parametrize("config, shapes_64", [
    ({"aspp": "four"}, (8, 8)),
    # DeepLab layout: the authors' ceil-mode max-pool gives one more row/column on even sizes.
    ({"aspp": "two", "head": "proda", "weights_format": "deeplab", "freeze_bn_affine": True}, (9, 9)),
])
def test_deeplab_outputs_at_stride_8(config, shapes_64):
    model = build_model({"name": "deeplabv2_r101", **config}).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 65, 65), return_backbone=True)
        out64 = model(torch.randn(1, 3, 64, 64))
    expected = {"logits": (1, 19, 9, 9), "aux": (1, 19, 9, 9), "backbone": (1, 2048, 9, 9)}
    if config.get("head") == "proda":
        expected["features"] = (1, 256, 9, 9)
        # The main logits are classified from the features the prototypes are built of.
        torch.testing.assert_close(out["logits"], model.classifier(out["features"]))
    assert _shapes(out) == expected
    assert tuple(out64["logits"].shape[-2:]) == shapes_64 and "backbone" not in out64
    assert model.aux_classifier.mode == config["aspp"]
    assert config.get("head") == "proda" or model.classifier.mode == config["aspp"]
    assert model.config["normalization"] == model.normalization == (
        "caffe" if config.get("weights_format") == "deeplab" else "imagenet")
    strided = model.backbone.layer2[0]
    assert (strided.conv1.stride, strided.conv2.stride) == (
        ((2, 2), (1, 1)) if config.get("weights_format") == "deeplab" else ((1, 1), (2, 2)))


def test_aspp_two_sums_only_the_first_two_branches():
    x = torch.randn(1, 8, 13, 13)
    four, two = ASPPClassifier(8, 3, "four"), ASPPClassifier(8, 3, "two")
    two.load_state_dict(four.state_dict())
    with torch.no_grad():
        branches = [conv(x) for conv in four.conv2d_list]
        torch.testing.assert_close(four(x), sum(branches))
        torch.testing.assert_close(two(x), branches[0] + branches[1])
        before = two(x)
        for conv in two.conv2d_list[2:]:
            conv.weight.zero_()
            conv.bias.fill_(5.0)
        torch.testing.assert_close(two(x), before)
    with pytest.raises(ValueError, match="aspp"):
        ASPPClassifier(8, 3, "three")


def test_small_model_outputs_backward_and_param_groups():
    model = build_model({"name": "small", "num_classes": 5, "feature_dim": 64})
    out = model(torch.randn(2, 3, 128, 256), return_backbone=True)
    assert _shapes(out) == {"logits": (2, 5, 16, 32), "aux": (2, 5, 16, 32), "features": (2, 64, 16, 32),
                            "backbone": (2, 128, 16, 32)}
    (out["logits"].mean() + out["aux"].mean()).backward()
    groups = model.param_groups(0.01)
    assert [g["name"] for g in groups] == ["backbone", "heads"]
    assert groups[0]["lr"] == 0.01 and groups[1]["lr"] == pytest.approx(0.1)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    assert {id(p) for p in groups[1]["params"]} == {id(p) for m in (model.aux_classifier, model.feature_head,
                                                                      model.classifier) for p in m.parameters()}
    assert model.config == {"name": "small", "num_classes": 5, "width": 16, "feature_dim": 64,
                            "normalization": "imagenet"}
    with pytest.raises(ValueError, match="lr"):
        model.param_groups(-1)


def test_freeze_bn_affine_keeps_batch_statistics():
    model = build_model({"name": "deeplabv2_r101", "freeze_bn_affine": True})
    bn = model.backbone.layer3[0].bn2
    assert not bn.weight.requires_grad and not bn.bias.requires_grad
    backbone_ids = {id(p) for p in model.param_groups(1e-3)[0]["params"]}
    assert id(bn.weight) not in backbone_ids and id(model.backbone.layer3[0].conv2.weight) in backbone_ids
    assert all(p.requires_grad for p in model.aux_classifier.parameters())
    stem_bn = model.backbone.bn1
    before = stem_bn.running_mean.clone()
    model.backbone.bn1(torch.randn(2, 64, 5, 5) + 3)  # train mode: batch statistics, running stats move
    assert not torch.equal(before, stem_bn.running_mean)


@pytest.mark.parametrize("which, fmt, normalization", [(1, "torchvision", "imagenet"), (2, "deeplab", "caffe")])
def test_pretrained_weights_both_formats_autodetected(weight_files, which, fmt, normalization):
    backbone, path = weight_files[0], weight_files[which]
    model = build_model({"name": "deeplabv2_r101", "pretrained": path})
    assert model.config["weights_format"] == fmt and model.config["pretrained"] == str(path)
    assert model.normalization == normalization
    assert model.backbone.layout == fmt
    for key in ("conv1.weight", "layer3.22.conv2.weight", "layer4.0.downsample.1.running_var"):
        torch.testing.assert_close(model.backbone.state_dict()[key], backbone[key], rtol=0, atol=0)
    explicit = build_model({"name": "deeplabv2_r101", "pretrained": path, "weights_format": fmt,
                            "normalization": "imagenet"})
    assert explicit.normalization == "imagenet"


def test_checkpoint_rebuilds_without_rereading_pretrained(weight_files, tmp_path):
    weights = tmp_path / "init.pth"
    os.link(weight_files[2], weights)
    model = build_model({"name": "deeplabv2_r101", "pretrained": weights, "aspp": "two"}).eval()
    ckpt = tmp_path / "ckpt.pth"
    save_checkpoint(ckpt, model, iter=7)
    weights.unlink()
    rebuilt = model_from_checkpoint(ckpt).eval()
    assert rebuilt.config == model.config and rebuilt.normalization == "caffe"
    assert rebuilt.backbone.layout == "deeplab" and rebuilt.classifier.mode == "two"
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x)["logits"], model(x)["logits"], rtol=0, atol=0)


def test_pretrained_errors_name_the_file(weight_files, tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_model({"name": "deeplabv2_r101", "pretrained": missing})
    partial = tmp_path / "partial.pth"
    state = torch.load(weight_files[1], weights_only=True)
    del state["layer1.0.conv1.weight"]
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, partial)
    with pytest.raises(ValueError, match=r"partial\.pth.*missing keys: layer1\.0\.conv1\.weight.*conv1\.weight"):
        build_model({"name": "deeplabv2_r101", "pretrained": partial})
    foreign = tmp_path / "foreign.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match=r"foreign\.pth.*encoder\.weight"):
        build_model({"name": "deeplabv2_r101", "pretrained": foreign})
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pth"):
        build_model({"name": "deeplabv2_r101", "pretrained": garbage})
    # DeepLab keys read as torchvision: nothing found under the expected names.
    with pytest.raises(ValueError, match=r"deeplab_init\.pth.*missing keys: conv1\.weight"):
        build_model({"name": "deeplabv2_r101", "pretrained": weight_files[2], "weights_format": "torchvision"})


@pytest.mark.parametrize("config, match", [
    ({"name": "resnet50"}, "name"),
    ({"name": "deeplabv2_r101", "aspp": "three"}, "aspp"),
    ({"name": "deeplabv2_r101", "head": "psp"}, "head"),
    ({"name": "deeplabv2_r101", "normalization": "bgr"}, "normalization"),
    ({"name": "deeplabv2_r101", "weights_format": "caffe"}, "weights_format"),
    ({"name": "deeplabv2_r101", "head": "proda", "feature_dim": 100}, "feature_dim"),
    ({"name": "small", "num_classes": 0}, "num_classes"),
    ({"name": "small", "pretrained": "x.pth"}, "pretrained"),
])
def test_bad_config_names_the_key(config, match):
    with pytest.raises(ValueError, match=match):
        build_model(config)


def test_discriminator_and_domain_classifier_shapes():
    d = Discriminator(19)
    assert [m.out_channels for m in (d.conv1, d.conv2, d.conv3, d.conv4, d.classifier)] == [64, 128, 256, 512, 1]
    assert tuple(d(torch.softmax(torch.randn(2, 19, 64, 128), 1)).shape) == (2, 1, 2, 4)
    dc = DomainClassifier(2048)
    assert [m.out_channels for m in dc.modules() if isinstance(m, nn.Conv2d)] == [1024, 1024, 1]
    assert tuple(dc(torch.randn(2, 2048, 5, 7)).shape) == (2, 1, 5, 7)


def test_projection_and_prediction_heads_maps_and_rows():
    proj, pred = ProjectionHead(32, 256), PredictionHead(256)
    z = proj(torch.randn(2, 32, 5, 6))
    assert tuple(z.shape) == (2, 256, 5, 6) and tuple(pred(z).shape) == (2, 256, 5, 6)
    rows = torch.randn(10, 32)
    proj.eval()
    torch.testing.assert_close(proj(rows), proj(rows[:, :, None, None])[:, :, 0, 0])
    with pytest.raises(ValueError, match="x"):
        proj(torch.randn(10, 31))


def test_class_selectors_match_one_selector_per_class():
    sel = ClassSelectors(num_classes=3, dim=8, hidden=16)
    z = torch.randn(9, 8)
    labels = torch.tensor([2, 0, 2, 2, 0, 1, 0, 2, 0])
    scores = sel(z, labels)
    assert tuple(scores.shape) == (9,)
    for c in range(3):
        ref = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
        with torch.no_grad():
            ref[0].weight.copy_(sel.weight1[c]), ref[0].bias.copy_(sel.bias1[c])
            ref[1].weight.copy_(sel.bn_weight[c]), ref[1].bias.copy_(sel.bn_bias[c])
            ref[3].weight.copy_(sel.weight2[c][None]), ref[3].bias.copy_(sel.bias2[c][None])
        rows = labels == c
        if rows.sum() > 1:  # batch statistics over the class's own rows, running stats updated per class
            torch.testing.assert_close(scores[rows], ref(z[rows])[:, 0])
            torch.testing.assert_close(sel.running_mean[c], ref[1].running_mean)
        else:  # a lone row in training mode: running statistics
            torch.testing.assert_close(scores[rows], ref.eval()(z[rows])[:, 0])
    scores.sum().backward()
    assert sel.weight1.grad is not None
    with pytest.raises(ValueError, match="labels"):
        sel(z, torch.full((9,), 3))


def test_class_selectors_under_bf16_autocast():
    """float32 rows (the contrastive memory bank's) scored under autocast: float32 scores, close to
    the float32 ones, with gradients (the selector's matmuls run in bfloat16)."""
    sel = ClassSelectors(num_classes=3, dim=8, hidden=16).eval()
    z = torch.randn(9, 8)
    labels = torch.tensor([2, 0, 2, 2, 0, 1, 0, 2, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = sel(z, labels)
        narrow = sel(z.bfloat16(), labels)
    assert scores.dtype == torch.float32 and narrow.dtype == torch.bfloat16
    torch.testing.assert_close(scores, sel(z, labels), rtol=0.05, atol=0.05)
    scores.sum().backward()
    assert sel.weight2.grad is not None and torch.isfinite(sel.weight2.grad).all()


def test_checkpoint_round_trip_and_extras(tmp_path):
    model = build_model({"name": "small", "num_classes": 7}).eval()
    opt = torch.optim.SGD(model.param_groups(0.01), momentum=0.9)
    model(torch.randn(1, 3, 32, 32))["logits"].sum().backward()
    opt.step()
    path = tmp_path / "run" / "ckpt.pth"
    save_checkpoint(path, model, iter=123, optimizer=opt.state_dict(), best_miou=41.5)
    assert os.listdir(path.parent) == ["ckpt.pth"]
    ckpt = load_checkpoint(path)
    assert ckpt["format_version"] == 1 and ckpt["iter"] == 123 and ckpt["best_miou"] == 41.5
    assert ckpt["config"] == model.config and "state" in ckpt["optimizer"]
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        expected = model(x)
        for rebuilt in (model_from_checkpoint(path), model_from_checkpoint(ckpt)):
            got = rebuilt.eval()(x)
            for key in expected:
                torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(path, model, iter=1, config={})
    with pytest.raises(ValueError, match="iter"):
        save_checkpoint(path, model, iter=-1)


def test_checkpoint_errors_name_the_file(tmp_path):
    model = build_model({"name": "small"})
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_checkpoint(tmp_path / "absent.pth")
    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, model, iter=0)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.pth"):
        load_checkpoint(truncated)
    with pytest.raises(ValueError, match="truncated.pth"):
        model_from_checkpoint(truncated)
    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": model.state_dict()}, foreign)
    with pytest.raises(ValueError, match="foreign.pth"):
        load_checkpoint(foreign)


def test_failed_save_leaves_the_old_file_and_no_temp(tmp_path):
    model = build_model({"name": "small"})
    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, model, iter=1)
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(path, model, iter=2, hook=lambda: None)  # lambdas cannot be pickled
    assert os.listdir(tmp_path) == ["ckpt.pth"] and path.read_bytes() == before
