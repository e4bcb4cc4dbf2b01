"""Weights for the decoders (decoder.py, fast_decode.py): GGUF files, HF safetensors checkpoints,
and lazily generated random weights at real shapes.

Why: ScheInfer is compared with llama.cpp on GGUF files and with HF-based engines (Fiddler) on
safetensors checkpoints; both formats must give the very same model. Every source maps its tensors
to the canonical names of `config.weight_shapes` and hands them out one at a time (`load`), in
their stored dtype, so a caller decides what to keep in memory.

Sources
* `GGUFWeights(path)`: architectures 'llama' (dense LLaMA and Mixtral-style MoE), 'qwen2moe',
  'phimoe'; tensor types F32, F16, BF16 (ScheInfer serves unquantised weights; anything else is
  refused by name). The file is memory-mapped; `load` copies only the tensor (or the one expert
  of a stacked expert tensor) asked for. llama.cpp's 'llama' converter permutes the q/k rows for
  its interleaved-pair RoPE; `load` undoes it so the decoder's rotate-half RoPE applies.
* `SafetensorsWeights(dir)`: config.json + *.safetensors of LlamaForCausalLM,
  MixtralForCausalLM, Qwen2MoeForCausalLM, PhiMoEForCausalLM (also spelled PhimoeForCausalLM).
* `RandomWeights(config, seed, dtype)`: no file. Each `load(name)` regenerates that tensor from
  (seed, name), so a real-size model (Mixtral-8x7B: 93 GB in bf16) never exists in memory whole;
  together with `Decoder(cache_weights=False)` only one layer's weights live at a time. A
  tensor costs its generation time on every load; callers that reuse tensors keep them.
* `DictWeights(config, tensors)`: tensors already in memory (`materialize(source)` builds one).

Files are checked when opened, before any weight is read: a GGUF's header is walked with every
read bounds-checked (`open_gguf`: magic, version, metadata, tensor table, tensor data within the
file), a safetensors header by the safetensors library, config.json values by type, and the
layer and expert counts against the tensors present. A damaged, truncated or foreign file raises
WeightFormatError, one line naming the file and what is wrong.

Semantics kept per format: a GGUF 'phimoe' file is read with Phi-3.5-MoE's own (HF) semantics,
LayerNorm and SparseMixer routing. llama.cpp runs such a file with RMSNorm-plus-bias and softmax
top-2 routing instead (src/models/phi3.cpp), so llama.cpp and this decoder differ on it by design.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
import zlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from impl.common.config import ConfigError

from .config import DecoderConfig, LongRope, expert_weight_names, weight_shapes

__all__ = [
    "WeightFormatError", "WeightSource", "DictWeights", "RandomWeights", "GGUFWeights",
    "SafetensorsWeights", "load_weights", "materialize", "GGUF_ARCHS", "GGUF_TYPES",
    "HF_ARCHITECTURES", "gguf_arch", "gguf_tensor_ref", "gguf_metadata", "open_gguf", "gguf_field",
    "GGUF_MAX_ARRAY", "hf_tensor_name", "hf_config_dict", "config_from_hf", "permute_for_interleaved_rope",
    "unpermute_from_interleaved_rope",
]


class WeightFormatError(ValueError):
    """A weights file this module does not read; the message names what was found and what is allowed."""


TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# =========================================================================== sources

class WeightSource(ABC):
    """Canonical-name access to one model's weights (see config.weight_shapes)."""

    config: DecoderConfig

    @abstractmethod
    def load(self, name: str) -> torch.Tensor:
        """The tensor `name` in its stored dtype (float32, float16 or bfloat16), a fresh copy."""

    def names(self) -> list[str]:
        return list(weight_shapes(self.config))

    def describe(self) -> str:
        return type(self).__name__


def _check_name(cfg: DecoderConfig, name: str) -> tuple[int, ...]:
    shapes = weight_shapes(cfg)
    if name not in shapes:
        raise KeyError(f"no weight named {name!r} in this {cfg.arch} model "
                       f"(canonical names look like {next(iter(shapes))!r}, 'layers.0.attn.q.weight')")
    return shapes[name]


def _check_extent(cfg: DecoderConfig, holds: Callable[[str], bool], stored_name: Callable[[str], str],
                  n_tensors: int, where) -> None:
    """The file's header does not claim more layers or experts than the file holds: its last
    layer's and its last expert's weights are there (`holds`; `stored_name` is the file's name of a
    canonical weight). Checked before every weight name is listed, which for a damaged count (a
    billion layers) would take minutes instead of failing at once."""
    counts = f"the header gives {cfg.num_layers} layers and {cfg.num_experts} experts"
    if cfg.num_layers > n_tensors:
        raise WeightFormatError(f"{where}: {counts}, more layers than the file's {n_tensors} tensors")
    probes = [f"layers.{cfg.num_layers - 1}.attn_norm.weight"]
    first_moe = next((i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)), None)
    if first_moe is not None:
        probes.append(expert_weight_names(f"layers.{first_moe}.moe.experts.{cfg.num_experts - 1}")["gate"])
    for name in probes:
        if not holds(name):
            raise WeightFormatError(f"{where}: tensor {stored_name(name)!r} (for {name}) is missing"
                                    f"{' or holds fewer experts' if '.experts.' in name else ''}; {counts}")


