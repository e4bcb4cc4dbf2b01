"""The calibration prompt of a popularity profile: a text's first tokens by the model's own
tokenizer (llama.cpp's on a GGUF vocabulary, its byte tokens without llama-cpp-python), random
ids only where the model has none, and the run record says which."""
import hashlib
import json
import sys

import pytest

from impl.experiments.scheinfer.__main__ import main
from impl.experiments.scheinfer.calibration_prompt import (DEFAULT_TEXT, POPULARITY_SEED, calibration_prompt,
                                                           random_ids)
from impl.scheinfer.generate_models import generate
from impl.scheinfer.partition import REFERENCE_COST


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("calibration_prompt")
    return {"gguf": generate("qwen2_moe", d / "qwen.gguf", seed=3), "hf": generate("qwen2_moe", d / "qwen_st", seed=3),
            "dir": d}


def _sentencepiece_bytes(text: str) -> list[int]:
    """What a SentencePiece tokenizer makes of `text` on a generated model's vocabulary (<unk>,
    <s>, </s>, the byte tokens <0x00>..<0xFF> from id 3, then pieces '\u2581t<i>' that no
    merge of two smaller pieces reaches): BOS, then every byte of the text with a space before it
    and every space written as '\u2581', each byte its byte token."""
    return [1] + [3 + b for b in ("\u2581" + text.replace(" ", "\u2581")).encode("utf-8")]


def test_text_is_split_by_the_models_own_tokenizer(models):
    """On a generated GGUF (a SentencePiece 'llama' vocabulary), the prompt is llama.cpp's split of
    the default text, and the record names the file, its sha256 and the tokenizer."""
    pytest.importorskip("llama_cpp")
    text = DEFAULT_TEXT.read_text(encoding="utf-8")
    prompt = calibration_prompt(models["gguf"], 512, 100)
    assert list(prompt.tokens) == _sentencepiece_bytes(text)[:100]
    assert prompt.how == {"kind": "text", "text_file": str(DEFAULT_TEXT),
                          "sha256": hashlib.sha256(DEFAULT_TEXT.read_bytes()).hexdigest(),
                          "tokenizer": prompt.how["tokenizer"], "text_tokens": len(_sentencepiece_bytes(text)),
                          "tokens_used": 100}
    assert prompt.how["tokenizer"].startswith("llama.cpp (llama-cpp-python") and "'llama'" in prompt.how["tokenizer"]
    own = models["dir"] / "own.txt"
    own.write_text("Tides turn slowly. " * 20)
    assert list(calibration_prompt(models["gguf"], 512, 30, own).tokens) == _sentencepiece_bytes(own.read_text())[:30]


def test_without_llama_cpp_the_vocabularys_byte_tokens_split_the_text(models, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)          # import llama_cpp raises ImportError
    text = DEFAULT_TEXT.read_text(encoding="utf-8")
    prompt = calibration_prompt(models["gguf"], 512, 64)
    assert list(prompt.tokens) == ([1] + [3 + b for b in text.encode("utf-8")])[:64]
    assert prompt.how["kind"] == "text" and "byte fallback; llama-cpp-python is not installed" in prompt.how["tokenizer"]


def test_random_ids_only_where_the_model_has_no_tokenizer(models):
    prompt = calibration_prompt(models["hf"], 512, 16)
    assert list(prompt.tokens) == random_ids(512, 16)
    assert prompt.how["kind"] == f"random ids, seed {POPULARITY_SEED}"
    assert prompt.how["why"] == "an HF checkpoint directory without tokenizer.json"
    with pytest.raises(ValueError, match="has no tokenizer to split it"):
        calibration_prompt(models["hf"], 512, 16, DEFAULT_TEXT)


