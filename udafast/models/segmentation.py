"""The segmentation networks: DeepLabV2-ResNet101 (with DeepLabV2's or ProDA's main head) and a
small CPU network with the same outputs.

`model(images)` -> dict: `"logits"` [B, C, h, w] (output stride 8), `"aux"` the layer3 head's logits
[B, C, h, w] (absent with `aux_head=False`), `"features"` the 256-d features the main logits are classified from (models with a
feature head: ProDA's head and "small"), and with `return_backbone=True` also `"backbone"`, the
stride-8 layer4 features (2048-d for ResNet-101) that DANN and the contrastive heads work on.
"""
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from udafast.models.recompute import stage
from udafast.models.resnet import ResNetBackbone

__all__ = ["SegmentationModel", "ASPPClassifier", "ProDAFeatureHead", "DeepLabV2", "SmallSegNet", "ASPP_MODES",
           "HEADS"]

ASPP_MODES = ("four", "two")
HEADS = ("deeplabv2", "proda")
ASPP_DILATIONS = (6, 12, 18, 24)


def _channels_last_input(module: nn.Module, args: tuple) -> tuple:
    """The forward pre-hook of `use_channels_last`: the images channels-last."""
    return (args[0].contiguous(memory_format=torch.channels_last),) + tuple(args[1:])


class SegmentationModel(nn.Module):
    """Common to the networks: `self.backbone` trains at the base learning rate, everything else
    (the heads) at ten times it."""

    #: the input normalisation the network expects (see udafast.data.transforms.normalize)
    normalization: str = "imagenet"
    #: the depth of the "features" output (None: the network has no feature head)
    feature_dim: Optional[int] = None
    #: the resolved config it was built from (set by udafast.models.build_model)
    config: Dict[str, Any]

    def use_channels_last(self) -> "SegmentationModel":
        """Weights and inputs in the channels-last memory format from now on (`train.channels_last`):
        oneDNN's convolutions run faster on it on the CPU (and tensor cores' on the GPU). The values
        are the same up to the kernels' summation order. Copies of the network (teachers) keep it."""
        self.to(memory_format=torch.channels_last)
        self.register_forward_pre_hook(_channels_last_input)
        return self

    def backbone_parameters(self) -> List[nn.Parameter]:
        """The backbone's trainable parameters."""
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def head_parameters(self) -> List[nn.Parameter]:
        """Every trainable parameter outside the backbone."""
        inside = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in inside]

    def param_groups(self, lr: float) -> List[Dict[str, Any]]:
        """Optimiser groups: the backbone at `lr`, the heads at 10 x `lr` (parameters with
        requires_grad False, e.g. frozen BatchNorm affines, are left out)."""
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"lr: expected a positive number, got {lr!r}")
        return [{"params": self.backbone_parameters(), "lr": float(lr), "name": "backbone"},
                {"params": self.head_parameters(), "lr": 10.0 * lr, "name": "heads"}]


class ASPPClassifier(nn.Module):
    """DeepLabV2's classifier: the sum of 3x3 convs (in -> num_classes) dilated 6, 12, 18, 24.
    `mode="two"` sums only the first two, as the AdaptSegNet code does (an early return inside its
    loop); the other two convs stay so the authors' state dicts load and the flag can flip."""

    def __init__(self, in_channels: int, num_classes: int, mode: str = "four", zero_bias: bool = False):
        super().__init__()
        if mode not in ASPP_MODES:
            raise ValueError(f"aspp: expected one of {ASPP_MODES}, got {mode!r}")
        self.mode = mode
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d) for d in ASPP_DILATIONS)
        # the authors' Classifier_Module (AdaptSegNet model/deeplab_multi.py, CRST deeplab/model.py):
        # weights N(0, 0.01), biases left at nn.Conv2d's default initialisation; `zero_bias`:
        # DAFormer's DLV2Head (configs/_base_/models/deeplabv2_r50-d8.py, mmcv's NormalInit std
        # 0.01 over aspp_modules) sets the biases to 0
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            if zero_bias:
                nn.init.zeros_(conv.bias)

    def unused_state_keys(self, prefix: str = "") -> List[str]:
        """The state-dict keys (under `prefix`) of the branches this mode leaves out of the sum."""
        return [f"{prefix}conv2d_list.{i}.{k}" for i in range(self.used_branches, len(self.conv2d_list))
                for k in self.conv2d_list[i].state_dict()]

    @property
    def used_branches(self) -> int:
        return len(self.conv2d_list) if self.mode == "four" else 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        used = self.conv2d_list[:self.used_branches]
        out = used[0](x)
        for conv in used[1:]:
            out = out + conv(x)
        return out


class _SEBlock(nn.Module):
    def __init__(self, channels, reduction=16):
        super().__init__()
        self.se = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True),
                                nn.Linear(channels // reduction, channels), nn.Sigmoid())

    def forward(self, x):
        return x * self.se(x.mean((2, 3)))[:, :, None, None]


def _conv_gn_relu(in_channels, out_channels, kernel, dilation=1):
    padding = dilation * (kernel // 2)
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding=padding, dilation=dilation),
                         nn.GroupNorm(32, out_channels), nn.ReLU(inplace=True))