class DictWeights(WeightSource):
    """Weights already in memory, by canonical name."""

    def __init__(self, config: DecoderConfig, tensors: Mapping[str, torch.Tensor]):
        self.config = config
        shapes = weight_shapes(config)
        missing = [n for n in shapes if n not in tensors]
        if missing:
            raise WeightFormatError(f"DictWeights: {len(missing)} weights missing, e.g. {missing[:3]}")
        for n, shape in shapes.items():
            if tuple(tensors[n].shape) != shape:
                raise WeightFormatError(f"DictWeights: {n} has shape {tuple(tensors[n].shape)}; expected {shape}")
        self.tensors = dict(tensors)

    def load(self, name: str) -> torch.Tensor:
        _check_name(self.config, name)
        return self.tensors[name].clone()


def materialize(source: WeightSource) -> DictWeights:
    """Every weight of `source` in memory."""
    return DictWeights(source.config, {n: source.load(n) for n in source.names()})


class RandomWeights(WeightSource):
    """Deterministic random weights at the config's shapes, generated on each load (module doc).

    Matrices ~ N(0, 1/fan_in) (unit-scale activations), embeddings ~ N(0, 1), norm weights
    1 + N(0, 0.1^2), biases N(0, 0.1^2): every tensor is non-trivial, so a wrong mapping between
    formats changes the logits."""

    def __init__(self, config: DecoderConfig | str, seed: int = 0, dtype: torch.dtype = torch.bfloat16):
        self.config = config if isinstance(config, DecoderConfig) else DecoderConfig.from_model_config(config)
        if dtype not in TORCH_DTYPES.values():
            raise WeightFormatError(f"RandomWeights: dtype {dtype} is not allowed; allowed: "
                                    + ", ".join(map(str, TORCH_DTYPES.values())))
        self.seed, self.dtype = seed, dtype

    def load(self, name: str) -> torch.Tensor:
        shape = _check_name(self.config, name)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
        x = torch.randn(shape, generator=g, dtype=torch.float32)
        if name.endswith(".bias"):
            x = 0.1 * x
        elif len(shape) == 1:                 # norm weight
            x = 1.0 + 0.1 * x
        elif name != "embed.weight":
            x = x / shape[-1] ** 0.5
        return x.to(self.dtype)

    def describe(self) -> str:
        return f"RandomWeights(arch={self.config.arch}, seed={self.seed}, dtype={self.dtype})"


# =========================================================================== GGUF

GGUF_ARCHS = ("llama", "qwen2moe", "phimoe")
GGUF_TYPES = ("F32", "F16", "BF16")
_DECODER_TO_GGUF_ARCH = {"llama": "llama", "mixtral": "llama", "qwen2_moe": "qwen2moe", "phimoe": "phimoe"}

# canonical layer-relative stem -> GGUF stem ('blk.{i}.' + stem + '.weight'/'.bias')
_GGUF_LAYER_STEMS = {
    "attn_norm": "attn_norm", "ffn_norm": "ffn_norm",
    "attn.q": "attn_q", "attn.k": "attn_k", "attn.v": "attn_v", "attn.o": "attn_output",
    "ffn.gate": "ffn_gate", "ffn.up": "ffn_up", "ffn.down": "ffn_down",
    "moe.router": "ffn_gate_inp",
    "moe.shared.gate": "ffn_gate_shexp", "moe.shared.up": "ffn_up_shexp", "moe.shared.down": "ffn_down_shexp",
    "moe.shared_gate": "ffn_gate_inp_shexp",
}
_GGUF_GLOBAL = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                "norm.bias": "output_norm.bias", "lm_head.weight": "output.weight", "lm_head.bias": "output.bias"}
_LAYER_NAME = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")
_EXPERT_STEM = re.compile(r"^moe\.experts\.(\d+)\.(gate|up|down)$")


def gguf_arch(cfg: DecoderConfig) -> str:
    return _DECODER_TO_GGUF_ARCH[cfg.arch]


def gguf_tensor_ref(cfg: DecoderConfig, name: str) -> tuple[str, int | None]:
    """(GGUF tensor name, expert index into a stacked [E, ...] tensor or None) of a canonical name.
    Experts are stacked as llama.cpp's converter writes them (blk.N.ffn_gate_exps: [E, F, M])."""
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name], None
    m = _LAYER_NAME.match(name)
    if not m:
        raise KeyError(f"{name!r} is not a canonical weight name")
    layer, stem, kind = m.groups()
    e = _EXPERT_STEM.match(stem)
    if e:
        return f"blk.{layer}.ffn_{e.group(2)}_exps.{kind}", int(e.group(1))
    return f"blk.{layer}.{_GGUF_LAYER_STEMS[stem]}.{kind}", None


def _rope_heads(cfg: DecoderConfig, name: str) -> int | None:
    """Heads whose rows llama.cpp's 'llama' converter permutes (q: H, k: G); None otherwise."""
    if gguf_arch(cfg) != "llama":
        return None                                   # qwen2moe / phimoe use NeoX (rotate-half) RoPE
    if re.match(r"^layers\.\d+\.attn\.q\.", name):
        return cfg.num_heads
    if re.match(r"^layers\.\d+\.attn\.k\.", name):
        return cfg.num_kv_heads
    return None


