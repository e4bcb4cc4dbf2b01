"""The calibration prompt a popularity profile is made on (`python -m impl.experiments.scheinfer`,
--calibration-text FILE, --popularity-tokens N): the first N tokens of a text as the model's own
tokenizer splits it, so that the profile counts the experts real text is routed to; random ids
only where the model has no tokenizer.

* Text: `DEFAULT_TEXT` (impl/scheinfer/calibration_text.txt: plain English prose on everyday
  subjects, written for this repository and dedicated to the public domain), or the file given.
* Tokenizer of a GGUF file with a vocabulary (tokenizer.ggml.tokens): llama.cpp's, through
  llama-cpp-python (`baselines.llamacpp.runner.tokenize`), which builds it from the file's
  tokenizer.ggml.* metadata as llama.cpp itself does. Without llama-cpp-python (or where it
  cannot load the file): the vocabulary's byte tokens <0x00>..<0xFF>, byte by byte
  (SentencePiece byte fallback, BOS first, as --prompt: `byte_tokenize`), where it has them.
* Tokenizer of an HF checkpoint directory: its tokenizer.json, through HF `tokenizers` (special
  tokens as its post-processor adds them), where both exist.
* Random ids otherwise (an HF checkpoint without tokenizer.json or without `tokenizers`, a GGUF
  file without a vocabulary): N ids uniform in 1..vocab-1 from a torch.Generator seeded
  `POPULARITY_SEED`; a text given there is an error.
What was used is in the record (`CalibrationPrompt.how`): the text file, its sha256 and the
tokenizer, or the random ids, their seed and why.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import impl.scheinfer

__all__ = ["DEFAULT_TEXT", "POPULARITY_SEED", "CalibrationPrompt", "byte_tokenize", "random_ids", "read_text",
           "model_tokens", "calibration_prompt"]

DEFAULT_TEXT = Path(impl.scheinfer.__file__).with_name("calibration_text.txt")
POPULARITY_SEED = 1729       # the random ids' generator where the model has no tokenizer


@dataclass(frozen=True)
class CalibrationPrompt:
    """The token ids a profile is made on and how they were made (the run record's
    `calibration_prompt`: kind 'text' or 'random ids, seed N')."""

    tokens: tuple[int, ...]
    how: dict

    @property
    def label(self) -> str:
        """A few words for a printed line: the text file's name, or random ids."""
        return f"text {Path(self.how['text_file']).name}" if self.how["kind"] == "text" else self.how["kind"]


def byte_tokenize(model: Path, text: str) -> list[int]:
    """BOS + one byte token per UTF-8 byte, if the GGUF vocabulary has all 256 byte tokens."""
    if model.suffix != ".gguf":
        raise ValueError(f"{model}: no tokenizer in this format; pass --tokens IDS")
    from impl.scheinfer.weights import gguf_field, open_gguf
    reader = open_gguf(model)
    tokens = _vocabulary(reader)
    index = {t: i for i, t in enumerate(tokens)}
    byte_ids = [index.get(f"<0x{b:02X}>") for b in range(256)]
    if not tokens or None in byte_ids:
        raise ValueError(f"{model}: its vocabulary has no byte tokens, so --prompt cannot be tokenized here; "
                         "pass --tokens IDS")
    bos = gguf_field(reader, "tokenizer.ggml.bos_token_id", int, None, model)
    return ([bos] if bos is not None else []) + [byte_ids[b] for b in text.encode("utf-8")]


def _vocabulary(reader) -> list:
    f = reader.get_field("tokenizer.ggml.tokens")
    tokens = f.contents() if f is not None else []
    return tokens if isinstance(tokens, list) else []


def random_ids(vocab_size: int, n: int) -> list[int]:
    """n ids uniform in 1..vocab_size-1, seeded `POPULARITY_SEED`."""
    import torch
    return torch.randint(1, max(vocab_size, 2), (n,), generator=torch.Generator().manual_seed(POPULARITY_SEED)).tolist()


def _flag(path: str | Path | None) -> str:
    return f"--calibration-text {path}" if path is not None else f"the default calibration text {DEFAULT_TEXT}"


