"""llama.cpp's partial offload settings: which weights each setting puts on the GPU (counted from
the GGUF by llama.cpp's rules), the settings that fit a budget, and --n-cpu-moe's tensor
overrides reaching llama.cpp (its log names every overridden tensor; logits unchanged)."""
import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from baselines.llamacpp.runner import (LlamaCppRunner, LlamaCppSettings, cpu_moe_patterns,  # noqa: E402
                                       gpu_weight_bytes, ngl_layers, open_llama,
                                       settings_within_budget)
from impl.scheinfer.generate_models import generate  # noqa: E402

PROMPT = [1, 5, 9, 33, 100, 7, 8, 200]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return generate("mixtral", tmp_path_factory.mktemp("offload") / "m.gguf", seed=1, num_layers=3)


def _expert_bytes_per_layer(path):
    return gpu_weight_bytes(path, LlamaCppSettings(n_gpu_layers=2))["ffn"]     # the head and one layer


# -ngl N on 3 repeating layers, as llama.cpp 0.3.36's load_tensors assigns them (src/llama-model.cpp:
# i_gpu_start = max(n_layer + 1 - N, 0), act_gpu_layers = min(N, n_layer + 1), the output layer
# assigned as layer n_layer): N -> (repeating layers on the GPU, output layer on the GPU)
NGL_3_LAYERS = {0: ([], False), 1: ([], True), 2: ([2], True), 3: ([1, 2], True), 4: ([0, 1, 2], True),
                99: ([0, 1, 2], True)}


@pytest.mark.parametrize("N", sorted(NGL_3_LAYERS))
def test_ngl_rule_is_llamacpps(N):
    first, output = ngl_layers(3, N)
    assert (list(range(first, 3)), output) == NGL_3_LAYERS[N]


def test_gpu_weight_bytes_follow_llamacpp_rules(model):
    per_layer = _expert_bytes_per_layer(model)          # mixtral: every FFN weight is an expert tensor
    assert per_layer == 8 * 3 * 64 * 128 * 4
    none = gpu_weight_bytes(model, LlamaCppSettings(n_gpu_layers=0))
    assert none["ffn"] == none["other"] == 0 and none["gpu_layers"] == [] and not none["output_on_gpu"]
    head = gpu_weight_bytes(model, LlamaCppSettings(n_gpu_layers=1))
    assert head["ffn"] == 0 and head["other"] > 0 and head["gpu_layers"] == [] and head["output_on_gpu"]
    two = gpu_weight_bytes(model, LlamaCppSettings(n_gpu_layers=3))
    assert two["gpu_layers"] == [1, 2] and two["ffn"] == 2 * per_layer
    every = gpu_weight_bytes(model, LlamaCppSettings(n_gpu_layers=99))
    moe = gpu_weight_bytes(model, LlamaCppSettings(n_gpu_layers=99, n_cpu_moe=2))
    assert every["ffn"] == 3 * per_layer and moe["ffn"] == per_layer and moe["cpu_moe_layers"] == [0, 1]
    assert moe["other"] == every["other"] > two["other"]       # attention, norms, routers, output stay


def test_settings_within_budget(model):
    per_layer = _expert_bytes_per_layer(model)
    got = settings_within_budget(model, int(1.5 * per_layer), LlamaCppSettings())
    assert [(s.n_gpu_layers, s.n_cpu_moe) for s in got] == [(2, 0), (4, 2), (4, 3)]
    for s in got:
        assert gpu_weight_bytes(model, s)["ffn"] <= 1.5 * per_layer
    assert s.command_line(model).endswith("--n-cpu-moe 3")


def test_n_cpu_moe_overrides_reach_llamacpp(model, capfd):
    assert cpu_moe_patterns(1) == [r"blk\.0\.ffn_(up|down|gate|gate_up)_(ch|)exps"]
    llm = open_llama(model, LlamaCppSettings(n_ctx=64, n_threads=1, n_cpu_moe=2), logits_all=False, verbose=True)
    llm.close()
    overridden = [line.split()[1] for line in capfd.readouterr().err.splitlines()
                  if "buffer type overridden to CPU" in line]
    assert sorted(overridden) == sorted(f"blk.{i}.ffn_{p}_exps.weight" for i in (0, 1) for p in ("gate", "up", "down"))


def test_n_cpu_moe_leaves_logits_unchanged(model):
    out = []
    for k in (0, 3):
        with LlamaCppRunner(model, LlamaCppSettings(n_ctx=64, n_threads=1, n_cpu_moe=k)) as r:
            out.append(r.logits(PROMPT))
    assert np.array_equal(out[0], out[1])
