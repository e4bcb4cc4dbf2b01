"""Run records (schema, atomic writes, summaries) and the name registry."""
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from impl.common import records, registry
from impl.common.config import config_hash
from impl.common.records import (atomic_output, atomic_write_text, make_record, read_record, read_records,
                                 record_path, summarize, validate_record, write_record)
from impl.common.topology import get_topology


@dataclass(frozen=True)
class DemoConfig:
    top_k: int = 2
    tokens: int = 64


def demo_record(**changes):
    kwargs = dict(experiment="demo", system="megatron", tier="sim", topology=get_topology("2x4"),
                  model={"E": 8, "K": 2}, config=DemoConfig(), seed=3, trace_id="synthetic:uniform",
                  metrics={"time_ms": [3.0, 1.0, 2.0]}, bytes_by_level={"node": 1024, "gpu": 2048},
                  messages_by_level={"node": 2, "gpu": 6}, command=["python", "-m", "demo"])
    kwargs.update(changes)
    return make_record(**kwargs)


# ---- summarize ---------------------------------------------------------------------------------

def test_summarize_hand_computed():
    # sorted 1..5: median 3; p5 = 1 + 0.05*4*(2-1) = 1.2; p95 = 4 + 0.8*(5-4) = 4.8
    s = summarize([5, 1, 4, 2, 3])
    assert s == {"values": [5.0, 1.0, 4.0, 2.0, 3.0], "median": 3.0, "p5": pytest.approx(1.2),
                 "p95": pytest.approx(4.8), "n": 5}
    assert summarize([2.5]) == {"values": [2.5], "median": 2.5, "p5": 2.5, "p95": 2.5, "n": 1}
    two = summarize([0.0, 10.0])
    assert (two["median"], two["p5"], two["p95"]) == (5.0, pytest.approx(0.5), pytest.approx(9.5))


def test_summarize_rejects_empty_and_non_finite():
    with pytest.raises(ValueError, match="no samples"):
        summarize([])
    with pytest.raises(ValueError, match="non-finite sample nan"):
        summarize([1.0, float("nan")])
    with pytest.raises(ValueError, match="non-finite sample inf"):
        summarize([float("inf")])


# ---- record contents and schema ----------------------------------------------------------------

def test_make_record_fills_provenance():
    rec = demo_record()
    assert rec["metrics"]["time_ms"]["median"] == 2.0 and rec["metrics"]["time_ms"]["n"] == 3
    assert rec["config"] == {"top_k": 2, "tokens": 64}
    assert rec["config_hash"] == config_hash(DemoConfig())
    assert rec["topology"]["name"] == "2x4" and rec["topology"]["G"] == 8
    env = rec["env"]
    for key in ("python", "torch", "numpy", "platform", "cpu_model", "hostname", "cuda", "gpus", "env_vars"):
        assert key in env
    assert rec["timestamp"].endswith("+00:00")
    assert set(rec["git"]) == {"sha", "dirty"}
    validate_record(rec)


def test_make_record_keeps_existing_summary_and_checks_it():
    rec = demo_record(metrics={"t": summarize([1.0, 2.0])})
    assert rec["metrics"]["t"] == summarize([1.0, 2.0])
    with pytest.raises(ValueError, match="metric 't'"):
        demo_record(metrics={"t": {"median": 1.0}})


def test_env_vars_keep_comm_settings_and_drop_secrets():
    env = records._relevant_env_vars({"NCCL_IB_DISABLE": "1", "GLOO_SOCKET_IFNAME": "lo",
                                      "HOME": "/root", "NCCL_API_KEY": "x", "MASTER_PORT": "29500"})
    assert env == {"GLOO_SOCKET_IFNAME": "lo", "MASTER_PORT": "29500", "NCCL_IB_DISABLE": "1"}


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.update(tier="gpu"), r"at tier: 'gpu' is not one of \['sim', 'emu', 'cluster'\]"),
    (lambda r: r.pop("config_hash"), r"at <record>: 'config_hash' is a required property"),
    (lambda r: r.update(colour="red"), r"Additional properties are not allowed \('colour'"),
    (lambda r: r["metrics"]["time_ms"].pop("p95"), r"at metrics/time_ms: 'p95' is a required"),
    (lambda r: r.update(seed="3"), r"at seed: '3' is not of type 'integer'"),
    (lambda r: r["bytes_by_level"].update(node=-1), r"at bytes_by_level/node: -1 is less than"),
    (lambda r: r.update(timestamp="yesterday"), r"at timestamp: 'yesterday' does not match"),
])
def test_validate_record_names_offending_field(mutate, message):
    rec = demo_record()
    mutate(rec)
    with pytest.raises(ValueError, match=message):
        validate_record(rec)


