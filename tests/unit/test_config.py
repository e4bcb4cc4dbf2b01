from dataclasses import dataclass, field
from typing import Literal

import pytest

from impl.common.config import ConfigError, apply_overrides, build_config, config_hash, from_dict, to_dict


@dataclass(frozen=True)
class Inner:
    top_k: int = 2
    kind: Literal["a", "b"] = "a"


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    ratio: float = 1.0
    sizes: tuple[int, ...] = (1, 2)
    inner: Inner = field(default_factory=Inner)
    maybe: int | None = None


def test_from_dict_fills_nested_and_converts():
    c = from_dict(Outer, {"ratio": 2, "sizes": [4, 8], "inner": {"kind": "b"}})
    assert c == Outer(ratio=2.0, sizes=(4, 8), inner=Inner(kind="b"))
    assert to_dict(c)["inner"] == {"top_k": 2, "kind": "b"}


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(ConfigError, match=r"inner: unknown key 'topk'; allowed: kind, top_k"):
        from_dict(Outer, {"inner": {"topk": 3}})


def test_bad_literal_names_allowed_values():
    with pytest.raises(ConfigError, match=r"inner.kind: 'c' is not allowed; allowed: 'a', 'b'"):
        from_dict(Outer, {"inner": {"kind": "c"}})


def test_bad_types():
    with pytest.raises(ConfigError, match="inner.top_k: expected an integer"):
        from_dict(Outer, {"inner": {"top_k": "two"}})
    with pytest.raises(ConfigError, match="ratio: expected a number"):
        from_dict(Outer, {"ratio": True})


def test_overrides_parse_yaml_values(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: run\ninner:\n  top_k: 4\n")
    c = build_config(Outer, p, ["inner.top_k=8", "sizes=[1, 2, 3]", "maybe=5"])
    assert (c.name, c.inner.top_k, c.sizes, c.maybe) == ("run", 8, (1, 2, 3), 5)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(Outer, tmp_path / "missing.yaml")


def test_config_hash_is_stable_and_sensitive():
    assert config_hash(Outer()) == config_hash(Outer())
    assert config_hash(Outer()) != config_hash(Outer(ratio=2.0))
