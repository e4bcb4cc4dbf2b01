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

Semantics kept per format: a GGUF 'phimoe' file is read with Phi-3.5-MoE's own (HF) semantics,
LayerNorm and SparseMixer routing. llama.cpp runs such a file with RMSNorm-plus-bias and softmax
top-2 routing instead (src/models/phi3.cpp), so llama.cpp and this decoder differ on it by design.
"""
from __future__ import annotations

import json
import re
import zlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .config import DecoderConfig, LongRope, weight_shapes

__all__ = [
    "WeightFormatError", "WeightSource", "DictWeights", "RandomWeights", "GGUFWeights",
    "SafetensorsWeights", "load_weights", "materialize", "GGUF_ARCHS", "GGUF_TYPES",
    "HF_ARCHITECTURES", "gguf_arch", "gguf_tensor_ref", "gguf_metadata", "hf_tensor_name",
    "hf_config_dict", "config_from_hf", "permute_for_interleaved_rope", "unpermute_from_interleaved_rope",
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


def _field(reader, key: str, default: Any = ...) -> Any:
    f = reader.get_field(key)
    if f is None:
        if default is ...:
            raise WeightFormatError(f"GGUF metadata key {key!r} is missing")
        return default
    value = f.contents()
    if isinstance(value, list):
        raise WeightFormatError(f"GGUF metadata key {key!r} holds a per-layer list {value[:4]}...; "
                                "allowed: one value for every layer")
    return value


def _f32(value) -> float:
    """A GGUF float32 as the shortest decimal that rounds to it (1e-05, not 9.99999974e-06), so a
    config read from GGUF equals the one that wrote it."""
    return float(str(np.float32(value)))


class GGUFWeights(WeightSource):
    """A GGUF file (module doc)."""

    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file {self.path} does not exist")
        reader = GGUFReader(self.path, "r")
        arch = _field(reader, "general.architecture")
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
        for name, shape in weight_shapes(self.config).items():
            got = self._shape(name)
            if got != shape:
                raise WeightFormatError(f"{self.path}: {self._ref(name)[0]} (for {name}) has shape {got}; "
                                        f"expected {shape} from the metadata")

    def _read_config(self, reader, arch: str) -> DecoderConfig:
        k = _gguf_keys(arch)
        get = lambda key, default=...: _field(reader, k[key], default)  # noqa: E731
        scaling = get("rope_scaling", "none")
        if scaling not in ("none", None):
            raise WeightFormatError(f"{self.path}: {k['rope_scaling']}={scaling!r} is not supported; allowed: 'none'")
        for t in ("rope_factors_long.weight", "rope_factors_short.weight"):
            if t in self._tensors:
                raise WeightFormatError(f"{self.path}: tensor {t!r} (longrope) is not supported; use the "
                                        "safetensors checkpoint for long-context RoPE")
        hidden, heads = int(get("hidden")), int(get("heads"))
        head_dim = int(get("key_length", hidden // heads))
        if int(get("value_length", head_dim)) != head_dim or int(get("rope_dims", head_dim)) != head_dim:
            raise WeightFormatError(f"{self.path}: key/value/rope dimensions "
                                    f"{get('key_length', None)}/{get('value_length', None)}/{get('rope_dims', None)} "
                                    f"differ; allowed: all equal to the head dim {head_dim}")
        num_experts = int(get("experts", 0))
        ffn = int(get("ffn", 0))
        emb = self._tensors.get("token_embd.weight")
        if emb is None:
            raise WeightFormatError(f"{self.path}: tensor 'token_embd.weight' is missing")
        has = lambda t: t in self._tensors  # noqa: E731
        kw: dict[str, Any] = dict(
            vocab_size=int(emb.shape[1]), hidden=hidden, num_layers=int(get("layers")), num_heads=heads,
            num_kv_heads=int(get("kv_heads", heads)), head_dim=head_dim,
            norm_eps=_f32(get("eps")), rope_theta=_f32(get("rope_base", 10000.0)),
            max_position_embeddings=int(get("context", 4096)),
            tie_word_embeddings=not has("output.weight"), lm_head_bias=has("output.bias"),
            qkv_bias=has("blk.0.attn_q.bias"), out_proj_bias=has("blk.0.attn_output.bias"),
            bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", None),
            eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id", None))
        if arch == "llama":
            kw.update(arch="mixtral" if num_experts else "llama", ffn_hidden=0 if num_experts else ffn,
                      num_experts=num_experts, top_k=int(get("top_k", 0)), moe_ffn_hidden=ffn if num_experts else 0)
        elif arch == "qwen2moe":
            kw.update(arch="qwen2_moe", ffn_hidden=0, num_experts=num_experts, top_k=int(get("top_k")),
                      moe_ffn_hidden=int(get("expert_ffn")), shared_expert_ffn_hidden=int(get("shared_ffn", 0)),
                      shared_expert_gate=has("blk.0.ffn_gate_inp_shexp.weight"), normalize_topk=False)
        else:  # phimoe
            kw.update(arch="phimoe", ffn_hidden=0, num_experts=num_experts, top_k=int(get("top_k")),
                      moe_ffn_hidden=ffn, router="sparsemixer", norm_kind="layernorm")
        return DecoderConfig(**kw)

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


def config_from_hf(hf: Mapping[str, Any], where: str = "config.json") -> DecoderConfig:
    """DecoderConfig of an HF config.json (one of HF_ARCHITECTURES)."""
    archs = hf.get("architectures") or []
    known = [a for a in archs if a in HF_ARCHITECTURES]
    if not known:
        raise WeightFormatError(f"{where}: architectures {archs} are not supported; allowed: "
                                + ", ".join(HF_ARCHITECTURES))
    arch = HF_ARCHITECTURES[known[0]]

    def req(key: str):
        if key not in hf:
            raise WeightFormatError(f"{where}: key {key!r} is missing (needed for {known[0]})")
        return hf[key]

    hidden, heads = int(req("hidden_size")), int(req("num_attention_heads"))
    eos = hf.get("eos_token_id")
    kw: dict[str, Any] = dict(
        arch=arch, vocab_size=int(req("vocab_size")), hidden=hidden, num_layers=int(req("num_hidden_layers")),
        num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads), norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos)
    scaling = hf.get("rope_scaling")
    scaling_type = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if scaling is not None and not (arch == "phimoe" and scaling_type == "longrope"):
        raise WeightFormatError(f"{where}: rope_scaling type {scaling_type!r} is not supported for {known[0]}; "
                                f"allowed: null{' or longrope' if arch == 'phimoe' else ''}")
    if arch == "llama":
        if hf.get("mlp_bias"):
            raise WeightFormatError(f"{where}: mlp_bias=true is not supported; allowed: false")
        bias = bool(hf.get("attention_bias", False))
        kw.update(ffn_hidden=int(req("intermediate_size")), qkv_bias=bias, out_proj_bias=bias)
    elif arch == "mixtral":
        kw.update(ffn_hidden=0, num_experts=int(req("num_local_experts")), top_k=int(req("num_experts_per_tok")),
                  moe_ffn_hidden=int(req("intermediate_size")))
    elif arch == "qwen2_moe":
        kw.update(ffn_hidden=int(req("intermediate_size")), num_experts=int(req("num_experts")),
                  top_k=int(req("num_experts_per_tok")), moe_ffn_hidden=int(req("moe_intermediate_size")),
                  shared_expert_ffn_hidden=int(req("shared_expert_intermediate_size")),
                  shared_expert_gate=bool(hf.get("shared_expert_intermediate_size")),
                  normalize_topk=bool(hf.get("norm_topk_prob", False)),
                  moe_layer_freq=int(hf.get("decoder_sparse_step", 1)),
                  mlp_only_layers=tuple(int(i) for i in hf.get("mlp_only_layers") or ()), qkv_bias=True)
    else:  # phimoe
        bias = bool(hf.get("attention_bias", False))
        kw.update(ffn_hidden=0, num_experts=int(req("num_local_experts")), top_k=int(req("num_experts_per_tok")),
                  moe_ffn_hidden=int(req("intermediate_size")), router="sparsemixer",
                  router_jitter_eps=float(hf.get("router_jitter_noise", 0.01)), norm_kind="layernorm",
                  qkv_bias=bias, out_proj_bias=bias, lm_head_bias=bool(hf.get("lm_head_bias", False)))
        if scaling is not None:
            kw["rope_scaling"] = LongRope(
                short_factor=tuple(map(float, scaling["short_factor"])),
                long_factor=tuple(map(float, scaling["long_factor"])),
                short_mscale=float(scaling.get("short_mscale", 1.0)), long_mscale=float(scaling.get("long_mscale", 1.0)),
                original_max_position_embeddings=int(scaling.get("original_max_position_embeddings")
                                                     or hf.get("original_max_position_embeddings") or 4096))
    return DecoderConfig(**kw).without_unused_ffn()


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
        from safetensors import safe_open

        path = Path(path)
        self.path = path.parent if path.is_file() else path
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise WeightFormatError(f"{self.path}: no config.json (an HF checkpoint directory needs one)")
        self.config = config_from_hf(json.loads(cfg_path.read_text()), str(cfg_path))
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise WeightFormatError(f"{self.path}: no *.safetensors files")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where: dict[str, Any] = {}
        for f, h in zip(files, self._handles):
            for key in h.keys():
                dtype = h.get_slice(key).get_dtype()
                if dtype not in TORCH_DTYPES:
                    raise WeightFormatError(f"{f}: tensor {key!r} has dtype {dtype}; allowed: {', '.join(TORCH_DTYPES)}")
                self._where[key] = h
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