class ProDAFeatureHead(nn.Module):
    """ProDA's head up to its features (its `Classifier_Module2`): a 1x1 branch and 3x3 branches
    dilated 6, 12, 18, 24 (each conv -> GroupNorm(32) -> ReLU, `out_channels` wide), concatenated,
    squeeze-and-excitation, then 3x3 conv -> GroupNorm: the features."""

    def __init__(self, in_channels: int, out_channels: int = 256):
        super().__init__()
        self.conv2d_list = nn.ModuleList([_conv_gn_relu(in_channels, out_channels, 1)] + [
            _conv_gn_relu(in_channels, out_channels, 3, d) for d in ASPP_DILATIONS])
        joined = out_channels * len(self.conv2d_list)
        self.bottleneck = nn.Sequential(_SEBlock(joined), nn.Conv2d(joined, out_channels, 3, padding=1),
                                        nn.GroupNorm(32, out_channels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([branch(x) for branch in self.conv2d_list], 1))


class DeepLabV2(SegmentationModel):
    """DeepLabV2-ResNet101 at output stride 8 with an aux classifier on layer3 and the main head on
    layer4: `head="deeplabv2"` DeepLabV2's ASPP classifier (no features); `head="proda"` ProDA's
    feature head, then `logits = classifier(dropout(features))` (1x1, no bias), so prototypes of
    the features live where the logits are made. `freeze_bn_affine` freezes the backbone's
    BatchNorm weights and biases (the authors' code) while batch statistics are still used."""

    def __init__(self, num_classes: int = 19, aspp: str = "four", head: str = "deeplabv2", head_dropout: float = 0.1,
                 layout: str = "torchvision", freeze_bn_affine: bool = False, feature_dim: int = 256,
                 aux_head: bool = True, bn_clr: bool = False):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head: expected one of {HEADS}, got {head!r}")
        self.backbone = ResNetBackbone(layout=layout)
        c3, c4 = self.backbone.out_channels
        # ProDA's distilled models (--bn_clr): a BatchNorm on the layer4 features before the head
        # (microsoft/ProDA models/deeplabv2.py `bn_pretrain`), trained with the heads
        self.backbone_norm = nn.BatchNorm2d(c4) if bn_clr else None
        # ProDA's and CRST's networks have no layer3 classifier (aux_head False)
        # the v1c layout is DAFormer's mmseg network, whose DLV2Head starts with zero biases
        zero_bias = layout == "v1c"
        self.aux_classifier = ASPPClassifier(c3, num_classes, aspp, zero_bias) if aux_head else None
        if head == "deeplabv2":
            self.feature_head = None
            self.classifier = ASPPClassifier(c4, num_classes, aspp, zero_bias)
        else:
            self.feature_dim = feature_dim
            self.feature_head = ProDAFeatureHead(c4, feature_dim)
            self.dropout = nn.Dropout2d(head_dropout)
            self.classifier = nn.Conv2d(feature_dim, num_classes, 1, bias=False)
            nn.init.kaiming_normal_(self.classifier.weight, mode="fan_out", nonlinearity="relu")
        if freeze_bn_affine:
            for m in self.backbone.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.requires_grad_(False)
                    m.bias.requires_grad_(False)

    def forward(self, images: torch.Tensor, return_backbone: bool = False) -> Dict[str, torch.Tensor]:
        c3, c4 = self.backbone(images)
        if self.backbone_norm is not None:
            c4 = self.backbone_norm(c4)
        out = {}
        if self.feature_head is None:
            out["logits"] = self.classifier(c4)
        else:
            features = self.feature_head(c4)
            out["logits"] = self.classifier(self.dropout(features))
            out["features"] = features
        if self.aux_classifier is not None:
            out["aux"] = self.aux_classifier(c3)
        if return_backbone:
            out["backbone"] = c4
        return out


def _conv_bn_relu(in_channels, out_channels, stride=1, dilation=1):
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation,
                                   bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class _SmallBackbone(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.stem = nn.Sequential(_conv_bn_relu(3, width, 2), _conv_bn_relu(width, 2 * width, 2))
        self.layer3 = nn.Sequential(_conv_bn_relu(2 * width, 4 * width, 2), _conv_bn_relu(4 * width, 4 * width))
        self.layer4 = _conv_bn_relu(4 * width, 8 * width, dilation=2)
        self.out_channels = (4 * width, 8 * width)

    activation_checkpointing = False

    def forward(self, x):
        on = self.activation_checkpointing
        c3 = stage(self.layer3, stage(self.stem, x, on), on)
        return c3, stage(self.layer4, c3, on)


class SmallSegNet(SegmentationModel):
    """A few conv blocks at output stride 8 with DeepLabV2-ProDA's outputs, for CPU runs: backbone
    widths `width`..`8 width` (the "backbone" output is 8 width deep), a 1x1 aux classifier on the
    layer3 stand-in, a 1x1 conv + BatchNorm feature head (`feature_dim`) and a 1x1 classifier."""

    def __init__(self, num_classes: int = 19, width: int = 16, feature_dim: int = 256):
        super().__init__()
        self.feature_dim = feature_dim
        self.backbone = _SmallBackbone(width)
        c3, c4 = self.backbone.out_channels
        self.aux_classifier = nn.Conv2d(c3, num_classes, 1)
        self.feature_head = nn.Sequential(nn.Conv2d(c4, feature_dim, 1, bias=False), nn.BatchNorm2d(feature_dim))
        self.classifier = nn.Conv2d(feature_dim, num_classes, 1, bias=False)

    def forward(self, images: torch.Tensor, return_backbone: bool = False) -> Dict[str, torch.Tensor]:
        c3, c4 = self.backbone(images)
        features = self.feature_head(c4)
        out = {"logits": self.classifier(features), "aux": self.aux_classifier(c3), "features": features}
        if return_backbone:
            out["backbone"] = c4
        return out
