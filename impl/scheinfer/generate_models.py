"""Small real model files for tests and smoke runs: GGUF files that llama.cpp loads and HF
safetensors checkpoints, both holding the very same weights.

Why: the decoder is checked against llama.cpp (the paper's baseline) and across weight formats on
files we can make in milliseconds, without downloading checkpoints. Weights come from
`weights.RandomWeights` (deterministic in the seed), at the tiny shapes of the models in
workflows/config/models (`<name>-tiny`: real structure, tiny widths), or at any other shape.

    python -m impl.scheinfer.generate_models --kind mixtral --out /tmp/mixtral.gguf [--dtype f16]
    python -m impl.scheinfer.generate_models --kind qwen2_moe --out /tmp/qwen_ckpt   # a directory: safetensors

GGUF files follow llama.cpp's converter conventions: q/k rows permuted for the 'llama'
architecture's interleaved RoPE, experts stacked as blk.N.ffn_{gate,up,down}_exps, 1-D tensors
and routers kept in F32 at every file type (their values rounded to the file's dtype first, so the
GGUF and the safetensors of one (kind, dtype, seed) hold identical numbers), and a SentencePiece-style
('llama') tokenizer section: <unk>, <s>, </s>, the 256 byte tokens, then placeholder pieces up to
the vocabulary size (ids are what matters; tests run on token ids).
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from impl.common import cli
from impl.common.config import MAX_LAYERS, MAX_TOKENS, SEED_MAX, ConfigError, check_host_memory, checked

from .config import KINDS, DecoderConfig, tiny_config, weight_shapes
from .weights import (RandomWeights, WeightFormatError, WeightSource, gguf_arch, gguf_metadata,
                      gguf_tensor_ref, hf_config_dict, hf_tensor_name, permute_for_interleaved_rope)

__all__ = ["KINDS", "DTYPES", "tiny_config", "random_source", "write_gguf", "write_safetensors",
           "generate", "main"]

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_GGUF_FILE_TYPE = {"f32": 0, "f16": 1, "bf16": 32}     # llama_ftype: ALL_F32, MOSTLY_F16, MOSTLY_BF16
_HF_DTYPE_NAME = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def _check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise WeightFormatError(f"dtype {dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def random_source(kind: str | DecoderConfig, seed: int = 0, dtype: str = "f32") -> RandomWeights:
    """Random weights of a kind / model name / config, stored in `dtype`."""
    cfg = kind if isinstance(kind, DecoderConfig) else tiny_config(kind)
    return RandomWeights(cfg, seed=seed, dtype=_check_dtype(dtype))


def _llama_vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    if n < 259:
        raise WeightFormatError(f"vocab_size={n} is not allowed for a GGUF 'llama' tokenizer; "
                                "expected >= 259 (3 special + 256 byte tokens)")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256                 # UNKNOWN, CONTROL, CONTROL, BYTE...
    scores = [0.0] * len(tokens)
    for i in range(n - len(tokens)):
        tokens.append(f"\u2581t{i}")
        types.append(1)                           # NORMAL
        scores.append(-float(i))
    return tokens, scores, types


def write_gguf(source: WeightSource, path: str | Path, dtype: str = "f32", name: str | None = None) -> Path:
    """Write `source` as a GGUF file of file type `dtype` (module doc for the conventions)."""
    import gguf

    tdtype = _check_dtype(dtype)
    cfg = source.config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arch = gguf_arch(cfg)
    metadata = gguf_metadata(cfg)                 # refuses configs llama.cpp cannot express
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name or f"tiny-{cfg.arch}")
    writer.add_file_type(_GGUF_FILE_TYPE[dtype])
    for key, value in metadata.items():
        (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(key, value)
    tokens, scores, types = _llama_vocab(cfg.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(cfg.bos_token_id if cfg.bos_token_id is not None else 1)
    writer.add_eos_token_id(cfg.eos_token_id if cfg.eos_token_id is not None else 2)
    writer.add_unk_token_id(0)

    stacked: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    order: list[str] = []
    single: dict[str, torch.Tensor] = {}
    for cname in weight_shapes(cfg):
        gname, expert = gguf_tensor_ref(cfg, cname)
        x = source.load(cname).to(tdtype).float()          # the file dtype's values, held in f32
        if arch == "llama" and (".attn.q." in cname or ".attn.k." in cname):
            heads = cfg.num_heads if ".attn.q." in cname else cfg.num_kv_heads
            x = permute_for_interleaved_rope(x, heads)
        if cname.endswith("moe.shared_gate.weight"):
            x = x.reshape(-1)                                # llama.cpp: a vector of n_embd
        if gname not in order:
            order.append(gname)
        if expert is None:
            single[gname] = x
        else:
            stacked[gname][expert] = x
    for gname in order:
        x = single[gname] if gname in single else torch.stack([stacked[gname][e] for e in sorted(stacked[gname])])
        keep_f32 = x.dim() == 1 or gname.endswith("ffn_gate_inp.weight") or dtype == "f32"
        arr = x.numpy().astype(np.float32)
        if keep_f32:
            writer.add_tensor(gname, arr)
        elif dtype == "f16":
            writer.add_tensor(gname, arr.astype(np.float16))
        else:
            writer.add_tensor(gname, gguf.quants.quantize(arr, gguf.GGMLQuantizationType.BF16),
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_safetensors(source: WeightSource, out_dir: str | Path, dtype: str = "f32") -> Path:
    """Write `source` as an HF checkpoint directory (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    tdtype = _check_dtype(dtype)
    cfg = source.config
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {hf_tensor_name(cfg, n): source.load(n).to(tdtype).contiguous() for n in weight_shapes(cfg)}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config_dict(cfg, _HF_DTYPE_NAME[dtype]), indent=2) + "\n")
    return out_dir


