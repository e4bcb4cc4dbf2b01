"""ScheInfer partition optimiser and token assignment: equal to exhaustive search on small cases."""
import itertools
import math
from fractions import Fraction

import pytest

from impl.common.config import ConfigError
from impl.scheinfer.assign import (ExpertLoad, assign_layer, break_even_tokens, layer_makespan,
                                   token_split)
from impl.scheinfer.partition import (REFERENCE_COST, CostModel, PerRowLinear, Split, brute_force_split,
                                      lane_times, optimal_split, resident_rows, tile_candidates)


def _cost(cpu_scale=1.0, gpu_scale=1.0, h2d=25e9, alpha=5e-6):
    r = REFERENCE_COST
    return CostModel(PerRowLinear(r.cpu.rows, tuple(v * cpu_scale for v in r.cpu.s_per_mac), alpha),
                     PerRowLinear(r.gpu.rows, tuple(v * gpu_scale for v in r.gpu.s_per_mac), alpha), h2d, alpha)


COSTS = [REFERENCE_COST, _cost(h2d=5e9), _cost(cpu_scale=0.1), _cost(gpu_scale=500.0, h2d=100e9),
         _cost(alpha=1e-3), _cost(cpu_scale=20.0, alpha=0.0)]


# ------------------------------------------------------------------------- cost model

def test_lane_times_by_hand():
    cost = CostModel(PerRowLinear((1, 3), (2.0, 1.0), 10.0), PerRowLinear((1,), (0.5,), 1.0), 4.0, 2.0)
    # n * per_mac linear in n between the grid points: 1 * 2.0 at n = 1, 3 * 1.0 at n = 3 -> 2.5 / 2 at n = 2
    assert cost.cpu.per_mac(2) == 1.25 and cost.cpu.per_mac(9) == 1.0 and cost.cpu.per_mac(1) == 2.0
    t = lane_times(cost, n=2, hidden=1, split=Split(1, 2, 3), dtype_bytes=2)
    assert t.cpu == 10 + 1.25 * 6           # macs = 3 * n * hidden * rows
    assert t.h2d == 2 + 3 * 1 * 2 * 2 / 4.0
    gg, cgc = 1 + 0.5 * 18, 1 + 0.5 * 12
    assert t.gpu == gg + cgc and t.offload == max(gg, t.h2d) + cgc and t.makespan == max(t.cpu, t.offload)
    assert lane_times(cost, 2, 1, Split(0, 0, 0), 2).makespan == 0      # empty bands cost nothing


def test_per_mac_is_exact_for_pure_memory_and_compute_bound_terms():
    """Between grid points (powers of two) a pure 1/n term (weights read once per call) and a pure
    constant (compute bound) are reproduced exactly, and so is their roofline max when its knee
    is a grid point."""
    rows = tuple(2 ** i for i in range(8))
    memory = PerRowLinear(rows, tuple(3.0 / n for n in rows))
    compute = PerRowLinear(rows, (0.5,) * len(rows))
    roof = PerRowLinear(rows, tuple(max(0.25, 2.0 / n) for n in rows))
    for n in range(1, 129):
        assert memory.per_mac(n) == pytest.approx(3.0 / n, rel=1e-12)
        assert compute.per_mac(n) == pytest.approx(0.5, rel=1e-12)
        assert roof.per_mac(n) == pytest.approx(max(0.25, 2.0 / n), rel=1e-12)   # knee n = 8 on the grid
    assert memory.per_mac(3) == pytest.approx(1.0)     # per_mac linear in n would give 1.125 (12.5 % over)


def test_cost_model_rejects_bad_values_and_round_trips():
    with pytest.raises(ConfigError, match="strictly increasing"):
        PerRowLinear((4, 1), (1.0, 1.0))
    with pytest.raises(ConfigError, match="h2d_bytes_per_s"):
        CostModel(REFERENCE_COST.cpu, REFERENCE_COST.gpu, 0.0)
    import json
    assert CostModel.from_dict(json.loads(REFERENCE_COST.to_json())) == REFERENCE_COST
    with pytest.raises(ConfigError, match="bad cost"):
        CostModel.from_dict({"cpu": {}})


def test_tile_candidates():
    assert tile_candidates(130, 64) == [0, 64, 128, 130]
    assert tile_candidates(128, 64) == [0, 64, 128]
    assert tile_candidates(0, 64) == [0]
    with pytest.raises(ConfigError, match="tile"):
        tile_candidates(10, 0)


# ------------------------------------------------------------------------- optimiser = grid search

