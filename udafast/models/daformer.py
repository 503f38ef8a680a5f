"""DAFormer's network: a SegFormer MiT encoder with DAFormer's context-aware fusion decoder.

`model(images)` -> {"logits" [B, C, H/4, W/4], "features" the fused 256-d decoder features the
logits are classified from} and, with `return_backbone=True`, "backbone" (the last encoder stage,
[B, 512, H/32, W/32] for MiT-B5: the features DAFormer's ImageNet feature distance compares) and
"levels" (all four stage outputs). No aux head. Inputs: ImageNet mean/std normalisation (DAFormer's
img_norm_cfg). The module names are the authors' (`backbone.*`, `decode_head.*`), so DAFormer/MIC
checkpoints map by dropping their `model.` prefix (udafast.models.authors).
"""
import os
from typing import Any, Dict, List, Sequence

import torch
import torch.nn as nn

from udafast.models.daformer_head import DAFormerHead
from udafast.models.mit_weights import load_mit_weights, read_mit_weights
from udafast.models.mix_transformer import MIT_B5, MixVisionTransformer
from udafast.models.segmentation import SegmentationModel

__all__ = ["MiTDAFormer", "build_mit_daformer"]


class MiTDAFormer(SegmentationModel):
    """MiT (default mit_b5) + DAFormerHead (`feature_dim` channels, Dropout2d(`head_dropout`))."""

    def __init__(self, num_classes: int = 19, feature_dim: int = 256, head_dropout: float = 0.1,
                 drop_path_rate: float = 0.1, **mit: Sequence[int]):
        super().__init__()
        self.feature_dim = feature_dim
        self.backbone = MixVisionTransformer(**{**MIT_B5, **mit}, drop_path_rate=drop_path_rate)
        self.decode_head = DAFormerHead(self.backbone.out_channels, num_classes, feature_dim, head_dropout)

    def forward(self, images: torch.Tensor, return_backbone: bool = False) -> Dict[str, Any]:
        levels = self.backbone(images)
        logits, features = self.decode_head(levels)
        out = {"logits": logits, "features": features}
        if return_backbone:
            out["backbone"] = levels[-1]
            out["levels"] = levels
        return out

    def param_groups(self, lr: float) -> List[Dict[str, Any]]:
        """As SegmentationModel's (backbone at `lr`, heads at 10 x `lr`), with the backbone's
        LayerNorm parameters in a group of their own without weight decay: DAFormer's
        paramwise_cfg (custom_keys head lr_mult 10, norm decay_mult 0; its first match wins,
        so the decoder's BatchNorms, named `bn` under `decode_head`, keep their decay)."""
        groups = super().param_groups(lr)
        norms = {id(p) for m in self.backbone.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
        backbone = groups[0]["params"]
        groups[0]["params"] = [p for p in backbone if id(p) not in norms]
        groups.insert(1, {"params": [p for p in backbone if id(p) in norms], "lr": float(lr), "weight_decay": 0.0,
                          "name": "backbone_norm"})
        return groups


def build_mit_daformer(config: dict, load_pretrained: bool = True) -> MiTDAFormer:
    """The "mit_b5_daformer" network of a resolved model config (udafast.models.build): keys
    num_classes, feature_dim, head_dropout, drop_path_rate, pretrained (None or a path to the
    ImageNet MiT-B5 file, udafast.models.mit_weights), normalization."""
    for key in ("head_dropout", "drop_path_rate"):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"config[{key!r}]: expected a number in [0, 1), got {value!r}")
    path = config["pretrained"]
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"config['pretrained']: expected a path to SegFormer's ImageNet mit_b5.pth or None, "
                         f"got {path!r}")
    model = MiTDAFormer(config["num_classes"], config["feature_dim"], float(config["head_dropout"]),
                        float(config["drop_path_rate"]))
    if path is not None:
        config["pretrained"] = path = os.fspath(path)
        if load_pretrained:
            load_mit_weights(model.backbone, read_mit_weights(path), path)
    return model
