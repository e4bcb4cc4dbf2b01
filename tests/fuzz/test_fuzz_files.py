"""Hostile files for every format the suite reads: each damaged, truncated, foreign or oddly typed
file ends in the reader's own error (or, through a command line, a non-zero exit) with one short
message naming the file or key, never a traceback or a hang.

Formats: GGUF (weights, tokenizer, llama.cpp offload sizes), HF safetensors + config.json, the
engine's cost file, router traces (.npz, .jsonl), YAML configs, hardware profiles, the ScheInfer
hardware classes, run records and result CSVs. Targeted cases (the truncations and header fields
that used to escape as the gguf package's IndexError / ValueError, say) run beside generated ones:
hypothesis with a fixed seed (`derandomize`) and a bounded number of examples, so every run tries
the same inputs and the file stays fast.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import struct
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from gguf import GGUFReader
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from impl.common.config import ConfigError, build_config
from impl.common.costmodel import PROFILES_DIR, load_profile
from impl.common.records import read_records
from impl.common.traces import RoutingTrace, TraceError
from impl.experiments import layer_bench
from impl.experiments.scheinfer import __main__ as scheinfer_cli
from impl.experiments.scheinfer.sim import load_hardware
from impl.scheinfer.generate_models import generate
from impl.scheinfer.weights import GGUF_MAX_ARRAY, WeightFormatError, load_weights

pytestmark = pytest.mark.fuzz

FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=40,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------ helpers

def assert_clear(message, *names) -> None:
    """One short message (at most 3 lines), no traceback, naming one of `names` (file or key)."""
    text = str(message).strip()
    assert 1 <= len(text.splitlines()) <= 3, text
    assert "Traceback" not in text, text
    assert any(str(n) in text for n in names), f"{text!r} names none of {names}"


def run_main(main, argv: list[str], capsys) -> tuple[int, str]:
    """A command line's main(argv) in this process: (exit status, stderr)."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def put(raw: bytes, at: int, fmt: str, value) -> bytes:
    """`raw` with struct `fmt` of `value` written at byte `at`."""
    packed = struct.pack(fmt, value)
    return raw[:at] + packed + raw[at + len(packed):]


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)


def mutate_mapping(data, draw, values=JSON) -> dict:
    """A copy of a nested mapping with one to three keys (at any depth) replaced by a generated
    value, deleted, or added."""
    out = json.loads(json.dumps(data))
    for _ in range(draw(st.integers(1, 3))):
        node = out
        while True:
            keys = sorted(node, key=str)
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            if isinstance(node[key], dict) and draw(st.booleans()):
                node = node[key]
                continue
            break
        action = draw(st.sampled_from(("replace", "delete", "add")))
        if action == "add" or not keys:
            node[draw(st.text(min_size=1, max_size=8))] = draw(values)
        elif action == "delete":
            del node[key]
        else:
            node[key] = draw(values)
    return out


# ------------------------------------------------------------------------------------ GGUF