@pytest.mark.parametrize("cost", [COSTS[0]] + [pytest.param(c, marks=pytest.mark.slow) for c in COSTS[1:]],
                         ids=range(len(COSTS)))
def test_optimal_split_equals_brute_force(cost):
    for n, (width, gg), tile, hidden, cg_max in itertools.product(
            (0, 1, 3, 17, 64, 300, 2048), ((37, 0), (128, 0), (172, 44), (1024, 256), (4096, 0)),
            (1, 16, 64), (64, 4096), (None, 0, 64)):
        got = optimal_split(cost, n, hidden, width, gg, tile, 2, cg_max)
        ref = brute_force_split(cost, n, hidden, width, gg, tile, 2, cg_max)
        t_got = lane_times(cost, n, hidden, got, 2).makespan
        t_ref = lane_times(cost, n, hidden, ref, 2).makespan
        assert t_got == pytest.approx(t_ref, rel=1e-12, abs=1e-18), (n, width, gg, tile, hidden, cg_max)
        assert got.width == width and got.gg == gg
        assert got.cc in tile_candidates(width - gg, tile)
        assert cg_max is None or got.cg <= cg_max


def test_split_is_phase_dependent_on_reference_hardware():
    # decode (n = 1): memory bound CPU keeps a large CC share; prefill (n = 512): almost all streamed
    dec = optimal_split(REFERENCE_COST, 1, 4096, 14336, 0, 128, 2)
    pre = optimal_split(REFERENCE_COST, 512, 4096, 14336, 0, 128, 2)
    assert dec.cc / 14336 > 0.6 and pre.cc / 14336 < 0.15
    assert dec.cc % 128 == 0 and pre.cc % 128 == 0


# ------------------------------------------------------------------------- GG sizing

def _snapped(w, f, tile):
    return w if f >= 1 else math.floor(f * w / tile) * tile