def permute_for_interleaved_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF (rotate-half) q/k rows -> llama.cpp's interleaved-pair order: within each head, row
    j*(D/2) + i moves to 2*i + j, so HF's pair (i, i + D/2) becomes adjacent rows (2i, 2i+1)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_from_interleaved_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of permute_for_interleaved_rope."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_keys(arch: str) -> dict[str, str]:
    return {
        "context": f"{arch}.context_length", "hidden": f"{arch}.embedding_length",
        "layers": f"{arch}.block_count", "ffn": f"{arch}.feed_forward_length",
        "heads": f"{arch}.attention.head_count", "kv_heads": f"{arch}.attention.head_count_kv",
        "key_length": f"{arch}.attention.key_length", "value_length": f"{arch}.attention.value_length",
        "eps": f"{arch}.attention.layer_norm_rms_epsilon", "rope_base": f"{arch}.rope.freq_base",
        "rope_dims": f"{arch}.rope.dimension_count", "rope_scaling": f"{arch}.rope.scaling.type",
        "experts": f"{arch}.expert_count", "top_k": f"{arch}.expert_used_count",
        "expert_ffn": f"{arch}.expert_feed_forward_length",
        "shared_ffn": f"{arch}.expert_shared_feed_forward_length",
    }


def gguf_metadata(cfg: DecoderConfig) -> dict[str, Any]:
    """The architecture key/values a GGUF writer stores for `cfg` (keys fully qualified), the
    inverse of what GGUFWeights reads. Refuses configs llama.cpp's graph for that architecture
    cannot express (it would compute a different model)."""
    arch = gguf_arch(cfg)
    k = _gguf_keys(arch)
    owner = f"GGUF '{arch}' for a {cfg.arch} model"
    if cfg.num_dense_layers and cfg.is_moe:
        raise WeightFormatError(f"{owner}: mixed dense/MoE layers (mlp_only_layers={cfg.mlp_only_layers}, "
                                f"moe_layer_freq={cfg.moe_layer_freq}) cannot be stored; allowed: every layer MoE")
    if cfg.rope_scaling is not None:
        raise WeightFormatError(f"{owner}: rope_scaling {type(cfg.rope_scaling).__name__} cannot be stored; allowed: None")
    if arch == "llama" and cfg.is_moe and (cfg.router != "softmax_topk" or not cfg.normalize_topk or cfg.shared_expert_ffn_hidden):
        raise WeightFormatError(f"{owner}: llama.cpp's 'llama' MoE is softmax top-k, renormalised, without "
                                f"shared experts; got router={cfg.router!r}, normalize_topk={cfg.normalize_topk}")
    if arch == "qwen2moe" and (cfg.normalize_topk or not cfg.shared_expert_gate):
        raise WeightFormatError(f"{owner}: llama.cpp's 'qwen2moe' has unnormalised top-k and a gated shared "
                                f"expert; got normalize_topk={cfg.normalize_topk}, shared_expert_gate={cfg.shared_expert_gate}")
    md: dict[str, Any] = {
        k["context"]: cfg.max_position_embeddings, k["hidden"]: cfg.hidden, k["layers"]: cfg.num_layers,
        k["ffn"]: cfg.ffn_hidden or cfg.moe_ffn_hidden,
        k["heads"]: cfg.num_heads, k["kv_heads"]: cfg.num_kv_heads, k["eps"]: float(cfg.norm_eps),
        k["rope_base"]: float(cfg.rope_theta), k["rope_dims"]: cfg.head_dim,
        k["key_length"]: cfg.head_dim, k["value_length"]: cfg.head_dim,
    }
    if cfg.is_moe:
        md[k["experts"]] = cfg.num_experts
        md[k["top_k"]] = cfg.top_k
        if arch != "llama":
            md[k["expert_ffn"]] = cfg.moe_ffn_hidden
        if cfg.shared_expert_ffn_hidden:
            md[k["shared_ffn"]] = cfg.shared_expert_ffn_hidden
    return md


# --------------------------------------------------------------------------- GGUF file layout

# GGUFValueType code -> struct format of a scalar (8 = string, 9 = array)
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY, _GGUF_UINT32 = 8, 9, 4
GGUF_MAX_DIMS = 4                 # ggml tensors have at most 4 dimensions
GGUF_MAX_ARRAY = 1 << 22          # entries of one metadata array: 16x the largest tokenizer vocabularies (256k)


