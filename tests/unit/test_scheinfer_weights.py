"""Weight loading: GGUF and safetensors of the same weights give identical models; errors name what
is wrong and what is allowed."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from impl.scheinfer.config import DecoderConfig
from impl.scheinfer.decoder import Decoder, load_decoder
from impl.scheinfer.generate_models import KINDS, generate, main, random_source, tiny_config, write_gguf
from impl.scheinfer.weights import (GGUFWeights, SafetensorsWeights, WeightFormatError, config_from_hf,
                                    gguf_metadata, hf_config_dict, load_weights, materialize,
                                    permute_for_interleaved_rope, unpermute_from_interleaved_rope)

PROMPT = [1, 5, 300, 42, 7, 99, 511, 3, 64, 128]
SEED = 4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(kind, dtype) -> (gguf path, safetensors dir), generated once."""
    d = tmp_path_factory.mktemp("scheinfer_models")
    out = {}
    for kind in KINDS:
        for dtype in ("f32", "f16"):
            out[kind, dtype] = (generate(kind, d / f"{kind}-{dtype}.gguf", dtype, SEED),
                                generate(kind, d / f"{kind}-{dtype}", dtype, SEED))
    out["mixtral", "bf16"] = (generate("mixtral", d / "mixtral-bf16.gguf", "bf16", SEED),
                              generate("mixtral", d / "mixtral-bf16", "bf16", SEED))
    return out


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_gguf_and_safetensors_give_identical_logits(files, kind, dtype):
    g_path, s_path = files[kind, dtype]
    g, s = load_weights(g_path), load_weights(s_path)
    assert isinstance(g, GGUFWeights) and isinstance(s, SafetensorsWeights)
    assert g.config.arch == s.config.arch == tiny_config(kind).arch
    lg, ls = Decoder(g).logits(PROMPT), Decoder(s).logits(PROMPT)
    assert torch.equal(lg, ls)
    assert lg.std() > 0.5                           # a real, non-degenerate model


@pytest.mark.parametrize("kind", list(KINDS))
def test_files_hold_the_generated_weights(files, kind):
    """Every tensor read back equals the generator's (rounded to the file dtype): covers the q/k
    RoPE permutation round trip and expert stacking."""
    src = random_source(kind, SEED)
    for path in files[kind, "f16"]:
        w = load_weights(path)
        for name in src.names():
            got = w.load(name)
            assert got.dtype in (torch.float16, torch.float32), name   # routers / 1-D stay F32 in GGUF
            assert torch.equal(got.float(), src.load(name).half().float()), (path, name)


def test_bf16_files(files):
    g, s = (load_weights(p) for p in files["mixtral", "bf16"])
    assert g.load("layers.0.moe.experts.3.down.weight").dtype == torch.bfloat16
    assert torch.equal(Decoder(g).logits(PROMPT), Decoder(s).logits(PROMPT))


def test_configs_read_back(files):
    for kind in KINDS:
        ref = tiny_config(kind)
        for path in files[kind, "f32"]:
            got = load_weights(path).config
            for f in ("arch", "vocab_size", "hidden", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                      "num_experts", "top_k", "moe_ffn_hidden", "shared_expert_ffn_hidden", "shared_expert_gate",
                      "router", "normalize_topk", "norm_kind", "norm_eps", "qkv_bias", "out_proj_bias",
                      "lm_head_bias", "tie_word_embeddings", "rope_theta"):
                assert getattr(got, f) == getattr(ref, f), (path, f)
        assert config_from_hf(hf_config_dict(ref)) == ref


