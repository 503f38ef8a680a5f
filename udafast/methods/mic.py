"""MIC: masked image consistency on top of DAFormer.

L. Hoyer, D. Dai, H. Wang, L. Van Gool, "MIC: Masked Image Consistency for Context-Enhanced Domain
Adaptation", CVPR 2023 (75.9 mIoU GTA5 -> Cityscapes with HRDA, MiT-B5). The paper is the
definition; where it is silent the authors' code (lhoyer/MIC `seg/mmseg/models/uda/dacs.py`,
`masking_consistency_module.py`, `utils/masking_transforms.py`) is. Each iteration is DAFormer's
(udafast.methods.daformer), plus one more student pass:

- the target batch, colour-jittered and blurred on its own (`mask_mode='separatetrgaug'`: the
  coins and factors drawn afresh, as for the mixed images), normalised, then multiplied by a block
  mask (`BlockMaskGenerator`): per 64x64 patch, kept where U(0, 1) > 0.7 (masked pixels become 0
  in the normalised image, the dataset mean);
- the student on that image learns the teacher's pseudo-labels of the whole target image, weighted
  by the same pseudo-label weight (the fraction above the threshold, the crop's rows at 0;
  `mask_alpha` and `mask_pseudo_threshold` 'same': MIC shares DAFormer's teacher), as a mean
  over every pixel, at weight `mask_weight` 1 (`mask_lambda`).

The masked pass runs the student in train mode, as lhoyer's code does, so a BatchNorm network's
running statistics also move towards the masked images' (`mask_bn_update` true). `mask_bn_update:
false` (not the authors': an ablation) keeps them as they were before that pass; the forward still
normalises with the batch's statistics.

HRDA's multi-resolution training is not part of udafast: MIC runs on DAFormer here, with
DAFormer's 512x512 settings (unconfirmed: MIC ships only HRDA configs). `mask_mode: separatetrg`
masks the target image without the separate colour augmentation.
"""
import contextlib
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from udafast.methods.base import is_count, is_number
from udafast.methods.dacs import BLUR_THRESHOLD, JITTER_THRESHOLD
from udafast.methods.daformer import DAFormer
from udafast.methods.mixing import uniform

__all__ = ["MIC", "block_mask", "running_stats_kept", "MASK_MODES"]

MASK_MODES = ("separatetrgaug", "separatetrg")


def block_mask(batch: int, size: Sequence[int], block_size: int, ratio: float, generator: torch.Generator,
               device: Optional[torch.device] = None) -> torch.Tensor:
    """`BlockMaskGenerator.generate_mask`: [B, 1, H, W] float, 1 on the kept blocks: U(0, 1) > `ratio`
    per cell of a (round(H / block_size), round(W / block_size)) grid, resized to `size` (H, W) by
    nearest neighbour."""
    H, W = size
    if round(H / block_size) < 1 or round(W / block_size) < 1:
        raise ValueError(f"block_mask: blocks of {block_size} leave no cell on an image of {H}x{W}")
    grid = torch.rand((batch, 1, round(H / block_size), round(W / block_size)), generator=generator)
    kept = (grid > ratio).float()
    return F.interpolate(kept, size=(H, W), mode="nearest").to(device)


@contextlib.contextmanager
def running_stats_kept(model: torch.nn.Module) -> Iterator[None]:
    """Within: `model`'s BatchNorm layers normalise with the batch's statistics but leave their running
    statistics as they are (update factor 0: autograd keeps those buffers for the backward pass, so
    they may not be restored in place afterwards); their batch counts are put back on exit."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


class MIC(DAFormer):
    name = "mic"
    defaults = {
        **DAFormer.defaults,
        "mask_block_size": 64,             # mask_generator mask_block_size
        "mask_ratio": 0.7,                 # mask_generator mask_ratio
        "mask_weight": 1.0,                # mask_lambda
        "mask_mode": "separatetrgaug",     # mask_mode
        "mask_bn_update": True,            # the masked pass updates BatchNorm running statistics
    }

    def _check_options(self):
        super()._check_options()
        o = self.options
        if not is_count(o["mask_block_size"], 1):
            raise self.option_error("mask_block_size", "an integer >= 1")
        if not (is_number(o["mask_ratio"]) and 0 <= o["mask_ratio"] <= 1):
            raise self.option_error("mask_ratio", "a number in [0, 1]")
        if not (is_number(o["mask_weight"]) and o["mask_weight"] >= 0):
            raise self.option_error("mask_weight", "a number >= 0")
        if o["mask_mode"] not in MASK_MODES:
            raise self.option_error("mask_mode", " or ".join(MASK_MODES))
        if not isinstance(o["mask_bn_update"], bool):
            raise self.option_error("mask_bn_update", "true or false")

    def masked_images(self, x_t: torch.Tensor) -> torch.Tensor:
        """The student's input: the target images [B, 3, H, W] in [0, 1], with `separatetrgaug` their
        own colour jitter (probability 0.8) and blur (probability 0.5) for the batch, normalised,
        times the block mask. Draws: the two coins, the jitter factors, the blur sigma, the mask."""
        o, g = self.options, self.generator
        x = x_t
        if o["mask_mode"] == "separatetrgaug":
            jitter = uniform(g) > JITTER_THRESHOLD
            blur = uniform(g) > BLUR_THRESHOLD
            x = self.strong_colour(x, jitter, blur)
        mask = block_mask(x.shape[0], x.shape[-2:], o["mask_block_size"], o["mask_ratio"], g, x.device)
        return self.normalize(x) * mask.to(x.dtype)

    def target_losses(self, x_t, pseudo, weight_t):
        with record_function("udafast::masked_view"):
            masked = self.masked_images(x_t)
        with contextlib.nullcontext() if self.options["mask_bn_update"] else running_stats_kept(self.model):
            logits = self.model(masked)["logits"]
        return {"masked": (self.weighted_ce(logits, pseudo, weight_t), self.options["mask_weight"])}
