"""Fixed inputs of the DACS golden tests (tests/test_method_dacs_golden.py), built from seeds. The
figures in tests/fixtures/authors/dacs_*.json were computed from these same inputs with the
authors' functions (vikolss/DACS and lhoyer/DAFormer, see each fixture's provenance), transcribed
outside this repository."""
import types

import torch

from udafast.config import DEFAULTS, merge
from udafast.methods.dacs import DACS
from udafast.models import build_model

C = 5
ITER, ITERS, LR = 3, 10, 0.01
# the step's confidence threshold: a random 5-class network is never 0.968-confident, so the
# golden step runs at 0.65 (one number of the code's pixel_weight rule; the 0.968 is tested alone)
STEP_THRESHOLD = 0.65


def probe(t, seed=99):
    """A fixed random direction: sum(t * probe) checks a whole tensor with one number."""
    g = torch.Generator().manual_seed(seed)
    return float((t.detach().double() * torch.randn(t.shape, generator=g, dtype=torch.float64)).sum())


def mix_inputs():
    """ClassMix: source labels [2, 8, 8] (with ignored pixels), pseudo-labels, source and target
    images [2, 3, 8, 8] and target pixel weights [2, 8, 8]."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, C, (2, 8, 8), generator=g)
    labels[0, 0, :3] = 255
    labels[1] = labels[1].clamp(max=2)  # image 1 has fewer classes than the batch
    pseudo = torch.randint(0, C, (2, 8, 8), generator=g)
    source = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64)
    target = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64)
    weights = torch.full((2, 8, 8), 0.375, dtype=torch.float64)
    return labels, pseudo, source, target, weights


def confidence_inputs():
    """Teacher confidences [2, 6, 7], some exactly at the threshold (the code's `ge`)."""
    g = torch.Generator().manual_seed(1)
    p = torch.rand(2, 6, 7, generator=g) * 0.1 + 0.9
    p[0, 2, :3] = 0.968
    return p


def jitter_inputs():
    """Images [3, 3, 6, 7] in [0, 1] (one grey pixel per image) and ColorJitter(0.25, ...)'s factors
    per image and orders (each image's own kornia call, as DACS jitters image by image)."""
    g = torch.Generator().manual_seed(2)
    images = torch.rand(3, 3, 6, 7, generator=g)
    images[:, :, 0, 0] = 0.5
    s = 0.25
    brightness = 1 - s + 2 * s * torch.rand(3, generator=g)
    contrast = 1 - s + 2 * s * torch.rand(3, generator=g)
    saturation = 1 - s + 2 * s * torch.rand(3, generator=g)
    hue = -s + 2 * s * torch.rand(3, generator=g)
    orders = [torch.randperm(4, generator=g).tolist() for _ in range(3)]
    return images, brightness, contrast, saturation, hue, orders


def blur_inputs():
    """An image [1, 3, 32, 48] and the sigma drawn for it."""
    g = torch.Generator().manual_seed(3)
    return torch.rand(1, 3, 32, 48, generator=g, dtype=torch.float64), 0.7


def config(**section):
    cfg = merge(DEFAULTS, {"method": "dacs", "model": {"name": "small", "num_classes": C, "width": 4},
                           "optimizer": {"name": "sgd", "lr": LR, "momentum": 0.9, "weight_decay": 5e-4},
                           "data": {"batch_size": 2}})
    cfg["dacs"] = dict(section)
    return cfg


def step_setup():
    """One iteration of trainUDA.py's main loop on a tiny network (the small net, width 4, 5
    classes) at it = 3 of 10: student and teacher weights perturbed apart, the colour views off
    (configUDA's color_jitter / blur false: they are tested alone), the step's threshold above.
    Returns the method (teacher set) and the batch."""
    ctx = types.SimpleNamespace(device=torch.device("cpu"), backend="auto")
    m = DACS(config(threshold=STEP_THRESHOLD, jitter=False, blur=False), ctx)
    torch.manual_seed(0)
    m.start_stage(None, build_model(m.config["model"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        m.teacher.model.load_state_dict(m.model.state_dict())
        for p in m.teacher.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    x_s = torch.rand(2, 3, 32, 32, generator=g)
    y_s = torch.randint(0, C, (2, 32, 32), generator=g)
    y_s[:, :4] = 255
    x_t = torch.rand(2, 3, 32, 32, generator=g)
    lr = LR * (1 - ITER / ITERS) ** 0.9
    for group in m.optimizers["model"].param_groups:
        group["lr"] = lr * (10 if group["name"] == "heads" else 1)
    return m, {"source": {"image": x_s, "label": y_s}, "target": {"image": x_t}}
