"""Training with several processes (torchrun, gloo on the CPU): every process ends with the same
weights and adaptation state, the distributed forms of the ops equal one process's computation
on everyone's data, a resumed two-process run ends bitwise where the uninterrupted one does, and
the pieces (sharded streams, the step guard) on their own."""
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import tiny_config_file, tiny_run_config
from udafast.engine.data import BatchStream
from udafast.engine.distributed import NonFiniteError, StepGuard, SyncBatchNorm
from udafast.models.checkpoint import load_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))


def torchrun(*args, cwd=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from leaves(v, f"{prefix}.{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, tree


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    torchrun(os.path.join(HERE, "distributed_run.py"), out)
    return out


def load(out, name, rank):
    return torch.load(out / f"{name}_rank{rank}.pt", weights_only=False)


def test_distributed_ops_equal_one_process_on_everyones_data(two_process_run):
    for rank in (0, 1):
        checks = load(two_process_run, "ops", rank)
        flags = {k: v for k, v in checks.items() if isinstance(v, bool)}
        assert flags and all(flags.values()), flags


@pytest.mark.parametrize("method", ["cbst", "contrastive", "proda", "daformer", "mic"])
def test_every_process_ends_with_the_same_weights_and_state(two_process_run, method):
    a, b = load(two_process_run, method, 0), load(two_process_run, method, 1)
    assert a["first_source_batch"] != b["first_source_batch"]  # they trained on different images
    left, right = dict(leaves({k: a[k] for k in ("model", "method")})), dict(leaves({k: b[k] for k in ("model", "method")}))
    assert left.keys() == right.keys()
    for key in left:
        if torch.is_tensor(left[key]):
            assert torch.equal(left[key], right[key]), key
        else:
            assert left[key] == right[key], key
    extra = a["method"]["extra"]
    if method == "cbst":
        assert extra["thresholds"].shape == (19,) and bool((extra["thresholds"] < 1).any())
    if method == "contrastive":
        assert int(a["method"]["modules"]["bank"]["counts"].sum()) > 0
    if method == "proda":
        assert float(extra["prototypes"].abs().sum()) > 0 and "teacher" in a["method"]["modules"]
    if method in ("daformer", "mic"):
        assert a["rare_class"] and {"teacher", "imnet"} <= set(a["method"]["modules"])
    assert a["metrics"]["processes"] == 2 and a["metrics"]["miou"] == b["metrics"]["miou"]


@pytest.mark.parametrize("method", ["dann", "mic"])
def test_torchrun_cli_resumes_bitwise(tmp_path, method):
    """mic: the EMA teacher, the frozen reference and each process's rare-class draws resume too."""
    config = tmp_path / "tiny.yaml"
    mic = {"rcs_min_pixels": 0, "ignore_top": 2, "ignore_bottom": 4, "mask_block_size": 8}
    config.write_text(yaml.safe_dump(tiny_config_file(train={"iters": 4, "panels": 0}, mic=mic)))
    common = ["-m", "udafast.train", "--config", config, "--method", method, "--deterministic", "--ckpt-every", "2"]
    full = torchrun(*common, "--out", tmp_path / "full")
    assert f"{method}: target val mIoU" in full.stdout  # printed once, by rank 0
    assert full.stdout.count(f"{method}: target val mIoU") == 1
    torchrun(*common, "--out", tmp_path / "resumed", "--resume", tmp_path / "full" / "checkpoints" / "iter_2.pt")
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert a["world_size"] == 2 and len(a["rng_per_rank"]) == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, v in dict(leaves(a["method"]["modules"])).items():
        assert torch.equal(v, dict(leaves(b["method"]["modules"]))[k]), k


def test_streams_shard_the_epoch_like_distributed_sampler():
    data = list(range(11))
    one = BatchStream(data, 2, lambda s, g, e=None: {"image": torch.tensor([s])}, seed=3)
    shards = [BatchStream(data, 2, lambda s, g, e=None: {"image": torch.tensor([s])}, seed=3, rank=r, world=2)
              for r in range(2)]
    # keys are (position in the process's order of the epoch, view seed)
    order = [one._order(0)[p] for batch in one._keys(0, 0) for p, _ in batch]
    parts = [[s._order(0)[p] for batch in s._keys(0, 0) for p, _ in batch] for s in shards]
    assert len(parts[0]) == len(parts[1]) == 4 and not set(parts[0]) & set(parts[1])
    # the same permutation: rank r takes every other sample of it from r
    full = torch.utils.data.DistributedSampler(data, 2, 0, shuffle=True, seed=3 * 1_000_003, drop_last=True)
    assert parts[0] == list(full)[:4] and order[:4] == torch.randperm(11, generator=torch.Generator().manual_seed(3 * 1_000_003)).tolist()[:4]
    view_seeds = [s for batch in shards[1]._keys(0, 0) for _, s in batch]
    assert view_seeds[0] == (3 * 1_000_003) * 65_537 + 1  # positions count in the whole permutation
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(data, 6, None, rank=0, world=2)
    with pytest.raises(ValueError, match="rank"):
        BatchStream(data, 2, None, rank=2, world=2)


def _optimizer(weight=1.0):
    p = torch.nn.Parameter(torch.tensor([weight]))
    return p, torch.optim.SGD([p], lr=0.5)


def test_step_guard_accumulates_micro_batches():
    p, opt = _optimizer()
    guard = StepGuard("model", opt, accumulate=2)
    for micro, g in enumerate((1.0, 3.0)):
        guard.micro_step = micro
        opt.zero_grad()
        (p * g).sum().backward()
        opt.step()
        if micro == 0:
            assert p.item() == 1.0  # no update before the last micro-batch
    assert p.item() == pytest.approx(1.0 - 0.5 * 2.0)  # the mean gradient (1 + 3) / 2
    guard.remove()
    assert "step" not in vars(opt) and "zero_grad" not in vars(opt)


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_step_guard_refuses_non_finite_gradients(mode):
    p, opt = _optimizer()
    guard = StepGuard("model", opt, on_nonfinite=mode)
    (p * float("nan")).sum().backward()
    if mode == "stop":
        with pytest.raises(NonFiniteError, match="'model'"):
            opt.step()
        opt.zero_grad()
    else:
        opt.step()
        assert guard.skipped == 1 and p.grad is None
    assert p.item() == 1.0
    (p * 2.0).sum().backward()
    opt.step()
    assert p.item() == 0.0


def test_step_guard_checks_its_arguments():
    _, opt = _optimizer()
    with pytest.raises(ValueError, match="on_nonfinite"):
        StepGuard("model", opt, on_nonfinite="ignore")
    with pytest.raises(ValueError, match="accumulate"):
        StepGuard("model", opt, accumulate=0)


@pytest.mark.parametrize("device, expected", [("cuda", torch.nn.SyncBatchNorm), ("cpu", SyncBatchNorm)])
def test_sync_bn_is_torchs_on_cuda_and_ours_elsewhere(monkeypatch, device, expected):
    """`TrainingContext.build_model` converts BatchNorm after moving the network to its device, so that
    a CUDA network gets torch.nn.SyncBatchNorm (NCCL) and a CPU one udafast's (gloo). No CUDA here:
    the move to cuda only marks the network, and the conversion reads the mark as its device."""
    import types

    from udafast.engine import distributed
    from udafast.engine.context import TrainingContext
    from udafast.methods import method_class

    moved = torch.nn.Module.to

    def to(module, *args, **kwargs):
        target = torch.device(args[0] if args else kwargs["device"])
        if target.type != "cuda":
            return moved(module, *args, **kwargs)
        module.marked_device = target
        return module
    monkeypatch.setattr(torch.nn.Module, "to", to)
    real_device = distributed.parameter_device
    monkeypatch.setattr(distributed, "parameter_device",
                        lambda m: getattr(m, "marked_device", None) or real_device(m))
    config = tiny_run_config("source_only", train={"sync_bn": True})
    ctx = types.SimpleNamespace(config=config, method_cls=method_class("source_only"), world=2,
                                device=torch.device(device), log=print)
    model = TrainingContext.build_model(ctx)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is expected for m in norms)
    one_process = TrainingContext.build_model(types.SimpleNamespace(**dict(vars(ctx), world=1)))
    assert not any(isinstance(m, (torch.nn.SyncBatchNorm, SyncBatchNorm)) for m in one_process.modules())


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_step_guard_unscales_and_skips_overflows_under_a_grad_scaler(mode):
    """fp16: the gradients of the scaled loss are unscaled before the update; an overflow drops it
    (counted, whatever on_nonfinite says) and the scaler's update halves the scale."""
    p, opt = _optimizer()
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    guard = StepGuard("model", opt, on_nonfinite=mode, scaler=scaler)
    scaler.scale((p * 2.0).sum()).backward()
    assert p.grad.item() == 8.0
    opt.step()
    scaler.update()
    assert p.item() == pytest.approx(1.0 - 0.5 * 2.0) and guard.unscaled == 1 and guard.skipped == 0
    opt.zero_grad()
    scaler.scale((p * float("inf")).sum()).backward()
    opt.step()
    scaler.update()
    assert p.item() == pytest.approx(0.0) and guard.skipped == 1 and p.grad is None
    assert scaler.get_scale() == 2.0 and guard.unscaled == 2
