"""Every change megatron-core 0.16.1 needs to run its MoE layer and a small GPT model on CPU
over gloo, in one place.

megatron-core targets CUDA: a few code paths on the MoE / GPT training route call CUDA-only torch
APIs even when every tensor lives on the CPU. `apply_cpu_patches()` replaces exactly those calls,
only when CUDA is absent (on a GPU machine it does nothing), and is idempotent. Nothing here
changes what megatron computes: each patch swaps a device, stream or RNG handle for its CPU
equivalent.

Patches (name: megatron code path - why):
* `current_device`: `Router.gating`, `tensor_parallel.mappings._AllToAll`, router buffers, DDP grad
  buffers allocate on / move to `torch.cuda.current_device()`, which raises on a CPU build; with
  the patch it names the CPU.
* `te_general_gemm`: `moe_utils.RouterGatingLinearFunction` reads the module global
  `te_general_gemm`, which 0.16.1 defines only when Transformer Engine imports (NameError
  without TE); None selects its own torch.mm path.
* `dtoh_stream`: `MoEAlltoAllTokenDispatcher.__init__` creates a class-level `torch.cuda.Stream()`
  for device-to-host copies of the split sizes; a placeholder object stands in.
* `dtoh_sync`: `MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize` fetches the split sizes
  with CUDA streams/events (and turns them into numpy arrays); on CPU they stay torch tensors,
  which `torch.distributed.all_to_all_single` rejects as split sizes; the replacement only turns
  them into lists of Python ints.
* `rng_tracker`: `tensor_parallel.random` (`model_parallel_cuda_manual_seed`, the
  `get_cuda_rng_tracker().fork()` around attention dropout) keeps per-parallel-region CUDA
  generator states; on CPU the same named states are CPU generator states.

Not patched, because callers can avoid them: `transformer.utils.get_default_causal_mask` builds
its mask on 'cuda' when the GPT model gets `attention_mask=None` (pass `causal_mask(seq)` from
`baselines.megatron.moe`), and the megatron optimizers (`FP32Optimizer`, `DistributedOptimizer`)
hard-code `device='cuda'` for their scale/overflow tensors (use megatron's DDP grad buffers and
`finalize_model_grads` with a torch optimizer, as `baselines.megatron.moe.GPTTrainer` does).
"""
from __future__ import annotations

import torch

__all__ = ["apply_cpu_patches", "applied_patches", "PATCHED_VERSION"]

PATCHED_VERSION = "0.16.1"
_MARK = "_moebench_cpu_patch"
_applied: list[str] = []


def applied_patches() -> tuple[str, ...]:
    """Names of the patches in effect in this process (empty on a CUDA machine)."""
    return tuple(_applied)


def _check_version() -> None:
    import megatron.core

    version = getattr(megatron.core, "__version__", "unknown")
    if version != PATCHED_VERSION:
        raise RuntimeError(f"impl.common.megatron.cpu_patches targets megatron-core {PATCHED_VERSION}, "
                           f"found {version}; install megatron-core=={PATCHED_VERSION}")


def _patch_current_device() -> None:
    if getattr(torch.cuda.current_device, _MARK, False):
        return

    def current_device():
        return torch.device("cpu")

    setattr(current_device, _MARK, True)
    torch.cuda.current_device = current_device


def _patch_te_general_gemm() -> None:
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


class _HostStream:
    """Stands in for the class-level CUDA stream the alltoall dispatcher creates once."""

    def __repr__(self) -> str:
        return "<host stream: CPU run, no CUDA stream>"


def _patch_alltoall_dispatcher() -> None:
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher as A2A

    if A2A.cuda_dtoh_stream is None:
        A2A.cuda_dtoh_stream = _HostStream()
    if getattr(A2A._maybe_dtoh_and_synchronize, _MARK, False):
        return

    def _maybe_dtoh_and_synchronize(self, point, tokens_per_expert=None):
        # Same contract as the CUDA version: at the dispatcher's device-to-host point the split
        # sizes become host sequences that all_to_all_single accepts: lists of Python ints.
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            for name in ("input_splits", "output_splits", "output_splits_tp"):
                value = getattr(self, name)
                if torch.is_tensor(value):
                    setattr(self, name, [int(v) for v in value.tolist()])
            if torch.is_tensor(self.num_out_tokens):
                self.num_out_tokens = int(self.num_out_tokens)
        return tokens_per_expert

    setattr(_maybe_dtoh_and_synchronize, _MARK, True)
    A2A._maybe_dtoh_and_synchronize = _maybe_dtoh_and_synchronize


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    if getattr(mrandom._get_cuda_rng_state, _MARK, False):
        return

    def _get_cuda_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def _set_cuda_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    def add(self, name, seed):
        # CudaRNGStatesTracker.add without torch.cuda: the named state is a seeded CPU generator's.
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    for fn in (_get_cuda_rng_state, _set_cuda_rng_state, add):
        setattr(fn, _MARK, True)
    mrandom._get_cuda_rng_state = _get_cuda_rng_state
    mrandom._set_cuda_rng_state = _set_cuda_rng_state
    mrandom.CudaRNGStatesTracker.add = add


_PATCHES = (
    ("current_device", _patch_current_device),
    ("te_general_gemm", _patch_te_general_gemm),
    ("dtoh_stream+dtoh_sync", _patch_alltoall_dispatcher),
    ("rng_tracker", _patch_rng_tracker),
)


def apply_cpu_patches() -> tuple[str, ...]:
    """Apply every patch when CUDA is absent; a no-op with CUDA or when already applied.
    Returns the names of the patches in effect."""
    if torch.cuda.is_available() or _applied:
        return applied_patches()
    _check_version()
    for name, patch in _PATCHES:
        patch()
        _applied.append(name)
    return applied_patches()
