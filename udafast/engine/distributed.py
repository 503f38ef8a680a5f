"""Several processes, one run: `torchrun --nproc-per-node N -m udafast.train ...`.

Every process trains on its own shard of each domain (`DistributedSampler` order inside
`BatchStream`) with `data.batch_size` images per domain; what makes them one run:

- they start each stage from the same weights and buffers (rank 0's, broadcast: `broadcast_state`)
  and keep them: `StepGuard` averages the gradients of every optimiser over the processes before it
  steps, so each process applies the same update; after every iteration (and after a method's last
  change to its network, `Method.finish_stage`) `average_buffers` replaces
  the floating-point buffers (BatchNorm running means and variances) of the trained network and of
  the method's saved modules with their mean over the processes (summed in float64, divided by the
  number of processes), where DistributedDataParallel would broadcast rank 0's; integer buffers
  (`num_batches_tracked`) advance alike everywhere and are left alone. An iteration whose update
  is skipped (non-finite gradients) instead restores each process's buffers from before it. With
  `train.sync_bn`, BatchNorm normalises over the global batch (torch.nn.SyncBatchNorm on CUDA,
  `SyncBatchNorm` below elsewhere), so the running statistics are already equal and the mean leaves
  them as they are;
- the adaptation state is updated from everyone's data in the same order on every process
  (the methods hand `all_gather` and `all_reduce_` below, through their run context, to
  `ClassMemoryBank` and `update_prototypes`, which insert in rank order, and to
  `ClassThresholds.all_reduce`, which sums counts; passes over the target set are sharded and
  reduced);
- rank 0 alone writes logs, checkpoints and metrics.

Gradients are all-reduced at the optimiser's step rather than by wrapping networks in
DistributedDataParallel because a method's step runs several networks and forwards (teachers,
discriminators, heads) and several optimisers, and a method must not need to know about processes.
"""
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["init_from_env", "shutdown", "is_distributed", "rank", "world_size", "barrier", "all_reduce_",
           "all_gather", "broadcast_state", "average_buffers", "StepGuard", "NonFiniteError", "shard", "SyncBatchNorm",
           "convert_sync_batchnorm", "parameter_device"]


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_distributed() else 0


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def init_from_env(device):
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1): gloo for
    the CPU, NCCL for CUDA (each process on `cuda:LOCAL_RANK`). Returns the device to train on
    (unchanged outside torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device)
    if world <= 1 or is_distributed():
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"device: torchrun training runs on cpu or cuda, got {device}")
    # long passes over the target set (pseudo-labels) run between collectives
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    return device


def shutdown():
    if is_distributed():
        dist.destroy_process_group()


def barrier():
    if is_distributed():
        dist.barrier()


def all_reduce_(tensor):
    """Sum `tensor` over the processes, in place (identity in one process). A CPU tensor under NCCL
    (which reduces CUDA tensors only) travels through the process's GPU."""
    if not is_distributed():
        return tensor
    if dist.get_backend() == "nccl" and not tensor.is_cuda:
        moved = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(moved)
        tensor.copy_(moved)
    else:
        dist.all_reduce(tensor)
    return tensor


def all_gather(tensor):
    """Every process's `tensor` (the same shape and dtype everywhere), in rank order ([tensor] in
    one process). A CPU tensor under NCCL travels through the process's GPU, as in `all_reduce_`."""
    if not is_distributed():
        return [tensor]
    through = tensor.contiguous()
    if dist.get_backend() == "nccl" and not tensor.is_cuda:
        through = through.to(torch.device("cuda", torch.cuda.current_device()))
    gathered = [torch.empty_like(through) for _ in range(world_size())]
    dist.all_gather(gathered, through)
    return [t.to(tensor.device) for t in gathered]


def shard(n):
    """This process's share of `range(n)`: every world_size-th index from its rank."""
    return range(rank(), n, world_size())


def broadcast_state(modules):
    """Rank 0's parameters and buffers of `modules` to every process."""
    if not is_distributed():
        return
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, 0)


def average_buffers(modules):
    """Average the floating-point buffers (BatchNorm statistics) of `modules` over the processes,
    so that they stay equal everywhere: the running statistics follow the mean of every process's
    batch statistics (DistributedDataParallel would keep rank 0's). Integer buffers (batch counts)
    advance alike on every process."""
    if not is_distributed():
        return
    buffers = [b for m in modules for b in m.buffers() if b.dtype.is_floating_point]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1).double() for b in buffers])
    dist.all_reduce(flat)
    flat /= world_size()
    for b, f in zip(buffers, flat.split([b.numel() for b in buffers])):
        b.copy_(f.view_as(b))


class NonFiniteError(RuntimeError):
    """A step's gradients were not finite (training stops before the update)."""


