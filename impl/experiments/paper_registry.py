"""One paper's systems and baselines, as its paper names them: the record of one system and the
lookups over one paper's list (`PaperSystems`).

Each paper's list lives with that paper's experiments (`impl.experiments.<paper>.systems`), so a
job of one paper imports, and reruns for, that paper's implementations only;
`impl.experiments.systems` joins the three for callers that need every system.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Callable, Literal

import yaml

from impl.common.config import ConfigError, from_dict

__all__ = ["PAPERS", "System", "PaperSystems"]

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


_NAME = re.compile(r"([A-Za-z0-9.+-]+)(?:\[(.*)\])?")


class PaperSystems:
    """The systems of one paper in registry order (baselines first, the paper's own last)."""

    def __init__(self, paper: str, systems: tuple[System, ...]):
        if paper not in PAPERS:
            raise ValueError(f"paper: {paper!r} is not one of {', '.join(PAPERS)}")
        if any(s.paper != paper for s in systems):
            raise ValueError(f"a system of another paper is listed with the {paper} paper's")
        self.paper = paper
        self._by_name = {s.name: s for s in systems}
        if len(self._by_name) != len(systems):
            raise ValueError(f"a system of the {paper} paper is registered twice")

    def __iter__(self):
        return iter(self._by_name.values())

    def select(self, roles: tuple[str, ...] = ("baseline", "ours", "variant")) -> tuple[System, ...]:
        """The systems with one of `roles`, in registry order."""
        return tuple(s for s in self if s.role in roles)

    def get(self, name: str) -> System:
        try:
            return self._by_name[name]
        except KeyError:
            raise ConfigError(f"systems: unknown system {name!r} of the {self.paper} paper; allowed: "
                              + ", ".join(self._by_name)) from None

    def parse(self, text: str, defaults: dict | None = None) -> tuple[System, Any]:
        """'HierMoE[gamma=5,every=2]' -> (its System, what the experiment runs). Option values are
        read as YAML and checked against the system's options dataclass; `defaults` (the
        experiment's config) fill the options the name does not set. One-line ConfigError."""
        m = _NAME.fullmatch(str(text).strip())
        if not m:
            raise ConfigError(f"systems: {text!r} is not a system name; expected NAME or NAME[key=value,...]")
        system = self.get(m[1])
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
