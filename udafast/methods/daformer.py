"""DAFormer: DACS with rare-class sampling, a thing-class ImageNet feature distance and a
pseudo-label crop, its EMA teacher at 0.999.

L. Hoyer, D. Dai, L. Van Gool, "DAFormer: Improving Network Architectures and Training Strategies
for Domain-Adaptive Semantic Segmentation", CVPR 2022 (68.3 mIoU GTA5 -> Cityscapes, MiT-B5). The
paper is the definition; where it is silent the authors' code (lhoyer/DAFormer `mmseg/models/uda/
dacs.py`, `mmseg/datasets/uda_dataset.py`, `mmseg/utils/utils.py`, configs/daformer/
gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py) is. DACS's step (udafast.methods.
dacs: teacher pseudo-labels weighted by the fraction above 0.968, ClassMix, colour jitter and blur)
as lhoyer's code runs it (the `lhoyer_*` flags on, jitter strength 0.2), plus:

- Rare-class sampling (RCS, section 3.3): source images drawn by class, P(c) = softmax((1 - f_c) /
  T) with T 0.01 over the classes' pixel frequencies f_c, then an image with more than 3000 pixels
  of c, its crop re-drawn (up to 10 times) until it holds more than 3000 * 0.5 of them
  (udafast.data.rare_class; the counts cached beside the dataset).
- Thing-class ImageNet feature distance (FD, section 3.4): lambda * the mean L2 distance between
  the student's last backbone features of the source images and those of a frozen copy of the
  ImageNet-initialised network (`imnet_model`, eval mode), over the feature pixels whose source
  label, pooled to the feature grid, is a thing class (6, 7, 11-18: traffic light, sign, person,
  rider, car, truck, bus, train, motorcycle, bicycle) for at least 75% of the cell
  (`downscale_label_ratio`); lambda 0.005. No kept pixel: 0 (the code's mean of nothing is NaN
  and adds no gradient).
- The pseudo-label crop: weight 0 on the top 15 and bottom 120 rows (the 512x512 crops of
  Cityscapes at 1024x512 carry the ego car's hood and the rectified border there).
- The schedule of its config: AdamW 6e-5, head x10, no weight decay on norms; linear warm-up of
  1500 iterations, then poly 1.0 (the `optimizer:` section: name adamw, warmup_iters).

`fd_reference: init` measures the distance to the run's initial network instead of the ImageNet
one: for networks without ImageNet weights (the embedded benchmark's small network); not DAFormer.
With RCS its code also draws each target image uniformly with replacement (`get_rare_class_sample`);
`rcs_target_replacement` (default on) does the same, off keeps shuffled passes over the target set.
"""
import copy
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from udafast.data.labels import IGNORE_INDEX
from udafast.methods.base import is_count, is_number
from udafast.methods.dacs import DACS

__all__ = ["DAFormer", "downscale_label_ratio", "feature_distance", "THING_CLASSES"]

#: DAFormer's imnet_feature_dist_classes: the Cityscapes "thing" classes
THING_CLASSES = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)


