"""llama.cpp baseline (the real one, through llama-cpp-python): logits / greedy parity on token ids
and prefill / decode speed (runner.py)."""
