"""A DeepEP-style dispatcher (beyond the HierMoE paper, which never compared against it): two-level
deduplicating dispatch with node-limited routing, on our substrate; see `dispatcher`."""
from .dispatcher import DeepEPDispatcher, deepep_collectives, deepep_time, notify_bytes

__all__ = ["DeepEPDispatcher", "deepep_collectives", "deepep_time", "notify_bytes"]
