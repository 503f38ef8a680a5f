"""ResNet-101 at output stride 8 (DeepLabV2's backbone) and its pretrained-weight loader.

Three layouts, with torchvision's parameter names for the bottlenecks (`layer1.0.conv1`, ...,
`layerN.0.downsample.{0,1}`), so one loader serves them all:
- "torchvision": the stem a 7x7 conv (`conv1`, `bn1`); the stride-2 of a downsampling bottleneck
  sits in its 3x3 conv (ResNet v1.5) and the stem's max-pool floors its output size.
- "deeplab": the network the DeepLab (Caffe) weights were trained in and the authors' PyTorch code
  runs: torchvision's names, the stride-2 in the bottleneck's first 1x1 conv and the max-pool in
  ceil mode (a 512x1024 input gives 65x129 logits, not 64x128).
- "v1c": mmseg's `ResNetV1c` as lhoyer/DAFormer configures it for its DeepLabV2 runs
  (configs/_base_/models/deeplabv2_r50-d8.py, depth 101 with open-mmlab's `resnet101_v1c`
  weights): a deep stem of three 3x3 convs (3 -> 32 stride 2, 32 -> 32, 32 -> 64, each with
  BatchNorm and ReLU: `stem.{0,1,3,4,6,7}`), torchvision's bottlenecks and floor max-pool, and
  `contract_dilation`: the first block of layer3 / layer4 dilates by 1 / 2, the others by 2 / 4.
In "torchvision" and "deeplab", layer3 and layer4 keep stride 1 and use dilation 2 and 4 in every
block (DeepLabV2).
"""
import os

import torch
import torch.nn as nn

from udafast.models.recompute import stage

__all__ = ["ResNetBackbone", "LAYOUTS", "read_backbone_weights", "read_weights", "load_backbone_weights"]

LAYOUTS = ("torchvision", "deeplab", "v1c")
RESNET101_BLOCKS = (3, 4, 23, 3)
# Not the backbone's: the ImageNet file's classifier (fc), the authors' heads (layer5/6, ProDA's
# bn_pretrain), which udafast.models.authors maps onto the model's heads.
_IGNORED_PREFIXES = ("fc.", "layer5.", "layer6.", "bn_pretrain.")
_DEEPLAB_PREFIX = "Scale."


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None, stride_in_1x1=False):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride if stride_in_1x1 else 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1 if stride_in_1x1 else stride, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _conv3x3_bn_relu(in_channels, out_channels, stride=1):
    """Three entries of the deep stem (conv, BatchNorm, ReLU), flat in one Sequential as mmseg's."""
    return (nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True))


class ResNetBackbone(nn.Module):
    """ResNet with layer3/layer4 dilated (2, 4) instead of strided: `forward` returns
    (layer3 output [B, 1024, H/8, W/8], layer4 output [B, 2048, H/8, W/8]) for ResNet-101."""

    def __init__(self, blocks=RESNET101_BLOCKS, layout="torchvision"):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        self._stride_in_1x1 = layout == "deeplab"
        if layout == "v1c":
            self.stem = nn.Sequential(*_conv3x3_bn_relu(3, 32, 2), *_conv3x3_bn_relu(32, 32), *_conv3x3_bn_relu(32, 64))
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=layout == "deeplab")
        self.inplanes = 64
        self.layer1 = self._make_layer(64, blocks[0])
        self.layer2 = self._make_layer(128, blocks[1], stride=2)
        self.layer3 = self._make_layer(256, blocks[2], dilation=2)
        self.layer4 = self._make_layer(512, blocks[3], dilation=4)
        self.out_channels = (1024, 2048)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes, n, stride=1, dilation=1):
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, out, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(out))
        # mmseg's ResLayer(contract_dilation=True): the first block of a dilated layer dilates by half
        first_dilation = dilation // 2 if self.layout == "v1c" and dilation > 1 else dilation
        layers = [Bottleneck(self.inplanes, planes, stride, first_dilation, downsample, self._stride_in_1x1)]
        self.inplanes = out
        layers += [Bottleneck(out, planes, 1, dilation, None, self._stride_in_1x1) for _ in range(1, n)]
        return nn.Sequential(*layers)

    #: recompute each layer's activations in the backward pass (udafast.models.recompute)
    activation_checkpointing = False

    def forward(self, x):
        x = self.maxpool(self.stem(x) if self.layout == "v1c" else self.relu(self.bn1(self.conv1(x))))
        on = self.activation_checkpointing
        x = stage(self.layer2, stage(self.layer1, x, on), on)
        c3 = stage(self.layer3, x, on)
        return c3, stage(self.layer4, c3, on)


