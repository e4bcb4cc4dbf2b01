"""Name -> factory registry, so configs select systems, baselines, gates, ... by string name.

    @register("system", "hiermoe")
    class HierMoEDispatcher: ...

    factory = get("system", config.system)    # error lists every registered "system"

Registration happens when the defining module is imported. `get` and `names` first import every
module listed in `PROVIDER_MODULES`, so a name is found no matter which module the caller happened
to import; a new module that registers names is added to that list.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar
import importlib
import threading

__all__ = ["RegistryError", "register", "get", "names", "kinds"]

F = TypeVar("F", bound=Callable)

_REGISTRY: dict[str, dict[str, Callable]] = {}

# Modules that register selectable implementations (imported lazily, once).
PROVIDER_MODULES = (
    "impl.common.routing",
    "impl.common.dispatcher",
    "impl.hiermoe.dedup_a2a",
    "impl.hiermoe.expert_swap",
    "baselines.smartmoe.planner",
    "baselines.tutel_2dh.dispatcher",
    "baselines.deepspeed_moe.sim",
    "baselines.megatron",          # lazy: megatron itself is imported only when the factory is called
)
_providers_loaded = False
_providers_loading = False
_providers_lock = threading.RLock()


def _load_providers() -> None:
    """Import every provider once. Thread-safe: SimComm ranks are threads that may all call `get`
    first; the others wait until every module is imported. A provider that calls `get` while it
    is being imported (same thread) sees the names registered so far."""
    global _providers_loaded, _providers_loading
    if _providers_loaded:
        return
    with _providers_lock:
        if _providers_loaded or _providers_loading:
            return
        _providers_loading = True
        try:
            for module in PROVIDER_MODULES:
                importlib.import_module(module)
            _providers_loaded = True
        finally:
            _providers_loading = False


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
    _load_providers()
    if kind not in _REGISTRY:
        raise RegistryError(f"unknown registry kind {kind!r}; registered kinds: "
                            f"{', '.join(kinds()) or '(none)'}")
    table = _REGISTRY[kind]
    if name not in table:
        raise RegistryError(f"unknown {kind} {name!r}; registered: {', '.join(names(kind))}")
    return table[name]


def names(kind: str) -> tuple[str, ...]:
    """Registered names of one kind, sorted; empty when nothing of that kind is registered."""
    _load_providers()
    return tuple(sorted(_REGISTRY.get(kind, {})))


def kinds() -> tuple[str, ...]:
    _load_providers()
    return tuple(sorted(_REGISTRY))
