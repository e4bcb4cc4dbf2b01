"""Name -> factory registry, so configs select implementations (dispatchers, gates, placement
planners, inference policies, ...) by string name.

    @register("dispatcher", "hd2")
    def make_hd2(comm, num_experts): ...

    factory = get("dispatcher", config.system)    # error lists every registered "dispatcher"

Registration happens when the defining module is imported; this module names none of them, so
the substrate depends on nothing above it. `impl.experiments.systems` imports every module that
registers something (and holds the papers' systems by their paper names); code that looks up
names chosen by a user imports it first.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

__all__ = ["RegistryError", "register", "get", "names", "kinds"]

F = TypeVar("F", bound=Callable)

_REGISTRY: dict[str, dict[str, Callable]] = {}


class RegistryError(ValueError):
    """An unknown or clashing registry name; the message lists what is registered."""


def _check_label(what: str, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise RegistryError(f"registry {what} must be a non-empty string, got {value!r}")


def register(kind: str, name: str) -> Callable[[F], F]:
    """Decorator registering a factory (class or function) under (kind, name). Registering a
    different object under a taken name is an error; re-registering the same object is a no-op."""
    _check_label("kind", kind)
    _check_label("name", name)

    def decorator(factory: F) -> F:
        if not callable(factory):
            raise RegistryError(f"{kind} {name!r}: registered object {factory!r} is not callable")
        table = _REGISTRY.setdefault(kind, {})
        existing = table.get(name)
        if existing is not None and existing is not factory:
            raise RegistryError(f"{kind} {name!r} is already registered to "
                                f"{getattr(existing, '__qualname__', existing)!r}")
        table[name] = factory
        return factory

    return decorator


def get(kind: str, name: str) -> Callable:
    """The factory registered under (kind, name)."""
    if kind not in _REGISTRY:
        raise RegistryError(f"unknown registry kind {kind!r}; registered kinds: "
                            f"{', '.join(kinds()) or '(none)'} (import impl.experiments.systems to "
                            "register every implementation)")
    table = _REGISTRY[kind]
    if name not in table:
        raise RegistryError(f"unknown {kind} {name!r}; registered: {', '.join(names(kind))}")
    return table[name]


def names(kind: str) -> tuple[str, ...]:
    """Registered names of one kind, sorted; empty when nothing of that kind is registered."""
    return tuple(sorted(_REGISTRY.get(kind, {})))


def kinds() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))
