"""Routing traces: file round trips (npz, Megatron JSONL), validation errors, synthetic generators
against their exact distributions, determinism by seed, and capture from a running module.

Statistical checks use fixed seeds (so they are reproducible) and 5-sigma bounds computed from the
exact distribution: loose enough never to trip on a correct generator with another seed, tight
enough to catch a biased one (e.g. sampling with replacement, or popularity ignored).
"""
import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from impl.common.routing import GateConfig, build_gate, routing_from_topk
from impl.common.traces import (FORMAT_VERSION, RoutingTrace, TraceError, TraceRecorder,
                                synthetic_topk, synthetic_trace)


def small_trace(with_weights=True) -> RoutingTrace:
    """6 tokens over 3 groups, E=5, K=3, with -1 padding in two rows."""
    ids = torch.tensor([[0, 1, 2], [4, 3, -1], [2, 0, 1], [1, -1, -1], [3, 4, 0], [0, 2, 4]])
    weights = torch.tensor([[.5, .3, .2], [.6, .4, 0], [.7, .2, .1], [1, 0, 0], [.4, .4, .2], [.9, .05, .05]])
    return RoutingTrace(step_T=torch.tensor([0, 0, 0, 1, 1, 1]), layer_T=torch.tensor([0, 0, 1, 0, 0, 1]),
                        rank_T=torch.tensor([0, 1, 0, 0, 1, 0]), topk_ids_TK=ids,
                        topk_weights_TK=weights if with_weights else None, num_experts=5,
                        source={"kind": "test", "note": "hand-written"})


def assert_same(a: RoutingTrace, b: RoutingTrace, source=True):
    for name in ("step_T", "layer_T", "rank_T", "topk_ids_TK"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.topk_weights_TK is None) == (b.topk_weights_TK is None)
    if a.topk_weights_TK is not None:
        assert torch.equal(a.topk_weights_TK, b.topk_weights_TK)
    assert a.num_experts == b.num_experts
    if source:
        assert a.source == b.source


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".npz", ".jsonl"])
@pytest.mark.parametrize("with_weights", [True, False])
def test_round_trip(tmp_path, suffix, with_weights):
    trace = small_trace(with_weights)
    loaded = RoutingTrace.load(trace.save(tmp_path / f"t{suffix}"))
    assert_same(trace, loaded, source=suffix == ".npz")
    assert loaded.topk_ids_TK.dtype == torch.long
    assert loaded.top_k == 3 and loaded.num_tokens == 6


def test_round_trip_synthetic_exact(tmp_path):
    trace = synthetic_trace(64, 6, tokens_per_rank=50, num_steps=2, num_layers=3, num_ranks=2,
                            distribution="zipf", skew=1.1, seed=7)
    for suffix in (".npz", ".jsonl"):
        assert_same(trace, RoutingTrace.load(trace.save(tmp_path / f"s{suffix}")), source=suffix == ".npz")


def test_npz_layout(tmp_path):
    """The documented layout: int32 ids / tags, float32 weights, JSON header."""
    path = small_trace().save(tmp_path / "t.npz")
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == {"step_T", "layer_T", "rank_T", "topk_ids_TK", "topk_weights_TK", "header"}
        assert z["topk_ids_TK"].dtype == np.int32 and z["topk_weights_TK"].dtype == np.float32
        header = json.loads(str(z["header"]))
    assert header == {"format": "moe-routing-trace", "version": FORMAT_VERSION, "num_experts": 5,
                      "top_k": 3, "source": {"kind": "test", "note": "hand-written"}}


def test_jsonl_records_are_megatron_records(tmp_path):
    path = small_trace().save(tmp_path / "t.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["layer"], r["rank"], r["num_tokens"]) for r in records] == [
        (0, 0, 0, 1), (0, 0, 1, 1), (0, 1, 0, 1), (1, 0, 0, 1), (1, 0, 1, 1), (1, 1, 0, 1)]
    for r in records:
        assert r["stage"] == "pre_dispatch" and r["block"] == "decoder" and r["topk"] == 3
        assert r["num_experts"] == 5 and len(r["top_indices"][0]) == len(r["top_weights"][0]) == 3


