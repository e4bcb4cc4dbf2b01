import pytest

from impl.common.topology import Level, Topology, TopologyError, get_topology


def test_hiermoe_testbed_shape():
    t = get_topology("hiermoe-testbed")
    assert (t.D, t.G, t.U[:t.D]) == (4, 32, (1, 4, 8, 16))
    assert t.level_names == ("node", "socket", "pcie-pair", "gpu")


def test_coords_round_trip_and_hierarchical_order():
    t = get_topology("hiermoe-testbed")
    assert t.coords(0) == (0, 0, 0, 0) and t.coords(31) == (3, 1, 1, 1) and t.coords(13) == (1, 1, 0, 1)
    assert all(t.rank(t.coords(r)) == r for r in range(t.G))
    # node-major: ranks 8..15 are node 1
    assert {t.coords(r)[0] for r in range(8, 16)} == {1}


def test_group_sizes_follow_the_paper():
    """Inter-level-i ops span U[i]/U[i-1] GPUs, Intra-level-i ops G/U[i] (HierMoE section 2.1)."""
    t = get_topology("hiermoe-testbed")
    assert [len(t.inter_groups(i)[0]) for i in (1, 2, 3)] == [4, 2, 2]
    assert [len(t.intra_groups(i)[0]) for i in (0, 1, 2, 3)] == [32, 8, 4, 2]
    assert [len(t.inter_groups(i)) for i in (1, 2, 3)] == [8, 16, 16]


def test_inter_level_1_links_same_local_index_across_nodes():
    t = get_topology("2x8")
    assert t.inter_groups(1) == [(i, 8 + i) for i in range(8)]
    assert t.intra_groups(1) == [tuple(range(8)), tuple(range(8, 16))]
    t = get_topology("hiermoe-testbed")
    assert t.inter_groups(1)[3] == (3, 11, 19, 27)
    assert t.inter_groups(2)[0] == (0, 4) and t.inter_groups(3)[0] == (0, 2)


def test_every_rank_in_exactly_one_group_per_step():
    t = get_topology("hiermoe-testbed")
    for kind, levels in (("intra", range(t.D)), ("inter", range(1, t.D))):
        for lvl in levels:
            groups = t.intra_groups(lvl) if kind == "intra" else t.inter_groups(lvl)
            flat = sorted(r for g in groups for r in g)
            assert flat == list(range(t.G)), (kind, lvl)
    # inter-(i) and intra-(i) groups stay inside one intra-(i-1) group
    for lvl in range(1, t.D):
        parents = t.intra_groups(lvl - 1)
        for g in t.inter_groups(lvl) + t.intra_groups(lvl):
            assert any(set(g) <= set(p) for p in parents)


def test_link_level():
    t = get_topology("hiermoe-testbed")
    assert t.link_name(0, 0) is None
    assert t.link_name(0, 1) == "gpu" and t.link_name(0, 2) == "pcie-pair"
    assert t.link_name(0, 4) == "socket" and t.link_name(0, 8) == "node"


def test_presets_and_patterns():
    assert get_topology("fsmoe-testbed-a").G == 48 and get_topology("fsmoe-testbed-b").G == 32
    assert get_topology("nvswitch-2x8").gpus_per_node == 8
    assert get_topology("4x2").num_nodes == 4
    assert get_topology("hier:node=2,gpu=4").G == 8
    assert get_topology("hiermoe-node").U[:3] == (1, 2, 4)


def test_all_step_groups_order_is_deterministic():
    t = get_topology("2x4")
    assert t.all_step_groups() == t.all_step_groups()
    assert t.all_step_groups()[0] == ("intra", 0, tuple(range(8)))


@pytest.mark.parametrize("bad", ["banana", "0x4", "2x"])
def test_unknown_topology_message(bad):
    with pytest.raises(TopologyError, match="topology"):
        get_topology(bad)


def test_bad_level():
    with pytest.raises(TopologyError, match="fanout"):
        Topology("x", (Level("node", 0),))
    with pytest.raises(TopologyError, match="rank 8 out of range"):
        get_topology("2x4").coords(8)
