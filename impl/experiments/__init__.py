"""Experiments layer: paper-scale simulations, sweeps, benches and the CLIs that drive them (above systems and baselines, below figures)."""