def test_resident_rows_uniform_is_a_tile_snapped_fraction_then_tile_fill():
    """The largest fraction f whose tile-snapped rows fit (found here by scanning a fine grid of
    fractions), every FFN at least at f, and the leftover smaller than the next tile of every FFN
    not wholly resident."""
    ffns = {(0, "dense"): 100, (1, 0): 64, (1, 1): 64, (2, "shared"): 30}
    row_bytes = 3 * 8 * 2
    grid = [Fraction(j, 960) for j in range(961)]           # every step k * 16 / w of these widths
    for budget in range(0, sum(ffns.values()) * row_bytes + 2 * row_bytes, 37 * row_bytes // 4):
        got = resident_rows(ffns, 8, 2, budget, tile=16)
        left = budget - sum(got.values()) * row_bytes
        assert left >= 0
        f = max(f for f in grid if sum(_snapped(w, f, 16) for w in ffns.values()) * row_bytes <= budget)
        assert all(got[k] >= _snapped(w, f, 16) for k, w in ffns.items()), budget
        assert all(got[k] == w or got[k] % 16 == 0 for k, w in ffns.items())
        assert all(left < min(16, w - got[k]) * row_bytes for k, w in ffns.items() if got[k] < w), budget


def test_resident_rows_uniform_mixed_widths_by_hand():
    """Qwen-like: a routed expert of 1408 rows and a shared one of 5632 (tile 128), budget for half
    of the rows (3520): f = 1/2 gives 640 + 2816 = 3456 rows (45 % and 50 %, not the same row
    count); the 64 rows left are less than a tile. Then the tile fill: smallest fraction first."""
    ffns = {(0, 0): 1408, (0, "shared"): 5632}
    row_bytes = 3 * 2048 * 2
    assert resident_rows(ffns, 2048, 2, 3520 * row_bytes, tile=128) == {(0, 0): 640, (0, "shared"): 2816}
    # 64 rows more: f = 23/44, the shared expert's next step (640 + 2944 rows)
    assert resident_rows(ffns, 2048, 2, 3584 * row_bytes, tile=128) == {(0, 0): 640, (0, "shared"): 2944}
    # 128 rows more still: the next step, 6/11, needs 768 + 3072; the fill gives the tile to the
    # routed expert, whose fraction is the smaller (640/1408 < 2944/5632)
    assert resident_rows(ffns, 2048, 2, 3712 * row_bytes, tile=128) == {(0, 0): 768, (0, "shared"): 2944}
    assert resident_rows(ffns, 2048, 2, 10 ** 12, tile=128) == ffns
    assert resident_rows(ffns, 2048, 2, 0, tile=128) == {(0, 0): 0, (0, "shared"): 0}
    with pytest.raises(ConfigError, match="tile"):
        resident_rows(ffns, 2048, 2, 0, tile=0)


def test_resident_rows_popularity_takes_whole_ffns_in_order():
    ffns = {(0, 0): 10, (0, 1): 10, (1, 0): 10}
    pop = {(1, 0): 5.0, (0, 1): 3.0}
    got = resident_rows(ffns, 1, 1, budget_bytes=60, tile=1, mode="popularity", popularity=pop)
    assert got == {(1, 0): 10, (0, 1): 10, (0, 0): 0}
    with pytest.raises(ConfigError, match="gg mode"):
        resident_rows(ffns, 1, 1, 60, 1, mode="random")
    with pytest.raises(ConfigError, match="budget"):
        resident_rows(ffns, 1, 1, -1, 1)


# ------------------------------------------------------------------------- token assignment

def _toy_cost():
    # CPU: 1 s per MAC-unit at any n (compute bound); GPU: 0.01; copy: 1 byte/s, no overheads
    return CostModel(PerRowLinear((1,), (1.0,)), PerRowLinear((1,), (0.01,)), 1.0)


def test_break_even_tokens_by_hand():
    # hidden=1, tile=1, 1 byte: CPU 3n; GPU path 3 (copy) + 0.03n -> CPU wins while 3n <= 3 + 0.03n
    assert break_even_tokens(_toy_cost(), 1, 1, 1) == 1
    fast_copy = CostModel(PerRowLinear((1,), (1.0,)), PerRowLinear((1,), (0.01,)), 1e3)
    assert break_even_tokens(fast_copy, 1, 1, 1) == 0          # streaming always wins
    slow_copy = CostModel(PerRowLinear((1,), (1.0,)), PerRowLinear((1,), (0.01,)), 1 / 30)
    assert break_even_tokens(slow_copy, 1, 1, 1) == 30         # 3n <= 90 + 0.03n  <=> n <= 30.3


def test_threshold_mode_sends_big_experts_to_cg():
    cost = _toy_cost()
    loads = [ExpertLoad((0, 0), 1, 10, 0), ExpertLoad((0, 1), 5, 10, 2)]
    got = assign_layer(cost, loads, 1, 1, 1, mode="threshold", n_star=2)
    assert got[1] == Split(0, 8, 2)                                       # n=5 > n*=2: no CPU rows
    assert got[0] == optimal_split(cost, 1, 1, 10, 0, 1, 1)               # small: the optimiser's split
    assert assign_layer(cost, loads, 1, 1, 1, mode="threshold", n_star=2, cg_max=4)[1] == \
        optimal_split(cost, 5, 1, 10, 2, 1, 1, 4)                         # CG would not fit staging


def test_makespan_mode_sweep_and_exhaustive_on_hand_case():
    cost = _toy_cost()
    # tokens 1, 1, 50: the two single-token experts on the CPU, the 50-token one streamed
    loads = [ExpertLoad((0, e), n, 4, 0) for e, n in enumerate((1, 50, 1))]
    sweep = assign_layer(cost, loads, 1, 1, 1, mode="makespan")
    full = assign_layer(cost, loads, 1, 1, 1, mode="makespan", exhaustive=True)
    assert sweep == full == [Split(4, 0, 0), Split(0, 4, 0), Split(4, 0, 0)]
    best = min(layer_makespan(cost, loads, [Split(4, 0, 0) if c else Split(0, 4, 0) for c in choice], 1, 1)
               for choice in itertools.product((0, 1), repeat=3))
    assert layer_makespan(cost, loads, full, 1, 1) == best
    with pytest.raises(ConfigError, match="assign mode"):
        assign_layer(cost, loads, 1, 1, 1, mode="random")


def test_split_mode_is_per_expert_optimum():
    loads = [ExpertLoad((0, e), n, 256, 64) for e, n in enumerate((1, 7, 200))]
    got = assign_layer(REFERENCE_COST, loads, 4096, 64, 2, mode="split")
    assert got == [optimal_split(REFERENCE_COST, ld.n, 4096, 256, 64, 64, 2) for ld in loads]


def test_token_split_balances_by_brute_force():
    cost = _toy_cost()
    for n in (0, 1, 10, 101):
        nc = token_split(cost, n, 1, 3)
        f = lambda c: max(cost.cpu.time(c, 9.0 * c), cost.gpu.time(n - c, 9.0 * (n - c)))  # noqa: E731
        assert f(nc) == min(f(c) for c in range(n + 1))
    assert token_split(cost, 101, 1, 3) == 1                            # GPU 100x faster: ~1 % on CPU
