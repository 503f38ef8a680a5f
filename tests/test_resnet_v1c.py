"""DAFormer's DeepLabV2 network ("dlv2red" on ResNet-101-V1c: `weights_format: v1c`, `aspp: two`, no
aux head) against lhoyer/DAFormer's own classes: key names and shapes, the layers' dilations, and
one forward with the same weights, from tests/fixtures/authors/dlv2red_r101_v1c.json (its
`provenance` says how the figures were made; the weights come from its recipe, re-made here)."""
import json
import os
import zlib

import pytest
import torch

from udafast.models import build_model
from udafast.models.pretrained import PRETRAINED

pytestmark = pytest.mark.usefixtures("one_thread")

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "authors",
                       "dlv2red_r101_v1c.json")) as _f:
    FIXTURE = json.load(_f)
DLV2RED = {"name": "deeplabv2_r101", "weights_format": "v1c", "aspp": "two", "aux_head": False}


def authors_keys(section):
    return [(name, tuple(shape)) for name, shape in FIXTURE[section]]


def head_name(key):
    """DLV2Head's `aspp_modules.<i>.conv.<weight|bias>` -> udafast's ASPP classifier's name."""
    _, i, _, what = key.split(".")
    return f"classifier.conv2d_list.{i}.{what}"


def recipe_tensor(name, shape):
    """The fixture's weight recipe for one tensor (drawn in float32)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if name.endswith("running_var"):
        return torch.rand(shape, generator=g) + 0.5
    if name.endswith("running_mean"):
        return 0.1 * torch.randn(shape, generator=g)
    if len(shape) == 4:
        return torch.randn(shape, generator=g) * (2.0 / (shape[1] * shape[2] * shape[3])) ** 0.5
    if name.endswith("bias"):
        return 0.1 * torch.randn(shape, generator=g)
    return 1 + 0.1 * torch.randn(shape, generator=g)  # a BatchNorm weight


def test_backbone_keys_are_mmseg_resnetv1c():
    model = build_model(DLV2RED)
    own = [(k, tuple(v.shape)) for k, v in model.backbone.state_dict().items()]
    assert own == authors_keys("backbone_keys")
    assert "aux" not in model(torch.zeros(1, 3, 33, 33))


def test_head_starts_as_mmcv_initialises_dlv2head():
    """DAFormer's deeplabv2 config: NormalInit(std=0.01) over aspp_modules, biases 0; the Caffe
    DeepLab classifier keeps nn.Conv2d's default biases."""
    torch.manual_seed(0)
    convs = build_model(DLV2RED).classifier.conv2d_list
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert all(torch.equal(c.bias, torch.zeros_like(c.bias)) for c in convs)
    assert abs(weights.std().item() - 0.01) < 1e-4 and abs(weights.mean().item()) < 1e-4
    caffe = build_model({**DLV2RED, "weights_format": "deeplab"}).classifier.conv2d_list
    assert all(c.bias.abs().max() > 0 for c in caffe)


def test_contract_dilation_strides_and_max_pool_are_the_authors():
    backbone = build_model(DLV2RED).backbone
    arch = FIXTURE["architecture"]
    blocks = {f"layer{n}.{i}": block for n in (1, 2, 3, 4) for i, block in enumerate(getattr(backbone, f"layer{n}"))}
    for name, dilation, padding, stride in arch["conv2_dilation_padding_stride"]:
        conv = blocks[name].conv2
        assert (conv.dilation[0], conv.padding[0], conv.stride[0]) == (dilation, padding, stride), name
    for name, conv1, conv2, downsample in arch["block0_strides"]:
        block = blocks[name]
        assert (block.conv1.stride[0], block.conv2.stride[0], block.downsample[0].stride[0]) == (conv1, conv2, downsample)
    pool = backbone.maxpool
    assert (pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode) == (3, 2, 1, arch["maxpool"]["ceil_mode"])


def test_one_forward_equals_the_authors():
    model = build_model(DLV2RED)
    state = {k: recipe_tensor(k, s) for k, s in authors_keys("backbone_keys") if not k.endswith("num_batches_tracked")}
    model.backbone.load_state_dict(state, strict=False)
    head = {head_name(k): recipe_tensor(k, s) for k, s in authors_keys("head_keys")}
    model.load_state_dict(head, strict=False)
    golden = FIXTURE["golden"]
    x = torch.randn(2, 3, 41, 57, generator=torch.Generator().manual_seed(0))
    model.double().train()
    with torch.no_grad():
        out = model(x.double(), return_backbone=True)
    c4 = out["backbone"]
    assert list(c4.shape) == golden["backbone_out_shapes"][3]
    torch.testing.assert_close(c4.sum().item(), golden["layer4_sum"], rtol=1e-9, atol=0)
    torch.testing.assert_close((c4 ** 2).sum().item(), golden["layer4_sumsq"], rtol=1e-9, atol=0)
    assert list(out["logits"].shape) == golden["logits_shape"]
    torch.testing.assert_close(out["logits"].flatten(), torch.tensor(golden["logits"], dtype=torch.float64),
                               rtol=1e-9, atol=1e-12)
    bn = golden["bn_after_forward"]
    modules = dict(model.backbone.named_modules())
    for name, stats in bn.items():
        for what, values in stats.items():
            ours = getattr(modules[name], what)
            torch.testing.assert_close(ours, torch.tensor(values, dtype=ours.dtype), rtol=1e-9, atol=1e-12)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder


def mmcv_file(path, keys):
    """open-mmlab's file layout: mmcv's {"state_dict": ...} with the ImageNet classifier `fc`."""
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) for k, s in keys if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": dict(state, **{"fc.weight": torch.randn(1000, 2048), "fc.bias": torch.randn(1000)})},
               path)
    return state


def test_imagenet_v1c_loads_from_the_cache_by_mmcv_key_names(hub):
    state = mmcv_file(hub / os.path.basename(PRETRAINED["imagenet_v1c"][0]), authors_keys("backbone_keys"))
    model = build_model({"name": "deeplabv2_r101", "pretrained": "imagenet_v1c", "aspp": "two", "aux_head": False})
    assert model.config["weights_format"] == "v1c" and model.normalization == "imagenet"
    own = model.backbone.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items())
    # a file given by path is recognised by its stem
    assert build_model({"name": "deeplabv2_r101", "pretrained": str(hub / "resnet101_v1c-e67eebb6.pth")}
                       ).config["weights_format"] == "v1c"


def test_a_v1c_file_with_other_keys_is_an_error_naming_them(hub):
    keys = [(k, s) for k, s in authors_keys("backbone_keys") if k != "stem.4.running_var"]
    keys = [(k, (32, 3, 3, 3) if k == "stem.3.weight" else s) for k, s in keys]
    mmcv_file(hub / "resnet101_v1c-e67eebb6.pth", keys + [("stem.9.weight", (1,))])
    with pytest.raises(ValueError, match=r"resnet101_v1c-e67eebb6\.pth: backbone weights do not fit the ResNet-101 "
                                         r"\(v1c format\): missing keys: stem\.4\.running_var; shape mismatches: "
                                         r"stem\.3\.weight \(32, 3, 3, 3\) \(model \(32, 32, 3, 3\)\); unexpected keys: "
                                         r"stem\.9\.weight"):
        build_model({"name": "deeplabv2_r101", "pretrained": "imagenet_v1c"})


def uda_checkpoint(keys):
    """A DAFormer DeepLabV2 run's checkpoint: mmcv's {"state_dict": ...} with the segmentor three times."""
    copies = {prefix: {f"{prefix}{part}.{k}": torch.tensor(3) if k.endswith("num_batches_tracked") else
                       recipe_tensor(f"{prefix}{part}.{k}", s) for part, section in keys for k, s in section}
              for prefix in ("model.", "ema_model.", "imnet_model.")}
    return copies["model."], {k: v for copy in copies.values() for k, v in copy.items()}


def test_a_daformer_deeplabv2_checkpoint_loads_the_student(tmp_path):
    from udafast.models.checkpoint import load_model_checkpoint, model_from_checkpoint
    keys = (("backbone", authors_keys("backbone_keys")), ("decode_head", authors_keys("head_keys")))
    student, state = uda_checkpoint(keys)
    path = tmp_path / "iter_40000.pth"
    torch.save({"meta": {"iter": 40000}, "state_dict": state}, path)
    model = model_from_checkpoint(path)
    assert {k: model.config[k] for k in DLV2RED} == DLV2RED and model.config["num_classes"] == 19
    own = model.state_dict()
    for key, value in student.items():
        name = key[len("model."):]
        if name.startswith("decode_head."):
            name = head_name(name[len("decode_head."):])
        assert torch.equal(own[name], value), key
    x = torch.randn(1, 3, 33, 41)
    with torch.no_grad():  # the head is DLV2Head: the sum of the two dilated convs of the layer4 features
        c4 = model.eval()(x, return_backbone=True)["backbone"]
        head = sum(torch.nn.functional.conv2d(c4, student[f"model.decode_head.aspp_modules.{i}.conv.weight"],
                                              student[f"model.decode_head.aspp_modules.{i}.conv.bias"],
                                              padding=d, dilation=d) for i, d in ((0, 6), (1, 12)))
        torch.testing.assert_close(model(x)["logits"], head)

    broken = dict(state)
    broken.pop("model.decode_head.aspp_modules.1.conv.bias")
    broken["model.backbone.stem.9.weight"] = torch.zeros(1)
    torch.save({"state_dict": broken}, path)
    with pytest.raises(ValueError, match=r"iter_40000\.pth: the daformer weights do not fit udafast's network: "
                                         r"missing keys: model\.decode_head\.aspp_modules\.1\.conv\.bias; "
                                         r"unexpected keys: model\.backbone\.stem\.9\.weight"):
        load_model_checkpoint(path)