MEGATRON_LINES = [  # as megatron/core/transformer/moe/router_trace.py writes them: no weights, no E
    {"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 1, "rank": 2, "num_tokens": 2,
     "topk": 2, "top_indices": [[3, 1], [0, 7]]},
    {"step": 0, "stage": "pre_dispatch", "block": "mtp", "mtp_idx": 0, "layer": 1, "rank": 2,
     "num_tokens": 1, "topk": 2, "top_indices": [[5, 6]]},
    {"step": 1, "stage": "pre_dispatch", "block": "decoder", "layer": 2, "rank": 2, "num_tokens": 1,
     "topk": 2, "top_indices": [[2, 4]]},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_load_megatron_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "router_trace_rank2.jsonl", MEGATRON_LINES)
    trace = RoutingTrace.load(path, num_experts=16)
    assert trace.topk_ids_TK.tolist() == [[3, 1], [0, 7], [2, 4]]  # the mtp record is skipped
    assert trace.step_T.tolist() == [0, 0, 1] and trace.layer_T.tolist() == [1, 1, 2]
    assert trace.rank_T.tolist() == [2, 2, 2]
    assert trace.num_experts == 16 and not trace.has_weights
    inferred = RoutingTrace.load(path)
    assert inferred.num_experts == 8 and inferred.source["num_experts_inferred"] is True
    mtp = RoutingTrace.load(path, num_experts=16, block="mtp")
    assert mtp.topk_ids_TK.tolist() == [[5, 6]]
    with pytest.raises(TraceError, match="needs topk_weights_TK"):
        trace.to_routing_result()


def test_load_directory_of_rank_files(tmp_path):
    for rank in (10, 2):
        lines = [dict(r, rank=rank) for r in MEGATRON_LINES]
        write_jsonl(tmp_path / f"router_trace_rank{rank}.jsonl", lines)
    trace = RoutingTrace.load(tmp_path, num_experts=8)
    assert trace.rank_T.tolist() == [2, 2, 2, 10, 10, 10]  # numeric rank order, not 10 < 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(TraceError, match="no router_trace_rank"):
        RoutingTrace.load(tmp_path / "empty")


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def rewrite_npz(tmp_path, **changes):
    """Save small_trace(), then rewrite its npz with arrays replaced (None = removed)."""
    path = small_trace().save(tmp_path / "good.npz")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    for k, v in changes.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    bad = tmp_path / "bad.npz"
    with open(bad, "wb") as f:
        np.savez(f, **arrays)
    return bad


def header_with(**changes):
    h = {"format": "moe-routing-trace", "version": 1, "num_experts": 5, "top_k": 3, "source": {}}
    h.update(changes)
    return np.array(json.dumps(h))


@pytest.mark.parametrize("changes, message", [
    ({"header": header_with(version=2)}, "version 2 is not supported; supported: 1"),
    ({"header": header_with(format="other")}, "header format 'other' is not allowed"),
    ({"header": header_with(num_experts=4)}, r"expert id 4 \(token 1\) is out of range; allowed: 0..3"),
    ({"header": header_with(top_k=2)}, r"expected \[T, top_k=2\]"),
    ({"header": None}, "missing array 'header'"),
    ({"extra": np.zeros(3)}, "unknown array 'extra'"),
    ({"topk_ids_TK": np.zeros((6, 3), np.int64)}, "topk_ids_TK has dtype int64; expected int32"),
    ({"topk_weights_TK": np.zeros((6, 3), np.float64)}, "topk_weights_TK has dtype float64; expected float32"),
    ({"step_T": np.zeros(5, np.int32)}, r"step_T must have shape \(6,\)"),
    ({"layer_T": np.full(6, -1, np.int32)}, "layer_T holds -1; expected values >= 0"),
    ({"topk_ids_TK": np.array([[0, 0, 1]] * 6, np.int32)}, r"token 0 lists an expert more than once: \[0, 0, 1\]"),
    ({"topk_weights_TK": np.full((6, 3), np.nan, np.float32)}, "NaN or infinite"),
])
def test_npz_validation(tmp_path, changes, message):
    with pytest.raises(TraceError, match=message):
        RoutingTrace.load(rewrite_npz(tmp_path, **changes))


