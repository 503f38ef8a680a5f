"""SegFormer's Mix Transformer encoder (MiT), the backbone of DAFormer and MIC.

Four stages; stage i embeds its input with an overlapping strided conv (`patch_embed{i}`: 7x7
stride 4, then 3x3 stride 2), runs `depths[i]` transformer blocks (`block{i}`) and a LayerNorm
(`norm{i}`), and hands on a [B, C_i, H/s, W/s] map (s = 4, 8, 16, 32). A block is
`x + DropPath(attention(norm1(x)))` then `x + DropPath(mix_ffn(norm2(x)))`:
- efficient self-attention: keys and values come from the tokens spatially reduced by a
  `sr_ratio` x `sr_ratio` stride conv (`attn.sr`) and a LayerNorm (`attn.norm`);
- Mix-FFN: Linear -> 3x3 depth-wise conv (`mlp.dwconv.dwconv`) -> GELU -> Linear.
Parameter names and shapes are those of NVlabs/SegFormer's `mit_b*` classes (as copied in
lhoyer/DAFormer mmseg/models/backbones/mix_transformer.py), so the ImageNet release files load by
their own names; tests/fixtures/authors/mit_b5_keys.json lists them. LayerNorm eps: 1e-6 in the
blocks and stage norms, torch's 1e-5 in the patch embeddings and the attention's reduction norm,
as there. Stochastic depth grows linearly from 0 to `drop_path_rate` over all blocks.
"""
import math
from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from udafast.models.recompute import stage

__all__ = ["MixVisionTransformer", "DropPath", "MIT_B5"]

#: mit_b5 (SegFormer): embed_dims, num_heads, depths, sr_ratios
MIT_B5 = {"embed_dims": (64, 128, 320, 512), "num_heads": (1, 2, 5, 8), "depths": (3, 6, 40, 3),
          "sr_ratios": (8, 4, 2, 1)}
_EPS = 1e-6


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability `p` and
    scale the kept ones by 1 / (1 - p). A class of its own so teachers can switch it off."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class OverlapPatchEmbed(nn.Module):
    def __init__(self, in_channels, dim, kernel, stride):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.proj(x)
        h, w = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class Attention(nn.Module):
    def __init__(self, dim, num_heads, sr_ratio):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x, h, w):
        b, n, c = x.shape
        heads = self.num_heads
        q = self.q(x).reshape(b, n, heads, c // heads).transpose(1, 2)
        if self.sr_ratio > 1:
            x = self.norm(self.sr(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2))
        k, v = self.kv(x).reshape(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
        # softmax(q k^T / sqrt(d)) v, the reference's attention, in torch's fused kernel
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DWConv(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x, h, w):
        b, n, c = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, h, w):
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, sr_ratio, mlp_ratio, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_EPS)
        self.attn = Attention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=_EPS)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio))

    def forward(self, x, h, w):
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class MixVisionTransformer(nn.Module):
    """The MiT encoder: `forward(images)` -> the four stage outputs [B, C_i, H/s, W/s]
    (`out_channels` = embed_dims). Defaults: mit_b5. Random initialisation as SegFormer's from
    scratch (`_init_weights`): Linear weights truncated normal std 0.02 with zero bias, convs
    normal with std sqrt(2 / fan_out) (per group), LayerNorms 1 and 0."""

    #: recompute each block's activations in the backward pass (udafast.models.recompute)
    activation_checkpointing = False

    def __init__(self, embed_dims: Sequence[int] = MIT_B5["embed_dims"], num_heads: Sequence[int] = MIT_B5["num_heads"],
                 depths: Sequence[int] = MIT_B5["depths"], sr_ratios: Sequence[int] = MIT_B5["sr_ratios"],
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.1, in_channels: int = 3):
        super().__init__()
        if not len(embed_dims) == len(num_heads) == len(depths) == len(sr_ratios) == 4:
            raise ValueError("embed_dims, num_heads, depths and sr_ratios: expected four stages each")
        self.out_channels = tuple(embed_dims)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        first = 0
        for i in range(4):
            kernel, stride = (7, 4) if i == 0 else (3, 2)
            prev = in_channels if i == 0 else embed_dims[i - 1]
            self.add_module(f"patch_embed{i + 1}", OverlapPatchEmbed(prev, embed_dims[i], kernel, stride))
            blocks = [Block(embed_dims[i], num_heads[i], sr_ratios[i], mlp_ratio, rates[first + j])
                      for j in range(depths[i])]
            self.add_module(f"block{i + 1}", nn.ModuleList(blocks))
            self.add_module(f"norm{i + 1}", nn.LayerNorm(embed_dims[i], eps=_EPS))
            first += depths[i]
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        outs = []
        on = self.activation_checkpointing
        for i in range(1, 5):
            x, h, w = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"block{i}"):
                x = stage(block, x, on, h, w)
            x = getattr(self, f"norm{i}")(x)
            x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
            outs.append(x)
        return outs


def _init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        nn.init.zeros_(m.bias)
