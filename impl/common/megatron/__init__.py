"""Glue for running the real megatron-core here: its CPU patches (`cpu_patches`) and its parallel
state on our torch.distributed world (`parallel`). Shared by the megatron-core baseline and by
HierMoE's adapter, so it sits below both. Importing this package does not import megatron."""
from __future__ import annotations

from .cpu_patches import PATCHED_VERSION, applied_patches, apply_cpu_patches
from .parallel import ep_group_ranks, init_parallel

__all__ = ["PATCHED_VERSION", "applied_patches", "apply_cpu_patches", "ep_group_ranks", "init_parallel"]