def key_problems(missing, mismatched, unexpected):
    """One line naming a state dict's missing keys, shape mismatches and unexpected keys ("" if none)."""
    problems = [f"{what}: {first_names(keys)}" for what, keys in (("missing keys", missing), ("shape mismatches", mismatched),
                                                             ("unexpected keys", unexpected)) if keys]
    return "; ".join(problems)


def first_names(names, n=5):
    """The first `n` names, and how many there are in all when more."""
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


def read_backbone_weights(path, weights_format="auto"):
    """Read a ResNet state dict from `path` -> (state dict with torchvision key names, format).

    `weights_format`: "torchvision" (keys `conv1.weight`, `layer1.0.conv1.weight`, ...), "deeplab"
    (the authors' Caffe conversion: the same names prefixed `Scale.`, or one of the authors' released
    models, udafast.models.authors), "v1c" (mmseg's ResNetV1c: `stem.0.weight`, ..., then the same
    layer names; open-mmlab's `resnet101_v1c` file) or "auto" (a `Scale.` prefix or an authors' model
    means deeplab, a `stem.` key v1c).
    Classifier keys (`fc.*`, the heads `layer5.*`/`layer6.*`, `bn_pretrain.*`) are left out: see
    `read_weights` for them."""
    state, weights_format, _ = read_weights(path, weights_format)
    return state, weights_format


def read_weights(path, weights_format="auto"):
    """`read_backbone_weights` plus the file's heads: -> (backbone state, format, heads) where heads
    is None, or (authors' format, the whole prefix-stripped state, input normalisation) when the
    file is one of the authors' models (ProDA `.pkl`, AdaptSegNet, CRST / the DeepLab init)."""
    from udafast.models.authors import AUTHORS_NORMALIZATION, detect_format, read_state_file, strip_prefixes

    if weights_format not in ("auto",) + LAYOUTS:
        raise ValueError(f"weights_format: expected 'auto', 'torchvision', 'deeplab' or 'v1c', got {weights_format!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone weights not found: {path}")
    state, _ = read_state_file(path, prefixes=("module.",))
    has_prefix = any(k.startswith(_DEEPLAB_PREFIX) for k in state)
    stripped = strip_prefixes(state, (_DEEPLAB_PREFIX,))
    fmt = detect_format(stripped)
    if weights_format == "auto":
        if has_prefix or fmt is not None:  # every authors' network is the DeepLab layout
            weights_format = "deeplab"
        elif "conv1.weight" in state:
            weights_format = "torchvision"
        elif "stem.0.weight" in state:
            weights_format = "v1c"
        else:
            raise ValueError(f"{path}: neither torchvision, DeepLab ('Scale.'-prefixed) nor ResNetV1c ('stem.') key names; "
                             f"first keys: {first_names(list(state))}")
    if weights_format == "deeplab":
        state = {k[len(_DEEPLAB_PREFIX):] if k.startswith(_DEEPLAB_PREFIX) else k: v for k, v in state.items()}
    heads = None
    if fmt is not None and weights_format == "deeplab":
        heads = (fmt, stripped, "caffe" if has_prefix else AUTHORS_NORMALIZATION[fmt])
    state = {k: v for k, v in state.items() if not k.startswith(_IGNORED_PREFIXES)}
    return state, weights_format, heads


def load_backbone_weights(backbone, state, path, weights_format):
    """Copy `state` (from `read_backbone_weights`) into `backbone`; a ValueError naming `path` and
    the first missing, unexpected or mismatched keys (in the file's naming) when they disagree."""
    prefix = _DEEPLAB_PREFIX if weights_format == "deeplab" else ""
    expected = backbone.state_dict()
    # Older files (and every Caffe conversion) predate BatchNorm's num_batches_tracked.
    missing = [prefix + k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [prefix + k for k in state if k not in expected]
    mismatched = [f"{prefix}{k} {tuple(state[k].shape)} (model {tuple(v.shape)})"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = key_problems(missing, mismatched, unexpected)
    if problems:
        raise ValueError(f"{path}: backbone weights do not fit the ResNet-101 ({weights_format} format): {problems}")
    backbone.load_state_dict(state, strict=False)