def generate(kind: str, out: str | Path, dtype: str = "f32", seed: int = 0, **overrides) -> Path:
    """A test model of `kind` at `out`: GGUF when out ends in .gguf, else a safetensors directory.
    `overrides` replace DecoderConfig fields (hidden=256, num_layers=4, ...)."""
    cfg = tiny_config(kind, **overrides)
    # the weights in float32, and one converted copy while writing
    check_host_memory(8 * sum(math.prod(shape) for shape in weight_shapes(cfg).values()),
                      ", ".join(overrides) or "kind", f"the weights of {kind!r}")
    source = random_source(cfg, seed)
    out = Path(out)
    if out.suffix == ".gguf":
        return write_gguf(source, out, dtype, name=f"tiny-{kind}-seed{seed}")
    return write_safetensors(source, out, dtype)


def _out_path(text: str) -> str:
    """An argparse `type`: a .gguf file to write, or a directory (existing or not) for safetensors."""
    path = Path(text)
    if path.suffix == ".gguf":
        return cli.output_path(text)
    if not text.strip() or (path.exists() and not path.is_dir()):
        raise argparse.ArgumentTypeError(f"{text!r} is neither a .gguf file nor a directory for safetensors")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = cli.ArgumentParser(prog="python -m impl.scheinfer.generate_models", description=cli.describe(__doc__))
    ap.add_argument("--kind", required=True,
                    help=f"one of {', '.join(KINDS)} or a model name from workflows/config/models")
    ap.add_argument("--out", required=True, type=_out_path, help="X.gguf for GGUF, otherwise a directory for safetensors")
    ap.add_argument("--dtype", default="f32", choices=list(DTYPES))
    ap.add_argument("--seed", type=cli.number(int, ge=0, le=SEED_MAX), default=0)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=INT",
                    help="replace an integer field of the model config, e.g. --set hidden=256")
    args = ap.parse_args(argv)
    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        try:
            overrides[key.strip()] = int(value)
        except ValueError:
            ap.error(f"--set {item!r}: expected FIELD=INTEGER")
        if not sep:
            ap.error(f"--set {item!r}: expected FIELD=INTEGER")
        high = MAX_LAYERS if key.strip() == "num_layers" else MAX_TOKENS
        if abs(overrides[key.strip()]) > high:
            ap.error(f"--set {item!r}: {key.strip()} is not allowed beyond {high}")
    try:
        checked("--kind", tiny_config, args.kind)
        checked("--set", lambda o: tiny_config(args.kind, **o), overrides)
        path = generate(args.kind, args.out, args.dtype, args.seed, **overrides)
    except (ConfigError, WeightFormatError) as e:
        ap.error(str(e))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
