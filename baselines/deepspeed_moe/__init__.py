"""DeepSpeed-MoE: the real deepspeed.moe layer (real.py) and its semantics on our substrate (sim.py)."""
