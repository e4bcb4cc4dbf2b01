"""megatron-core as a baseline: the real MoELayer / GPT model on CPU or GPU (`moe`). The CPU patches
and parallel-state set-up it shares with HierMoE's adapter live in `impl.common.megatron`.

Importing this package does not import megatron (slow): the registry entry
('moe_layer', 'megatron-core') is a lazy factory that loads `baselines.megatron.moe` on call.
"""
from __future__ import annotations

from impl.common.registry import register

__all__ = ["megatron_core_moe_layer"]


@register("moe_layer", "megatron-core")
def megatron_core_moe_layer(comm, cfg, **kwargs):
    """megatron-core's MoELayer (alltoall dispatcher) for `cfg`, a `moe.MegatronMoEConfig` or an
    `impl.common.models.ModelConfig`; keyword arguments go to `moe.build_megatron_moe`."""
    from .moe import MegatronMoEConfig, build_megatron_moe

    if not isinstance(cfg, MegatronMoEConfig):
        cfg = MegatronMoEConfig.from_model(cfg)
    return build_megatron_moe(comm, cfg, **kwargs)