class _GGUFScan:
    """A bounds-checked walk over a GGUF file's header: every read is checked against the file's
    size before it is made, so a damaged file ends in one WeightFormatError naming the file and
    what is wrong, never in the gguf package's IndexError / ValueError, and never in a loop over
    a count read from damaged bytes (every loop is bounded by the file's size or GGUF_MAX_ARRAY)."""

    def __init__(self, path: Path, buf):
        self.path, self.buf, self.size, self.pos, self.order = path, buf, len(buf), 0, "<"

    def fail(self, what: str) -> WeightFormatError:
        return WeightFormatError(f"{self.path}: {what}")

    def skip(self, n: int, what: str) -> int:
        """The position of `what`'s n bytes, which must lie within the file; moves past them."""
        start = self.pos
        if n > self.size - start:
            raise self.fail(f"truncated: {what} at byte {start} needs {n} bytes; the file has {self.size}")
        self.pos += n
        return start

    def take(self, n: int, what: str) -> bytes:
        start = self.skip(n, what)
        return self.buf[start:self.pos]

    def scalar(self, fmt: str, what: str):
        return struct.unpack(self.order + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("Q", f"{what} (length)")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {self.pos - n} is not UTF-8 text") from None

    def value(self, vtype: int, what: str):
        if vtype in _GGUF_SCALARS:
            return self.scalar(_GGUF_SCALARS[vtype], what)
        if vtype == _GGUF_STRING:
            return self.string(what)
        if vtype != _GGUF_ARRAY:
            raise self.fail(f"{what} has value type {vtype}; allowed: 0..12 (GGUFValueType)")
        itype = self.scalar("I", f"{what} (array type)")
        count = self.scalar("Q", f"{what} (array length)")
        if itype == _GGUF_ARRAY or (itype not in _GGUF_SCALARS and itype != _GGUF_STRING):
            raise self.fail(f"{what} is an array of type {itype}; allowed: scalars or strings")
        if count > GGUF_MAX_ARRAY:
            raise self.fail(f"{what} is an array of {count} entries; allowed: at most {GGUF_MAX_ARRAY}")
        if itype == _GGUF_STRING:
            for i in range(count):
                self.string(f"{what}[{i}]")
        else:
            self.skip(count * struct.calcsize(_GGUF_SCALARS[itype]), f"{what} ({count} values)")
        return None

    def unique_string(self, seen: set, what: str, kind: str) -> str:
        """A string that repeats none in `seen` (metadata keys, tensor names); added to it."""
        name = self.string(what)
        if name in seen:
            raise self.fail(f"{kind} {name!r} is given twice")
        seen.add(name)
        return name

    def run(self) -> None:
        """The whole check: header, metadata, tensor table, tensor data within the file."""
        from gguf.gguf_reader import READER_SUPPORTED_VERSIONS

        if self.size == 0:
            raise self.fail("the file is empty; expected a GGUF file")
        magic = self.take(4, "the GGUF magic") if self.size >= 4 else self.buf[:]
        if magic != b"GGUF":
            raise self.fail(f"not a GGUF file: it starts with {bytes(magic[:4])!r}, expected b'GGUF'")
        version = self.scalar("I", "the version")
        if version & 0xFFFF == 0:                      # written on a machine of the other byte order
            self.order = ">"
            version = struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in READER_SUPPORTED_VERSIONS:
            raise self.fail(f"GGUF version {version} is not supported; allowed: "
                            + ", ".join(map(str, READER_SUPPORTED_VERSIONS)))
        n_tensors, n_kv = self.scalar("Q", "the tensor count"), self.scalar("Q", "the key/value count")
        alignment = self.metadata(n_kv)
        tensors = self.tensor_table(n_tensors, alignment)
        data_start = -(-self.pos // alignment) * alignment
        for name, offset, nbytes in tensors:
            if data_start + offset + nbytes > self.size:
                start = data_start + offset
                raise self.fail(f"truncated: tensor {name!r} needs bytes {start}..{start + nbytes} "
                                f"(its offset and size); the file has {self.size}")

    def metadata(self, n_kv: int) -> int:
        """Walk the key/value section; the data alignment it sets (general.alignment, default 32)."""
        keys, alignment = set(), 32
        for i in range(n_kv):
            key = self.unique_string(keys, f"metadata key {i} of {n_kv}", "metadata key")
            vtype = self.scalar("I", f"metadata key {key!r} (type)")
            value = self.value(vtype, f"metadata key {key!r}")
            if key == "general.alignment":
                if vtype != _GGUF_UINT32 or value == 0 or value & (value - 1):
                    raise self.fail(f"general.alignment={value!r} is not allowed; expected a power of two (uint32)")
                alignment = value
        return alignment

    def tensor_table(self, n_tensors: int, alignment: int) -> list[tuple[str, int, int]]:
        """Walk the tensor infos: (name, data offset, bytes) of each."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        tensors, names = [], set()
        for i in range(n_tensors):
            name = self.unique_string(names, f"tensor info {i} of {n_tensors} (name)", "tensor")
            n_dims = self.scalar("I", f"tensor {name!r} (dimension count)")
            if not 1 <= n_dims <= GGUF_MAX_DIMS:
                raise self.fail(f"tensor {name!r} has {n_dims} dimensions; allowed: 1..{GGUF_MAX_DIMS}")
            dims = [self.scalar("Q", f"tensor {name!r} (dimension {d})") for d in range(n_dims)]
            raw_type = self.scalar("I", f"tensor {name!r} (type)")
            try:
                ttype = GGMLQuantizationType(raw_type)
                block, type_size = GGML_QUANT_SIZES[ttype]
            except (ValueError, KeyError):
                raise self.fail(f"tensor {name!r} has type {raw_type}, which is not a ggml type") from None
            offset = self.scalar("Q", f"tensor {name!r} (offset)")
            if offset % alignment:
                raise self.fail(f"tensor {name!r} has offset {offset}; "
                                f"expected a multiple of the alignment {alignment}")
            if dims[0] % block:
                raise self.fail(f"tensor {name!r} of type {ttype.name} has {dims[0]} columns; "
                                f"expected a multiple of its block size {block}")
            tensors.append((name, offset, math.prod(dims) // block * type_size))
        return tensors


def open_gguf(path: str | Path):
    """A `gguf.GGUFReader` on a GGUF file whose layout has been checked first (`_GGUFScan`:
    magic, version, metadata and tensor table within the file, every tensor's data within it):
    a damaged or foreign file raises WeightFormatError naming the file and what is wrong."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise WeightFormatError(f"{path}: the file is empty; expected a GGUF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _GGUFScan(path, buf).run()
    try:
        return GGUFReader(path, "r")
    except Exception as e:          # what the scan does not cover; the gguf package's own errors
        raise WeightFormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def gguf_field(reader, key: str, kind: type, default: Any = ..., where: str | Path = "GGUF") -> Any:
    """Metadata `key` of an open GGUF file as one value of `kind` (int, float or str), `default`
    when absent (WeightFormatError naming `where` and the key when absent without a default, a
    per-layer list, or of another type)."""
    f = reader.get_field(key)
    if f is None:
        if default is ...:
            raise WeightFormatError(f"{where}: GGUF metadata key {key!r} is missing")
        return default
    try:
        value = f.contents()
    except (ValueError, IndexError) as e:         # e.g. a string value that is not UTF-8
        raise WeightFormatError(f"{where}: GGUF metadata key {key!r} cannot be read ({e})") from None
    if isinstance(value, list):
        raise WeightFormatError(f"{where}: GGUF metadata key {key!r} holds a list {value[:4]}...; "
                                "allowed: one value for every layer")
    check, expected = _GGUF_KINDS[kind]
    if not check(value):
        raise WeightFormatError(f"{where}: GGUF metadata key {key!r}={value!r} is not allowed; expected {expected}")
    return value


_GGUF_KINDS = {
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a finite number"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _f32(value) -> float:
    """A GGUF float32 as the shortest decimal that rounds to it (1e-05, not 9.99999974e-06), so a
    config read from GGUF equals the one that wrote it."""
    return float(str(np.float32(value)))


class GGUFWeights(WeightSource):
    """A GGUF file (module doc)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        reader = open_gguf(self.path)
        arch = gguf_field(reader, "general.architecture", str, where=self.path)
        if arch not in GGUF_ARCHS:
            raise WeightFormatError(f"{self.path}: GGUF architecture {arch!r} is not supported; "
                                    f"allowed: {', '.join(GGUF_ARCHS)}")
        self._tensors = {t.name: t for t in reader.tensors}
        for t in reader.tensors:
            if t.tensor_type.name not in GGUF_TYPES:
                raise WeightFormatError(
                    f"{self.path}: tensor {t.name!r} has type {t.tensor_type.name}; allowed: "
                    f"{', '.join(GGUF_TYPES)} (quantised weights are not supported)")
        self.gguf_arch = arch
        self.config = self._read_config(reader, arch)
        _check_extent(self.config, self._holds, lambda n: gguf_tensor_ref(self.config, n)[0],
                      len(self._tensors), self.path)
        for name, shape in weight_shapes(self.config).items():
            got = self._shape(name)
            if got != shape:
                raise WeightFormatError(f"{self.path}: {self._ref(name)[0]} (for {name}) has shape {got}; "
                                        f"expected {shape} from the metadata")

    def _read_config(self, reader, arch: str) -> DecoderConfig:
        k = _gguf_keys(arch)
        get = lambda key, default=..., kind=int: gguf_field(reader, k[key], kind, default, self.path)  # noqa: E731
        scaling = get("rope_scaling", "none", str)
        if scaling != "none":
            raise WeightFormatError(f"{self.path}: {k['rope_scaling']}={scaling!r} is not supported; allowed: 'none'")
        for t in ("rope_factors_long.weight", "rope_factors_short.weight"):
            if t in self._tensors:
                raise WeightFormatError(f"{self.path}: tensor {t!r} (longrope) is not supported; use the "
                                        "safetensors checkpoint for long-context RoPE")
        hidden, heads = get("hidden"), get("heads")
        head_dim = get("key_length", hidden // heads if heads > 0 else 0)
        if get("value_length", head_dim) != head_dim or get("rope_dims", head_dim) != head_dim:
            raise WeightFormatError(f"{self.path}: key/value/rope dimensions "
                                    f"{get('key_length', None)}/{get('value_length', None)}/{get('rope_dims', None)} "
                                    f"differ; allowed: all equal to the head dim {head_dim}")
        num_experts = get("experts", 0)
        ffn = get("ffn", 0)
        emb = self._tensors.get("token_embd.weight")
        if emb is None or len(emb.shape) != 2:
            raise WeightFormatError(f"{self.path}: tensor 'token_embd.weight' is "
                                    + ("missing" if emb is None else f"{len(emb.shape)}-D; expected [vocab, hidden]"))
        has = lambda t: t in self._tensors  # noqa: E731
        token = lambda key: gguf_field(reader, f"tokenizer.ggml.{key}", int, None, self.path)  # noqa: E731
        kw: dict[str, Any] = dict(
            vocab_size=int(emb.shape[1]), hidden=hidden, num_layers=get("layers"), num_heads=heads,
            num_kv_heads=get("kv_heads", heads), head_dim=head_dim,
            norm_eps=_f32(get("eps", kind=float)), rope_theta=_f32(get("rope_base", 10000.0, float)),
            max_position_embeddings=get("context", 4096),
            tie_word_embeddings=not has("output.weight"), lm_head_bias=has("output.bias"),
            qkv_bias=has("blk.0.attn_q.bias"), out_proj_bias=has("blk.0.attn_output.bias"),
            bos_token_id=token("bos_token_id"), eos_token_id=token("eos_token_id"))
        if arch == "llama":
            kw.update(arch="mixtral" if num_experts else "llama", ffn_hidden=0 if num_experts else ffn,
                      num_experts=num_experts, top_k=get("top_k", 0), moe_ffn_hidden=ffn if num_experts else 0)
        elif arch == "qwen2moe":
            kw.update(arch="qwen2_moe", ffn_hidden=0, num_experts=num_experts, top_k=get("top_k"),
                      moe_ffn_hidden=get("expert_ffn"), shared_expert_ffn_hidden=get("shared_ffn", 0),
                      shared_expert_gate=has("blk.0.ffn_gate_inp_shexp.weight"), normalize_topk=False)
        else:  # phimoe
            kw.update(arch="phimoe", ffn_hidden=0, num_experts=num_experts, top_k=get("top_k"),
                      moe_ffn_hidden=ffn, router="sparsemixer", norm_kind="layernorm")
        try:
            return DecoderConfig(**kw)
        except ConfigError as e:
            raise WeightFormatError(f"{self.path}: the metadata gives {e}") from None

    def _holds(self, name: str) -> bool:
        """Whether the file has a tensor for canonical weight `name` (an expert's: its stacked tensor
        with enough experts), without listing every weight name first (as _ref does)."""
        tname, expert = gguf_tensor_ref(self.config, name)
        t = self._tensors.get(tname)
        return t is not None and (expert is None or (len(t.shape) == 3 and expert < int(t.shape[-1])))

    def _ref(self, name: str) -> tuple[str, int | None]:
        _check_name(self.config, name)
        return gguf_tensor_ref(self.config, name)

    def _tensor(self, name: str):
        tname, expert = self._ref(name)
        t = self._tensors.get(tname)
        if t is None:
            raise WeightFormatError(f"{self.path}: tensor {tname!r} (for {name}) is missing")
        return t, expert

    def _shape(self, name: str) -> tuple[int, ...]:
        t, expert = self._tensor(name)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if expert is not None:
            if expert >= shape[0]:
                raise WeightFormatError(f"{self.path}: {t.name} holds {shape[0]} experts; {name} needs {expert + 1}")
            shape = shape[1:]
        if name.endswith("moe.shared_gate.weight") and len(shape) == 1:
            shape = (1, *shape)                       # llama.cpp stores the shared gate as a vector
        return shape

    def load(self, name: str) -> torch.Tensor:
        t, expert = self._tensor(name)
        data = np.ascontiguousarray(t.data if expert is None else t.data[expert])
        if t.tensor_type.name == "BF16":          # the reader exposes BF16 as raw bytes
            x = torch.from_numpy(data.view(np.int16).copy()).view(torch.bfloat16)
        else:
            x = torch.from_numpy(data.copy())
        x = x.reshape(self._shape(name))
        heads = _rope_heads(self.config, name)
        return unpermute_from_interleaved_rope(x, heads).contiguous() if heads else x

    def describe(self) -> str:
        return f"GGUF {self.path} (arch {self.gguf_arch})"


# =========================================================================== HF safetensors

HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
    "PhiMoEForCausalLM": "phimoe", "PhimoeForCausalLM": "phimoe",
}
_HF_MODEL_TYPE = {"llama": "llama", "mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "phimoe": "phimoe"}
_HF_ARCH_NAME = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM", "phimoe": "PhiMoEForCausalLM"}
_HF_LAYER_STEMS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.o_proj", "ffn.gate": "mlp.gate_proj", "ffn.up": "mlp.up_proj",
    "ffn.down": "mlp.down_proj", "moe.shared.gate": "mlp.shared_expert.gate_proj",
    "moe.shared.up": "mlp.shared_expert.up_proj", "moe.shared.down": "mlp.shared_expert.down_proj",
    "moe.shared_gate": "mlp.shared_expert_gate",
}
_HF_MIXTRAL_EXPERT = {"gate": "w1", "up": "w3", "down": "w2"}


def hf_tensor_name(cfg: DecoderConfig, name: str) -> str:
    """The HF checkpoint tensor name of a canonical name."""
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    if name.startswith("norm."):
        return "model." + name
    if name.startswith("lm_head."):
        return name
    m = _LAYER_NAME.match(name)
    if not m:
        raise KeyError(f"{name!r} is not a canonical weight name")
    layer, stem, kind = m.groups()
    prefix = f"model.layers.{layer}."
    block = "mlp" if cfg.arch == "qwen2_moe" else "block_sparse_moe"
    if stem == "moe.router":
        return f"{prefix}{block}.gate.{kind}"
    e = _EXPERT_STEM.match(stem)
    if e:
        part = e.group(2)
        part = f"{part}_proj" if cfg.arch == "qwen2_moe" else _HF_MIXTRAL_EXPERT[part]
        return f"{prefix}{block}.experts.{e.group(1)}.{part}.{kind}"
    return f"{prefix}{_HF_LAYER_STEMS[stem]}.{kind}"


class _JSONFields:
    """Typed reads of an HF config.json's keys: a value of the wrong type, or a required key that is
    missing (or null), raises WeightFormatError naming the file and the key."""

    def __init__(self, data: Mapping[str, Any], where: str, owner: str):
        self.data, self.where, self.owner = data, where, owner

    def _bad(self, key: str, value, expected: str) -> WeightFormatError:
        return WeightFormatError(f"{self.where}: {key}={value!r} is not allowed; expected {expected}")

    def get(self, key: str, default: Any = ...) -> Any:
        value = self.data.get(key)
        if value is None and default is ...:
            raise WeightFormatError(f"{self.where}: key {key!r} is missing (needed for {self.owner})")
        return default if value is None else value

    def int(self, key: str, default: Any = ...) -> Any:
        value = self.get(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
            raise self._bad(key, value, "an integer")
        return int(value)

    def float(self, key: str, default: Any = ...) -> Any:
        value = self.get(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self._bad(key, value, "a finite number")
        return float(value)

    def bool(self, key: str, default: bool = False) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self._bad(key, value, "true or false")
        return value

    def ints(self, key: str) -> tuple[int, ...]:
        value = self.get(key, [])
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise self._bad(key, value, "a list of integers")
        return tuple(value)

    def floats(self, key: str) -> tuple[float, ...]:
        value = self.get(key)
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
            raise self._bad(key, value, "a list of numbers")
        return tuple(map(float, value))

    def token_id(self, key: str) -> int | None:
        """An int, null, or a list of ints (HF's eos_token_id): its first."""
        value = self.get(key, None)
        first = value[0] if isinstance(value, list) and value else value
        if first is not None and (isinstance(first, bool) or not isinstance(first, int)):
            raise self._bad(key, value, "a token id (an integer), a list of them, or null")
        return first


def config_from_hf(hf: Mapping[str, Any], where: str = "config.json") -> DecoderConfig:
    """DecoderConfig of an HF config.json (one of HF_ARCHITECTURES)."""
    if not isinstance(hf, Mapping):
        raise WeightFormatError(f"{where}: expected a JSON object, got {type(hf).__name__}")
    archs = hf.get("architectures") or []
    archs = archs if isinstance(archs, list) else [archs]
    known = [a for a in archs if isinstance(a, str) and a in HF_ARCHITECTURES]
    if not known:
        raise WeightFormatError(f"{where}: architectures {archs} are not supported; allowed: "
                                + ", ".join(HF_ARCHITECTURES))
    arch = HF_ARCHITECTURES[known[0]]
    f = _JSONFields(hf, where, known[0])
    hidden, heads = f.int("hidden_size"), f.int("num_attention_heads")
    kw: dict[str, Any] = dict(
        arch=arch, vocab_size=f.int("vocab_size"), hidden=hidden, num_layers=f.int("num_hidden_layers"),
        num_heads=heads, num_kv_heads=f.int("num_key_value_heads", 0) or heads,
        head_dim=f.int("head_dim", 0) or (hidden // heads if heads > 0 else 0), norm_eps=f.float("rms_norm_eps", 1e-5),
        rope_theta=f.float("rope_theta", 10000.0), max_position_embeddings=f.int("max_position_embeddings", 4096),
        tie_word_embeddings=f.bool("tie_word_embeddings"),
        bos_token_id=f.token_id("bos_token_id"), eos_token_id=f.token_id("eos_token_id"))
    scaling = f.get("rope_scaling", None)
    if scaling is not None and not isinstance(scaling, Mapping):
        raise WeightFormatError(f"{where}: rope_scaling={scaling!r} is not allowed; expected an object or null")
    scaling_type = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if scaling is not None and not (arch == "phimoe" and scaling_type == "longrope"):
        raise WeightFormatError(f"{where}: rope_scaling type {scaling_type!r} is not supported for {known[0]}; "
                                f"allowed: null{' or longrope' if arch == 'phimoe' else ''}")
    if arch == "llama":
        if f.bool("mlp_bias"):
            raise WeightFormatError(f"{where}: mlp_bias=true is not supported; allowed: false")
        bias = f.bool("attention_bias")
        kw.update(ffn_hidden=f.int("intermediate_size"), qkv_bias=bias, out_proj_bias=bias)
    elif arch == "mixtral":
        kw.update(ffn_hidden=0, num_experts=f.int("num_local_experts"), top_k=f.int("num_experts_per_tok"),
                  moe_ffn_hidden=f.int("intermediate_size"))
    elif arch == "qwen2_moe":
        shared = f.int("shared_expert_intermediate_size")
        kw.update(ffn_hidden=f.int("intermediate_size"), num_experts=f.int("num_experts"),
                  top_k=f.int("num_experts_per_tok"), moe_ffn_hidden=f.int("moe_intermediate_size"),
                  shared_expert_ffn_hidden=shared, shared_expert_gate=bool(shared),
                  normalize_topk=f.bool("norm_topk_prob"), moe_layer_freq=f.int("decoder_sparse_step", 1),
                  mlp_only_layers=f.ints("mlp_only_layers"), qkv_bias=True)
    else:  # phimoe
        bias = f.bool("attention_bias")
        kw.update(ffn_hidden=0, num_experts=f.int("num_local_experts"), top_k=f.int("num_experts_per_tok"),
                  moe_ffn_hidden=f.int("intermediate_size"), router="sparsemixer",
                  router_jitter_eps=f.float("router_jitter_noise", 0.01), norm_kind="layernorm",
                  qkv_bias=bias, out_proj_bias=bias, lm_head_bias=f.bool("lm_head_bias"))
        if scaling is not None:
            rs = _JSONFields(scaling, f"{where}: rope_scaling", "longrope")
            kw["rope_scaling"] = LongRope(
                short_factor=rs.floats("short_factor"), long_factor=rs.floats("long_factor"),
                short_mscale=rs.float("short_mscale", 1.0), long_mscale=rs.float("long_mscale", 1.0),
                original_max_position_embeddings=rs.int("original_max_position_embeddings", 0)
                or f.int("original_max_position_embeddings", 0) or 4096)
    try:
        return DecoderConfig(**kw).without_unused_ffn()
    except ConfigError as e:
        raise WeightFormatError(f"{where}: {e}") from None


def hf_config_dict(cfg: DecoderConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """The config.json of `cfg` (inverse of config_from_hf)."""
    d: dict[str, Any] = dict(
        architectures=[_HF_ARCH_NAME[cfg.arch]], model_type=_HF_MODEL_TYPE[cfg.arch],
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
        hidden_act="silu", torch_dtype=torch_dtype, rope_scaling=None)
    if cfg.arch == "llama":
        d.update(intermediate_size=cfg.ffn_hidden, attention_bias=cfg.qkv_bias, mlp_bias=False)
        if cfg.qkv_bias != cfg.out_proj_bias:
            raise WeightFormatError("LlamaForCausalLM has one attention_bias for q/k/v/o; "
                                    f"got qkv_bias={cfg.qkv_bias}, out_proj_bias={cfg.out_proj_bias}")
    elif cfg.arch == "mixtral":
        d.update(intermediate_size=cfg.moe_ffn_hidden, num_local_experts=cfg.num_experts,
                 num_experts_per_tok=cfg.top_k, sliding_window=None)
    elif cfg.arch == "qwen2_moe":
        d.update(intermediate_size=cfg.ffn_hidden or cfg.moe_ffn_hidden, moe_intermediate_size=cfg.moe_ffn_hidden,
                 shared_expert_intermediate_size=cfg.shared_expert_ffn_hidden, num_experts=cfg.num_experts,
                 num_experts_per_tok=cfg.top_k, norm_topk_prob=cfg.normalize_topk,
                 decoder_sparse_step=cfg.moe_layer_freq, mlp_only_layers=list(cfg.mlp_only_layers),
                 use_sliding_window=False)
    else:
        d.update(intermediate_size=cfg.moe_ffn_hidden, num_local_experts=cfg.num_experts,
                 num_experts_per_tok=cfg.top_k, router_jitter_noise=cfg.router_jitter_eps,
                 attention_bias=cfg.qkv_bias, lm_head_bias=cfg.lm_head_bias, sliding_window=None)
        if cfg.rope_scaling is not None:
            rs = cfg.rope_scaling
            d["rope_scaling"] = dict(type="longrope", short_factor=list(rs.short_factor),
                                     long_factor=list(rs.long_factor), short_mscale=rs.short_mscale,
                                     long_mscale=rs.long_mscale,
                                     original_max_position_embeddings=rs.original_max_position_embeddings)
    return d


class SafetensorsWeights(WeightSource):
    """An HF checkpoint directory: config.json + one or more *.safetensors (module doc)."""

    def __init__(self, path: str | Path):
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        self.path = path.parent if path.is_file() else path
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise WeightFormatError(f"{self.path}: no config.json (an HF checkpoint directory needs one)")
        try:
            hf = json.loads(cfg_path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightFormatError(f"{cfg_path}: not valid JSON ({e})") from None
        self.config = config_from_hf(hf, str(cfg_path))
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise WeightFormatError(f"{self.path}: no *.safetensors files")
        self._handles, self._where = [], {}
        for f in files:
            try:               # the header is checked here: its JSON, dtypes, offsets within the file
                h = safe_open(str(f), framework="pt")
                dtypes = {key: h.get_slice(key).get_dtype() for key in h.keys()}
            except SafetensorError as e:
                raise WeightFormatError(f"{f}: not a readable safetensors file ({e})") from None
            self._handles.append(h)
            for key, dtype in dtypes.items():
                if dtype not in TORCH_DTYPES:
                    raise WeightFormatError(f"{f}: tensor {key!r} has dtype {dtype}; "
                                            f"allowed: {', '.join(TORCH_DTYPES)}")
                self._where[key] = h
        _check_extent(self.config, lambda n: hf_tensor_name(self.config, n) in self._where,
                      lambda n: hf_tensor_name(self.config, n), len(self._where), self.path)
        for name, shape in weight_shapes(self.config).items():
            hf = hf_tensor_name(self.config, name)
            if hf not in self._where:
                raise WeightFormatError(f"{self.path}: tensor {hf!r} (for {name}) is missing")
            got = tuple(self._where[hf].get_slice(hf).get_shape())
            if got != shape:
                raise WeightFormatError(f"{self.path}: {hf} has shape {got}; expected {shape} from config.json")

    def load(self, name: str) -> torch.Tensor:
        _check_name(self.config, name)
        hf = hf_tensor_name(self.config, name)
        return self._where[hf].get_tensor(hf)

    def describe(self) -> str:
        return f"safetensors {self.path} ({self.config.arch})"


# =========================================================================== entry points

def load_weights(path: str | Path) -> WeightSource:
    """GGUFWeights for a .gguf file, SafetensorsWeights for an HF checkpoint directory (or one of
    its .safetensors files)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return GGUFWeights(path)
    if (path.is_dir() and (path / "config.json").is_file()) or (path.is_file() and path.suffix == ".safetensors"):
        return SafetensorsWeights(path)
    raise WeightFormatError(f"{path}: not a weights path; allowed: a .gguf file, or an HF checkpoint "
                            "directory with config.json and *.safetensors")