def test_rope_permutation_turns_rotate_half_into_interleaved_pairs():
    """q.k with rotate-half RoPE on HF rows == q.k with llama.cpp's interleaved-pair RoPE on the
    permuted rows: why the GGUF loader un-permutes."""
    H, D, M = 3, 8, 5
    g = torch.Generator().manual_seed(0)
    wq, wk, x = torch.randn(H * D, M, generator=g), torch.randn(H * D, M, generator=g), torch.randn(2, M, generator=g)
    theta = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)
    pos = torch.tensor([3.0, 11.0])

    def rotate_half(v, p):                          # v [2, H, D]
        ang = torch.cat([p[:, None] * theta] * 2, -1)[:, None]
        rot = torch.cat((-v[..., D // 2:], v[..., :D // 2]), -1)
        return v * ang.cos() + rot * ang.sin()

    def interleaved(v, p):
        ang = (p[:, None] * theta)[:, None]
        a, b = v[..., 0::2], v[..., 1::2]
        return torch.stack((a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()), -1).flatten(-2)

    q_hf, k_hf = (x @ wq.T).view(2, H, D), (x @ wk.T).view(2, H, D)
    q_ll = (x @ permute_for_interleaved_rope(wq, H).T).view(2, H, D)
    k_ll = (x @ permute_for_interleaved_rope(wk, H).T).view(2, H, D)
    dots_hf = (rotate_half(q_hf, pos)[0] * rotate_half(k_hf, pos)[1]).sum(-1)
    dots_ll = (interleaved(q_ll, pos)[0] * interleaved(k_ll, pos)[1]).sum(-1)
    torch.testing.assert_close(dots_hf, dots_ll)
    assert torch.equal(unpermute_from_interleaved_rope(permute_for_interleaved_rope(wq, H), H), wq)


# ------------------------------------------------------------------------- errors

def _gguf_with(path, arch="llama", quantized_tensor=False):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.embedding_length", 64)
    w.add_uint32(f"{arch}.block_count", 1)
    w.add_uint32(f"{arch}.feed_forward_length", 128)
    w.add_uint32(f"{arch}.attention.head_count", 4)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    emb = np.zeros((300, 64), dtype=np.float32)
    if quantized_tensor:
        w.add_tensor("token_embd.weight", gguf.quants.quantize(emb, gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        w.add_tensor("token_embd.weight", emb)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_quantized_tensor_is_refused(tmp_path):
    with pytest.raises(WeightFormatError, match=r"'token_embd.weight' has type Q8_0; allowed: F32, F16, BF16"):
        GGUFWeights(_gguf_with(tmp_path / "q.gguf", quantized_tensor=True))


def test_gguf_unsupported_arch_is_refused(tmp_path):
    with pytest.raises(WeightFormatError, match=r"architecture 'gpt2' is not supported; allowed: llama, qwen2moe, phimoe"):
        load_weights(_gguf_with(tmp_path / "g.gguf", arch="gpt2"))


def test_gguf_missing_tensor_is_named(tmp_path):
    with pytest.raises(WeightFormatError, match=r"tensor 'blk.0.attn_norm.weight' \(for layers.0.attn_norm.weight\) is missing"):
        GGUFWeights(_gguf_with(tmp_path / "m.gguf"))


def test_hf_errors(files, tmp_path):
    _, s_path = files["llama", "f32"]
    cfg = json.loads((s_path / "config.json").read_text())
    with pytest.raises(WeightFormatError, match=r"architectures \['GPT2LMHeadModel'\] are not supported; allowed: LlamaForCausalLM"):
        config_from_hf({**cfg, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(WeightFormatError, match="rope_scaling type 'llama3'"):
        config_from_hf({**cfg, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(WeightFormatError, match="'hidden_size' is missing"):
        config_from_hf({k: v for k, v in cfg.items() if k != "hidden_size"})

    from safetensors.torch import save_file
    bad = tmp_path / "int8"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    save_file({"model.embed_tokens.weight": torch.zeros(3, 3, dtype=torch.int8)}, str(bad / "model.safetensors"))
    with pytest.raises(WeightFormatError, match="has dtype I8; allowed: F32, F16, BF16"):
        load_weights(bad)
    with pytest.raises(WeightFormatError, match="not a weights path"):
        load_weights(tmp_path / "nothing.bin")


def test_gguf_refuses_configs_llamacpp_cannot_express(tmp_path):
    qwen = tiny_config("qwen2_moe")
    with pytest.raises(WeightFormatError, match="normalize_topk"):
        gguf_metadata(dataclasses.replace(qwen, normalize_topk=True))
    with pytest.raises(WeightFormatError, match="mlp_only_layers"):
        gguf_metadata(dataclasses.replace(qwen, mlp_only_layers=(0,), ffn_hidden=64))
    with pytest.raises(WeightFormatError, match="dtype 'q4'"):
        write_gguf(random_source("llama"), tmp_path / "x.gguf", "q4")


def test_materialize_and_cli(tmp_path, capsys):
    assert main(["--kind", "llama", "--out", str(tmp_path / "l.gguf"), "--seed", "2"]) == 0
    assert capsys.readouterr().out.strip().endswith("l.gguf")
    dec = load_decoder(tmp_path / "l.gguf")
    mem = materialize(load_weights(tmp_path / "l.gguf"))
    assert torch.equal(Decoder(mem).logits(PROMPT[:4]), dec.logits(PROMPT[:4]))
    assert isinstance(dec.config, DecoderConfig) and dec.config.arch == "llama"


@pytest.mark.parametrize("kind", list(KINDS))
def test_safetensors_checkpoint_matches_hf_transformers(files, kind):
    """The decoder on a checkpoint == HF transformers' own model class on it (skipped unless
    transformers is installed; it is not a dependency of the project)."""
    transformers = pytest.importorskip("transformers")
    from transformers import AutoConfig, AutoModelForCausalLM

    _, path = files[kind, "f32"]
    try:
        AutoConfig.from_pretrained(str(path))
    except (KeyError, ValueError):
        pytest.skip(f"transformers {transformers.__version__} does not know {kind}")
    hf = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32,
                                              attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits[0]
    ours = Decoder(load_weights(path)).logits(PROMPT)
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()
