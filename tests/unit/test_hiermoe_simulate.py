"""The sim-tier HierMoE experiment engine: config checks before work, systems parsed by name,
per-system times equal the model evaluated directly, d* is the best fixed dimension, planners
really change the placement they are evaluated on."""
import pytest
import torch

from impl.common.config import ConfigError, build_config
from impl.common.dispatcher import ExpertPlacement
from impl.experiments.hiermoe import sim as simulate
from impl.hiermoe.dimension import agreement_bytes, allreduce_time, dispatch_counts, flat_time

SMALL = ["model=qwen3-30b-a3b-32l-tiny", "topology=hiermoe-node", "profile=hiermoe-node", "tokens_per_rank=256",
         "layers=2", "iterations=3", "warmup=1"]


def resolved(*extra):
    return simulate.resolve(build_config(simulate.SimExperimentConfig, None, SMALL + list(extra)))


@pytest.mark.parametrize("override,message", [
    ("systems=[Megatron-LM,FooMoE]", "unknown system 'FooMoE'"),
    ("systems=[HD4]", "HD4 needs d=4 but topology 'hiermoe-node' has D = 3"),
    ("systems=['HierMoE[colour=red]']", "unknown key 'colour'"),
    ("systems=['HierMoE[gamma=abc]']", "systems: HierMoE[gamma=abc].gamma: expected a number, got 'abc'"),
    ("systems=['HierMoE[every=0]']", "every: 0 is not allowed; allowed: 1..100000"),
    ("systems=['HierMoE[max_fn=mean]']", "'mean' is not allowed; allowed: 'max', 'smooth', 'lse'"),
    ("num_experts=12", "E=12 is not divisible by the expert-parallel size 8"),
    ("top_k=99", "top_k: 99 is not allowed"),
    ("model=gpt5", "model: unknown model 'gpt5'"),
    ("profile=hiermoe-testbed", "profile:"),
    ("warmup=3", "warmup: 3 is not allowed"),
])
def test_bad_config_fails_before_work(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        resolved(override)


def test_parse_system_variants():
    d = dict(max_fn="smooth", gamma=10.0, every=1, history=2)
    assert simulate.parse_system("HierMoE[gamma=5,every=2]", d) == simulate.SystemSpec(
        "HierMoE[gamma=5,every=2]", route="auto", dedup=True, planner="hierd-es", gamma=5.0, every=2)
    assert simulate.parse_system("H3", d).route == "fixed" and not simulate.parse_system("H3", d).dedup
    assert simulate.parse_system("HD2-MoE-Smart", d).planner == "smartmoe"


def test_run_times_equal_the_model_and_auto_is_the_best_fixed_dimension():
    rz = resolved("systems=[Megatron-LM,H2,HD1,HD2,HD3,HD-MoE,HierMoE,Tutel-2DH,DeepEP]")
    frame = simulate.run_experiment(rz, progress=False)
    assert len(frame) == 3 * 2 * 9
    # Megatron-LM on iteration 0 re-evaluated directly from a fresh stream of the same seed
    stream = simulate.RoutingStream(rz.model, 2, rz.topology.G, rz.config.tokens_per_rank, rz.config.stream,
                                    rz.config.seed)
    maps = stream.per_rank(stream.next_iteration()[0])
    flat = flat_time(dispatch_counts(maps, rz.topology), rz.profile, rz.row_bytes)
    got = frame[(frame.iteration == 0) & (frame.layer == 0) & (frame.system == "Megatron-LM")]["a2a_ms"].item()
    assert got == pytest.approx(flat)
    agree = allreduce_time(rz.profile, agreement_bytes(rz.topology))
    for (it, layer), g in frame.groupby(["iteration", "layer"]):
        ms = dict(zip(g.system, g.a2a_ms))
        chosen = ms["HD-MoE"] - agree                    # d*'s routes plus the all-reduce that agrees on it
        assert chosen == pytest.approx(min(ms["HD2"], ms["HD3"])) or chosen == pytest.approx(ms["HD1"])
        assert chosen <= min(ms["HD1"], ms["HD2"], ms["HD3"]) + 1e-9
        assert ms["HD2"] <= ms["H2"] + 1e-9              # dedup never sends more
    # iteration 0 is evaluated before any swap: HierMoE equals HD-MoE there
    first = frame[frame.iteration == 0].set_index(["layer", "system"])["a2a_ms"]
    for layer in (0, 1):
        assert first[(layer, "HierMoE")] == pytest.approx(first[(layer, "HD-MoE")])
    assert {"max_split_ratio", "maxvio", "skew"} <= set(frame.columns)


def test_tutel_2dh_time_pads_every_expert_slice_to_the_capacity():
    rz = resolved()
    E, G = rz.num_experts, rz.topology.G
    maps = [torch.zeros(4, E, dtype=torch.bool) for _ in range(G)]
    maps[0][:3, 5] = True        # the largest (rank, expert) count is 3
    maps[1][0, 7] = True
    counts = dispatch_counts(maps, rz.topology)
    counts_GE = torch.stack([m.sum(0) for m in maps])
    n = E * 3 * rz.row_bytes
    # level 0 of the topology is the "node" of Tutel's 2D route: intra-level-1, then inter-level-1,
    # four exchanges (dispatch, combine, their backward twins), one capacity all-reduce
    one = rz.profile.comm_time("a2a", "intra-1", n) + rz.profile.comm_time("a2a", "inter-1", n)
    dropless = simulate.parse_system("Tutel-2DH[capacity_factor=0]", {})
    assert simulate.a2a_time(dropless, counts, counts_GE, rz)[0] == pytest.approx(allreduce_time(rz.profile, 24) + 4 * one)
    fixed = simulate.parse_system("Tutel-2DH", {})                 # Tutel's default capacity factor 1.0
    C = rz.top_k * int(1.0 * -(-rz.config.tokens_per_rank // E))   # K x the even share of the run's tokens
    n = E * C * rz.row_bytes
    one = rz.profile.comm_time("a2a", "intra-1", n) + rz.profile.comm_time("a2a", "inter-1", n)
    assert simulate.a2a_time(fixed, counts, counts_GE, rz)[0] == pytest.approx(allreduce_time(rz.profile, 24) + 4 * one)


def test_planners_change_the_placement_they_are_evaluated_on():
    rz = resolved("systems=[HierMoE,SmartMoE]", "iterations=3")
    states = [simulate.SystemState(s, rz) for s in rz.systems]
    stream = simulate.RoutingStream(rz.model, 2, rz.topology.G, rz.config.tokens_per_rank, rz.config.stream,
                                    rz.config.seed)
    for it in range(3):
        for layer, full in enumerate(stream.next_iteration()):
            for st in states:
                st.update(it, layer, simulate.LayerRouting(full, rz), 2)
    identity = ExpertPlacement.identity(rz.num_experts)
    assert any(p != identity for st in states for p in st.placements)


def test_swap_cost_is_one_pair_point_to_point_and_hidden_under_backward():
    """A HierD-ES swap moves two experts' weights and optimizer state (14 bytes per parameter)
    in both directions at once: one message's time, a lone message having its link to itself.
    'overlap' charges only what exceeds the backward compute; 'exposed' charges it all; the plan is
    the same; 'shared' gives the move one rank's share of the link."""
    rz = resolved("systems=[HierMoE,'HierMoE[swap_cost=exposed]','HierMoE[swap_cost=shared]',HD-MoE]",
                  "stream.skew=1.5", "iterations=3")
    m = rz.model
    assert simulate.expert_state_bytes(m) == 3 * m.hidden * m.moe_ffn_hidden * 14
    old = ExpertPlacement.identity(rz.num_experts)
    new = old.swap(0, rz.num_experts - 1)                              # GPU 0 <-> GPU 7 (across sockets)
    one = simulate.p2p_time(rz.profile, rz.topology, 0, 7, simulate.expert_state_bytes(m))
    model = rz.profile.comm_model("a2a", "inter-1")             # fan 2; 4 GPUs of a socket share the link
    assert one == pytest.approx(model.alpha_ms + model.beta_ms * simulate.expert_state_bytes(m) * 2 / 4)
    shared = simulate.p2p_time(rz.profile, rz.topology, 0, 7, simulate.expert_state_bytes(m), shared=True)
    assert shared == pytest.approx(model.alpha_ms + model.beta_ms * simulate.expert_state_bytes(m) * 2)
    nvlink = rz.profile.comm_model("a2a", "intra-2")            # the finest level: a pair's own link
    assert simulate.p2p_time(rz.profile, rz.topology, 0, 1, 100) == pytest.approx(nvlink.alpha_ms + nvlink.beta_ms * 200)
    assert simulate.migration_time(old, new, rz) == pytest.approx(one)
    frame = simulate.run_experiment(rz, progress=False)
    by = {s: g.reset_index(drop=True) for s, g in frame.groupby("system")}
    assert by["HierMoE"]["a2a_ms"].equals(by["HierMoE[swap_cost=exposed]"]["a2a_ms"])
    assert by["HierMoE"]["moved_experts"].sum() > 0
    per_it = simulate.summarize_frame(frame).set_index(["system", "iteration"])
    exposed = per_it.loc["HierMoE[swap_cost=exposed]"]
    overlap = per_it.loc["HierMoE"]
    assert (exposed["swap_exposed_ms"] == exposed["swap_link_ms"]).all()
    assert (overlap["swap_exposed_ms"] <= overlap["swap_link_ms"]).all()
    assert (overlap["swap_link_ms"] == exposed["swap_link_ms"]).all()
    assert (per_it.loc["HD-MoE"]["swap_link_ms"] == 0).all()


def test_variants_run_in_one_process_and_bad_ones_fail_in_one_line(tmp_path, capsys):
    csv, record = tmp_path / "s.csv", tmp_path / "s.json"
    argv = ["--set", "model=qwen3-30b-a3b-32l-tiny", "--set", "topology=hiermoe-node", "--set", "profile=hiermoe-node",
            "--set", "tokens_per_rank=256", "--set", "layers=1", "--set", "iterations=2", "--set", "warmup=0",
            "--set", "systems=[Megatron-LM,HD2-MoE]", "--no-progress", "--out-csv", str(csv), "--out-record", str(record)]
    assert simulate.main(["--variant", 'flat={"stream": {"skew": 0.0}}', "--variant", "skewed={stream: {skew: 1.5}}",
                          *argv]) == 0
    import pandas as pd
    frame = pd.read_csv(csv)
    assert list(dict.fromkeys(frame["variant"])) == ["flat", "skewed"]
    assert frame.groupby("variant")["skew"].first().to_dict() == {"flat": 0.0, "skewed": 1.5}
    capsys.readouterr()
    for variant, message in (("noname", "expected NAME=MAPPING"), ("a=[1, 2]", "must be a mapping"),
                             ("a={stream: {skw: 1}}", "stream: unknown key 'skw'")):
        assert simulate.main(["--variant", variant, *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_attention_is_the_compute_profiles_entry_at_the_sequence_length_and_others_are_refused():
    import dataclasses
    rz = resolved()
    entry = rz.compute.compute["attention_L256"]
    bumped = dataclasses.replace(rz, compute=dataclasses.replace(
        rz.compute, compute={**rz.compute.compute, "attention_L256": dataclasses.replace(entry, alpha_ms=entry.alpha_ms + 1)}))
    # one forward core per layer, forward + backward = 3 x forward (ATTENTION_READING)
    assert simulate.dense_compute_ms(bumped) - simulate.dense_compute_ms(rz) == pytest.approx(3 * rz.model.num_layers)
    with pytest.raises(ConfigError, match=r"tokens_per_rank: 64 .*no compute entry 'attention_L64'; allowed: 256, 512, 1024"):
        resolved("tokens_per_rank=64")


def test_model_overrides_change_the_routing_groups_and_the_dense_layers():
    base = ["model=deepseek-v3-tiny", "systems=[Megatron-LM]"]
    assert resolved(*base).model.n_group == 8
    ungrouped = resolved(*base, "n_group=1", "topk_group=1")
    assert (ungrouped.model.n_group, ungrouped.model.topk_group) == (1, 1)
    all_moe = resolved(*base, "first_k_dense_layers=0")
    assert all_moe.model.num_moe_layers == all_moe.model.num_layers > resolved(*base).model.num_moe_layers
    frame = simulate.run_experiment(all_moe, progress=False)
    assert (frame["moe_layers_total"] == frame["num_layers"]).all() and (frame["n_group"] == 8).all()
    with pytest.raises(ConfigError, match="n_group=3 is not allowed"):
        resolved(*base, "n_group=3")


@pytest.mark.parametrize("model", ["qwen3-30b-a3b-32l-tiny", "deepseek-v3-tiny"])
def test_a_moved_placement_has_the_tensors_it_would_have_afresh(model):
    """`LayerRouting.move` recounts only the tokens of the moved experts; the slot lists, both count
    tables, HierD-ES's tables and its statistics equal a fresh derivation bit for bit, for swaps,
    a wider permutation and tokens that select fewer than K experts (padded slot lists)."""
    rz = resolved(f"model={model}", "systems=[Megatron-LM]")
    stream = simulate.RoutingStream(rz.model, 1, rz.topology.G, rz.config.tokens_per_rank, rz.config.stream, 0)
    full = stream.next_iteration()[0]
    full[::7, :3] = False                                       # some tokens select fewer experts
    moving, placement = simulate.LayerRouting(full, rz), ExpertPlacement.identity(rz.num_experts)
    g = torch.Generator().manual_seed(0)
    steps = [placement.swap(0, 1)] + [None] * 3 + [ExpertPlacement(tuple(torch.randperm(rz.num_experts, generator=g)
                                                                         .tolist()))]
    for new in steps:
        new = new or placement.swap(*torch.randperm(rz.num_experts, generator=g)[:2].tolist())
        moving.swap_stats(placement)
        moving.move(placement, new)
        placement, fresh = new, simulate.LayerRouting(full, rz)
        assert torch.equal(moving.slots(placement), fresh.slots(placement))
        assert torch.equal(moving.tables(placement), fresh.tables(placement))
        for ours, theirs in zip(moving.of(placement)[:2], fresh.of(placement)[:2]):
            if isinstance(ours, torch.Tensor):
                assert torch.equal(ours, theirs)
            else:
                for a, b in ((ours.copies, theirs.copies), (ours.pairs, theirs.pairs)):
                    assert all(torch.equal(x, y) for x, y in zip(a.by_level, b.by_level))
        assert moving.of(placement)[2] == fresh.of(placement)[2]
        ours, theirs = moving.swap_stats(placement).tables, fresh.swap_stats(placement).tables
        assert all(torch.equal(getattr(ours, k), getattr(theirs, k)) for k in ("z0", "x", "solo", "w"))
