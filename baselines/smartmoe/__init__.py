"""SmartMoE's dynamic expert placement, clean-room from its published description (ATC'23 and its
artifact's behaviour as summarised in the project's anchors); see `planner`."""
from .planner import SMARTMOE_METHODS, SmartMoEPlanner, rank_loads, smartmoe_placement

__all__ = ["SMARTMOE_METHODS", "SmartMoEPlanner", "rank_loads", "smartmoe_placement"]