class GGUFMap:
    """Where a GGUF file's header fields are, to damage them one at a time."""

    def __init__(self, path: Path):
        self.raw = path.read_bytes()
        reader = GGUFReader(path, "r")
        self.data_start = reader.data_offset
        self.key_at = {k: f.offset for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        self.tensor_at = {t.name: t.field.offset for t in reader.tensors}
        self.n_dims = {t.name: len(t.shape) for t in reader.tensors}

    def type_at(self, key: str) -> int:
        """Byte of metadata `key`'s value type."""
        return self.key_at[key] + 8 + len(key.encode())

    def value_at(self, key: str) -> int:
        return self.type_at(key) + 4

    def tensor_field(self, name: str, part: str) -> int:
        """Byte of a tensor-info part: 'n_dims', 'dim0', 'type' or 'offset'."""
        n_dims_at = self.tensor_at[name] + 8 + len(name.encode())
        return {"n_dims": n_dims_at, "dim0": n_dims_at + 4, "type": n_dims_at + 4 + 8 * self.n_dims[name],
                "offset": n_dims_at + 8 + 8 * self.n_dims[name]}[part]

    def same_length_pair(self, names) -> tuple[str, str]:
        by_length = defaultdict(list)
        for n in names:
            by_length[len(n)].append(n)
        return next(sorted(v)[:2] for _, v in sorted(by_length.items()) if len(v) > 1)

    def rename(self, at: int, new: str) -> bytes:
        return self.raw[:at + 8] + new.encode() + self.raw[at + 8 + len(new.encode()):]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> tuple[Path, GGUFMap]:
    path = generate("mixtral", tmp_path_factory.mktemp("gguf") / "good.gguf", dtype="f32", seed=0)
    m = GGUFMap(path)
    last = max(GGUFReader(path, "r").tensors, key=lambda t: t.data_offset)
    assert last.data_offset + last.n_bytes == len(m.raw), "the last tensor must end the file (truncations below)"
    return path, m


def _swap_key(m: GGUFMap) -> bytes:
    a, b = m.same_length_pair(m.key_at)
    return m.rename(m.key_at[b], a)


def _swap_tensor(m: GGUFMap) -> bytes:
    a, b = m.same_length_pair(m.tensor_at)
    return m.rename(m.tensor_at[b], a)


# The cases that printed a 20-34 line traceback from both CLIs before the file was checked on open.
GGUF_CLI_CASES = {
    "empty": lambda m: b"",
    "text": lambda m: b"this is a text file, not a model\n" * 4,
    "cut-3kB": lambda m: m.raw[:3000],
    "cut-100kB": lambda m: m.raw[:100_000],
    "tail-cut": lambda m: m.raw[:-100],
}
GGUF_CASES = {
    **GGUF_CLI_CASES,
    "magic-only": lambda m: m.raw[:4],
    "header-only": lambda m: m.raw[:24],
    "metadata-only": lambda m: m.raw[:m.data_start],
    "version-99": lambda m: put(m.raw, 4, "<I", 99),
    "kv-count-2^63": lambda m: put(m.raw, 16, "<Q", 2**63),
    "tensor-count-2^40": lambda m: put(m.raw, 8, "<Q", 2**40),
    "tensor-count-0": lambda m: put(m.raw, 8, "<Q", 0),
    "value-type-99": lambda m: put(m.raw, m.type_at("general.name"), "<I", 99),
    "array-length-2^40": lambda m: put(m.raw, m.value_at("tokenizer.ggml.tokens") + 4, "<Q", 2**40),
    "array-length-over-cap": lambda m: put(m.raw, m.value_at("tokenizer.ggml.token_type") + 4, "<Q",
                                           GGUF_MAX_ARRAY + 1),
    "array-length-past-end": lambda m: put(m.raw, m.value_at("tokenizer.ggml.token_type") + 4, "<Q", 2**20),
    "nested-array": lambda m: put(m.raw, m.value_at("tokenizer.ggml.tokens"), "<I", 9),
    "key-not-utf8": lambda m: put(m.raw, m.key_at["general.name"] + 8, "B", 0xFF),
    "duplicate-key": _swap_key,
    "duplicate-tensor": _swap_tensor,
    "tensor-type-200": lambda m: put(m.raw, m.tensor_field("token_embd.weight", "type"), "<I", 200),
    "tensor-quantised": lambda m: put(m.raw, m.tensor_field("token_embd.weight", "type"), "<I", 8),
    "tensor-7-dims": lambda m: put(m.raw, m.tensor_field("token_embd.weight", "n_dims"), "<I", 7),
    "tensor-0-dims": lambda m: put(m.raw, m.tensor_field("token_embd.weight", "n_dims"), "<I", 0),
    "tensor-dim-2^40": lambda m: put(m.raw, m.tensor_field("token_embd.weight", "dim0"), "<Q", 2**40),
    "tensor-offset-misaligned": lambda m: put(m.raw, m.tensor_field("output.weight", "offset"), "<Q", 33),
    "tensor-offset-past-end": lambda m: put(m.raw, m.tensor_field("output.weight", "offset"), "<Q", 2**40),
    "block-count-10^9": lambda m: put(m.raw, m.value_at("llama.block_count"), "<I", 10**9),
    "expert-count-10^6": lambda m: put(m.raw, m.value_at("llama.expert_count"), "<I", 10**6),
    "embedding-length-0": lambda m: put(m.raw, m.value_at("llama.embedding_length"), "<I", 0),
    "head-count-0": lambda m: put(m.raw, m.value_at("llama.attention.head_count"), "<I", 0),
    "block-count-a-float": lambda m: put(m.raw, m.type_at("llama.block_count"), "<I", 6),
    "eps-nan": lambda m: put(m.raw, m.value_at("llama.attention.layer_norm_rms_epsilon"), "<f", float("nan")),
}


@pytest.mark.parametrize("case", GGUF_CASES)
def test_damaged_gguf_is_refused_naming_the_file(gguf, tmp_path, case):
    _, m = gguf
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(GGUF_CASES[case](m))
    with pytest.raises(WeightFormatError) as e:
        load_weights(path)
    assert_clear(e.value, path)


def _scheinfer_argv(cmd: str, model: Path, out: Path, *extra: str) -> list[str]:
    if cmd == "bench":
        return ["bench", "--model", str(model), "--out-csv", str(out / "b.csv"), "--out-record", str(out / "b.json"),
                "--no-progress", *extra]
    return ["generate", "--model", str(model), "--n-predict", "1", "--no-progress", *(extra or ("--tokens", "1,2"))]


@pytest.mark.parametrize("cmd", ["generate", "generate --prompt", "bench"])
@pytest.mark.parametrize("case", GGUF_CLI_CASES)
def test_scheinfer_cli_refuses_a_damaged_gguf_in_one_line(gguf, tmp_path, capsys, cmd, case):
    _, m = gguf
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(GGUF_CLI_CASES[case](m))
    extra = ("--prompt", "hello") if cmd.endswith("--prompt") else ()
    rc, err = run_main(scheinfer_cli.main, _scheinfer_argv(cmd.split()[0], path, tmp_path, *extra), capsys)
    assert rc not in (0, None)
    assert_clear(err, path)
    assert not (tmp_path / "b.csv").exists() and not (tmp_path / "b.json").exists()


@FUZZ
@given(data=st.data())
def test_any_truncation_of_a_gguf_is_refused(gguf, tmp_path, data):
    _, m = gguf
    cut = data.draw(st.integers(0, len(m.raw) - 1), label="cut")
    path = tmp_path / "cut.gguf"
    path.write_bytes(m.raw[:cut])
    with pytest.raises(WeightFormatError) as e:
        load_weights(path)
    assert_clear(e.value, path)


@FUZZ
@given(data=st.data())
def test_header_byte_flips_load_or_are_refused(gguf, tmp_path, data):
    """Overwritten header bytes (metadata and tensor table): the file loads (a changed token string,
    say) or is refused with the reader's error; nothing else escapes and nothing hangs."""
    _, m = gguf
    edits = data.draw(st.lists(st.tuples(st.integers(0, m.data_start - 1), st.integers(0, 255)),
                               min_size=1, max_size=6), label="edits")
    raw = bytearray(m.raw)
    for at, value in edits:
        raw[at] = value
    path = tmp_path / "flipped.gguf"
    path.write_bytes(bytes(raw))
    try:
        load_weights(path)
    except WeightFormatError as e:
        assert_clear(e, path)


def _structural_fields(m: GGUFMap) -> list[tuple[int, str]]:
    """(byte, struct format) of every count, length, type and offset in the header."""
    out = [(8, "<Q"), (16, "<Q")]
    for key in m.key_at:
        out += [(m.key_at[key], "<Q"), (m.type_at(key), "<I")]
        if key.startswith("tokenizer.ggml.") and key[15:] in ("tokens", "scores", "token_type"):
            out += [(m.value_at(key), "<I"), (m.value_at(key) + 4, "<Q")]
        elif key.startswith("llama."):
            out.append((m.value_at(key), "<I"))
    for name in m.tensor_at:
        out += [(m.tensor_at[name], "<Q")] + [(m.tensor_field(name, p), "<I" if p in ("n_dims", "type") else "<Q")
                                            for p in ("n_dims", "dim0", "type", "offset")]
    return out


@FUZZ
@given(data=st.data())
def test_header_counts_lengths_and_offsets_set_to_any_value_load_or_are_refused(gguf, tmp_path, data):
    """A count, length, type or offset of the header set to any value (small, large, near the
    integer's limit): the file loads or is refused with the reader's error, quickly."""
    _, m = gguf
    at, fmt = data.draw(st.sampled_from(_structural_fields(m)), label="field")
    bits = 8 * struct.calcsize(fmt)
    value = data.draw(st.integers(0, 64) | st.integers(0, 2**bits - 1) | st.sampled_from([2**bits - 1, 2**(bits - 1)]),
                      label="value")
    path = tmp_path / "field.gguf"
    path.write_bytes(put(m.raw, at, fmt, value))
    try:
        load_weights(path)
    except WeightFormatError as e:
        assert_clear(e, path)


@FUZZ
@given(tail=st.binary(max_size=400))
def test_random_bytes_after_a_gguf_magic_are_refused(tmp_path, tail):
    path = tmp_path / "random.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + tail)
    with pytest.raises(WeightFormatError) as e:
        load_weights(path)
    assert_clear(e.value, path)


def test_llamacpp_offload_sizes_refuse_a_damaged_gguf(gguf, tmp_path):
    from baselines.llamacpp.runner import LlamaCppSettings, gpu_weight_bytes
    _, m = gguf
    path = tmp_path / "cut.gguf"
    path.write_bytes(m.raw[:3000])
    with pytest.raises(WeightFormatError) as e:
        gpu_weight_bytes(path, LlamaCppSettings())
    assert_clear(e.value, path)


# ------------------------------------------------------------------------------------ cost file

COST_CASES = {
    "not-json": b"{", "not-utf8": b"\xff\xfe\x00", "a-list": b"[1, 2]", "empty-object": b"{}",
    "rows-a-string": json.dumps({"cost": {"cpu": {"rows": "abc", "s_per_mac": [1], "alpha_s": 0}}}).encode(),
    "h2d-negative": json.dumps({"cpu": {"rows": [1], "s_per_mac": [1e-9], "alpha_s": 0},
                                "gpu": {"rows": [1], "s_per_mac": [1e-9], "alpha_s": 0},
                                "h2d_bytes_per_s": -1}).encode(),
}


@pytest.mark.parametrize("case", COST_CASES)
def test_scheinfer_cli_refuses_a_bad_cost_file_before_reading_weights(gguf, tmp_path, capsys, case):
    model, _ = gguf
    cost = tmp_path / "cost.json"
    cost.write_bytes(COST_CASES[case])
    rc, err = run_main(scheinfer_cli.main, _scheinfer_argv("generate", model, tmp_path, "--tokens", "1",
                                                           "--cost", str(cost)), capsys)
    assert rc == 2
    assert_clear(err, cost)


# ------------------------------------------------------------------------------------ safetensors

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return generate("mixtral", tmp_path_factory.mktemp("hf") / "ckpt", dtype="f32", seed=0)


def _checkpoint_with(base: Path, where: Path, *, config: bytes | None = None, tensors: bytes | None = None) -> Path:
    """A checkpoint directory at `where`: `base`'s files, config.json and/or the safetensors file replaced."""
    where.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        target = where / f.name
        if target.exists():
            target.unlink()
        if f.name == "config.json" and config is not None:
            target.write_bytes(config)
        elif f.suffix == ".safetensors" and tensors is not None:
            target.write_bytes(tensors)
        else:
            os.symlink(f, target)
    return where


def _split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join_safetensors(header, data: bytes) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def _first_tensor(header: dict) -> str:
    return sorted(k for k in header if k != "__metadata__")[0]


def _edit_first(field, value):
    def edit(raw):
        header, data = _split_safetensors(raw)
        header[_first_tensor(header)][field] = value
        return _join_safetensors(header, data)
    return edit


SAFETENSORS_CASES = {
    "empty": lambda raw: b"",
    "header-too-small": lambda raw: raw[:5],
    "header-length-past-end": lambda raw: put(raw, 0, "<Q", 10**12),
    "header-length-just-past-end": lambda raw: put(raw, 0, "<Q", len(raw)),
    "header-bad-json": lambda raw: _join_safetensors(b"{" + b" " * 15, _split_safetensors(raw)[1]),
    "header-not-object": lambda raw: _join_safetensors(b"[1, 2]  ", _split_safetensors(raw)[1]),
    "cut-in-half": lambda raw: raw[:len(raw) // 2],
    "dtype-unknown": _edit_first("dtype", "XX"),
    "dtype-int32": _edit_first("dtype", "I32"),
    "shape-vs-bytes": _edit_first("shape", [1000, 64]),
    "shape-vs-config": lambda raw: _edit_first("shape", list(reversed(
        _split_safetensors(raw)[0][_first_tensor(_split_safetensors(raw)[0])]["shape"])))(raw),
    "offsets-past-end": _edit_first("data_offsets", [0, 10**9]),
}


@pytest.mark.parametrize("case", SAFETENSORS_CASES)
def test_damaged_safetensors_is_refused_naming_the_file(checkpoint, tmp_path, case):
    raw = next(checkpoint.glob("*.safetensors")).read_bytes()
    where = _checkpoint_with(checkpoint, tmp_path / "ckpt", tensors=SAFETENSORS_CASES[case](raw))
    with pytest.raises(WeightFormatError) as e:
        load_weights(where)
    assert_clear(e.value, where)


def _config_edit(**changes):
    def edit(cfg):
        cfg = dict(cfg)
        for k, v in changes.items():
            if v is _DROP:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        return json.dumps(cfg).encode()
    return edit


_DROP = object()
CONFIG_CASES = {
    "not-json": (lambda cfg: b"{", "config.json"),
    "not-utf8": (lambda cfg: b"\xff\xfe{}", "config.json"),
    "a-list": (lambda cfg: b"[]", "config.json"),
    "a-string": (lambda cfg: b'"MixtralForCausalLM"', "config.json"),
    "architectures-odd": (_config_edit(architectures=[{"a": 1}]), "architectures"),
    **{f"missing-{k}": (_config_edit(**{k: _DROP}), k)
       for k in ("hidden_size", "num_attention_heads", "vocab_size", "num_hidden_layers", "num_local_experts",
                 "num_experts_per_tok", "intermediate_size")},
    "hidden-a-string": (_config_edit(hidden_size="64"), "hidden_size"),
    "hidden-fractional": (_config_edit(hidden_size=64.5), "hidden_size"),
    "heads-0": (_config_edit(num_attention_heads=0), "num_heads"),
    "layers-negative": (_config_edit(num_hidden_layers=-1), "num_layers"),
    "layers-10^9": (_config_edit(num_hidden_layers=10**9), "layers"),
    "experts-10^6": (_config_edit(num_local_experts=10**6), "experts"),
    "top-k-above-experts": (_config_edit(num_experts_per_tok=99), "top_k"),
    "tie-a-string": (_config_edit(tie_word_embeddings="yes"), "tie_word_embeddings"),
    "eos-empty-list": (_config_edit(eos_token_id=[]), "config.json"),
    "eos-a-string": (_config_edit(eos_token_id=["x"]), "eos_token_id"),
    "eps-a-string": (_config_edit(rms_norm_eps="small"), "rms_norm_eps"),
    "eps-nan": (_config_edit(rms_norm_eps=float("nan")), "rms_norm_eps"),
    "rope-scaling-a-string": (_config_edit(rope_scaling="linear"), "rope_scaling"),
    "rope-scaling-linear": (_config_edit(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_json_is_refused_naming_the_key(checkpoint, tmp_path, case):
    edit, name = CONFIG_CASES[case]
    cfg = json.loads((checkpoint / "config.json").read_text())
    where = _checkpoint_with(checkpoint, tmp_path / "ckpt", config=edit(cfg))
    try:
        load_weights(where)
    except WeightFormatError as e:
        assert_clear(e, where / "config.json", name)
        assert name in str(e) or "config.json" in str(e)
    else:
        assert case == "eos-empty-list", "an empty eos list is read as no eos token; every other case is refused"


def test_generate_refuses_a_bad_config_json_in_one_line(checkpoint, tmp_path, capsys):
    cfg = json.loads((checkpoint / "config.json").read_text())
    where = _checkpoint_with(checkpoint, tmp_path / "ckpt", config=_config_edit(hidden_size="big")(cfg))
    rc, err = run_main(scheinfer_cli.main, _scheinfer_argv("generate", where, tmp_path), capsys)
    assert rc == 2
    assert_clear(err, "hidden_size")


@FUZZ
@given(data=st.data())
def test_generated_config_json_loads_or_is_refused(checkpoint, tmp_path, data):
    cfg = json.loads((checkpoint / "config.json").read_text())
    mutated = mutate_mapping(cfg, data.draw)
    where = _checkpoint_with(checkpoint, tmp_path / "ckpt", config=json.dumps(mutated).encode())
    try:
        load_weights(where)
    except WeightFormatError as e:
        assert_clear(e, where)


TENSOR_ENTRY = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "I32", "BOOL", "XX"]) | JSON,
    "shape": st.lists(st.integers(-2, 600), max_size=3) | JSON,
    "data_offsets": st.lists(st.integers(-1, 2**20), min_size=2, max_size=2) | JSON,
})


@FUZZ
@given(header=st.dictionaries(st.sampled_from(["lm_head.weight", "model.norm.weight", "__metadata__", "x"]),
                              TENSOR_ENTRY | JSON, max_size=3),
       data=st.binary(max_size=256))
def test_generated_safetensors_headers_are_refused(checkpoint, tmp_path, header, data):
    where = _checkpoint_with(checkpoint, tmp_path / "ckpt", tensors=_join_safetensors(header, data))
    with pytest.raises(WeightFormatError) as e:
        load_weights(where)
    assert_clear(e.value, where)


# ------------------------------------------------------------------------------------ router traces

def _trace_arrays(T: int = 6, K: int = 2, E: int = 4) -> dict:
    header = {"format": "moe-routing-trace", "version": 1, "num_experts": E, "top_k": K, "source": {}}
    ids = np.stack([np.arange(T) % E, (np.arange(T) + 1) % E], 1).astype(np.int32)
    return {"step_T": np.zeros(T, np.int32), "layer_T": np.zeros(T, np.int32),
            "rank_T": np.arange(T, dtype=np.int32) % 2,
            "topk_ids_TK": ids, "topk_weights_TK": np.full((T, K), 0.5, np.float32),
            "header": np.array(json.dumps(header))}


def _npz(arrays: dict, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays) if not allow_pickle else np.savez(buf, **arrays)
    return buf.getvalue()


def _with(**changes) -> bytes:
    arrays = _trace_arrays()
    for k, v in changes.items():
        if v is _DROP:
            arrays.pop(k, None)
        else:
            arrays[k] = v
    return _npz(arrays)


def _header(**changes) -> np.ndarray:
    h = json.loads(str(_trace_arrays()["header"]))
    h.update(changes)
    return np.array(json.dumps(h))


def _corrupt_member() -> bytes:
    """A valid archive whose topk_ids_TK member has damaged compressed bytes (its CRC fails)."""
    raw = bytearray(_npz(_trace_arrays()))
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as z:
        info = z.getinfo("topk_ids_TK.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    for i in range(start + 2, start + info.compress_size - 2):
        raw[i] ^= 0x5A
    return bytes(raw)


def _zip_of_text() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.txt", "hello")
    return buf.getvalue()


NPZ_CASES = {
    "empty": lambda: b"",
    "not-a-zip": lambda: b"PK but not really a zip file",
    "zip-of-text": lambda: _zip_of_text(),
    "cut-in-half": lambda: (lambda raw: raw[:len(raw) // 2])(_npz(_trace_arrays())),
    "corrupt-member": _corrupt_member,
    "missing-array": lambda: _with(rank_T=_DROP),
    "missing-header": lambda: _with(header=_DROP),
    "unknown-array": lambda: _with(extra=np.zeros(3)),
    "ids-int64": lambda: _with(topk_ids_TK=np.zeros((6, 2), np.int64)),
    "ids-1d": lambda: _with(topk_ids_TK=np.zeros(6, np.int32)),
    "ids-out-of-range": lambda: _with(topk_ids_TK=np.full((6, 2), 9, np.int32)),
    "step-wrong-length": lambda: _with(step_T=np.zeros(2, np.int32)),
    "weights-float64": lambda: _with(topk_weights_TK=np.zeros((6, 2))),
    "weights-nan": lambda: _with(topk_weights_TK=np.full((6, 2), np.nan, np.float32)),
    "object-array": lambda: _npz({**_trace_arrays(), "step_T": np.array([{"a": 1}] * 6, dtype=object)}, True),
    "header-not-json": lambda: _with(header=np.array("{not json")),
    "header-a-number": lambda: _with(header=np.array(5)),
    "header-not-object": lambda: _with(header=np.array("[1, 2]")),
    "header-other-format": lambda: _with(header=_header(format="other")),
    "header-version-9": lambda: _with(header=_header(version=9)),
    "header-top-k-a-string": lambda: _with(header=_header(top_k="2")),
    "header-num-experts-0": lambda: _with(header=_header(num_experts=0)),
    "header-num-experts-a-string": lambda: _with(header=_header(num_experts="4")),
    "header-source-a-list": lambda: _with(header=_header(source=[1])),
}


@pytest.mark.parametrize("case", NPZ_CASES)
def test_damaged_npz_trace_is_refused_naming_the_file(tmp_path, case):
    path = tmp_path / f"{case}.npz"
    path.write_bytes(NPZ_CASES[case]())
    with pytest.raises(TraceError) as e:
        RoutingTrace.load(path)
    assert_clear(e.value, path)


def test_plan_cli_refuses_a_damaged_trace_in_one_line(tmp_path, capsys):
    from impl.hiermoe import plan
    path = tmp_path / "t.npz"
    path.write_bytes(NPZ_CASES["corrupt-member"]())
    rc, err = run_main(plan.main, ["--topology", "2x2", "--trace", str(path)], capsys)
    assert rc == 2
    assert_clear(err, path)


ARRAY = st.builds(
    lambda dtype, shape, fill: np.full(shape, fill).astype(dtype),
    st.sampled_from([np.int32, np.int64, np.float32, np.float64, np.bool_, np.uint8]),
    st.lists(st.integers(0, 4), max_size=3).map(tuple), st.integers(-3, 9))


@FUZZ
@given(changes=st.dictionaries(
    st.sampled_from(["step_T", "layer_T", "rank_T", "topk_ids_TK", "topk_weights_TK", "header", "other"]),
    ARRAY | JSON.map(lambda v: np.array(json.dumps(v))) | st.just(_DROP), max_size=3))
def test_generated_npz_traces_load_or_are_refused(tmp_path, changes):
    path = tmp_path / "gen.npz"
    path.write_bytes(_with(**changes))
    try:
        RoutingTrace.load(path)
    except TraceError as e:
        assert_clear(e, path)


JSONL_RECORD = st.fixed_dictionaries(
    {}, optional={"step": JSON | st.integers(-1, 3), "layer": JSON | st.integers(0, 3), "rank": st.integers(0, 3) | JSON,
                  "top_indices": st.lists(st.lists(st.integers(-2, 5), min_size=2, max_size=2), max_size=3) | JSON,
                  "top_weights": JSON, "num_tokens": JSON, "topk": JSON, "num_experts": st.integers(0, 6) | JSON,
                  "block": st.sampled_from(["decoder", "mtp"]), "mtp_idx": JSON})


@FUZZ
@given(lines=st.lists(JSONL_RECORD.map(json.dumps) | JSON.map(json.dumps) | st.binary(max_size=12).map(
    lambda b: b.decode("latin-1")), max_size=4))
def test_generated_jsonl_traces_load_or_are_refused(tmp_path, lines):
    path = tmp_path / "gen.jsonl"
    path.write_bytes("\n".join(lines).encode("latin-1", "replace") if lines else b"")
    try:
        RoutingTrace.load(path)
    except TraceError as e:
        assert_clear(e, path)


def test_a_binary_jsonl_trace_is_refused(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b"\xff\xfe\x00garbage\n")
    with pytest.raises(TraceError) as e:
        RoutingTrace.load(path)
    assert_clear(e.value, path)


# ------------------------------------------------------------------------------------ YAML configs

YAML_CASES = {
    "malformed": ("model: [1, 2\n", "line"),
    "tab": ("model:\t- x\n", "line"),
    "a-list": ("- 1\n- 2\n", "mapping"),
    "a-scalar": ("hello\n", "mapping"),
    "not-utf8": (b"model: \xff\xfe\n", "utf-8"),
    "deep-nesting": ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
    "unknown-key": ("nosuchkey: 1\n", "nosuchkey"),
    "mixed-key-types": ("1: 2\nfoo: 3\n", "unknown key"),
    "a-date": ("model: 2020-01-01\n", "model"),
    "binary": ("model: !!binary aGVsbG8=\n", "model"),
    "a-set": ("model: !!set {a, b}\n", "model"),
    "python-tag": ("model: !!python/object:os.system ls\n", "python/object"),
    "section-a-list": ("routing: [1, 2]\n", "routing"),
    "wrong-type": ("repeats: many\n", "repeats"),
    "bool-for-int": ("repeats: true\n", "repeats"),
}


@pytest.mark.parametrize("case", YAML_CASES)
def test_layer_bench_refuses_a_bad_config_file_in_one_line(tmp_path, capsys, case):
    text, name = YAML_CASES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    rc, err = run_main(layer_bench.main, ["--config", str(path)], capsys)
    assert rc == 2
    assert_clear(err, path, name)


YAML_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats() | st.text(max_size=8)
    | st.sampled_from(["2x2", "flat", "hd2", "deepseek-v3-tiny", "emu", "sim", "zipf", "gate"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=5)


@FUZZ
@given(data=st.data())
def test_generated_layer_bench_configs_resolve_or_are_refused(tmp_path, data):
    """Generated YAML (valid and not, known keys with odd values, unknown keys): building and
    checking the config succeeds or raises ConfigError naming the file or a key; no run starts."""
    from dataclasses import fields
    keys = [f.name for f in fields(layer_bench.LayerBenchConfig)]
    mapping = data.draw(st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), YAML_VALUE, max_size=4))
    text = data.draw(st.sampled_from(["mapping", "raw"]))
    body = yaml.safe_dump(mapping) if text == "mapping" else data.draw(st.text(max_size=60))
    path = tmp_path / "gen.yaml"
    path.write_text(body)
    try:
        layer_bench.validate(build_config(layer_bench.LayerBenchConfig, path), with_profile=True)
    except ConfigError as e:
        assert_clear(e, path, *mapping, *keys, "LayerBenchConfig")


# ------------------------------------------------------------------------------------ hardware profiles

PROFILE_CASES = {
    "malformed": "name: [x\n",
    "a-list": "- 1\n",
    "empty": "",
    "not-utf8": b"\xff\xfe",
    "deep-nesting": "a: " + "[" * 5000 + "]" * 5000 + "\n",
    "comm-a-list": "name: x\ntopology: 2x2\nsource: s\ncomm: [1]\n",
    "compute-a-number": "name: x\ntopology: 2x2\nsource: s\ncompute: 5\n",
    "provenance-a-string": "name: x\ntopology: 2x2\nsource: s\nprovenance: abc\n",
    "measurements-a-list": "name: x\ntopology: 2x2\nsource: s\nmeasurements: [1, 2]\n",
    "name-a-list": "name: [1]\ntopology: 2x2\nsource: s\n",
    "topology-unknown": "name: x\ntopology: nope\nsource: s\n",
    "model-a-list": "name: x\ntopology: 2x2\nsource: s\ncomm: {a2a: {flat: [1, 2]}}\n",
    "alpha-a-string": "name: x\ntopology: 2x2\nsource: s\ncomm: {a2a: {flat: {alpha: x, beta: 1}}}\n",
    "int-keys": "name: x\ntopology: 2x2\nsource: s\ncomm: {a2a: {flat: {1: 2, alpha: 1, beta: 1}}}\n",
    "published-a-list": "name: x\ntopology: 2x2\nsource: s\ncomm: {a2a: {flat: {alpha: 1, beta: 1, published: [1]}}}\n",
    "no-a2a-models": "name: x\ntopology: 2x2\nsource: s\n",
}


@pytest.mark.parametrize("case", PROFILE_CASES)
def test_layer_bench_refuses_a_bad_profile_file_in_one_line(tmp_path, capsys, case):
    text = PROFILE_CASES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    rc, err = run_main(layer_bench.main, ["--set", "system=hierd", "--set", "topology=2x2",
                                          "--set", f"profile={path}"], capsys)
    assert rc == 2
    assert_clear(err, path, "profile")


@FUZZ
@given(data=st.data())
def test_generated_profiles_load_or_are_refused(tmp_path, data):
    base = yaml.safe_load((PROFILES_DIR / "hiermoe-node.yaml").read_text())
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(mutate_mapping(base, data.draw, YAML_VALUE)))
    try:
        load_profile(path)
    except ValueError as e:
        assert_clear(e, path, "profile")


HARDWARE_OK = {"gpu_mem_bytes": 8e9, "gpu_reserve_bytes": 1e9, "gpu_flops": 1e13, "gpu_bytes_per_s": 5e11,
               "cpu_flops": 1e12, "cpu_bytes_per_s": 1e11, "h2d_bytes_per_s": 2.5e10}


@pytest.mark.parametrize("text", ["a: [1\n", "- 1\n", "hello\n", b"\xff", "x: 5\n", "x: {gpu_flops: fast}\n",
                                  "1: {}\n2: {a: 1}\n"], ids=["malformed", "a-list", "a-scalar", "not-utf8",
                                                            "class-a-number", "value-a-string", "int-names"])
def test_bad_scheinfer_hardware_file_is_refused_naming_it(tmp_path, text):
    path = tmp_path / "hw.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as e:
        load_hardware(path)
    assert_clear(e.value, path)


@FUZZ
@given(data=st.data())
def test_generated_scheinfer_hardware_files_load_or_are_refused(tmp_path, data):
    path = tmp_path / "hw.yaml"
    path.write_text(yaml.safe_dump(mutate_mapping({"gpu-a": HARDWARE_OK}, data.draw, YAML_VALUE)))
    try:
        load_hardware(path)
    except ConfigError as e:
        assert_clear(e, path)


# ------------------------------------------------------------------------------------ records and CSVs

@pytest.mark.parametrize("content", [b"", b"{", b"\xff\xfe\x00", b"[1, 2]", b'{"schema_version": 1}', None],
                         ids=["empty", "not-json", "not-utf8", "a-list", "not-a-record", "a-directory"])
def test_bad_run_record_is_refused_naming_the_file(tmp_path, content):
    path = tmp_path / "r.json"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        read_records(tmp_path / "*.json")
    assert_clear(e.value, path)


def _compare_results():
    spec = importlib.util.spec_from_file_location("compare_results", REPO / "workflows/scripts/compare_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00\x01", b'a,b\n1,2\n3,4,5,6\n"unterminated\n'],
                         ids=["empty", "binary", "ragged"])
def test_compare_results_names_an_unreadable_csv(tmp_path, capsys, content):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir(), new.mkdir()
    (old / "x.csv").write_text("a,b\n1,2\n")
    (new / "x.csv").write_bytes(content)
    rc = _compare_results().main([str(old), str(new)])
    out = capsys.readouterr().out
    assert rc != 0
    assert_clear(out, new / "x.csv")
