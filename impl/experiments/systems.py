"""The one registry of the papers' systems and baselines.

Each system or baseline is registered here once, under the name its paper prints: which paper,
whether it is the paper's own system or a baseline, its fixed plot style (a slot in the suite's
colour x hatch cycle, so a system looks the same in every figure), its options (a dataclass:
the config schema of `NAME[key=value,...]`) and a factory that turns the options into what the
paper's experiments run (a HierMoE route/planner spec, a ScheInfer policy name, ...).

Importing this module also imports every module that registers an implementation in
`impl.common.registry` (dispatchers, gates, placement planners, inference policies, the
megatron-core layer), so `registry.get` finds any of them by name. That is the experiments
layer's job: the substrate's registry names no module above it.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Callable, Literal

import yaml

# Every module that registers implementations (import for the side effect).
import baselines.deepspeed_moe.schedule  # noqa: F401
import baselines.deepspeed_moe.sim  # noqa: F401
import baselines.fiddler  # noqa: F401
import baselines.llamacpp  # noqa: F401
import baselines.megatron  # noqa: F401  (lazy: megatron itself loads when its factory is called)
import baselines.pipemoe.plans  # noqa: F401
import baselines.smartmoe.planner  # noqa: F401
import baselines.tutel_2dh.dispatcher  # noqa: F401
import impl.common.dispatcher  # noqa: F401
import impl.common.routing  # noqa: F401
import impl.fsmoe.planner  # noqa: F401
import impl.hiermoe.dedup_a2a  # noqa: F401
import impl.hiermoe.expert_swap  # noqa: F401
from impl.common.config import ConfigError, from_dict
from impl.common.registry import get
from impl.fsmoe.planner import TRAINING_PLAN
from impl.experiments.hiermoe.spec import HierMoEOptions, SystemSpec

__all__ = ["PAPERS", "System", "SYSTEMS", "get_system", "paper_systems", "parse_system_name", "style_slots"]

PAPERS = ("hiermoe", "fsmoe", "scheinfer")


@dataclass(frozen=True)
class System:
    """One system or baseline as its paper names it."""

    paper: Literal["hiermoe", "fsmoe", "scheinfer"]
    name: str
    role: Literal["baseline", "ours", "variant"]   # variant: the paper's ablations of its own system
    description: str
    factory: Callable[..., Any]                   # options dataclass -> what the experiment runs
    options: type | None = None                   # dataclass of NAME[key=value] options
    style: int | None = None                      # slot in the colour x hatch cycle (figures.style)


def _hiermoe(**spec) -> Callable[[HierMoEOptions], SystemSpec]:
    def factory(opts: HierMoEOptions) -> SystemSpec:
        return SystemSpec.from_options(opts, **spec)
    return factory


def _scheinfer(policy: str) -> Callable[[], str]:
    return lambda: policy


def _plan(name: str) -> Callable[[], Callable]:
    """An FSMoE-paper system: its planner (blocks -> SystemPlan), registered as a training plan."""
    return lambda: get(TRAINING_PLAN, name)


SYSTEMS: tuple[System, ...] = (
    # HierMoE (training, AlltoAll): the paper's Figs. 10-13 systems, baselines first
    System("hiermoe", "Megatron-LM", "baseline", "Megatron-LM's flat AlltoAll, one copy per (token, expert)",
           _hiermoe(route="flat"), HierMoEOptions, style=0),
    System("hiermoe", "Tutel-2DH", "baseline", "Tutel's 2DH AlltoAll over capacity-padded equal slices",
           _hiermoe(route="tutel-2dh"), HierMoEOptions, style=1),
    System("hiermoe", "SmartMoE", "baseline", "flat AlltoAll with SmartMoE's dynamic expert placement",
           _hiermoe(route="flat", planner="smartmoe"), HierMoEOptions, style=2),
    System("hiermoe", "HD2-MoE", "variant", "2-level dedup AlltoAll, fixed d = 2",
           _hiermoe(route="fixed", dedup=True, dim=2), HierMoEOptions, style=3),
    System("hiermoe", "HD2-MoE-Smart", "variant", "HD2 with SmartMoE placement",
           _hiermoe(route="fixed", dedup=True, dim=2, planner="smartmoe"), HierMoEOptions, style=4),
    System("hiermoe", "HD-MoE", "variant", "dedup AlltoAll with d* chosen per layer and iteration",
           _hiermoe(route="auto", dedup=True), HierMoEOptions, style=5),
    System("hiermoe", "HierMoE", "ours", "d* dedup AlltoAll plus HierD-ES expert swap",
           _hiermoe(route="auto", dedup=True, planner="hierd-es"), HierMoEOptions, style=6),
    *(System("hiermoe", f"{'HD' if dedup else 'H'}{d}", "variant",
             f"{d}-level hierarchical AlltoAll {'with' if dedup else 'without'} dedup (ablation)",
             _hiermoe(route="fixed", dedup=dedup, dim=d), HierMoEOptions)
      for dedup in (True, False) for d in range(1, 9)),
    # FSMoE (training, co-scheduled pipelines): the plans of Figs. 6-8 and Table 5, baselines first
    System("fsmoe", "DS-MoE", "baseline", "DeepSpeed-MoE's sequential schedule, r = 1", _plan("ds-moe"), style=7),
    System("fsmoe", "Tutel", "baseline", "Tutel with PipeMoE's degree, one communication lane", _plan("tutel"),
           style=8),
    System("fsmoe", "Tutel-Improved", "baseline", "Tutel plus gradients overlapped with non-MoE work",
           _plan("tutel-improved"), style=9),
    System("fsmoe", "PipeMoE+Lina", "baseline", "PipeMoE with Lina's fixed 30 MB gradient chunks",
           _plan("pipemoe-lina"), style=10),
    System("fsmoe", "FSMoE-No-IIO", "variant", "FSMoE on one shared communication lane", _plan("fsmoe-no-iio"),
           style=11),
    System("fsmoe", "FSMoE", "ours", "three co-scheduled lanes, per-pass degrees, partitioned gradients",
           _plan("fsmoe"), style=12),
    System("fsmoe", "FSMoE-r1", "variant", "FSMoE with r forced to 1", _plan("fsmoe-r1")),
    System("fsmoe", "Tutel-A2A-only", "variant", "Tutel with the ESP collectives on the compute lane",
           _plan("tutel-a2a-only")),
    # ScheInfer (inference on one moderate GPU): baselines first; slots after FSMoE's six
    System("scheinfer", "llama.cpp", "baseline", "llama.cpp's layer offload (-ngl)", _scheinfer("layers"), style=13),
    System("scheinfer", "Fiddler", "baseline", "Fiddler's expert-granular CPU/GPU policy", _scheinfer("fiddler"),
           style=14),
    System("scheinfer", "ScheInfer", "ours", "CC / CG / GG slices on three concurrent lanes",
           _scheinfer("scheinfer"), style=15),
)

_BY_KEY = {(s.paper, s.name): s for s in SYSTEMS}
if len(_BY_KEY) != len(SYSTEMS):
    raise RuntimeError("a system is registered twice")


def paper_systems(paper: str, roles: tuple[str, ...] = ("baseline", "ours", "variant")) -> tuple[System, ...]:
    """The systems of one paper in registry order (baselines first, the paper's own last)."""
    if paper not in PAPERS:
        raise ConfigError(f"paper: {paper!r} is not allowed; allowed: {', '.join(PAPERS)}")
    return tuple(s for s in SYSTEMS if s.paper == paper and s.role in roles)


def get_system(paper: str, name: str) -> System:
    try:
        return _BY_KEY[(paper, name)]
    except KeyError:
        raise ConfigError(f"systems: unknown system {name!r} of the {paper} paper; allowed: "
                          + ", ".join(s.name for s in paper_systems(paper))) from None


def style_slots() -> dict[str, int]:
    """{system name: style slot} of every system with a fixed plot style."""
    return {s.name: s.style for s in SYSTEMS if s.style is not None}


_NAME = re.compile(r"([A-Za-z0-9.+-]+)(?:\[(.*)\])?")


def parse_system_name(text: str, paper: str, defaults: dict | None = None) -> tuple[System, Any]:
    """'HierMoE[gamma=5,every=2]' -> (its System, what the experiment runs). Option values are
    read as YAML and checked against the system's options dataclass; `defaults` (the
    experiment's config) fill the options the name does not set. One-line ConfigError."""
    m = _NAME.fullmatch(str(text).strip())
    if not m:
        raise ConfigError(f"systems: {text!r} is not a system name; expected NAME or NAME[key=value,...]")
    system = get_system(paper, m[1])
    given: dict[str, Any] = {}
    for item in filter(None, (m[2] or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"systems: option {item!r} of {text!r} is not key=value")
        given[key.strip()] = yaml.safe_load(value)
    if system.options is None:
        if given:
            raise ConfigError(f"systems: {system.name} takes no options; got {', '.join(given)}")
        return system, system.factory()
    fields = {f.name for f in dataclasses.fields(system.options)}
    merged = {k: v for k, v in (defaults or {}).items() if k in fields} | given
    opts = from_dict(system.options, merged, where=f"systems: {text.strip()}")
    return system, system.factory(opts)
