"""The ScheInfer engine's CUDA path (compute and copy streams, pinned host weights, staging
buffers, PCIe copies) against the CPU reference decoder: the same tokens and logits under every
partition and policy; copies and products overlapping on the device (CUDA-event timelines); the
staging buffers pinned-to-device, lent and reused, never reallocated."""
import pytest
import torch

import baselines.fiddler  # noqa: F401  (registers the engine policy 'fiddler')
import baselines.llamacpp  # noqa: F401  (registers the engine policy 'layers')
from impl.scheinfer.decoder import Decoder
from impl.scheinfer.engine import HybridDecoder, HybridEngine
from impl.scheinfer.generate_models import generate
from impl.scheinfer.partition import REFERENCE_COST
from impl.scheinfer.policy import FixedPolicy, ffn_widths, make_policy
from impl.scheinfer.weights import GGUFWeights

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPT = [1 + (7 * i) % 500 for i in range(48)]       # products large enough for the device to time
N_NEW = 6
BIG = 1 << 34


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = generate("mixtral", tmp_path_factory.mktemp("scheinfer_cuda") / "m.gguf", seed=3, hidden=256,
                    moe_ffn_hidden=1024, ffn_hidden=1024, num_heads=4, num_kv_heads=2, head_dim=64, num_layers=2)
    src = GGUFWeights(path)
    return src, Decoder(src).generate([PROMPT], N_NEW, return_logits=True)


def _run(src, policy, gpu_mem=BIG, **engine_kw):
    eng = HybridEngine(policy, src.config.hidden, gpu_mem_bytes=gpu_mem, **engine_kw)
    try:
        dec = HybridDecoder(src, eng)
        out = dec.generate([PROMPT], N_NEW, return_logits=True)
    finally:
        eng.close()
    return out, eng, dec


def _assert_same(out, ref):
    assert out.tokens == ref.tokens
    torch.testing.assert_close(out.step_logits[0].cpu(), ref.step_logits[0], rtol=0, atol=1e-4)


FRACTIONS = {"cc_only": (1, 0, 0), "cg_only": (0, 1, 0), "gg_only": (0, 0, 1), "mixed": (0.3, 0.3, 0.4)}


@pytest.mark.parametrize("frac", FRACTIONS, ids=list(FRACTIONS))
def test_cuda_partitions_match_cpu_reference(model, frac):
    src, ref = model
    out, eng, _ = _run(src, FixedPolicy(*FRACTIONS[frac]))
    assert eng.cuda and eng.device.type == "cuda"
    _assert_same(out, ref)
    assert {e.band for e in eng.events} == {b for b, f in zip(("cc", "cg", "gg"), FRACTIONS[frac]) if f}


@pytest.mark.parametrize("policy", ["scheinfer", "fiddler", "layers"])
def test_cuda_policies_match_cpu_reference_within_budget(model, policy):
    src, ref = model
    cfg = src.config
    row = 3 * cfg.hidden * 4
    budget = 2 * max(ffn_widths(cfg).values()) * row + sum(ffn_widths(cfg).values()) * row // 3
    p = make_policy(policy, cost=REFERENCE_COST, hidden=cfg.hidden, num_layers=cfg.num_layers, dtype_bytes=4, tile=64)
    out, eng, _ = _run(src, p, gpu_mem=budget)
    _assert_same(out, ref)
    assert eng.placement.resident_bytes + eng.placement.staging_bytes <= budget


def test_copies_overlap_products_on_the_device(model):
    """CUDA events on the copy and compute streams: some host->device copy runs on the device
    while some product runs (the copy of FFN j+1 under the product of FFN j, or under GG)."""
    src, ref = model
    out, eng, _ = _run(src, FixedPolicy(0.0, 0.5, 0.5), device_events=True)
    _assert_same(out, ref)
    tl = eng.device_timeline()
    copies = [e for e in tl if e["lane"] == "h2d"]
    products = [e for e in tl if e["lane"] == "gpu"]
    assert copies and products and all(e["end_ms"] >= e["start_ms"] >= 0 for e in tl)
    overlaps = [(c, p) for c in copies for p in products
                if max(c["start_ms"], p["start_ms"]) < min(c["end_ms"], p["end_ms"])]
    assert overlaps, f"no copy overlapped a product in {len(copies)} copies and {len(products)} products"


def test_staging_buffers_are_reused_and_host_weights_pinned(model, monkeypatch):
    src, ref = model
    eng = HybridEngine(FixedPolicy(0.3, 0.3, 0.4), src.config.hidden, gpu_mem_bytes=BIG)
    used = []
    copy_band = eng._copy_band

    def recording(key, w, s, slot):
        used.append((slot[0].data_ptr(), slot[0].device.type))
        return copy_band(key, w, s, slot)

    monkeypatch.setattr(eng, "_copy_band", recording)
    try:
        dec = HybridDecoder(src, eng)
        staging = {s[0].data_ptr() for s in eng._staging}
        experts = dec.layer_weights(0).moe.experts
        assert all(t.is_pinned() for w in experts for t in (w.gate_FM, w.up_FM, w.down_MF))
        out = dec.generate([PROMPT], N_NEW, return_logits=True)
        allocated = []
        for _ in range(2):
            again = dec.generate([PROMPT], N_NEW)
            torch.cuda.synchronize()
            allocated.append(torch.cuda.memory_allocated())
        assert allocated[0] == allocated[1]                          # nothing kept per generation
    finally:
        eng.close()
    _assert_same(out, ref)
    assert again.tokens == out.tokens
    assert len(eng._staging) == eng.policy.staging_buffers == 2
    assert {t for _, t in used} == {"cuda"}
    assert {p for p, _ in used} <= staging and len(used) > len(staging)     # lent again and again
