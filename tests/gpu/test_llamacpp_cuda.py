"""llama.cpp with CUDA (the libraries of `make llamacpp-cuda`, named by LLAMA_CPP_LIB_PATH):
it offloads, its logits with every layer on the GPU equal the reference decoder's (to TF32
precision, which its CUDA products use), and
`--n-cpu-moe` keeps the expert tensors in host memory (the device memory it takes drops by their
size) without changing the logits."""
import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
llama_cpp = pytest.importorskip("llama_cpp")

from baselines.llamacpp.runner import (LlamaCppRunner, LlamaCppSettings, gpu_weight_bytes,  # noqa: E402
                                       llama_cpp_info, measure_speed)
from impl.scheinfer.decoder import Decoder  # noqa: E402
from impl.scheinfer.generate_models import generate  # noqa: E402
from impl.scheinfer.weights import load_weights  # noqa: E402

PROMPT = [1 + (11 * i) % 500 for i in range(40)]
ALL = 99


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    if llama_cpp_info()["gpu_offload"] != "True":
        pytest.skip("this llama.cpp has no GPU backend; build one with `make llamacpp-cuda` and set LLAMA_CPP_LIB_PATH")
    path = generate("mixtral", tmp_path_factory.mktemp("llamacpp_cuda") / "m.gguf", seed=4, hidden=256,
                    moe_ffn_hidden=1024, ffn_hidden=1024, num_heads=4, num_kv_heads=2, head_dim=64, num_layers=2)
    return path, Decoder(load_weights(path)).logits(PROMPT).numpy()


def _logits(path, **settings):
    with LlamaCppRunner(path, LlamaCppSettings(n_ctx=128, n_threads=4, **settings)) as runner:
        return runner.logits(PROMPT)


# llama.cpp's CUDA backend multiplies F32 weights in TF32 (its cuBLAS handles use
# CUBLAS_TF32_TENSOR_OP_MATH and its own mma kernels take tf32 operands; nothing turns that off), so
# its logits differ from the float32 reference by about 1e-3 of their range: a TF32 bound, and the
# arg-max compared where the reference's best two logits are further apart than that bound.
TF32_RTOL = 1e-2


@pytest.mark.parametrize("n_cpu_moe", [0, 2])
def test_offloaded_logits_equal_reference(model, n_cpu_moe):
    path, ref = model
    got = _logits(path, n_gpu_layers=ALL, n_cpu_moe=n_cpu_moe)
    tol = TF32_RTOL * np.abs(ref).max()
    assert np.abs(got - ref).max() <= tol
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * tol
    assert clear.any() and (got.argmax(-1) == ref.argmax(-1))[clear].all()


def test_n_cpu_moe_keeps_experts_off_the_device(model):
    """Batches under 32 tokens (n_ubatch 16): llama.cpp then computes CPU-resident weights on the
    CPU, so its compute buffers hold no device copies of them and the difference is the weights."""
    path, _ = model
    free = lambda: torch.cuda.mem_get_info()[0]      # noqa: E731
    torch.cuda.init()
    used = {}
    for k in (0, 2):
        s = LlamaCppSettings(n_ctx=64, n_threads=4, n_gpu_layers=ALL, n_cpu_moe=k, n_batch=16, n_ubatch=16)
        used[k] = measure_speed(path, PROMPT[:16], 2, s, repeats=1, warmup=0, device_free=free).device_bytes_used
    experts = gpu_weight_bytes(path, LlamaCppSettings(n_gpu_layers=ALL))["ffn"]
    assert gpu_weight_bytes(path, LlamaCppSettings(n_gpu_layers=ALL, n_cpu_moe=2))["ffn"] == 0
    assert used[0] - used[2] >= 0.8 * experts, (used, experts)