def test_file_errors(tmp_path):
    with pytest.raises(TraceError, match=r"suffix '.pt' is not allowed; allowed: .npz, .jsonl"):
        small_trace().save(tmp_path / "t.pt")
    with pytest.raises(TraceError, match="does not exist"):
        RoutingTrace.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(TraceError, match="not a readable .npz"):
        RoutingTrace.load(tmp_path / "junk.npz")
    with pytest.raises(TraceError, match="num_experts= applies to JSONL"):
        RoutingTrace.load(small_trace().save(tmp_path / "t.npz"), num_experts=5)


@pytest.mark.parametrize("record, message", [
    ({"step": 0, "layer": 0, "top_indices": [[1]]}, "record lacks 'rank'"),
    ({"step": -1, "layer": 0, "rank": 0, "top_indices": [[1]]}, "step=-1 is not allowed"),
    ({"step": 0, "layer": 0, "rank": 0, "num_tokens": 2, "top_indices": [[1]]}, "num_tokens=2 but top_indices has 1"),
    ({"step": 0, "layer": 0, "rank": 0, "topk": 2, "top_indices": [[1]]}, "topk=2 but top_indices rows have 1"),
    ({"step": 0, "layer": 0, "rank": 0, "top_indices": [[1, 2], [3]]}, "rows have different lengths"),
    ({"step": 0, "layer": 0, "rank": 0, "top_indices": [[1.5]]}, "must hold integers"),
    ({"step": 0, "layer": 0, "rank": 0, "top_indices": [[9]], "num_experts": 4}, "expert id 9"),
    ({"step": 0, "layer": 0, "rank": 0, "top_indices": [[1]], "top_weights": [[1, 2]]}, "top_weights has shape"),
])
def test_jsonl_validation(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(TraceError, match=message) as info:
        RoutingTrace.load(path)
    assert "bad.jsonl" in str(info.value)  # the message names the file


def test_jsonl_inconsistent_records(tmp_path):
    base = {"step": 0, "layer": 0, "rank": 0, "top_indices": [[1]]}
    path = write_jsonl(tmp_path / "a.jsonl", [dict(base, num_experts=4), dict(base, num_experts=8)])
    with pytest.raises(TraceError, match=r"disagree on num_experts: \[4, 8\]"):
        RoutingTrace.load(path)
    path = write_jsonl(tmp_path / "b.jsonl", [dict(base, top_weights=[[1.0]]), base])
    with pytest.raises(TraceError, match="some records carry top_weights"):
        RoutingTrace.load(path)
    path = write_jsonl(tmp_path / "c.jsonl", [dict(base, num_experts=4)])
    with pytest.raises(TraceError, match="num_experts=8 given, but the records say 4"):
        RoutingTrace.load(path, num_experts=8)
    (tmp_path / "d.jsonl").write_text("{not json\n")
    with pytest.raises(TraceError, match=r"d.jsonl:1: not valid JSON"):
        RoutingTrace.load(tmp_path / "d.jsonl")


def test_constructor_validation():
    ok = dict(step_T=[0], layer_T=[0], rank_T=[0], topk_ids_TK=[[0, 1]], topk_weights_TK=None, num_experts=2)
    RoutingTrace(**ok)
    for changes, message in [
        ({"num_experts": 0}, "num_experts: 0 is not allowed; expected an integer >= 1"),
        ({"topk_ids_TK": [[0.0, 1.0]]}, "topk_ids_TK must be an integer array"),
        ({"topk_ids_TK": [0, 1]}, r"topk_ids_TK must be 2-D \[T, K\]"),
        ({"topk_ids_TK": [[0, -2]]}, "expert id -2 .* out of range"),
        ({"topk_weights_TK": [[1, 0]]}, "topk_weights_TK must be floating point"),
        ({"topk_weights_TK": [[1.0]]}, "topk_weights_TK must have the shape"),
    ]:
        with pytest.raises(TraceError, match=message):
            RoutingTrace(**{**ok, **changes})


# --------------------------------------------------------------------------------------------
# Slicing and conversion
# --------------------------------------------------------------------------------------------

def test_select():
    trace = small_trace()
    assert trace.select(step=1).topk_ids_TK.tolist() == [[1, -1, -1], [3, 4, 0], [0, 2, 4]]
    sel = trace.select(layer=0, rank=1)
    assert sel.topk_ids_TK.tolist() == [[4, 3, -1], [3, 4, 0]] and sel.step_T.tolist() == [0, 1]
    assert torch.equal(sel.topk_weights_TK, trace.topk_weights_TK[[1, 4]])
    assert trace.select(step=[0, 1], layer=[1]).num_tokens == 2
    assert trace.select(step=5).num_tokens == 0
    assert trace.select().num_tokens == 6
    assert trace.keys() == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (1, 0, 1), (1, 1, 0)]
    with pytest.raises(TraceError, match=r"select\(layer=...\): '0' is not allowed"):
        trace.select(layer="0")