def test_bad_tier_fails_before_assembly():
    with pytest.raises(ValueError, match="tier 'gpu' is not allowed; allowed: sim, emu, cluster"):
        demo_record(tier="gpu")


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_info_sha_and_dirty(tmp_path):
    assert records.git_info(tmp_path) == {"sha": None, "dirty": None}  # not a checkout

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-q", "-m", "one")
    sha = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert records.git_info(tmp_path) == {"sha": sha, "dirty": False}
    (tmp_path / "b.py").write_text("y = 2\n")  # untracked, not ignored
    assert records.git_info(tmp_path) == {"sha": sha, "dirty": True}
    (tmp_path / "b.py").unlink()
    (tmp_path / "a.py").write_text("x = 2\n")  # modified
    assert records.git_info(tmp_path)["dirty"] is True


# ---- writing and reading -----------------------------------------------------------------------

def test_write_record_round_trip_creates_parents(tmp_path):
    rec = demo_record()
    path = record_path(tmp_path / "results", "demo", "megatron", "2x4", rec["config_hash"])
    assert path == tmp_path / "results/raw/demo/megatron/2x4" / f"{rec['config_hash']}.json"
    write_record(path, rec)
    assert json.loads(path.read_text()) == rec
    assert read_records(tmp_path / "results/raw/**/*.json") == [rec]
    assert os.listdir(path.parent) == [path.name]  # no temporary file left behind


def test_write_record_refuses_invalid_and_keeps_old_file(tmp_path):
    path = tmp_path / "r.json"
    write_record(path, demo_record())
    before = path.read_text()
    bad = demo_record()
    bad["tier"] = "gpu"
    with pytest.raises(ValueError, match="at tier"):
        write_record(path, bad)
    assert path.read_text() == before


def test_atomic_output_leaves_target_untouched_on_error(tmp_path):
    target = tmp_path / "sub" / "out.csv"
    atomic_write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            assert tmp.parent == target.parent and tmp.suffix == ".csv" and tmp != target
            tmp.write_text("half-written")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.csv"]


def test_read_records_reports_the_bad_file(tmp_path):
    write_record(tmp_path / "a.json", demo_record())
    (tmp_path / "b.json").write_text(json.dumps({"experiment": "x"}))
    with pytest.raises(ValueError, match=r"b\.json: invalid record at <record>: .* is a required property"):
        read_records(tmp_path / "*.json")
    assert len(read_records(tmp_path / "*.json", validate=False)) == 2
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"c\.json: not valid JSON"):
        read_records(tmp_path / "c.json")
    assert read_records(tmp_path / "none-*.json") == []


def test_read_record_reads_the_one_path_given_never_a_glob(tmp_path):
    """A '*' in the path is part of the name: the literal file is read, not the files it would match."""
    star, other = demo_record(seed=1), demo_record(seed=2)
    write_record(tmp_path / "a*.json", star)
    write_record(tmp_path / "ab.json", other)
    assert read_record(tmp_path / "a*.json") == star
    assert read_records(tmp_path / "a*.json") == [star, other]          # the glob matches both
    with pytest.raises(FileNotFoundError):
        read_record(tmp_path / "a?.json")
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path))}: a directory"):
        read_record(tmp_path)
    (tmp_path / "b.json").write_text(json.dumps({"experiment": "x"}))
    with pytest.raises(ValueError, match=r"b\.json: invalid record at <record>"):
        read_record(tmp_path / "b.json")
    assert read_record(tmp_path / "b.json", validate=False) == {"experiment": "x"}


# ---- registry ----------------------------------------------------------------------------------

def test_registry_register_get_names():
    @registry.register("test-kind-a", "beta")
    def beta():
        return "b"

    @registry.register("test-kind-a", "alpha")
    class Alpha:
        pass

    assert registry.get("test-kind-a", "beta") is beta and registry.get("test-kind-a", "alpha") is Alpha
    assert registry.names("test-kind-a") == ("alpha", "beta")
    assert registry.names("test-kind-never-used") == ()
    assert "test-kind-a" in registry.kinds()
    registry.register("test-kind-a", "beta")(beta)  # same object again: no-op


def test_registry_errors_list_what_is_registered():
    registry.register("test-kind-b", "one")(lambda: 1)
    registry.register("test-kind-b", "two")(lambda: 2)
    with pytest.raises(registry.RegistryError, match=r"unknown test-kind-b 'three'; registered: one, two"):
        registry.get("test-kind-b", "three")
    with pytest.raises(registry.RegistryError, match=r"unknown registry kind 'test-kind-zzz'; registered kinds: .*test-kind-b"):
        registry.get("test-kind-zzz", "one")
    with pytest.raises(registry.RegistryError, match=r"test-kind-b 'one' is already registered"):
        registry.register("test-kind-b", "one")(lambda: 3)
    with pytest.raises(registry.RegistryError, match="must be a non-empty string"):
        registry.register("test-kind-b", "")
    with pytest.raises(registry.RegistryError, match="is not callable"):
        registry.register("test-kind-b", "four")(42)