def read_text(path: str | Path | None) -> str:
    """The calibration text of `path` (None: `DEFAULT_TEXT`); ValueError, one line, where it is
    missing, unreadable, not UTF-8 or empty."""
    file = Path(path) if path is not None else DEFAULT_TEXT
    if not file.is_file():
        raise ValueError(f"{_flag(path)}: {'not a file' if file.exists() else 'no such file'}")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{_flag(path)}: not UTF-8 text") from None
    except OSError as e:
        raise ValueError(f"{_flag(path)}: cannot be read ({e.strerror})") from None
    if not text.strip():
        raise ValueError(f"{_flag(path)}: the file has no text; expected plain prose to tokenize")
    return text


def model_tokens(model: Path, text: str) -> tuple[list[int] | None, str]:
    """(`text`'s ids by the model's own tokenizer, what tokenized it), or (None, why the model has
    none) (module doc)."""
    if model.suffix != ".gguf":
        return _hf_tokens(model, text)
    from impl.scheinfer.weights import gguf_field, open_gguf
    reader = open_gguf(model)
    if not _vocabulary(reader):
        return None, "the GGUF file has no vocabulary (tokenizer.ggml.tokens)"
    kind = gguf_field(reader, "tokenizer.ggml.model", str, "?", model)
    try:
        import llama_cpp
        from baselines.llamacpp.runner import tokenize
        return tokenize(model, text), (f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) from the file's "
                                       f"tokenizer.ggml.* (model {kind!r})")
    except ImportError:
        why = "llama-cpp-python is not installed"
    except ValueError as e:
        why = f"llama.cpp cannot load the file's vocabulary ({e})"
    try:
        return byte_tokenize(model, text), f"the vocabulary's byte tokens, byte by byte (SentencePiece byte fallback; {why})"
    except ValueError:
        return None, f"{why}, and the vocabulary (model {kind!r}) has no byte tokens to fall back on"


def _hf_tokens(checkpoint: Path, text: str) -> tuple[list[int] | None, str]:
    """An HF checkpoint directory's split of `text` by its tokenizer.json (HF `tokenizers`, with
    the special tokens its post-processor adds, as transformers' tokenizer call does), or (None,
    why not)."""
    file = checkpoint / "tokenizer.json"
    if not file.is_file():
        return None, "an HF checkpoint directory without tokenizer.json"
    try:
        import tokenizers
    except ImportError:
        return None, "an HF checkpoint directory, and HF tokenizers (which reads its tokenizer.json) is not installed"
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:                # the library's own parse errors have no common base
        raise ValueError(f"{file}: HF tokenizers cannot read it ({str(e).strip().splitlines()[0]})") from None
    return tokenizer.encode(text).ids, f"HF tokenizers {tokenizers.__version__} from {file.name}"


def calibration_prompt(model: Path, vocab_size: int, n: int, text_file: str | Path | None = None) -> CalibrationPrompt:
    """The first n tokens of the calibration text (`text_file`, else `DEFAULT_TEXT`) by the model's
    tokenizer, or n random ids where it has none (module doc). ValueError, one line: a text given
    for a model without a tokenizer, a text shorter than n tokens, an id outside the model's
    vocabulary (and `read_text`'s)."""
    file = Path(text_file) if text_file is not None else DEFAULT_TEXT
    ids, what = model_tokens(model, read_text(text_file))
    if ids is None:
        if text_file is not None:
            raise ValueError(f"{_flag(text_file)}: {model} has no tokenizer to split it ({what}); calibration "
                             "uses random ids there, so leave --calibration-text out")
        return CalibrationPrompt(tuple(random_ids(vocab_size, n)), {
            "kind": f"random ids, seed {POPULARITY_SEED}",
            "ids": f"{n} token ids drawn uniformly from 1..{max(vocab_size, 2) - 1} by torch.Generator",
            "why": what})
    if len(ids) < n:
        raise ValueError(f"{_flag(text_file)}: {len(ids)} tokens by the model's tokenizer, fewer than the "
                         f"--popularity-tokens {n} the profile needs; give a longer text or fewer tokens")
    used = tuple(ids[:n])
    if max(used, default=0) >= vocab_size:
        raise ValueError(f"{_flag(text_file)}: the tokenizer gives id {max(used)}, outside the model's vocabulary "
                         f"0..{vocab_size - 1}")
    return CalibrationPrompt(used, {
        "kind": "text", "text_file": str(file), "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
        "tokenizer": what, "text_tokens": len(ids), "tokens_used": n})
