"""ScheInfer command line.

    python -m impl.scheinfer generate --model FILE (--prompt TEXT | --tokens IDS) --n-predict N
        [--gpu-mem BYTES] [--policy scheinfer|fiddler|layers] [--threads N] [--tile ROWS]
        [--assign split|threshold|makespan] [--cost COST.json] [--timeline OUT.json]
    python -m impl.scheinfer calibrate [--out COST.json] [--quick]

`generate` prints the new token ids, then prefill and decode speed (tokens/s); a progress bar goes
to stderr. The cost model comes from --cost (a `calibrate` output) or a quick calibration at start.
Bad arguments give one line on stderr and exit status 2, before any weights are read.
--prompt: GGUF files whose vocabulary holds the 256 byte tokens <0x00>..<0xFF> are tokenized byte
by byte (SentencePiece byte fallback, BOS first); other files need --tokens.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

USAGE_EXIT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(USAGE_EXIT, f"{self.prog}: error: {message}\n")


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return USAGE_EXIT


def _parse_tokens(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--tokens={text!r}: expected integers separated by commas or spaces") from None
    if not ids or min(ids) < 0:
        raise ValueError(f"--tokens={text!r}: expected at least one integer >= 0")
    return ids


def byte_tokenize(model: Path, text: str) -> list[int]:
    """BOS + one byte token per UTF-8 byte, if the GGUF vocabulary has all 256 byte tokens."""
    if model.suffix != ".gguf":
        raise ValueError(f"{model}: no tokenizer in this format; pass --tokens IDS")
    from gguf import GGUFReader
    reader = GGUFReader(model, "r")
    f = reader.get_field("tokenizer.ggml.tokens")
    tokens = f.contents() if f is not None else []
    index = {t: i for i, t in enumerate(tokens)}
    byte_ids = [index.get(f"<0x{b:02X}>") for b in range(256)]
    if not tokens or None in byte_ids:
        raise ValueError(f"{model}: its vocabulary has no byte tokens, so --prompt cannot be tokenized here; "
                         "pass --tokens IDS")
    bos = reader.get_field("tokenizer.ggml.bos_token_id")
    return ([int(bos.contents())] if bos is not None else []) + [byte_ids[b] for b in text.encode("utf-8")]


def _validate_generate(args) -> str | None:
    from .engine import POLICIES
    from .assign import ASSIGN_MODES
    model = Path(args.model)
    if not model.exists():
        return f"--model {model}: no such file or directory"
    if not (model.suffix == ".gguf" and model.is_file()) and not (model / "config.json").is_file():
        return f"--model {model}: expected a .gguf file or an HF checkpoint directory with config.json"
    if args.policy not in POLICIES or args.policy == "fixed":
        return f"--policy={args.policy!r} is not allowed; expected one of scheinfer, fiddler, layers"
    if args.assign not in ASSIGN_MODES:
        return f"--assign={args.assign!r} is not allowed; expected one of {', '.join(ASSIGN_MODES)}"
    if args.n_predict < 1:
        return f"--n-predict={args.n_predict} is not allowed; expected an integer >= 1"
    if args.gpu_mem is not None and args.gpu_mem < 0:
        return f"--gpu-mem={args.gpu_mem} is not allowed; expected bytes >= 0"
    if args.threads is not None and args.threads < 1:
        return f"--threads={args.threads} is not allowed; expected an integer >= 1"
    if args.tile < 1:
        return f"--tile={args.tile} is not allowed; expected an integer >= 1"
    if args.cost is not None and not Path(args.cost).is_file():
        return f"--cost {args.cost}: no such file"
    return None


def cmd_generate(args) -> int:
    err = _validate_generate(args)
    if err:
        return _fail(err)
    from impl.common.config import ConfigError
    from .weights import WeightFormatError, load_weights
    model = Path(args.model)
    try:
        prompt = _parse_tokens(args.tokens) if args.tokens is not None else byte_tokenize(model, args.prompt)
    except ValueError as e:
        return _fail(str(e))
    try:
        source = load_weights(model)          # reads the header / config only
    except (WeightFormatError, ConfigError, FileNotFoundError) as e:
        return _fail(str(e))
    cfg = source.config
    if max(prompt) >= cfg.vocab_size:
        return _fail(f"--tokens: id {max(prompt)} is outside the vocabulary 0..{cfg.vocab_size - 1}")

    import torch
    from tqdm import tqdm
    from .calibrate import calibrate
    from .engine import HybridDecoder, HybridEngine, ffn_widths, make_policy
    from .partition import CostModel
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cost:
        d = json.loads(Path(args.cost).read_text())
        cost = CostModel.from_dict(d.get("cost", d))
    else:
        cost = calibrate(hidden=cfg.hidden, widths=(64, 128, 256), rows=(1, 8, 32), reps=3,
                         copy_sizes=(1 << 14, 1 << 16, 1 << 18)).cost
    ffn_bytes = sum(ffn_widths(cfg).values()) * 3 * cfg.hidden * 4
    gpu_mem = args.gpu_mem if args.gpu_mem is not None else ffn_bytes // 2
    opts = {"assign": args.assign} if args.policy == "scheinfer" else {}
    policy = make_policy(args.policy, cost=cost, hidden=cfg.hidden, num_layers=cfg.num_layers, dtype_bytes=4,
                         tile=args.tile, **opts)
    engine = HybridEngine(policy, cfg.hidden, torch.float32, gpu_mem, threads=args.threads)
    bar = tqdm(total=len(prompt) + args.n_predict - 1, desc="tokens", unit="tok", file=sys.stderr,
               disable=args.no_progress)
    try:
        dec = HybridDecoder(source, engine, on_forward=bar.update)
        out = dec.generate([prompt], args.n_predict, eos_token_id=None if args.ignore_eos else cfg.eos_token_id)
    finally:
        bar.close()
        engine.close()
    print(" ".join(map(str, out.tokens[0])))
    prefill = out.prompt_tokens / out.prefill_s if out.prefill_s > 0 else float("inf")
    decode = out.decode_steps / out.decode_s if out.decode_s > 0 else float("nan")
    print(f"prefill: {out.prompt_tokens} tokens, {prefill:.2f} tok/s")
    print(f"decode: {out.decode_steps} tokens, {decode:.2f} tok/s")
    print(f"policy: {policy.name}, gpu-mem {gpu_mem} B, resident FFN {engine.resident_bytes} B, "
          f"device {engine.device}, cost {cost.source}")
    if args.timeline:
        Path(args.timeline).write_text(json.dumps([dataclasses.asdict(e) for e in engine.events], default=str))
    return 0


def cmd_calibrate(args) -> int:
    from .calibrate import calibrate
    kw = dict(widths=(64, 128, 256), rows=(1, 8, 32), reps=3) if args.quick else {}
    c = calibrate(hidden=args.hidden, **kw)
    text = json.dumps(c.as_dict(), indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(prog="python -m impl.scheinfer", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="generate tokens with the hybrid engine")
    g.add_argument("--model", required=True, help=".gguf file or HF checkpoint directory")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text (byte-level tokenization; see module doc)")
    src.add_argument("--tokens", help="token ids, e.g. '1,5,9'")
    g.add_argument("--n-predict", type=int, required=True)
    g.add_argument("--gpu-mem", type=int, default=None, help="GPU bytes for FFN weights + staging (default: half the FFN bytes)")
    g.add_argument("--policy", default="scheinfer")
    g.add_argument("--assign", default="split")
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--tile", type=int, default=64)
    g.add_argument("--cost", default=None, help="a JSON written by 'calibrate --out'")
    g.add_argument("--timeline", default=None, help="write lane events as JSON")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--no-progress", action="store_true")
    c = sub.add_parser("calibrate", help="fit the cost model on this machine")
    c.add_argument("--out", default=None)
    c.add_argument("--hidden", type=int, default=256)
    c.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    return cmd_generate(args) if args.cmd == "generate" else cmd_calibrate(args)


if __name__ == "__main__":
    raise SystemExit(main())
