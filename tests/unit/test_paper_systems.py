"""The papers' system lists: the registry of every system is their union, each paper's list works
on its own (a job imports its paper's list only), and a system name with options parses."""
import subprocess
import sys
from pathlib import Path

import pytest

from impl.common.config import ConfigError
from impl.experiments import systems

ROOT = Path(__file__).resolve().parents[2]


def test_the_registry_is_the_union_of_the_papers_lists():
    assert set(systems.BY_PAPER) == set(systems.PAPERS)
    assert systems.SYSTEMS == tuple(s for paper in systems.PAPERS for s in systems.BY_PAPER[paper])
    for paper, listed in systems.BY_PAPER.items():
        assert listed.paper == paper and all(s.paper == paper for s in listed)
        assert [s.role for s in listed.select(("ours",))] == ["ours"]
    with pytest.raises(ConfigError, match="paper: 'gpt' is not allowed; allowed: hiermoe, fsmoe, scheinfer"):
        systems.paper_systems("gpt")


def test_a_system_name_parses_with_its_options_and_fails_in_one_line():
    system, spec = systems.BY_PAPER["hiermoe"].parse("HierMoE[gamma=5,every=2]", {"gamma": 9.0})
    assert system.name == "HierMoE" and (spec.gamma, spec.every, spec.planner) == (5, 2, "hierd-es")
    with pytest.raises(ConfigError, match="unknown system 'Foo' of the fsmoe paper; allowed: DS-MoE, "):
        systems.BY_PAPER["fsmoe"].get("Foo")
    with pytest.raises(ConfigError, match="systems: FSMoE takes no options; got r"):
        systems.BY_PAPER["fsmoe"].parse("FSMoE[r=2]")


# What each paper's systems resolve to, checked in a process that imported that paper's list only.
RESOLVES = {
    "hiermoe": "assert all(s.factory(s.options()).route for s in listed)",
    "fsmoe": "assert all(callable(s.factory()) for s in listed)",
    "scheinfer": ("from impl.common.registry import get\nfrom impl.scheinfer.policy import POLICY_KIND\n"
                  "assert all(get(POLICY_KIND, s.factory()) for s in listed)"),
}


@pytest.mark.parametrize("paper", sorted(RESOLVES))
def test_each_papers_list_resolves_its_systems_on_its_own(paper):
    """Importing `impl.experiments.<paper>.systems` alone registers what its systems name, and
    loads no other paper's list."""
    code = (f"import sys\nfrom impl.experiments.{paper}.systems import {paper.upper()}_SYSTEMS as listed\n"
            f"{RESOLVES[paper]}\n"
            "others = [m for m in sys.modules if m == 'impl.experiments.systems' or "
            f"(m.endswith('.systems') and m.startswith('impl.experiments.') and '{paper}' not in m)]\n"
            "assert not others, others\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
