"""The ImageNet MiT weights (`model.pretrained` of "mit_b5_daformer"), read by their own names.

NVlabs/SegFormer's ImageNet-1k release (`mit_b5.pth`, which DAFormer's configs load as
`pretrained='pretrained/mit_b5.pth'`) is a plain state dict of the encoder's keys
(`patch_embed1.proj.weight`, `block1.0.attn.q.weight`, ..., `norm4.bias`; the list is
tests/fixtures/authors/mit_b5_keys.json) plus the ImageNet classifier `head.weight`/`head.bias`,
which the segmentation network has no use for (DAFormer's non-strict load drops it too). Any other
missing, unexpected or misshapen key is a ValueError naming the file and the keys.
"""
import os

import torch.nn as nn

from udafast.models.authors import read_state_file
from udafast.models.resnet import key_problems

__all__ = ["read_mit_weights", "load_mit_weights"]

_CLASSIFIER = ("head.weight", "head.bias")


def read_mit_weights(path: str) -> dict:
    """The encoder's tensors of an ImageNet MiT file (a `module.` prefix and the classifier dropped)."""
    state, _ = read_state_file(os.fspath(path), prefixes=("module.",))
    return {k: v for k, v in state.items() if k not in _CLASSIFIER}


def load_mit_weights(backbone: nn.Module, state: dict, path: str) -> None:
    """Copy `state` (from `read_mit_weights`) into the MiT `backbone`; ValueError naming `path`
    and the keys when they disagree."""
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} (model {tuple(v.shape)})"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = key_problems(missing, mismatched, unexpected)
    if problems:
        raise ValueError(f"{path}: the MiT weights do not fit the model's encoder: {problems}")
    backbone.load_state_dict(state)