def test_to_routing_map():
    trace = small_trace()
    expected = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 1, 1], [1, 1, 1, 0, 0], [0, 1, 0, 0, 0],
                             [1, 0, 0, 1, 1], [1, 0, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(trace.to_routing_map(), expected)
    assert torch.equal(trace.to_routing_map(7)[:, :5], expected)
    assert not trace.to_routing_map(7)[:, 5:].any()
    with pytest.raises(TraceError, match="num_experts=4 is too small: the trace routes to expert 4"):
        trace.to_routing_map(4)
    assert trace.tokens_per_expert().tolist() == expected.sum(0).tolist()
    result = trace.to_routing_result()
    assert torch.equal(result.routing_map_TE, expected)
    assert torch.equal(result.probs_TE, routing_from_topk(trace.topk_ids_TK, trace.topk_weights_TK, 5).probs_TE)


def test_concat_pads_and_drops_missing_weights():
    a = small_trace()
    b = RoutingTrace([3], [0], [0], [[6]], torch.tensor([[1.0]]), 7)
    c = RoutingTrace.concat([a, b])
    assert c.top_k == 3 and c.num_experts == 7 and c.topk_ids_TK[-1].tolist() == [6, -1, -1]
    assert c.topk_weights_TK[-1].tolist() == [1.0, 0.0, 0.0]
    assert not RoutingTrace.concat([a, small_trace(with_weights=False)]).has_weights


# --------------------------------------------------------------------------------------------
# Synthetic generators
# --------------------------------------------------------------------------------------------

def distinct_rows(ids):
    return bool((ids.sort(dim=1).values.diff(dim=1) > 0).all())


@pytest.mark.parametrize("distribution", ["uniform", "zipf", "correlated"])
def test_synthetic_shape_distinct_deterministic(distribution):
    ids = synthetic_topk(3000, 32, 4, distribution, seed=3)
    assert ids.shape == (3000, 4) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < 32 and distinct_rows(ids)
    assert torch.equal(ids, synthetic_topk(3000, 32, 4, distribution, seed=3))
    assert not torch.equal(ids, synthetic_topk(3000, 32, 4, distribution, seed=4))


def test_synthetic_chunking_covers_all_tokens():
    ids = synthetic_topk(40000, 8, 8, seed=0)  # K = E: every row is a permutation, across chunks
    assert torch.equal(ids.sort(dim=1).values, torch.arange(8).expand(40000, 8))


def test_uniform_subsets_exactly_uniform():
    """E=5, K=2: each of the 10 subsets has probability 1/10 and each slot order 1/20."""
    T = 60000
    ids = synthetic_topk(T, 5, 2, "uniform", seed=11)
    pairs = torch.bincount(ids[:, 0] * 5 + ids[:, 1], minlength=25).reshape(5, 5)
    ordered = [int(pairs[i, j]) for i, j in itertools.permutations(range(5), 2)]
    p = 1 / 20
    sd = math.sqrt(T * p * (1 - p))
    assert max(abs(c - T * p) for c in ordered) < 5 * sd, ordered
    assert int(pairs.diagonal().sum()) == 0


def test_uniform_marginals_large_e():
    T, E, K = 20000, 64, 8
    ids = synthetic_topk(T, E, K, "uniform", seed=5)
    counts = torch.bincount(ids.flatten(), minlength=E).double()
    p = K / E
    sd = math.sqrt(T * p * (1 - p))
    assert (counts - T * p).abs().max() < 5 * sd
    slot0 = torch.bincount(ids[:, 0], minlength=E).double()  # the top-1 slot is uniform too
    assert (slot0 - T / E).abs().max() < 5 * math.sqrt(T / E * (1 - 1 / E))


def zipf_inclusion_k2(p):
    """P(expert i among 2 drawn sequentially without replacement, proportional to p)."""
    return np.array([p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(len(p)) if j != i)
                     for i in range(len(p))])


