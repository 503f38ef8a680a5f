"""Fixed inputs of the DAFormer / MIC golden one-iteration tests
(tests/test_method_daformer_step_golden.py), built from seeds. The figures in
tests/fixtures/authors/daformer_step.json and mic_step.json were computed from these same inputs
(step_setup's networks, batch and mask) with the authors' DACS.forward_train (lhoyer/DAFormer,
lhoyer/MIC; see each fixture's provenance), transcribed outside this repository, on udafast's tiny
network (the small net, width 4, 5 classes), as tests/dacs_recipes.py does for vikolss/DACS."""
import types

import torch

from udafast.config import DEFAULTS, merge
from udafast.methods.daformer import DAFormer, downscale_label_ratio
from udafast.methods.mic import MIC
from udafast.models import build_model

C = 5
H = W = 32
LR = 0.01
# (it, iters) of the step: DAFormer's at 3 of 10, where the teacher's alpha(it + 1) = 0.8 differs
# from alpha(it) = 0.75 (the EMA offset shows); MIC's at 1500 of 4000, where alpha = 0.999 caps it
STEPS = {"daformer": (3, 10), "mic": (1500, 4000)}
# a random 5-class network is never 0.968-confident: the step runs at a lower threshold (the
# pseudo-label weight then is neither 0 nor 1)
STEP_THRESHOLD = 0.6
# the feature distance: classes 3 and 4 stand for the thing classes, lambda large enough to matter
FD_LAMBDA = 0.5
FD_CLASSES = [3, 4]
FD_MIN_RATIO = 0.75
# the pseudo-label crop (DAFormer's 15 / 120 rows of 512, here of 32)
IGNORE_TOP, IGNORE_BOTTOM = 2, 3
ALPHA = 0.999
# MIC's block mask: blocks of 8 over 32 x 32 (a 4 x 4 grid), kept where U > 0.7
MASK_BLOCK, MASK_RATIO, MASK_WEIGHT = 8, 0.7, 1.0

METHODS = {"daformer": DAFormer, "mic": MIC}


def probe(t, seed=99):
    """A fixed random direction: sum(t * probe) checks a whole tensor with one number."""
    g = torch.Generator().manual_seed(seed)
    return float((t.detach().double() * torch.randn(t.shape, generator=g, dtype=torch.float64)).sum())


def config(name):
    """The run config of `name` ("daformer" or "mic"): the small net, SGD as tests/dacs_recipes.py,
    rare-class sampling off (a data-stream matter, not the step's), colour jitter and blur off, the
    feature distance to a reference network (fd_reference init: step_setup sets its weights), MIC
    masking the target images without its own colour augmentation (separatetrg)."""
    cfg = merge(DEFAULTS, {"method": name, "model": {"name": "small", "num_classes": C, "width": 4},
                           "optimizer": {"name": "sgd", "lr": LR, "momentum": 0.9, "weight_decay": 5e-4},
                           "data": {"batch_size": 2}})
    section = {"alpha": ALPHA, "threshold": STEP_THRESHOLD, "jitter": False, "blur": False, "rcs": False,
               "ignore_top": IGNORE_TOP, "ignore_bottom": IGNORE_BOTTOM, "fd_lambda": FD_LAMBDA,
               "fd_classes": list(FD_CLASSES), "fd_scale_min_ratio": FD_MIN_RATIO, "fd_reference": "init",
               # the fixtures' one adaptation (their notes): lhoyer's logits upsampled with align_corners=True;
               # the flag's own path is tested against F.interpolate in test_method_daformer.py
               "lhoyer_align_corners": False}
    if name == "mic":
        section.update(mask_mode="separatetrg", mask_block_size=MASK_BLOCK, mask_ratio=MASK_RATIO,
                       mask_weight=MASK_WEIGHT)
    cfg[name] = section
    return cfg


def source_labels(g):
    """Source labels [2, 32, 32]: one class per 8 x 8 cell (the feature grid's cells), a random
    share (0 to 0.5) of each cell's pixels redrawn, ignore (255) pixels scattered at 4% and on the
    top two rows; cells of classes 3 / 4 both above and below the 0.75 pooling ratio."""
    coarse = torch.randint(0, C, (2, 4, 4), generator=g)
    coarse[0, 1, :3] = torch.tensor([3, 4, 3])
    coarse[1, 2, 1:] = torch.tensor([4, 4, 3])
    labels = coarse.repeat_interleave(8, 1).repeat_interleave(8, 2)
    rate = (torch.rand(2, 4, 4, generator=g) * 0.5).repeat_interleave(8, 1).repeat_interleave(8, 2)
    noisy = torch.rand(2, H, W, generator=g) < rate
    labels = torch.where(noisy, torch.randint(0, C, (2, H, W), generator=g), labels)
    labels[torch.rand(2, H, W, generator=g) < 0.04] = 255
    labels[:, :2] = 255
    return labels


def pooled_labels(labels):
    """The source labels pooled to the 4 x 4 feature grid as the feature distance pools them."""
    return downscale_label_ratio(labels, H // 4, FD_MIN_RATIO, C)


def fixed_mask():
    """MIC's block mask [2, 1, 32, 32] float32 (given, not drawn): a 4 x 4 grid of blocks kept where
    U(0, 1) > 0.7, resized to 32 x 32 by nearest neighbour."""
    g = torch.Generator().manual_seed(11)
    grid = (torch.rand(2, 1, 4, 4, generator=g) > MASK_RATIO).float()
    return grid.repeat_interleave(MASK_BLOCK, 2).repeat_interleave(MASK_BLOCK, 3)


def _perturb_buffers(model, g):
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.add_(torch.randn(b.shape, generator=g) * 0.1)
        elif name.endswith("running_var"):
            b.mul_(1 + torch.rand(b.shape, generator=g))


def step_setup(name):
    """One iteration of lhoyer's DACS.forward_train (DAFormer, or MIC with its masked image) on
    the tiny network at STEPS[name]: student, teacher and the feature distance's reference network
    perturbed apart (weights and BatchNorm statistics), the step's threshold above, the SGD groups'
    learning rates at the trainer's poly factor (heads x10). Returns the method (teacher and
    reference set) and the batch (images in [0, 1])."""
    it, iters = STEPS[name]
    ctx = types.SimpleNamespace(device=torch.device("cpu"), backend="auto", log=lambda text: None)
    m = METHODS[name](config(name), ctx)
    torch.manual_seed(0)
    m.start_stage(None, build_model(m.config["model"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        _perturb_buffers(m.model, g)
        for other in (m.teacher.model, m.reference):
            other.load_state_dict(m.model.state_dict())
            for p in other.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
        _perturb_buffers(m.reference, g)
    x_s = torch.rand(2, 3, H, W, generator=g)
    y_s = source_labels(g)
    x_t = torch.rand(2, 3, H, W, generator=g)
    lr = LR * (1 - it / iters) ** 0.9
    for group in m.optimizers["model"].param_groups:
        group["lr"] = lr * (10 if group["name"] == "heads" else 1)
    return m, {"source": {"image": x_s, "label": y_s}, "target": {"image": x_t}}
