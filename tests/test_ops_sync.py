"""The ops take their synchronisation from the caller (udafast.ops.sync): no module of udafast/ops
touches torch.distributed, the helpers apply the collective they are given, and with none (or one
process's) they do what they do in one process. The real two-process runs: test_distributed.py."""
import ast
import pathlib

import torch

import udafast.ops
from udafast.ops import ClassMemoryBank, ClassThresholds, update_prototypes

OPS = pathlib.Path(udafast.ops.__file__).parent


def _distributed_uses(tree):
    """Lines where a module imports torch.distributed or reaches it as an attribute of torch."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.startswith("torch.distributed") for a in node.names):
            yield node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and (
                node.module.startswith("torch.distributed")
                or (node.module == "torch" and any(a.name == "distributed" for a in node.names))):
            yield node.lineno
        elif isinstance(node, ast.Attribute) and node.attr == "distributed":
            yield node.lineno


def test_no_ops_module_uses_torch_distributed():
    modules = sorted(OPS.glob("*.py"))
    assert len(modules) > 5
    found = {m.name: lines for m in modules if (lines := list(_distributed_uses(ast.parse(m.read_text()))))}
    assert not found, found


def test_the_check_sees_each_form():
    for source in ("import torch.distributed as dist", "from torch import distributed",
                   "from torch.distributed import all_gather", "torch.distributed.all_reduce(x)"):
        assert list(_distributed_uses(ast.parse(source))), source


def _pixels(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(300, generator=g), torch.randint(0, 4, (300,), generator=g)


def test_class_thresholds_all_reduce_applies_the_callers_sum():
    (conf, pred), (other_conf, other_pred) = _pixels(0), _pixels(1)
    other = ClassThresholds(4, bins=32).update(other_conf, other_pred)
    alone = ClassThresholds(4, bins=32).update(conf, pred)
    before = alone.counts.clone()
    assert alone.all_reduce() is alone and torch.equal(alone.counts, before)  # no sum: one process
    summed = ClassThresholds(4, bins=32).update(conf, pred).all_reduce(lambda t: t.add_(other.counts))
    whole = ClassThresholds(4, bins=32).update(torch.cat([conf, other_conf]), torch.cat([pred, other_pred]))
    assert torch.equal(summed.counts, whole.counts)


def _bank_pushes(bank):
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        bank.push(torch.randn(30, 3, generator=g), torch.randint(0, 5, (30,), generator=g),
                  torch.rand(30, generator=g), per_class=2)
    return bank


def test_memory_bank_with_one_process_gather_is_the_bank_without():
    alone = _bank_pushes(ClassMemoryBank(5, size=4, dim=3))
    gathered = _bank_pushes(ClassMemoryBank(5, size=4, dim=3, all_gather=lambda t: [t]))
    assert torch.equal(alone.features, gathered.features) and torch.equal(alone.counts, gathered.counts)


def test_memory_bank_inserts_the_gathered_blocks_in_rank_order():
    """Rank 1's view of a push: rank 0's block (here the same selection with its features + 100)
    ends up in front of its own."""
    feats, labels, scores = torch.arange(12.0).view(6, 2), torch.tensor([0, 0, 1, 1, 1, 255]), torch.rand(6)
    bank = ClassMemoryBank(2, size=8, dim=2,
                           all_gather=lambda t: [t + 100 if t.is_floating_point() else t.clone(), t])
    bank.push(feats, labels, scores, per_class=2)
    one = ClassMemoryBank(2, size=8, dim=2)
    one.push(feats, labels, scores, per_class=2)
    for c in range(2):
        assert torch.equal(bank.get(c), torch.cat([one.get(c) + 100, one.get(c)]))


def test_update_prototypes_applies_the_gathered_images_in_rank_order():
    g = torch.Generator().manual_seed(3)
    sums = [torch.randn(2, 4, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    counts = [torch.randint(0, 30, (2, 4), generator=g) for _ in range(2)]
    start = torch.randn(4, 3, generator=g, dtype=torch.float64)
    alone = update_prototypes(start.clone(), sums[1], counts[1], momentum=0.5)
    assert torch.equal(alone, update_prototypes(start.clone(), sums[1], counts[1], momentum=0.5,
                                                all_gather=lambda t: [t]))
    rank0 = {torch.float64: sums[0], torch.int64: counts[0]}  # what rank 0 holds, by tensor
    got = update_prototypes(start.clone(), sums[1], counts[1], momentum=0.5,
                            all_gather=lambda t: [rank0[t.dtype], t])
    expected = update_prototypes(start.clone(), sums[0], counts[0], momentum=0.5)
    expected = update_prototypes(expected, sums[1], counts[1], momentum=0.5)
    assert torch.equal(got, expected)
