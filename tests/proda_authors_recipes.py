"""The inputs of the ProDA golden tests (tests/test_proda_authors.py), drawn from seeds.

The fixtures tests/fixtures/authors/proda_*.json hold what the authors' code (microsoft/ProDA,
transcribed outside this repository) computed on exactly these inputs; each fixture names the
recipe function below that rebuilds them. Everything is float64 on the CPU.
"""
import torch
import torch.nn.functional as F

DT = torch.float64
B, C, D, H, W = 2, 5, 6, 8, 12     # batch, classes, feature channels, map size (1/4 of the frame)
FRAME = (32, 48)                   # the image (frame / strong view) the maps are a quarter of
IGNORE = 255                       # udafast's ignore label; the authors' code uses 250


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=DT)


def sce_inputs():
    """Stage-1 loss terms: logits [B, C, H, W] = 2 randn; labels randint(C) with rand < 0.25 ignored."""
    g = _gen(101)
    logits = 2.0 * randn(g, B, C, H, W)
    labels = torch.randint(0, C, (B, H, W), generator=g)
    labels[torch.rand(B, H, W, generator=g, dtype=DT) < 0.25] = IGNORE
    return {"logits": logits, "labels": labels}


#: weak views of the full frame FRAME (32x48): (RandomSized (h, w), RandomCrop (y1, y2, x1, x2),
#: RandomHorizontallyFlip) per sample, as data/augmentations.py records them; the views are 24x36
WEAK_PARAMS = {
    "RandomSized": [[40, 28], [60, 42]],
    "RandomCrop": [[6, 2], [30, 26], [10, 5], [46, 41]],
    "RandomHorizontallyFlip": [True, False],
}
WEAK_VIEW = (24, 36)


def weak_geometry():
    """udafast's geometry rows [scaled_h, scaled_w, crop_top, crop_left, flipped] of WEAK_PARAMS."""
    p = WEAK_PARAMS
    return torch.tensor([[p["RandomSized"][0][i], p["RandomSized"][1][i], p["RandomCrop"][0][i],
                          p["RandomCrop"][2][i], float(p["RandomHorizontallyFlip"][i])] for i in range(B)],
                        dtype=DT)