def test_zipf_matches_exact_inclusion_probabilities():
    T, E, skew = 40000, 6, 1.2
    ids = synthetic_topk(T, E, 2, "zipf", skew=skew, seed=2, popularity_seed=9)
    counts = torch.bincount(ids.flatten(), minlength=E).numpy()
    order = np.argsort(-counts, kind="stable")  # experts from most to least chosen
    p = 1 / np.arange(1, E + 1) ** skew
    p /= p.sum()
    inclusion = zipf_inclusion_k2(p)  # by popularity rank
    sd = np.sqrt(T * inclusion * (1 - inclusion))
    assert np.all(np.abs(counts[order] - T * inclusion) < 5 * sd), (counts[order], T * inclusion)
    assert np.all(np.diff(counts[order]) < 0)  # strictly ordered by rank at this T
    # the rank -> expert permutation depends on popularity_seed only
    again = synthetic_topk(T, E, 2, "zipf", skew=skew, seed=99, popularity_seed=9)
    assert np.array_equal(np.argsort(-torch.bincount(again.flatten(), minlength=E).numpy()), order)


def test_zipf_skew_zero_is_uniform_and_skew_concentrates():
    T, E, K = 20000, 32, 4
    flat = synthetic_topk(T, E, K, "zipf", skew=0.0, seed=1)
    counts = torch.bincount(flat.flatten(), minlength=E).double()
    assert (counts - T * K / E).abs().max() < 5 * math.sqrt(T * K / E)
    hot = torch.bincount(synthetic_topk(T, E, K, "zipf", skew=1.5, seed=1).flatten(), minlength=E)
    assert int(hot.max()) > 0.5 * T  # the rank-1 expert is in most tokens' top-4


