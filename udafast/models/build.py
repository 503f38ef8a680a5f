"""`build_model(config)`: the networks by name, with their resolved config on `model.config`."""
import os
from collections.abc import Mapping
from typing import Any, Tuple

from udafast.models.authors import load_fitting_heads
from udafast.models.daformer import build_mit_daformer
from udafast.models.pretrained import PRETRAINED, fetch_pretrained, pretrained_layout
from udafast.models.resnet import LAYOUTS, load_backbone_weights, read_weights
from udafast.models.segmentation import ASPP_MODES, HEADS, DeepLabV2, SegmentationModel, SmallSegNet

__all__ = ["build_model", "model_keys", "MODEL_NAMES"]

MODEL_NAMES = ("deeplabv2_r101", "small", "mit_b5_daformer")
NORMALIZATIONS = ("imagenet", "caffe", "unit")

_DEFAULTS = {
    "deeplabv2_r101": {"num_classes": 19, "aspp": "four", "head": "deeplabv2", "head_dropout": 0.1, "feature_dim": 256,
                       "freeze_bn_affine": False, "pretrained": None, "weights_format": "auto",
                       "normalization": None, "aux_head": True, "bn_clr": False},
    "small": {"num_classes": 19, "width": 16, "feature_dim": 256, "normalization": "imagenet"},
    "mit_b5_daformer": {"num_classes": 19, "feature_dim": 256, "head_dropout": 0.1, "drop_path_rate": 0.1,
                        "pretrained": None, "normalization": "imagenet"},
}


def model_keys(name: str) -> Tuple[str, ...]:
    """The config keys `build_model` takes for the network `name` ("name" included)."""
    if name not in MODEL_NAMES:
        raise ValueError(f"name: expected one of {MODEL_NAMES}, got {name!r}")
    return ("name",) + tuple(_DEFAULTS[name])


def _positive_int(config, key):
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"config[{key!r}]: expected a positive integer, got {value!r}")


def _choice(config, key, choices):
    if config[key] not in choices:
        raise ValueError(f"config[{key!r}]: expected one of {choices}, got {config[key]!r}")


