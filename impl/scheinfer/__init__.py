"""ScheInfer (arXiv 2411.15715): CPU-GPU hybrid inference with FFN / expert weights split into
CC / CG / GG slices. A library: the decoder (config, layers, decoder, fast_decode, sampling),
weight loading (weights), the partition optimiser (partition, assign), the engine's policies and
placement (policy) and the three-lane engine (engine), calibration, and a generator of small GGUF /
safetensors test models (`python -m impl.scheinfer.generate_models`). The command lines and the
sim tier that drive experiments are in impl.experiments.scheinfer."""