def test_correlated_structure():
    T, E, K, C = 20000, 16, 2, 4
    full = synthetic_topk(T, E, K, "correlated", correlation=1.0, num_clusters=C, seed=0, popularity_seed=3)
    # correlation 1: every token's experts lie in one cluster; recover the clusters as the
    # connected components of the co-selection graph
    cluster = list(range(E))
    def find(x):
        while cluster[x] != x:
            x = cluster[x]
        return x
    for a, b in full.tolist():
        cluster[find(a)] = find(b)
    roots = [find(e) for e in range(E)]
    sizes = sorted(roots.count(r) for r in set(roots))
    assert sizes == [E // C] * C
    cluster_of = torch.tensor(roots)
    # correlation 0.5: half the tokens stay in a cluster, the rest uniform (in one cluster
    # with probability (E/C - 1) / (E - 1))
    half = synthetic_topk(T, E, K, "correlated", correlation=0.5, num_clusters=C, seed=1, popularity_seed=3)
    same = (cluster_of[half[:, 0]] == cluster_of[half[:, 1]]).double().mean().item()
    expected = 0.5 + 0.5 * (E // C - 1) / (E - 1)
    assert abs(same - expected) < 5 * math.sqrt(expected * (1 - expected) / T)
    counts = torch.bincount(half.flatten(), minlength=E).double()  # loads stay balanced
    assert (counts - T * K / E).abs().max() < 5 * math.sqrt(T * K / E)
    zero = synthetic_topk(T, E, K, "correlated", correlation=0.0, num_clusters=C, seed=1, popularity_seed=3)
    same0 = (cluster_of[zero[:, 0]] == cluster_of[zero[:, 1]]).double().mean().item()
    assert abs(same0 - 0.2) < 0.02


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_tokens=10, num_experts=4, top_k=5), "top_k: 5 is not allowed; expected 1..num_experts=4"),
    (dict(num_tokens=-1, num_experts=4, top_k=1), "num_tokens: -1 is not allowed"),
    (dict(num_tokens=10, num_experts=4, top_k=1, distribution="normal"),
     "distribution: 'normal' is not allowed; allowed: 'uniform', 'zipf', 'correlated'"),
    (dict(num_tokens=10, num_experts=4, top_k=1, distribution="zipf", skew=-1), "skew: -1 is not allowed"),
    (dict(num_tokens=10, num_experts=4, top_k=1, distribution="correlated", correlation=2),
     r"correlation: 2 is not allowed; expected a number in \[0, 1\]"),
    (dict(num_tokens=10, num_experts=8, top_k=3, distribution="correlated", num_clusters=4),
     "num_clusters: 4 is not allowed .* expected 1..2"),
    (dict(num_tokens=10, num_experts=8, top_k=3, num_clusters=2), "num_clusters=2 applies to distribution 'correlated' only"),
    (dict(num_tokens=10, num_experts=8, top_k=3, seed=1.5), "seed: 1.5 is not allowed"),
])
def test_synthetic_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthetic_topk(**kwargs)


def test_synthetic_trace_layout_and_seeds():
    kw = dict(tokens_per_rank=30, num_layers=2, num_ranks=3, distribution="zipf", skew=1.0, seed=4)
    trace = synthetic_trace(16, 2, num_steps=2, **kw)
    assert trace.num_tokens == 2 * 2 * 3 * 30 and trace.num_experts == 16 and trace.top_k == 2
    assert trace.keys() == [(s, l, r) for s in range(2) for l in range(2) for r in range(3)]
    assert trace.step_T[:180].eq(0).all() and trace.layer_T[:90].eq(0).all()
    assert torch.equal(trace.rank_T[:90], torch.arange(3).repeat_interleave(30))
    w = trace.topk_weights_TK
    assert torch.allclose(w.sum(dim=1), torch.ones(trace.num_tokens))
    assert (w[:, 0] >= w[:, 1]).all()
    assert trace.source["distribution"] == "zipf" and trace.source["seed"] == 4
    assert_same(trace, synthetic_trace(16, 2, num_steps=2, **kw))
    # a group does not depend on how many other groups were generated
    one_step = synthetic_trace(16, 2, num_steps=1, **kw)
    assert_same(trace.select(step=0), one_step, source=False)
    other = synthetic_trace(16, 2, num_steps=2, **{**kw, "seed": 5})
    assert not torch.equal(trace.topk_ids_TK, other.topk_ids_TK)


def test_synthetic_trace_popularity_shared_within_layer():
    trace = synthetic_trace(16, 2, tokens_per_rank=4000, num_steps=2, num_layers=2, num_ranks=2,
                            distribution="zipf", skew=1.5, seed=0)
    hottest = {k: int(trace.select(step=k[0], layer=k[1], rank=k[2]).tokens_per_expert().argmax())
               for k in trace.keys()}
    for layer in range(2):
        assert len({v for k, v in hottest.items() if k[1] == layer}) == 1
    assert hottest[(0, 0, 0)] != hottest[(0, 1, 0)]  # seed 0: the layers' orders differ


# --------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------

class TinyGate(nn.Module):
    """Top-k of x @ W, softmax weights over the k: returns a RoutingResult like the real gates."""

    def __init__(self, hidden, num_experts, top_k, seed):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.randn(hidden, num_experts, generator=torch.Generator().manual_seed(seed)))
        self.num_experts = num_experts

    def expected(self, x):
        values, ids = torch.topk(x @ self.weight, self.top_k, dim=1)
        return ids, torch.softmax(values, dim=1)

    def forward(self, x):
        ids, weights = self.expected(x)
        return routing_from_topk(ids, weights, self.num_experts)


