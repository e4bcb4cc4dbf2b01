"""llama.cpp baseline: the real one (through llama-cpp-python) for logits / greedy parity on token
ids and prefill / decode speed (runner.py), and its layer offload as the engine policy 'layers'
(policy.py), registered when the package is imported."""
from . import policy  # noqa: F401  (registers the engine policy 'layers')