def build_model(config: Mapping[str, Any], *, load_pretrained: bool = True) -> SegmentationModel:
    """Build the network `config["name"]` ("deeplabv2_r101", "small" or "mit_b5_daformer").

    deeplabv2_r101 keys (defaults): num_classes (19); aspp ("four"; "two" = the AdaptSegNet code's
    two-branch sum); head ("deeplabv2": DeepLabV2's ASPP classifier on layer4; "proda": ProDA's
    256-d feature head then a 1x1 classifier, which adds "features" to the outputs); head_dropout
    (0.1, ProDA's dropout before its classifier); feature_dim (256); freeze_bn_affine (False);
    pretrained (None; a path to ResNet-101 backbone weights; or "imagenet" / "imagenet_caffe" /
    "imagenet_v1c": torchvision's / the Caffe DeepLab init's / open-mmlab's ResNet-101-V1c ImageNet
    weights from torch.hub's cache, downloaded there when missing, see udafast.models.pretrained);
    weights_format ("auto", "torchvision", "deeplab" or "v1c": also picks the network layout, see
    udafast.models.resnet; "v1c" with aspp "two" and no aux head is DAFormer's "dlv2red");
    normalization ("caffe" for DeepLab-format weights, else "imagenet"; "unit" = RGB in [0, 1]);
    aux_head (True: the layer3 classifier); bn_clr (False: ProDA's BatchNorm on the layer4 features).
    A `pretrained` file that is one of the authors' released models (udafast.models.authors: ProDA,
    AdaptSegNet, CRST) loads its heads too where they have this model's shapes (the names loaded in
    `model.pretrained_heads`); heads of another shape (e.g. the DeepLab init's 21-class classifier)
    start fresh, as the authors' training scripts do; its input normalisation is the authors'.
    small keys: num_classes (19), width (16), feature_dim (256), normalization ("imagenet").
    mit_b5_daformer (DAFormer's SegFormer MiT-B5 + context-aware fusion head, udafast.models.daformer)
    keys: num_classes (19), feature_dim (256, the decoder's width), head_dropout (0.1),
    drop_path_rate (0.1), pretrained (None; a path to SegFormer's ImageNet `mit_b5.pth`, read by its
    own key names, udafast.models.mit_weights), normalization ("imagenet").

    `model.config` holds every key resolved (the detected weights format included), so a model
    rebuilt from it with `load_pretrained=False` (as `model_from_checkpoint` does) has the same
    layout without reading the weights file again."""
    if not isinstance(config, Mapping):
        raise ValueError(f"config: expected a dict, got {type(config).__name__}")
    name = config.get("name")
    if name not in MODEL_NAMES:
        raise ValueError(f"config['name']: expected one of {MODEL_NAMES}, got {name!r}")
    unknown = sorted(set(config) - set(_DEFAULTS[name]) - {"name"})
    if unknown:
        raise ValueError(f"config: unknown key(s) for {name!r}: {', '.join(map(str, unknown))}")
    resolved = {"name": name, **_DEFAULTS[name], **config}
    _positive_int(resolved, "num_classes")
    _positive_int(resolved, "feature_dim")
    if resolved["normalization"] is not None:
        _choice(resolved, "normalization", NORMALIZATIONS)

    if name == "small":
        _positive_int(resolved, "width")
        model = SmallSegNet(resolved["num_classes"], resolved["width"], resolved["feature_dim"])
    elif name == "mit_b5_daformer":
        model = build_mit_daformer(resolved, load_pretrained)
    else:
        _choice(resolved, "aspp", ASPP_MODES)
        _choice(resolved, "head", HEADS)
        if resolved["head"] == "proda" and resolved["feature_dim"] % 32:
            raise ValueError(f"config['feature_dim']: ProDA's head uses GroupNorm(32), so a multiple of 32, "
                             f"got {resolved['feature_dim']}")
        _choice(resolved, "weights_format", ("auto",) + LAYOUTS)
        dropout = resolved["head_dropout"]
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"config['head_dropout']: expected a number in [0, 1), got {dropout!r}")
        for key in ("freeze_bn_affine", "aux_head", "bn_clr"):
            if not isinstance(resolved[key], bool):
                raise ValueError(f"config[{key!r}]: expected a bool, got {resolved[key]!r}")
        path = resolved["pretrained"]
        if path is not None:
            if not isinstance(path, (str, os.PathLike)):
                names = " or ".join(map(repr, PRETRAINED))
                raise ValueError(f"config['pretrained']: expected {names}, a path or None, got {path!r}")
            path = resolved["pretrained"] = os.fspath(path)
        named = path in PRETRAINED
        if named:
            layout = pretrained_layout(path)
            if resolved["weights_format"] not in ("auto", layout):
                raise ValueError(f"config['weights_format']: {resolved['weights_format']!r}, but pretrained {path!r} "
                                 f"is {layout} weights")
            resolved["weights_format"] = layout
        state = heads = None
        if path is not None and (load_pretrained or resolved["weights_format"] == "auto"):
            file = fetch_pretrained(path) if named else path
            state, resolved["weights_format"], heads = read_weights(file, resolved["weights_format"])
        elif resolved["weights_format"] == "auto":
            resolved["weights_format"] = "torchvision"
        model = DeepLabV2(resolved["num_classes"], resolved["aspp"], resolved["head"], float(dropout),
                          resolved["weights_format"], resolved["freeze_bn_affine"], resolved["feature_dim"],
                          resolved["aux_head"], resolved["bn_clr"])
        if state is not None and load_pretrained:
            load_backbone_weights(model.backbone, state, file, resolved["weights_format"])
            if heads is not None:
                model.pretrained_heads = load_fitting_heads(model, heads)
        if resolved["normalization"] is None:
            resolved["normalization"] = heads[2] if heads is not None else \
                "caffe" if resolved["weights_format"] == "deeplab" else "imagenet"
    model.normalization = resolved["normalization"]
    model.config = resolved
    return model