def _word_tokenizer(words: list[str]):
    """A word-level HF tokenizer: <s> 1 before every text, each known word its id from 3, others <unk>."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: 3 + i for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok, vocab


def test_an_hf_checkpoint_splits_the_text_by_its_tokenizer_json(models, tmp_path):
    """With tokenizer.json beside the weights, the prompt is that tokenizer's split of the text
    (its post-processor's BOS first) and the record names it; a file it cannot read is one line."""
    import shutil
    checkpoint = tmp_path / "qwen_st"
    shutil.copytree(models["hf"], checkpoint)
    tok, vocab = _word_tokenizer(["tides", "turn", "slowly", "."])
    tok.save(str(checkpoint / "tokenizer.json"))
    text = tmp_path / "text.txt"
    text.write_text("tides turn slowly . " * 5 + "unknown words too")
    prompt = calibration_prompt(checkpoint, 512, 12, text)
    assert list(prompt.tokens) == [1] + [vocab[w] for w in ("tides turn slowly . " * 3).split()][:11]
    assert prompt.how["kind"] == "text" and prompt.how["text_tokens"] == 1 + 20 + 3
    assert prompt.how["tokenizer"].startswith("HF tokenizers ") and prompt.how["tokenizer"].endswith("tokenizer.json")
    (checkpoint / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer.json: HF tokenizers cannot read it \("):
        calibration_prompt(checkpoint, 512, 12, text)


def test_an_hf_checkpoint_without_the_tokenizers_library_gets_random_ids(models, tmp_path, monkeypatch):
    import shutil
    checkpoint = tmp_path / "qwen_st"
    shutil.copytree(models["hf"], checkpoint)
    _word_tokenizer(["a"])[0].save(str(checkpoint / "tokenizer.json"))
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    prompt = calibration_prompt(checkpoint, 512, 8)
    assert list(prompt.tokens) == random_ids(512, 8) and "HF tokenizers" in prompt.how["why"]


def test_the_run_record_says_which_prompt_the_profile_was_made_on(models, capsys):
    """generate --out-record: the timeline record's popularity names the calibration text and its
    sha256 on a GGUF with a vocabulary, random ids and their seed on an HF checkpoint."""
    cost = models["dir"] / "cost.json"
    cost.write_text(json.dumps({"cost": json.loads(REFERENCE_COST.to_json())}))
    text = models["dir"] / "calib.txt"
    text.write_text("A short walk by the harbour, then home for supper. " * 8)
    for model, extra in ((models["gguf"], ["--calibration-text", str(text)]), (models["hf"], [])):
        rec = models["dir"] / "rec.json"
        argv = ["generate", "--model", str(model), "--tokens", "1,5,9", "--n-predict", "2", "--policy", "fiddler",
                "--cost", str(cost), "--threads", "1", "--popularity-tokens", "24", "--timeline",
                str(models["dir"] / "tl.json"), "--out-record", str(rec), "--no-progress"]
        assert main(argv + extra) == 0
        how = json.loads(rec.read_text())["extra"]["popularity"]["calibration_prompt"]
        if extra:
            assert (how["kind"], how["text_file"], how["sha256"], how["tokens_used"]) == (
                "text", str(text), hashlib.sha256(text.read_bytes()).hexdigest(), 24)
            assert "popularity from 24 calibration tokens (text calib.txt," in capsys.readouterr().out
        else:
            assert how["kind"] == f"random ids, seed {POPULARITY_SEED}"
            assert f"(random ids, seed {POPULARITY_SEED}," in capsys.readouterr().out


def test_only_a_policy_that_profiles_reads_the_calibration_prompt(models, tmp_path, capsys):
    """A tokenizer.json that cannot be read stops a run whose policy ranks FFNs by popularity
    (Fiddler), one line, exit 2; a run whose policy never profiles (llama.cpp's -ngl) makes no
    calibration prompt, so it runs."""
    import shutil
    checkpoint = tmp_path / "qwen_st"
    shutil.copytree(models["hf"], checkpoint)
    (checkpoint / "tokenizer.json").write_text("{not json")
    cost = tmp_path / "cost.json"
    cost.write_text(json.dumps({"cost": json.loads(REFERENCE_COST.to_json())}))
    argv = ["generate", "--model", str(checkpoint), "--tokens", "1,5,9", "--n-predict", "2", "--cost", str(cost),
            "--threads", "1", "--popularity-tokens", "8", "--no-progress", "--policy"]
    assert main(argv + ["layers"]) == 0
    assert "note: --calibration-text" not in capsys.readouterr().err
    text = tmp_path / "text.txt"
    text.write_text("unused")
    assert main(argv + ["layers", "--calibration-text", str(text)]) == 0
    assert "note: --calibration-text is not read: no policy of this run (layers) ranks" in capsys.readouterr().err
    assert main(argv + ["fiddler"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.json: HF tokenizers cannot read it (" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("policies, profiles", [("layers,scheinfer", False), ("layers,fiddler", True),
                                                ("scheinfer --gg-mode popularity", True)])
def test_bench_makes_a_calibration_prompt_only_for_policies_that_profile(models, tmp_path, monkeypatch,
                                                                           policies, profiles):
    """Every registered way to profile is decided before the cost model: by the policy (Fiddler)
    or by its options (ScheInfer's --gg-mode popularity)."""
    import impl.experiments.scheinfer.__main__ as cli_module
    made = []
    monkeypatch.setattr(cli_module, "calibration_prompt", lambda *a: made.append(a) or calibration_prompt(*a))
    cost = tmp_path / "cost.json"
    cost.write_text(json.dumps({"cost": json.loads(REFERENCE_COST.to_json())}))
    names, *options = policies.split()
    argv = ["bench", "--model", str(models["gguf"]), "--n-predict", "2", "--cost", str(cost), "--threads", "1",
            "--popularity-tokens", "8", "--prompt-tokens", "3", "--repeats", "1", "--policies", names, *options,
            "--out-csv", str(tmp_path / "b.csv"), "--out-record", str(tmp_path / "b.json")]
    assert main(argv) == 0
    assert len(made) == int(profiles)
