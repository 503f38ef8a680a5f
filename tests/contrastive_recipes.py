"""Fixed inputs of the contrastive golden tests (tests/test_method_contrastive_golden.py), built
from seeds. The figures in tests/fixtures/authors/contrastive_golden.json were computed from these
same inputs with the authors' functions (Shathe/SemiSeg-Contrastive, see the fixture's
provenance), transcribed outside this repository."""
import types

import torch

from udafast.config import DEFAULTS, merge
from udafast.methods.contrastive import ClassBalance, Contrastive, _ParameterEMA
from udafast.models import build_model
from udafast.models.heads import ClassSelectors

C, DIM = 4, 8


def probe(t, seed=99):
    """A fixed random direction: sum(t * probe) checks a whole tensor with one number."""
    g = torch.Generator().manual_seed(seed)
    return float((t.detach().double() * torch.randn(t.shape, generator=g, dtype=torch.float64)).sum())


def loss_inputs():
    """contrastive_class_to_class_learned_memory: features, labels, memory, selectors (float64)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40, DIM, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (40,), generator=g)
    labels[:2] = 3  # class 3: two features, one bank entry (skipped)
    labels[labels == 3] = 2
    labels[:2] = 3
    sizes = [5, 3, 6, 1]
    memory = [torch.randn(n, DIM, generator=g, dtype=torch.float64) for n in sizes]
    torch.manual_seed(1)
    selectors = ClassSelectors(C, DIM, DIM).double().train()
    memory_selectors = ClassSelectors(C, DIM, DIM).double().train()
    return z, labels, memory, selectors, memory_selectors


def ce_inputs():
    """The target CE (CrossEntropyLoss2dPixelWiseWeighted) + 0.01 entropy_loss (float64)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64) * 2
    pseudo = torch.randint(0, 5, (2, 6, 7), generator=g)
    pseudo[torch.rand(2, 6, 7, generator=g) < 0.2] = 255
    max_probs = torch.rand(2, 6, 7, generator=g, dtype=torch.float64) * 0.8 + 0.2
    class_weights = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    return logits, pseudo, max_probs, class_weights


def mix_inputs():
    """ClassMix: labels of 3 images with the classes picked per image, images and probabilities."""
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 6, (3, 8, 8), generator=g)
    labels[:, 0, :3] = 255
    classes = [torch.tensor([0, 2, 5]), torch.tensor([1, 4]), torch.tensor([3, 0, 1, 2])]
    images = torch.rand(3, 3, 8, 8, generator=g, dtype=torch.float64)
    probs = torch.rand(3, 8, 8, generator=g, dtype=torch.float64)
    return labels, classes, images, probs


def config(**section):
    cfg = merge(DEFAULTS, {"method": "contrastive", "model": {"name": "small", "num_classes": C, "width": 4},
                           "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4},
                           "data": {"batch_size": 2}})
    cfg["contrastive"] = {"dim": DIM, "bank_size": 6, **section}
    return cfg


def method(**section):
    ctx = types.SimpleNamespace(device=torch.device("cpu"), backend="auto")
    m = Contrastive(config(**section), ctx)
    torch.manual_seed(0)
    m.start_stage(None, build_model(m.config["model"]))
    return m


def memory_inputs():
    """FeatureMemory.add_features_from_sample_learned: two pushes of projections [N, 8] with labels,
    2 images a batch (so 2 per class), a bank of 6 per class, the authors' ascending sort."""
    m = method(code_ascending_selection=True, per_class=1)
    g = torch.Generator().manual_seed(4)
    pushes = []
    for n in (30, 25):
        z = torch.randn(n, DIM, generator=g)
        labels = torch.randint(0, C, (n,), generator=g)
        pushes.append((z, labels))
    return m, pushes


ITER, ITERS, RAMP_UP = 3, 10, 2


def step_setup():
    """One iteration of the script on a tiny network (the small net, width 4, 4 classes, 8-d heads):
    given views (no augmentation), a pre-filled bank, class weights from one batch of counts;
    it = 3 > ramp_up = 2 so every term is on. The authors' flags on (they are what the script does);
    the bank threshold 0 so that the random network's correct pixels enter."""
    m = method(ramp_up=RAMP_UP, bank_start=0, loss_start=0, bank_threshold=0.0,
               code_ascending_selection=True, code_unit_memory_weights=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in m.student.parameters():  # larger than the default init, so every term moves the weights
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    m.teacher = _ParameterEMA(m.student)
    m.modules["teacher"] = m.teacher
    x_s = torch.rand(2, 3, 32, 32, generator=g)
    y_s = torch.randint(0, C, (2, 32, 32), generator=g)
    y_s[:, :4] = 255
    x_u = torch.rand(2, 3, 32, 32, generator=g)
    y_u = torch.randint(0, C, (2, 32, 32), generator=g)
    y_u[:, :, :3] = 255
    p_u = torch.rand(2, 32, 32, generator=g) * 0.5 + 0.5
    p_u[y_u == 255] = 0.0
    bank = torch.randn(C, 6, DIM, generator=g)
    counts = torch.tensor([6, 3, 2, 1])
    m.bank.features.copy_(bank)
    m.bank.counts.copy_(counts)
    m.balance = ClassBalance(C, 1, 1)
    m.balance.add(y_s, y_u)
    lr = 0.01 * (1 - ITER / ITERS) ** 0.9
    for group in m.optimizers["model"].param_groups:
        group["lr"] = lr
    return m, (x_s, y_s, x_u, y_u, p_u)