def rectify_inputs():
    """Prototype weights / rectified labels / full2weak: teacher features on the full frame at 1/4
    [B, D, 8, 12] randn, prototypes [C, D] randn, soft labels in the weak view at 1/4
    [B, C, 6, 9] = softmax(1.5 randn)."""
    g = _gen(202)
    feats = randn(g, B, D, H, W)
    prototypes = randn(g, C, D)
    soft = F.softmax(1.5 * randn(g, B, C, WEAK_VIEW[0] // 4, WEAK_VIEW[1] // 4), dim=1)
    return {"feats": feats, "prototypes": prototypes, "soft": soft}


#: strong views (no affine op): flip, and the CutoutAbs box (x0, y0, x1, y1) in pixels of the
#: 32x48 view, as data/randaugment.py records them
STRONG_FLIP = [True, False]
STRONG_CUTOUT = [[8, 4, 24, 20], [20, 12, 36, 28]]


def strong_params():
    """The same strong views as udafast's warp_like params (identity affine; cutout as fractions)."""
    h, w = FRAME
    cut = torch.tensor([[x0 / w, y0 / h, x1 / w, y1 / h] for x0, y0, x1, y1 in STRONG_CUTOUT], dtype=torch.float32)
    return {"theta": torch.eye(2, 3).repeat(B, 1, 1), "flip": torch.tensor(STRONG_FLIP), "cutout": cut}


def kl_inputs():
    """Structure learning: teacher features in the weak view and student features in the strong
    view, both [B, D, 8, 12] randn, prototypes [C, D] randn."""
    g = _gen(303)
    return {"teacher": randn(g, B, D, H, W), "student": randn(g, B, D, H, W), "prototypes": randn(g, C, D)}


def update_inputs():
    """Moving prototypes: teacher features [B, D, 8, 12] randn, logits [B, C, 8, 12] = 2 randn with
    class 4 lowered by 2.5 (rare: under 10 pixels in some image), prototypes [C, D] randn."""
    g = _gen(404)
    feats = randn(g, B, D, H, W)
    logits = 2.0 * randn(g, B, C, H, W)
    logits[:, 4] -= 2.5
    return {"feats": feats, "logits": logits, "prototypes": randn(g, C, D)}


INIT_N, INIT_H, INIT_W = 800, 4, 8


def init_inputs():
    """Initial prototypes: 800 images of 4x8 maps; features [N, D, 4, 8] randn; logits randn with
    class 0 raised by 6 on the left half of every image (its 16 pixels: 3200 updates over 4 epochs,
    past the 3000 cap) and class 1 + i % 4 raised by 3 on the right half of image i."""
    g = _gen(505)
    feats = randn(g, INIT_N, D, INIT_H, INIT_W)
    logits = randn(g, INIT_N, C, INIT_H, INIT_W)
    logits[:, 0, :, : INIT_W // 2] += 6.0
    for i in range(INIT_N):
        logits[i, 1 + i % 4, :, INIT_W // 2:] += 3.0
    return {"feats": feats, "logits": logits}


def distill_label_inputs():
    """Stage 2/3 labels: the image's logits at stride 8 [B, C, 4, 6] = 2 randn, + 6 on class 1 in
    the left three columns and on class 3 in the right three; the mirror image's logits = those
    mirrored + randn; the image is FRAME (32x48); threshold 0.95."""
    g = _gen(606)
    logits = 2.0 * randn(g, B, C, FRAME[0] // 8, FRAME[1] // 8)
    logits[:, 1, :, :3] += 6.0
    logits[:, 3, :, 3:] += 6.0
    flipped = logits.flip(-1) + randn(g, B, C, FRAME[0] // 8, FRAME[1] // 8)
    return {"logits": logits, "flipped": flipped, "threshold": 0.95}


def adversarial_inputs():
    """Warm-up: source and target logits at stride 8 [B, C, 4, 6] = 2 randn (the image FRAME,
    32x48); the discriminator's parameters are drawn after these, in named_parameters() order,
    each 0.3 randn (see discriminator_weights)."""
    g = _gen(707)
    return {"source": 2.0 * randn(g, B, C, FRAME[0] // 8, FRAME[1] // 8),
            "target": 2.0 * randn(g, B, C, FRAME[0] // 8, FRAME[1] // 8), "generator": g}


def discriminator_weights(module, g):
    """Overwrite `module`'s parameters, in named_parameters() order, with 0.3 randn from `g`."""
    with torch.no_grad():
        for _, p in module.named_parameters():
            p.copy_(0.3 * randn(g, *p.shape).to(p.dtype))
    return module


def distill_loss_inputs():
    """Stage-2 loss: student and teacher logits [B, C, 8, 12] = 2 randn and 3 randn, labels
    randint(C) with rand < 0.3 ignored."""
    g = _gen(808)
    student = 2.0 * randn(g, B, C, H, W)
    teacher = 3.0 * randn(g, B, C, H, W)
    labels = torch.randint(0, C, (B, H, W), generator=g)
    labels[torch.rand(B, H, W, generator=g, dtype=DT) < 0.3] = IGNORE
    return {"student": student, "teacher": teacher, "labels": labels}


# -- how the fixtures store tensors ------------------------------------------------------------
def digest(t, seed=12345):
    """A tensor [B, ...] as a few numbers: per sample its sums along each axis (the others summed
    out) and its dot product with a fixed randn tensor (enough to catch a misplaced pixel), and its
    L1 norm, the scale of the comparison's absolute tolerance (sums along an axis can cancel to 0)."""
    t = t.detach().to(DT)
    w = torch.randn(t.shape, generator=_gen(seed), dtype=DT)
    out = {"shape": list(t.shape), "l1": t.abs().sum().item(), "dot": (t * w).flatten(1).sum(1).tolist()}
    for d in range(1, t.dim()):
        others = [k for k in range(1, t.dim()) if k != d]
        out[f"axis{d}"] = (t.sum(dim=others) if others else t).tolist()
    return out


def label_string(labels):
    """Int labels [B, H, W] as one string per sample, row-major: a digit per class, 'x' = ignored."""
    return ["".join("x" if v in (250, 255) else str(v) for v in x.flatten().tolist()) for x in labels]