class Wrapper(nn.Module):
    """Returns its inner gate's RoutingResult object: must not be recorded twice."""

    def __init__(self, gate):
        super().__init__()
        self.gate = gate

    def forward(self, x):
        return self.gate(x)


class TinyModel(nn.Module):
    def __init__(self, hidden=8, num_experts=6, top_k=2):
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)
        self.layers = nn.ModuleList([Wrapper(TinyGate(hidden, num_experts, top_k, seed=i)) for i in range(3)])

    def forward(self, x):
        x = self.proj(x)
        for layer in self.layers:
            result = layer(x)
            x = x + result.probs_TE.sum(dim=1, keepdim=True)
        return x


def test_recorder_captures_every_gate(tmp_path):
    torch.manual_seed(0)
    model = TinyModel()
    x0, x1 = torch.randn(5, 8), torch.randn(7, 8)
    with TraceRecorder(model, rank=3) as rec:
        model(x0)
        rec.next_step()
        model(x1)
    trace = rec.trace()
    assert trace.num_tokens == 3 * 5 + 3 * 7 and trace.num_experts == 6 and trace.top_k == 2
    assert trace.keys() == [(s, l, 3) for s in range(2) for l in range(3)]
    assert rec.layer_names == {0: "layers.0.gate", 1: "layers.1.gate", 2: "layers.2.gate"}
    # recompute each gate's routing by hand and compare
    with torch.no_grad():
        for step, x in enumerate((x0, x1)):
            h = model.proj(x)
            for layer, wrapper in enumerate(model.layers):
                ids, weights = wrapper.gate.expected(h)
                got = trace.select(step=step, layer=layer)
                assert torch.equal(got.topk_ids_TK, ids)
                assert torch.allclose(got.topk_weights_TK, weights)
                h = h + wrapper.gate(h).probs_TE.sum(dim=1, keepdim=True)
    assert_same(trace, RoutingTrace.load(rec.save(tmp_path / "cap.npz")))
    model(x0)  # hooks removed on exit: nothing more is recorded
    assert rec.trace().num_tokens == trace.num_tokens


def test_recorder_auto_step_pause_and_fixed_layers():
    model = TinyModel()
    rec = TraceRecorder(model, auto_step=True, layers={"layers.0.gate": 5, "layers.1.gate": 6,
                                                       "layers.2.gate": 7})
    x = torch.randn(4, 8)
    model(x)
    model(x)
    rec.pause()
    model(x)
    rec.resume()
    trace = rec.trace()
    assert trace.keys() == [(s, l, 0) for s in range(2) for l in (5, 6, 7)]
    rec.clear()
    with pytest.raises(TraceError, match="nothing recorded"):
        rec.trace()
    rec.remove()
    with pytest.raises(ValueError, match="module 'nope' is not in the model"):
        TraceRecorder(model, layers={"nope": 0})
    partial = TraceRecorder(model, layers={"layers.0.gate": 0})
    with pytest.raises(ValueError, match="gate 'layers.1.gate' is not in layers="):
        model(x)
    partial.remove()


def test_recorder_with_project_gate_and_padding():
    """A real gate from impl.common.routing with capacity drops: dropped slots become -1 / 0."""
    torch.manual_seed(1)
    gate = build_gate(GateConfig(kind="softmax_topk", top_k=2, capacity_factor=0.5), 8, 4)
    model = nn.Sequential(gate)
    with TraceRecorder(model) as rec:
        result = model(torch.randn(16, 8))
    trace = rec.trace()
    assert result.num_dropped > 0
    assert int((trace.topk_ids_TK == -1).sum()) == result.num_dropped
    assert torch.equal(trace.to_routing_map(), result.routing_map_TE)
    assert torch.allclose(trace.to_routing_result().probs_TE, result.probs_TE.detach())
