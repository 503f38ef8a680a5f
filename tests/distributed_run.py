"""Run under torchrun by tests/test_distributed.py: `torchrun --nproc-per-node 2 tests/distributed_run.py OUT`.

Each process checks the distributed forms of the ops against what one process computes from
everyone's data, then trains CBST, the contrastive method, ProDA, DAFormer and MIC for a few iterations, and
writes what it ends with (weights, adaptation state, checks) to OUT/<name>_rank<r>.pt for the
test to compare across processes.
"""
import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_run_config  # noqa: E402

from udafast.engine.data import RareClassStream  # noqa: E402
from udafast.engine.distributed import all_gather, all_reduce_, convert_sync_batchnorm, init_from_env  # noqa: E402
from udafast.engine.trainer import Trainer  # noqa: E402
from udafast.ops import ClassMemoryBank, ClassThresholds, update_prototypes  # noqa: E402

METHODS = {
    "cbst": {"cbst": {"rounds": 2, "iters_per_round": 2}},
    "contrastive": {"contrastive": {"bank_start": 0, "loss_start": 1, "bank_threshold": 0.0, "dim": 16},
                    "train": {"iters": 3, "sync_bn": True}},
    "proda": {"train": {"stage_iters": 2}},   # its warm-up, then stage 1 (prototypes, teacher)
    # rare-class sampling (each process its own draws), the feature distance, the EMA teacher
    "daformer": {"daformer": {"rcs_min_pixels": 0, "ignore_top": 2, "ignore_bottom": 4}, "train": {"iters": 3}},
    "mic": {"mic": {"rcs_min_pixels": 0, "ignore_top": 2, "ignore_bottom": 4, "mask_block_size": 8},
            "train": {"iters": 3}},
}
STAGES = {"proda": ("warmup", "stage1")}


def data_of(rank, seed=0):
    """Rank `rank`'s share of some made-up data (every process can make everyone's)."""
    g = torch.Generator().manual_seed(1000 * seed + rank)
    conf = torch.rand(500, generator=g)
    pred = torch.randint(0, 5, (500,), generator=g)
    feats = torch.randn(40, 3, generator=g)
    labels = torch.randint(0, 5, (40,), generator=g)
    scores = torch.rand(40, generator=g)
    sums = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    counts = torch.randint(0, 30, (2, 5), generator=g)
    return conf, pred, feats, labels, scores, sums, counts


def op_checks(rank, world):
    conf, pred, feats, labels, scores, sums, counts = data_of(rank)
    everyone = [data_of(r) for r in range(world)]
    out = {}
    # ClassThresholds.all_reduce through the engine's sum: the counts of everyone's pixels
    hist = ClassThresholds(5, bins=64)
    hist.update(conf, pred)
    hist.all_reduce(all_reduce_)
    whole = ClassThresholds(5, bins=64)
    whole.update(torch.cat([d[0] for d in everyone]), torch.cat([d[1] for d in everyone]))
    out["thresholds_equal_whole"] = torch.equal(hist.counts, whole.counts)
    out["thresholds"] = hist.thresholds(0.3)
    # ClassMemoryBank.push through the engine's gather: rank 0's selection in front, then rank 1's, ...
    bank = ClassMemoryBank(5, size=8, dim=3, all_gather=all_gather)
    bank.push(feats, labels, scores, per_class=2)
    expected = ClassMemoryBank(5, size=8, dim=3)
    for d in reversed(everyone):  # one process: the newest push ends up in front
        expected.features, expected.counts = _push_local(expected, d[2], d[3], d[4])
    out["bank_equal_rank_order"] = torch.equal(bank.features, expected.features) and \
        torch.equal(bank.counts, expected.counts)
    out["bank"] = bank.state_dict()
    # update_prototypes: everyone's images in (rank, image) order
    protos = torch.zeros(5, 3, dtype=torch.float64)
    update_prototypes(protos, sums, counts, momentum=0.5, min_pixels=10, all_gather=all_gather)
    sequential = torch.zeros(5, 3, dtype=torch.float64)
    for d in everyone:
        for b in range(d[5].shape[0]):
            present = d[6][b] >= 10
            sequential[present] = 0.5 * sequential[present] + 0.5 * d[5][b][present] / d[6][b][present, None]
    out["prototypes_equal_sequential"] = torch.equal(protos, sequential)
    out["prototypes"] = protos
    # SyncBatchNorm over each process's half of a batch = BatchNorm2d over the whole batch
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2 * world, 3, 4, 5, generator=g, dtype=torch.float64)
    grad = torch.randn(x.shape, generator=g, dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    sync = convert_sync_batchnorm(copy.deepcopy(bn))
    whole = x.clone().requires_grad_()
    reference = bn(whole)
    (reference * grad).sum().backward()
    part = x[2 * rank:2 * rank + 2].clone().requires_grad_()
    out_part = sync(part)
    (out_part * grad[2 * rank:2 * rank + 2]).sum().backward()
    weight_grad = sync.weight.grad.clone()
    dist.all_reduce(weight_grad)  # each process holds its share of the parameter gradient
    out["syncbn_forward"] = torch.allclose(out_part, reference[2 * rank:2 * rank + 2], atol=1e-12)
    out["syncbn_input_grad"] = torch.allclose(part.grad, whole.grad[2 * rank:2 * rank + 2], atol=1e-12)
    out["syncbn_weight_grad"] = torch.allclose(weight_grad, bn.weight.grad, atol=1e-12)
    out["syncbn_running_mean"] = torch.allclose(sync.running_mean, bn.running_mean, atol=1e-12)
    out["syncbn_running_var"] = torch.allclose(sync.running_var, bn.running_var, atol=1e-12)
    return out


def _push_local(bank, feats, labels, scores):
    """A push in one process (no gather): per class the 2 top-scored features in front."""
    feats_now, counts_now = bank.features.clone(), bank.counts.clone()
    for c in range(bank.num_classes):
        rows = (labels == c).nonzero().squeeze(1)
        order = rows[torch.argsort(scores[rows], descending=True, stable=True)][:2]
        n = order.numel()
        if n == 0:
            continue
        kept = min(int(counts_now[c]), bank.size - n)
        feats_now[c, n:n + kept] = feats_now[c, :kept].clone()
        feats_now[c, :n] = feats[order]
        counts_now[c] = n + kept
    return feats_now, counts_now


def main(out):
    init_from_env("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.save(op_checks(rank, world), os.path.join(out, f"ops_rank{rank}.pt"))
    for method, sections in METHODS.items():
        config = tiny_run_config(method, deterministic=True, **sections)
        for stage in STAGES.get(method, (None,)):
            trainer = Trainer(config, os.path.join(out, method), stage=stage, progress=False, tensorboard=False)
            metrics = trainer.run()
        state = trainer.method.state_dict()
        state.pop("generator")  # each process's own random stream, by design
        stream = trainer.method.ctx.source_stream
        first_batch = next(stream._keys(0, 0))  # (position in the process's order, view seed)
        # a rare-class stream draws every sample from its view seed; a plain one reads its order
        drawn = [seed if isinstance(stream, RareClassStream) else stream._order(0)[position]
                 for position, seed in first_batch]
        torch.save({"model": trainer.method.model.state_dict(), "method": state, "metrics": metrics,
                    "first_source_batch": drawn, "rare_class": isinstance(stream, RareClassStream)},
                   os.path.join(out, f"{method}_rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