class StepGuard:
    """Wraps an optimiser's `step` (and `zero_grad`): gradients are averaged over the processes
    (one flat all-reduce), checked for finiteness, and, over `accumulate` calls, summed before one
    update.

    - non-finite gradients: `on_nonfinite="stop"` raises NonFiniteError before the update,
      `"skip"` drops the update (and the gradients) and counts it in `skipped`;
    - `accumulate=k`: the method's `zero_grad()` clears only on the first of k micro-steps and its
      `step()` applies only on the last, with the summed gradients divided by k (the mean over the
      k micro-batches, each already a mean over its images).

    Parameters with no gradient on any process are left without one (as in one process); a
    parameter with a gradient on some processes only gets zeros on the others.

    With `scaler` (a torch.amp.GradScaler: float16 training), the gradients are of the scaled loss
    (`Method.backward`): after the all-reduce they are unscaled (`scaler.unscale_`, which records
    for `scaler.update` whether they overflowed), and non-finite ones, the scaler's overflow, drop
    the update and count in `skipped` whatever `on_nonfinite` says: the trainer's `scaler.update()`
    then lowers the scale. `unscaled` counts the steps that reached `unscale_`."""

    def __init__(self, name, optimizer, *, on_nonfinite="stop", accumulate=1, scaler=None):
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite: expected 'stop' or 'skip', got {on_nonfinite!r}")
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise ValueError(f"accumulate: expected a positive int, got {accumulate!r}")
        self.name, self.optimizer = name, optimizer
        self.on_nonfinite, self.accumulate = on_nonfinite, accumulate
        self.micro_step = 0          # set by the trainer before each micro-batch
        self.skipped = 0
        self.scaler, self.unscaled = scaler, 0
        self._step, self._zero_grad = optimizer.step, optimizer.zero_grad
        self._own = {k: vars(optimizer)[k] for k in ("step", "zero_grad") if k in vars(optimizer)}
        optimizer.step, optimizer.zero_grad = self.step, self.zero_grad

    def remove(self):
        """Give the optimiser back its own step and zero_grad."""
        for key in ("step", "zero_grad"):
            if key in self._own:
                setattr(self.optimizer, key, self._own[key])
            else:
                delattr(self.optimizer, key)

    @property
    def last_micro_step(self):
        return self.micro_step == self.accumulate - 1

    def zero_grad(self, set_to_none=True):
        if self.micro_step == 0:
            self._zero_grad(set_to_none=set_to_none)

    def _params(self):
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("closure: udafast's step guard does not take closures")
        if not self.last_micro_step:
            return None
        params = self._params()
        if not params:
            return None
        if is_distributed():
            has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=params[0].device)
            dist.all_reduce(has, op=dist.ReduceOp.MAX)
            for p, h in zip(params, has.tolist()):
                if h and p.grad is None:
                    p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return None
        scale = 1.0 / (world_size() * self.accumulate)
        if is_distributed():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            torch._foreach_copy_(grads, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)])
        if scale != 1.0:
            torch._foreach_mul_(grads, scale)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            self.unscaled += 1
        # the max-abs norm is NaN or inf exactly where a gradient has one (one fused kernel on CUDA)
        finite = bool(torch.stack(torch._foreach_norm(grads, float("inf"))).isfinite().all())
        if not finite:
            if self.on_nonfinite == "stop" and self.scaler is None:
                raise NonFiniteError(f"optimiser {self.name!r}: non-finite gradients")
            self.skipped += 1
            self._zero_grad(set_to_none=True)
            return None
        return self._step()


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch normalisation over the global batch: per-channel sums of x and x^2 (and, backward, of
    the gradient and gradient * x_hat) all-reduced in float64."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        dims = [0] + list(range(2, x.dim()))
        x64 = x.double()
        stats = torch.cat([x64.sum(dims), (x64 * x64).sum(dims),
                           torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64, device=x.device)])
        all_reduce_(stats)
        c = x.shape[1]
        count = stats[-1]
        mean = stats[:c] / count
        var = (stats[c:2 * c] / count - mean * mean).clamp_min(0)
        shape = [1, c] + [1] * (x.dim() - 2)
        invstd = torch.rsqrt(var + eps)
        x_hat = ((x64 - mean.view(shape)) * invstd.view(shape)).to(x.dtype)
        ctx.save_for_backward(x_hat, weight, invstd, count)
        ctx.has_bias = bias is not None
        out = x_hat if weight is None else x_hat * weight.view(shape)
        out = out if bias is None else out + bias.view(shape)
        return out, mean, var * count / (count - 1).clamp_min(1)

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        x_hat, weight, invstd, count = ctx.saved_tensors
        c = x_hat.shape[1]
        dims = [0] + list(range(2, x_hat.dim()))
        shape = [1, c] + [1] * (x_hat.dim() - 2)
        g64 = grad_out.double()
        grad_bias = g64.sum(dims)
        grad_weight = (g64 * x_hat.double()).sum(dims)
        sums = all_reduce_(torch.cat([grad_bias, grad_weight]))
        mean_g, mean_gx = sums[:c] / count, sums[c:] / count
        scale = invstd if weight is None else invstd * weight.double()
        grad_x = (g64 - mean_g.view(shape) - x_hat.double() * mean_gx.view(shape)) * scale.view(shape)
        return (grad_x.to(grad_out.dtype),
                None if weight is None else grad_weight.to(weight.dtype),
                grad_bias.to(grad_out.dtype) if ctx.has_bias else None, None)


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the batch of every process (any device,
    gloo included; torch.nn.SyncBatchNorm needs CUDA). Running statistics follow the global batch,
    so they are the same on every process. In one process it is BatchNorm2d."""

    def forward(self, x):
        if not (self.training and is_distributed()):
            return super().forward(x)
        out, mean, var = _SyncBatchNormFunction.apply(x, self.weight, self.bias, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(var.to(self.running_var.dtype), alpha=m)
        return out


def convert_sync_batchnorm(module):
    """`module` with every BatchNorm2d replaced: torch.nn.SyncBatchNorm on CUDA, SyncBatchNorm
    above elsewhere (weights and statistics kept)."""
    if parameter_device(module).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert(module)


def parameter_device(module: nn.Module) -> torch.device:
    """The device of `module`'s first parameter (the CPU for a module without parameters)."""
    return next(iter(module.parameters()), torch.empty(0)).device


def _convert(module):
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm):
        like = module.weight if module.affine else module.running_mean
        new = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, device=like.device, dtype=like.dtype)
        new.load_state_dict(module.state_dict())
        if module.affine:
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, _convert(child))
    return module
