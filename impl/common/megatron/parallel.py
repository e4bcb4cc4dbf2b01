"""megatron-core's parallel state on the world our launcher created: the one place the suite
initialises it, for the megatron baseline and for HierMoE's dispatcher inside megatron alike."""
from __future__ import annotations

from ..launcher import collective_timeout_s
from .cpu_patches import apply_cpu_patches

__all__ = ["init_parallel", "ep_group_ranks"]


def init_parallel(expert_parallel_size: int, *, seed: int = 0) -> None:
    """Megatron's parallel state (TP = PP = CP = 1, EP as given, DP = world) on the existing
    torch.distributed world; every rank must call it. Re-initialises when called again with
    another EP size. Its groups get the launcher's collective timeout. `seed` feeds megatron's model-parallel RNG tracker (attention dropout,
    expert init on GPU)."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    apply_cpu_patches()
    if not dist.is_initialized():
        raise RuntimeError("init_parallel needs torch.distributed to be initialised first "
                           "(see impl.common.launcher)")
    world = dist.get_world_size()
    if expert_parallel_size < 1 or world % expert_parallel_size:
        raise ValueError(f"expert_parallel_size={expert_parallel_size} does not divide the world size "
                         f"{world}; allowed: a divisor of {world}")
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_expert_model_parallel_world_size() == expert_parallel_size:
            return
        parallel_state.destroy_model_parallel()
    # megatron passes its own timeout to every group it makes: ours (impl.common.launcher)
    parallel_state.initialize_model_parallel(expert_model_parallel_size=expert_parallel_size,
                                             distributed_timeout_minutes=collective_timeout_s() / 60)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def ep_group_ranks(group) -> list[int]:
    """Global ranks of a megatron process group, in group order."""
    import torch.distributed as dist

    return list(dist.get_process_group_ranks(group))
