"""Fixed inputs of the DAFormer / MIC golden tests (tests/test_method_daformer_golden.py), built
from seeds. The figures in tests/fixtures/authors/daformer_rcs.json (rcs_stats, rcs_stats_dominant),
daformer_fdist.json (fdist_inputs, fdist_empty_labels), mic_mask.json (mask_cases) and
daformer_schedule.json (SCHEDULE) were computed from these same inputs with the authors' functions
(lhoyer/DAFormer, lhoyer/MIC, open-mmlab/mmcv v1.3.7; see each fixture's provenance), transcribed
outside this repository. It imports torch only: the transcriptions read these very inputs."""
import torch

NUM_CLASSES = 19
# DAFormer's thing classes for the ImageNet feature distance
# (configs/daformer/gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py)
THING_CLASSES = [6, 7, 11, 12, 13, 14, 15, 16, 17, 18]
FDIST_MIN_RATIO = 0.75

RCS_TEMPERATURES = [0.01, 0.1]
RCS_MIN_PIXELS = [40, 100]
# the dominant-class stats: 0.01 keeps float32 subnormals, 0.005 underflows them to exact zeros
RCS_DOMINANT_TEMPERATURES = [0.01, 0.005]

# (seed, batch, H, W, block size, mask ratio); MIC's defaults are block 64, ratio 0.7
MASK_CASES = [
    (0, 2, 128, 256, 64, 0.7),   # divides
    (1, 2, 128, 256, 32, 0.7),   # divides
    (2, 2, 100, 150, 32, 0.7),   # does not divide: round(3.125) = 3, round(4.6875) = 5 blocks
    (3, 3, 80, 144, 32, 0.5),    # halves: round(2.5) = 2, round(4.5) = 4 (Python rounds half to even)
]

# DAFormer's schedule (configs/_base_/schedules/poly10warm.py, adamw.py, head lr_mult 10)
SCHEDULE = {
    "base_lr": 6e-5, "head_lr": 6e-4, "max_iters": 40000, "warmup_iters": 1500, "warmup_ratio": 1e-6,
    "power": 1.0, "min_lr": 0.0, "iters": [0, 1, 2, 749, 1499, 1500, 1501, 20000, 39999],
}


def probe(t, seed=99):
    """A fixed random direction: sum(t * probe) checks a whole tensor with one number."""
    g = torch.Generator().manual_seed(seed)
    return float((t.detach().double() * torch.randn(t.shape, generator=g, dtype=torch.float64)).sum())


def rcs_stats():
    """12 source samples' {train id: pixel count} over 19 classes (keys ascending, as DAFormer's
    tools/convert_datasets/gta.py writes them), as of 256x256 labels. Classes 9 and 16 are absent
    everywhere; classes 17 and 12 tie at 210 pixels in all, 17 appearing first (sample 2, class 12
    in sample 6: DAFormer's stable sort keeps first appearance, not class order); classes 3 and 4
    tie at 900, 3 appearing first; class 7 has exactly 40 pixels in sample 11 and class 5 exactly
    100 in sample 1 (the RCS_MIN_PIXELS boundaries: strictly more is kept). Every class present has
    a sample above both thresholds (DAFormer's UDADataset asserts that)."""
    g = torch.Generator().manual_seed(15)
    scale = torch.tensor([9000, 2500, 6000, 300, 400, 500, 60, 150, 4000, 800,
                          3000, 200, 40, 1200, 500, 300, 100, 80, 120], dtype=torch.float64)
    present_p = torch.tensor([.95, .8, .9, .4, .4, .7, .2, .4, .9, .5, .85, .3, .15, .8, .3, .2, .1, .15, .2])
    stats = []
    for _ in range(12):
        present = torch.rand(NUM_CLASSES, generator=g) < present_p
        counts = (scale * (0.25 + 1.5 * torch.rand(NUM_CLASSES, generator=g, dtype=torch.float64))).long()
        stats.append({c: int(counts[c]) + 1 for c in range(NUM_CLASSES)
                      if present[c] and c not in (3, 4, 9, 12, 16, 17)})
    stats[2][17], stats[5][17], stats[6][12] = 70, 140, 210
    stats[1][3], stats[8][3], stats[3][4], stats[9][4], stats[10][4] = 500, 400, 300, 300, 300
    stats[7][6] = 150
    stats[11][7] = 40
    stats[1][5] = 100
    return [dict(sorted(s.items())) for s in stats]


def rcs_stats_dominant():
    """3 samples where class 0 holds ~98% of the pixels: (1 - f) / 0.01 spans ~98, beyond float32's
    normal range for exp (the authors' float32 softmax keeps subnormals), and at 0.005 ~196 (exact
    zeros in float32)."""
    return [{0: 130000, 5: 900, 11: 40}, {0: 128000, 1: 1500, 5: 700}, {0: 131000, 18: 12}]


def _blocky_labels(g, batch, size, cell):
    """Labels [batch, size, size] int64: one class per cell x cell block, then per block a random
    share (0 to 0.5) of its pixels redrawn, then ignore (255) pixels scattered at 4%."""
    n = size // cell
    coarse = torch.randint(0, NUM_CLASSES, (batch, n, n), generator=g)
    labels = coarse.repeat_interleave(cell, 1).repeat_interleave(cell, 2)
    rate = (torch.rand(batch, n, n, generator=g) * 0.5).repeat_interleave(cell, 1).repeat_interleave(cell, 2)
    noisy = torch.rand(batch, size, size, generator=g) < rate
    labels = torch.where(noisy, torch.randint(0, NUM_CLASSES, (batch, size, size), generator=g), labels)
    labels[torch.rand(batch, size, size, generator=g) < 0.04] = 255
    return labels


def fdist_inputs():
    """The feature distance's inputs: labels [2, 64, 64] (8x8 blocks of one class, partly redrawn,
    ignore pixels scattered, an ignore patch over whole and half cells in image 0, image 1's left
    columns all thing class 13), and for each feature size 8 (scale 8) and 16 (scale 4) the
    student's features and the ImageNet model's [2, 16, h, h] float64."""
    g = torch.Generator().manual_seed(150)
    labels = _blocky_labels(g, 2, 64, 8)
    labels[0, 36:56, 0:24] = 255
    labels[1, :, 0:8] = 13
    feats = {}
    for h in (8, 16):
        f = torch.randn(2, 16, h, h, generator=g, dtype=torch.float64)
        ref = f + 0.5 * torch.randn(2, 16, h, h, generator=g, dtype=torch.float64)
        feats[h] = (f, ref)
    return labels, feats


def fdist_empty_labels():
    """Labels with no thing-class pixel kept: fdist_inputs' labels with every class sent to 0..5
    (ignore kept), and an all-ignore map."""
    labels, _ = fdist_inputs()
    stuff = torch.where(labels == 255, labels, labels % 6)
    return {"stuff_only": stuff, "all_ignore": torch.full_like(labels, 255)}


def mask_cases():
    """The block-mask cases: (seed, batch, (H, W), block size, ratio)."""
    return [(s, b, (h, w), bs, r) for s, b, h, w, bs, r in MASK_CASES]
