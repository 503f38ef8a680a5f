"""The run's random state: seeding every global generator, and capturing and restoring their whole
state (Python, NumPy, torch CPU and CUDA) with the checkpoints, so that a resumed run continues the
random streams of the run that was interrupted. Under torchrun each process has streams of its own
(augmentation, dropout): a checkpoint holds every process's, and each takes back its own."""
import random
from typing import Any, Dict, List

import numpy as np
import torch

__all__ = ["seed_everything", "seed_process", "get_rng_state", "set_rng_state", "gather_rng_states", "restore_rng"]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators with `seed`."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_process(seed: int, rank: int, offset: int = 0) -> None:
    """Seed this process's generators: `seed` for rank 0, distinct streams for the others
    (`offset`: a fresh start within the run, e.g. a resume that cannot restore the saved streams)."""
    seed_everything(int(seed) + 1_000_003 * rank + offset)


def get_rng_state() -> Dict[str, Any]:
    """Every global generator's whole state, in types `torch.load(weights_only=True)` reads (the
    Gaussian caches of NumPy and Python included: a Box-Muller draw leaves its second value there)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy": keys.tolist(), "numpy_pos": int(pos),
            "numpy_gauss": [int(has_gauss), float(cached)], "python": list(internal), "python_version": version,
            "python_gauss": gauss_next,
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore the global generators from `get_rng_state()`'s result."""
    torch.set_rng_state(state["torch"])
    # checkpoints written before the Gaussian caches were saved: empty caches
    has_gauss, cached = state.get("numpy_gauss", (0, 0.0))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], has_gauss, cached))
    random.setstate((state.get("python_version", 3), tuple(state["python"]), state.get("python_gauss")))
    if state["cuda"] and torch.cuda.is_available():
        # a machine with fewer GPUs than the one that saved: the devices it has
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def gather_rng_states(generator: torch.Generator, world: int) -> List[Dict[str, Any]]:
    """Every process's `get_rng_state()`, with its method's `generator` state as "method", by rank
    (a collective: every process calls it)."""
    states = [None] * world
    torch.distributed.all_gather_object(states, dict(get_rng_state(), method=generator.get_state()))
    return states


def restore_rng(ckpt: Dict[str, Any], generator: torch.Generator, seed: int, rank: int, world: int) -> bool:
    """The checkpoint's random state; under several processes each takes back its own, with the
    method's `generator`, when the checkpoint was written by as many processes. Else they get fresh,
    distinct seeds, and the result is False (the caller says so)."""
    per_rank = ckpt.get("rng_per_rank")
    if world == 1:
        set_rng_state(ckpt["rng"])
    elif per_rank is not None and len(per_rank) == world:
        set_rng_state(per_rank[rank])
        generator.set_state(per_rank[rank]["method"])
    else:
        seed_process(seed, rank, offset=7 * int(ckpt["iter"]))
        return False
    return True
