"""ScheInfer (arXiv 2411.15715): CPU-GPU hybrid inference with FFN / expert weights split into
CC / CG / GG slices. This package holds the reference decoder (model.py), weight loading
(weights.py) and a generator of small GGUF / safetensors test models (generate_models.py)."""