def downscale_label_ratio(labels: torch.Tensor, scale: int, min_ratio: float, num_classes: int,
                          ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Labels [B, H, W] pooled to [B, H // scale, W // scale]: each cell's most frequent label
    (ignore counted as a class), or `ignore_index` where it covers less than `min_ratio` of the cell
    (`mmseg/utils/utils.py` `downscale_label_ratio`)."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale <= 1:
        raise ValueError(f"scale: expected an integer > 1, got {scale!r}")
    out = torch.where(labels == ignore_index, num_classes, labels)
    one_hot = F.one_hot(out.long(), num_classes + 1).permute(0, 3, 1, 2).float()
    ratio, out = F.avg_pool2d(one_hot, kernel_size=scale).max(1)
    out[out == num_classes] = ignore_index
    out[ratio < min_ratio] = ignore_index
    return out


def feature_distance(features: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor,
                     classes: Optional[Sequence[int]], scale_min_ratio: float, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The mean over feature pixels of ||features - reference||_2 ([B, C, h, w] each), over the
    pixels whose label, pooled to the feature grid by `downscale_label_ratio` (scale W // w), is
    one of `classes` (None: every pixel). 0, with a gradient path, where none is kept."""
    dist = torch.norm(features - reference, dim=1, p=2)
    if classes is not None:
        scale = labels.shape[-1] // features.shape[-1]
        pooled = downscale_label_ratio(labels, scale, scale_min_ratio, num_classes, ignore_index)
        if pooled.shape[-2:] != dist.shape[-2:]:
            raise ValueError(f"feature_distance: labels {tuple(labels.shape[-2:])} pooled by {scale} give "
                             f"{tuple(pooled.shape[-2:])}, the features are {tuple(dist.shape[-2:])}")
        dist = dist[torch.isin(pooled, torch.tensor(list(classes), device=pooled.device))]
    if dist.numel() == 0:
        return features.sum() * 0.0
    return dist.mean()


class DAFormer(DACS):
    name = "daformer"
    defaults = {
        **DACS.defaults,
        "alpha": 0.999,                       # dacs_a999_fdthings.py
        "ignore_top": 15,                     # the config's pseudo_weight_ignore_top
        "ignore_bottom": 120,                 # pseudo_weight_ignore_bottom
        "jitter_strength": 0.2,               # configs/_base_/uda/dacs.py color_jitter_strength
        "lhoyer_batch_classes": True,         # its get_class_masks (see udafast.methods.dacs)
        "lhoyer_ema_offset": True,            # its _update_ema at the start of the next iteration
        "lhoyer_source_mean_all": True,       # mmseg's cross-entropy: the mean over every pixel
        "lhoyer_align_corners": True,         # mmseg's resize of the logits: align_corners=False
        "rcs": True,                          # rare_class_sampling
        "rcs_temperature": 0.01,              # class_temp
        "rcs_min_pixels": 3000,               # min_pixels
        "rcs_min_crop_ratio": 0.5,            # min_crop_ratio
        "rcs_target_replacement": True,       # get_rare_class_sample: np.random.choice over the target
        "fd_lambda": 0.005,                   # imnet_feature_dist_lambda
        "fd_classes": list(THING_CLASSES),    # imnet_feature_dist_classes (null: every pixel)
        "fd_scale_min_ratio": 0.75,           # imnet_feature_dist_scale_min_ratio
        "fd_reference": "imagenet",           # imagenet (the paper) | init (the run's initial network)
    }

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.reference = None

    def _check_options(self):
        super()._check_options()
        o = self.options
        for key in ("rcs", "rcs_target_replacement"):
            if not isinstance(o[key], bool):
                raise self.option_error(key, "true or false")
        if not (is_number(o["rcs_temperature"]) and o["rcs_temperature"] > 0):
            raise self.option_error("rcs_temperature", "a number > 0")
        if not is_count(o["rcs_min_pixels"], 0):
            raise self.option_error("rcs_min_pixels", "an integer >= 0")
        for key in ("rcs_min_crop_ratio", "fd_scale_min_ratio"):
            if not (is_number(o[key]) and 0 <= o[key] <= 1):
                raise self.option_error(key, "a number in [0, 1]")
        if not (is_number(o["fd_lambda"]) and o["fd_lambda"] >= 0):
            raise self.option_error("fd_lambda", "a number >= 0")
        classes = o["fd_classes"]
        num_classes = int(self.config["model"].get("num_classes", 19))
        if classes is not None and not (isinstance(classes, (list, tuple)) and classes
                                        and all(is_count(c, 0) and c < num_classes for c in classes)):
            raise self.option_error("fd_classes", f"null or a list of class ids in [0, {num_classes})")
        if o["fd_reference"] not in ("imagenet", "init"):
            raise self.option_error("fd_reference", "imagenet or init")

    def start_stage(self, stage, model, resume=False):
        super().start_stage(stage, model, resume)
        o = self.options
        if o["rcs"]:
            try:
                classes, probs = self.ctx.set_rare_class_sampling(o["rcs_temperature"], o["rcs_min_pixels"],
                                                                  o["rcs_min_crop_ratio"])
            except ValueError as e:
                raise ValueError(f"{self.name}.rcs_min_pixels: {e}") from None
            self.ctx.log("rare-class sampling: " + ", ".join(f"{c}: {p:.3g}" for c, p in zip(classes, probs.tolist())))
            if o["rcs_target_replacement"]:
                self.ctx.draw_target_with_replacement()
        if o["fd_lambda"] > 0:
            # DAFormer's imnet_model: the network as built, before any UDA step, frozen in eval mode;
            # saved with the checkpoint (its code keeps it in the state dict as `imnet_model.`)
            if o["fd_reference"] == "init" and not resume:
                reference = copy.deepcopy(model)
            else:
                reference = self.ctx.build_model(init=o["fd_reference"] == "init")
            reference.eval()
            for p in reference.parameters():
                p.requires_grad_(False)
            self.reference = reference
            self.modules["imnet"] = reference

    def source_losses(self, x_s, y_s):
        o = self.options
        if o["fd_lambda"] == 0:
            return super().source_losses(x_s, y_s)
        x = self.normalize(x_s)
        out = self.model(x, return_backbone=True)
        logits = self.upsample(out["logits"], y_s.shape[-2:])
        with torch.no_grad(), record_function("udafast::reference_forward"):
            self.reference.eval()
            reference = self.reference(x, return_backbone=True)["backbone"]
        num_classes = out["logits"].shape[1]
        with record_function("udafast::feature_distance"):
            fd = feature_distance(out["backbone"], reference.to(out["backbone"].dtype), y_s, o["fd_classes"],
                                  o["fd_scale_min_ratio"], num_classes)
        return {"seg": (self.source_ce(logits, y_s), 1.0), "fd": (fd, o["fd_lambda"])}
