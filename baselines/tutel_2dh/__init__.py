"""Tutel-2DH: capacity-padded equal-slice dispatch with Tutel's 2-D hierarchical AlltoAll."""
