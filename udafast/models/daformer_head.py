"""DAFormer's context-aware fusion decoder (`DAFormerHead` with the `daformer_sepaspp` fusion).

Each of the encoder's four levels is embedded by a Linear layer (`embed_layers.{i}.proj`) to
`channels` and resized (bilinear, align_corners False) to the stride-4 level's size; the
concatenation goes through a depth-wise separable ASPP (`fuse_layer`): a 1x1 conv branch and 3x3
depth-wise + 1x1 point-wise branches dilated 6, 12, 18 (every conv followed by BatchNorm and
ReLU), concatenated, then a 3x3 conv + BatchNorm + ReLU bottleneck: the fused features. Logits are
`conv_seg(dropout(features))` with Dropout2d(0.1). Names and shapes are those of lhoyer/DAFormer's
`DAFormerHead` built from configs/_base_/models/daformer_sepaspp_mitb5.py (mmcv's ConvModule
children `conv`/`bn`, DepthwiseSeparableConvModule's `depthwise_conv`/`pointwise_conv`);
tests/fixtures/authors/daformer_keys.json lists them. Initialisation as mmcv's: convs Kaiming
normal (fan_out, ReLU) without bias, BatchNorm 1 and 0, `conv_seg` normal std 0.01 with zero
bias, the embeddings torch's Linear default.
"""
from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DAFormerHead", "FUSION_DILATIONS"]

FUSION_DILATIONS = (1, 6, 12, 18)


class ConvBNReLU(nn.Module):
    """mmcv's ConvModule with BatchNorm and ReLU: a conv without bias (the norm follows)."""

    def __init__(self, in_channels, out_channels, kernel, dilation=1, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, padding=dilation * (kernel // 2), dilation=dilation,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class SeparableConvBNReLU(nn.Module):
    """A 3x3 depth-wise ConvBNReLU, then a 1x1 point-wise one."""

    def __init__(self, in_channels, out_channels, dilation):
        super().__init__()
        self.depthwise_conv = ConvBNReLU(in_channels, in_channels, 3, dilation, groups=in_channels)
        self.pointwise_conv = ConvBNReLU(in_channels, out_channels, 1)

    def forward(self, x):
        return self.pointwise_conv(self.depthwise_conv(x))


class SeparableASPP(nn.Module):
    def __init__(self, in_channels, channels, dilations=FUSION_DILATIONS):
        super().__init__()
        self.aspp_modules = nn.ModuleList(
            ConvBNReLU(in_channels, channels, 1) if d == 1 else SeparableConvBNReLU(in_channels, channels, d)
            for d in dilations)
        self.bottleneck = ConvBNReLU(len(dilations) * channels, channels, 3)

    def forward(self, x):
        return self.bottleneck(torch.cat([branch(x) for branch in self.aspp_modules], 1))


class Embedding(nn.Module):
    """SegFormer's per-level "MLP": one Linear over the channels of every position."""

    def __init__(self, in_channels, channels):
        super().__init__()
        self.proj = nn.Linear(in_channels, channels)

    def forward(self, x):
        return self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class DAFormerHead(nn.Module):
    """`forward(levels)` -> (logits [B, num_classes, h0, w0], fused features [B, channels, h0, w0])
    at the size of the first level."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 256, dropout: float = 0.1):
        super().__init__()
        self.embed_layers = nn.ModuleDict({str(i): Embedding(c, channels) for i, c in enumerate(in_channels)})
        self.fuse_layer = SeparableASPP(len(in_channels) * channels, channels)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, 0.0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, levels: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        size = levels[0].shape[2:]
        embedded = []
        for i, x in enumerate(levels):
            e = self.embed_layers[str(i)](x)
            if e.shape[2:] != size:
                e = F.interpolate(e, size=size, mode="bilinear", align_corners=False)
            embedded.append(e)
        features = self.fuse_layer(torch.cat(embedded, 1))
        return self.conv_seg(self.dropout(features)), features
