"""ScheInfer command line.

    python -m impl.experiments.scheinfer generate --model FILE (--prompt TEXT | --tokens IDS) --n-predict N
        [--gpu-mem BYTES] [--policy scheinfer|fiddler|layers] [--threads N] [--tile ROWS]
        [--assign split|threshold|makespan] [--gg-mode uniform|popularity] [--cost COST.json]
        [--cpu-kernel auto|torch|avx512|avx2|sse] [--popularity-tokens N] [--calibration-text FILE]
        [--timeline OUT.json [--out-record RECORD.json]]
    python -m impl.experiments.scheinfer bench --model FILE.gguf --prompt-tokens 16,64 --n-predict N
        [--policies scheinfer,fiddler,layers] [--gpu-mem BYTES] [--llamacpp [--llamacpp-offload auto|SPECS]]
        [--gg-mode uniform|popularity] [--popularity-tokens N] [--calibration-text FILE] [--repeats R]
        --out-csv OUT.csv --out-record OUT.json
    python -m impl.experiments.scheinfer calibrate [--out COST.json] [--quick] [--hidden M] [--widths F,..] [--rows N,..]

`bench` measures every (policy, prompt length) on one model (and the real llama.cpp on the same
GGUF with --llamacpp, in a process of its own: `baselines.llamacpp.runner.SeparateProcess`), in
alternating rounds so that machine noise hits every system alike, and
writes the per-round tok/s as a CSV and one run record (medians, p5/p95, and ScheInfer's speed over
each other system's, medians of this run). Tier 'emu' when the GPU lanes run on the CPU, 'cluster'
on a CUDA device. --llamacpp-offload runs llama.cpp partially offloaded, one system per setting:
'auto' derives the settings that hold its FFN / expert weights on the GPU within --gpu-mem (the
engine's budget; `baselines.llamacpp.runner.settings_within_budget`), or give them as
'ngl=N[,ncmoe=K];...' (N an integer or 'all'; K = --n-cpu-moe). llama.cpp offloads only with a
CUDA build (LLAMA_CPP_LIB_PATH, `make llamacpp-cuda`); how the budget binds each system, and the
device memory each took, are in the record.
--gg-mode: which of the scheinfer policy's readings of scheinfer.md 3.3 step 1 places its resident
(GG) rows: 'uniform' (default; the same tile-snapped fraction of every FFN) or 'popularity' (whole
FFNs in decreasing popularity, as Fiddler's experts; `impl.scheinfer.partition.resident_rows`); in
the bench CSV (`gg_mode`, scheinfer's rows) and the records' config.
Popularity: a policy that ranks FFNs by popularity (Fiddler, whose resident experts are the most
popular ones; scheinfer with --gg-mode popularity) gets a profile made before its weights are placed,
outside the timings, as Fiddler
profiles offline: the tokens each FFN is routed on one prefill of a calibration prompt of
--popularity-tokens tokens (default 64): the first ones of a text (--calibration-text FILE, default
impl/scheinfer/calibration_text.txt) as the model's own tokenizer splits it (llama.cpp's for a GGUF
file with a vocabulary, tokenizer.json's for an HF checkpoint), random ids seeded only where the
model has no tokenizer
(`impl.experiments.scheinfer.calibration_prompt`; the record says which, with the text's sha256,
and whether the prompt differs from every measured one; bench's are the ramp 1, 2, 3, ...), counted by
`impl.scheinfer.policy.PopularityCounter` (a shared expert counts every token). The prefill runs on
a decoder the bench has already loaded for a policy that needs no profile, else on the reference
decoder on the CPU, layer by layer. --popularity-tokens 0: no profile, FFNs in key order. How the
profile was made, its counts and its time are in the bench record (`popularity`) and CSV
(`popularity_tokens`), and in generate's last line and timeline record.
`generate` prints the new token ids, then prefill and decode speed (tokens/s); a progress bar goes
to stderr; --timeline writes the engine's lane events and --out-record their run record.
Where the GPU lanes ran is said everywhere: without CUDA the engine's GPU and PCIe lanes are
emulated on the CPU (`gpu_lanes` 'emulated on CPU' in the bench CSV, the record and the printed
lines; 'cuda' on a GPU). The cost model comes from --cost (a `calibrate` output) or a quick calibration at start.
Bad arguments give one line on stderr and exit status 2, before any weights are read.
--prompt: GGUF files whose vocabulary holds the 256 byte tokens <0x00>..<0xFF> are tokenized byte
by byte (SentencePiece byte fallback, BOS first); other files need --tokens.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import baselines.fiddler  # noqa: F401  (registers the engine policy 'fiddler')
import baselines.llamacpp  # noqa: F401  (registers the engine policy 'layers')
from impl.common import cli
from impl.common.config import MAX_REPEATS, MAX_SECONDS, host_memory_bytes
from impl.experiments.scheinfer.calibration_prompt import byte_tokenize, calibration_prompt, read_text

USAGE_EXIT = cli.USAGE_EXIT
CLI_POLICIES = ("scheinfer", "fiddler", "layers")
MAX_THREADS = 4096
GPU_MATMUL = ("ieee", "tf32")
MAX_TILE = 1 << 20
MAX_TOKENS = 1 << 20         # --n-predict; the model's positions bound prompt + generation anyway
DEFAULT_POPULARITY_TOKENS = 64


def gpu_lanes(device) -> str:
    """Where the engine's GPU and PCIe lanes ran: 'cuda', or 'emulated on CPU' without CUDA."""
    return "cuda" if str(device).startswith("cuda") else "emulated on CPU"


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return USAGE_EXIT


def _check_int(args, name: str, low: int, high: int | None = None, unit: str = "an integer") -> str | None:
    """The one-line error of an integer flag outside low..high (None: within)."""
    value = getattr(args, name)
    if value is None or (value >= low and (high is None or value <= high)):
        return None
    allowed = f"{unit} >= {low}" if high is None else f"{unit} in {low}..{high}"
    return f"--{name.replace('_', '-')}={value} is not allowed; expected {allowed}"


def _check_text(path: str | None) -> str | None:
    """The one-line error of a calibration text (--calibration-text, else the default) that cannot
    be read or is empty (None: it can be tokenized)."""
    try:
        read_text(path)
    except ValueError as e:
        return str(e)
    return None


def _check_output(flag: str, path: str | None) -> str | None:
    """The one-line error of an output path that cannot be written (None: it can)."""
    if path is None:
        return None
    try:
        cli.output_path(path)
    except argparse.ArgumentTypeError as e:
        return f"{flag}: {e}"
    return None


def _parse_tokens(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--tokens={text!r}: expected integers separated by commas or spaces") from None
    if not ids or min(ids) < 0:
        raise ValueError(f"--tokens={text!r}: expected at least one integer >= 0")
    return ids


def _device_bytes() -> int:
    """The memory a GPU budget must fit in: the GPU's, or this host's where the GPU lanes are
    emulated on the CPU."""
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return host_memory_bytes()


def _validate_engine_options(args) -> str | None:
    """The engine options generate and bench share (--assign, --gg-mode, --gpu-mem, --threads, --tile,
    --cost, --cpu-kernel)."""
    from impl.common.config import ConfigError
    from impl.scheinfer.assign import ASSIGN_MODES
    from impl.scheinfer.fast_decode import KERNELS, named_kernel
    from impl.scheinfer.partition import GG_MODES
    if args.cpu_kernel is not None and args.cpu_kernel not in KERNELS:
        return f"--cpu-kernel={args.cpu_kernel!r} is not allowed; expected one of {', '.join(KERNELS)}"
    try:
        named_kernel(args.cpu_kernel)        # a kernel this host cannot run, or a bad $SCHEINFER_CPU_KERNEL
    except ConfigError as e:
        return f"--cpu-kernel: {e}"
    if args.assign not in ASSIGN_MODES:
        return f"--assign={args.assign!r} is not allowed; expected one of {', '.join(ASSIGN_MODES)}"
    if args.gg_mode not in GG_MODES:
        return f"--gg-mode={args.gg_mode!r} is not allowed; expected one of {', '.join(GG_MODES)}"
    for err in (_check_int(args, "gpu_mem", 0, _device_bytes(), unit="bytes"),
                _check_int(args, "threads", 1, MAX_THREADS), _check_int(args, "tile", 1, MAX_TILE)):
        if err:
            return err
    if args.cost is not None:
        from impl.scheinfer.partition import CostModel
        if not Path(args.cost).is_file():
            return f"--cost {args.cost}: no such file"
        try:
            CostModel.load(args.cost)
        except ConfigError as e:
            return f"--cost {e}"
    return None


def _validate_generate(args) -> str | None:
    model = Path(args.model)
    if not model.exists():
        return f"--model {model}: no such file or directory"
    if not (model.suffix == ".gguf" and model.is_file()) and not (model / "config.json").is_file():
        return f"--model {model}: expected a .gguf file or an HF checkpoint directory with config.json"
    if args.policy not in CLI_POLICIES:
        return f"--policy={args.policy!r} is not allowed; expected one of {', '.join(CLI_POLICIES)}"
    if args.out_record is not None and args.timeline is None:
        return "--out-record needs --timeline (the record is the timeline's)"
    return (_check_int(args, "n_predict", 1, MAX_TOKENS) or _check_int(args, "popularity_tokens", 0, MAX_TOKENS)
            or _check_text(args.calibration_text) or _check_output("--timeline", args.timeline)
            or _check_output("--out-record", args.out_record) or _validate_engine_options(args))


def _cost_model(path: str | None, hidden: int, kernel=None):
    """The engine's cost model: a `calibrate --out` JSON, else a quick calibration now."""
    from impl.scheinfer.calibrate import calibrate
    from impl.scheinfer.partition import CostModel
    if path:
        return CostModel.load(path)
    return calibrate(hidden=hidden, widths=(64, 128, 256), rows=(1, 8, 32), reps=3,
                     copy_sizes=(1 << 14, 1 << 16, 1 << 18), kernel=kernel).cost


def _gpu_mem(gpu_mem: int | None, cfg) -> int:
    from impl.scheinfer.policy import ffn_widths
    return gpu_mem if gpu_mem is not None else sum(ffn_widths(cfg).values()) * 3 * cfg.hidden * 4 // 2


def _policy_options(policy_name: str, args) -> dict:
    """The options the CLI builds a policy with (besides a popularity profile): --assign and
    --gg-mode for scheinfer."""
    return {"assign": args.assign, "gg_mode": args.gg_mode} if policy_name == "scheinfer" else {}


def _calibration(args, cfg, policy_names):
    """The calibration prompt of --popularity-tokens tokens (`calibration_prompt`: the text's
    first tokens by the model's tokenizer, else random ids), or None for 0 or where none of
    `policy_names` profiles (`policy_ranks_by_popularity`, known before the cost model); made
    before any weights are read. ValueError, one line, on bad input."""
    from impl.scheinfer.policy import policy_ranks_by_popularity
    if args.popularity_tokens == 0:
        return None
    if not any(policy_ranks_by_popularity(name, **_policy_options(name, args)) for name in policy_names):
        if args.calibration_text is not None:
            print(f"note: --calibration-text is not read: no policy of this run ({', '.join(policy_names)}) ranks "
                  "FFNs by popularity", file=sys.stderr)
        return None
    return calibration_prompt(Path(args.model), cfg.vocab_size, args.popularity_tokens, args.calibration_text)


def profile(source, prompt, loaded: tuple[str, object] | None = None,
            measured: list[list[int]] = ()) -> tuple[dict | None, dict]:
    """A popularity profile on the calibration prompt (module doc; a `CalibrationPrompt`) and its
    record: with `loaded` = (policy, its decoder) that decoder's prefill, else the reference
    decoder's on the CPU, layer by layer. prompt None (--popularity-tokens 0): no profile (None;
    placement in key order)."""
    from impl.scheinfer.policy import ffn_widths, profile_popularity
    cfg = source.config
    if prompt is None:
        return None, {"tokens": 0, "ranking": "key order (--popularity-tokens 0: no profile)"}
    t0 = time.perf_counter()
    if loaded is None:
        from impl.scheinfer.decoder import Decoder
        decoder, how = Decoder(source, cache_weights=False), "the reference decoder on the CPU, layer by layer"
    else:
        decoder, how = loaded[1], f"the engine decoder already loaded for policy {loaded[0]!r} ({loaded[1].device})"
    counts = profile_popularity(decoder, prompt.tokens)
    seconds = time.perf_counter() - t0
    widths = ffn_widths(cfg)
    return counts, {
        "tokens": len(prompt.tokens),
        "ranking": "popularity: tokens routed to each FFN on one prefill of the calibration prompt",
        "calibration_prompt": prompt.how, "prompt_label": prompt.label,
        "differs_from_measured_prompts": all(list(prompt.tokens) != list(m) for m in measured),
        "counter": "impl.scheinfer.policy.PopularityCounter (a shared expert counts every token of its layer)",
        "profiled_with": how, "seconds": seconds, "ffns": len(widths),
        "ffns_counted": sum(1 for k in widths if counts.get(k, 0) > 0),
        "counts": {f"{layer}.{e}": c for (layer, e), c in sorted(counts.items(), key=str)}}


def resident_summary(placement, cfg, popularity: dict | None) -> dict:
    """Whole FFNs a placement made resident, and the share of the profile's routed tokens they take."""
    from impl.scheinfer.policy import ffn_widths
    widths = ffn_widths(cfg)
    whole = [k for k, g in placement.gg.items() if g and g == widths[k]]
    total = sum((popularity or {}).values())
    return {"resident_ffns": len(whole), "resident_share_of_profile":
            sum(popularity.get(k, 0.0) for k in whole) / total if total else None}


def _policy(policy_name: str, cost, cfg, args):
    """The policy the CLI runs, built once by name with its options (--tile, `_policy_options`);
    one that asks for a popularity profile (`uses_popularity`) is given it by
    `Policy.set_popularity` before it is placed."""
    from impl.scheinfer.policy import make_policy
    return make_policy(policy_name, cost=cost, hidden=cfg.hidden, num_layers=cfg.num_layers, dtype_bytes=4,
                       tile=args.tile, **_policy_options(policy_name, args))


def _engine(policy, cfg, gpu_mem: int, threads: int | None, kernel=None):
    import torch
    from impl.scheinfer.engine import HybridEngine
    return HybridEngine(policy, cfg.hidden, torch.float32, gpu_mem, threads=threads, kernel=kernel)


def _cpu_kernel(name: str | None, cfg):
    """The CPU products' kernel (--cpu-kernel, fast_decode.choose_kernel) for the engine's CPU lane
    on this model, chosen once: the cost model is calibrated with the kernel the engine runs."""
    from impl.scheinfer.fast_decode import ProbeShape, choose_kernel
    return choose_kernel(name, mode="ffns", shape=ProbeShape.of(cfg))


def cmd_generate(args) -> int:
    err = _validate_generate(args)
    if err:
        return _fail(err)
    from impl.common.config import ConfigError
    from impl.scheinfer.weights import WeightFormatError, load_weights
    model = Path(args.model)
    try:
        prompt = _parse_tokens(args.tokens) if args.tokens is not None else byte_tokenize(model, args.prompt)
    except (ValueError, OSError) as e:
        return _fail(str(e))
    try:
        source = load_weights(model)          # reads the header / config only
    except (WeightFormatError, ConfigError, OSError) as e:
        return _fail(str(e))
    cfg = source.config
    if max(prompt) >= cfg.vocab_size:
        return _fail(f"--tokens: id {max(prompt)} is outside the vocabulary 0..{cfg.vocab_size - 1}")
    if len(prompt) + args.n_predict > cfg.max_position_embeddings:
        return _fail(f"--n-predict {args.n_predict} after a prompt of {len(prompt)} tokens exceeds the model's "
                     f"{cfg.max_position_embeddings} positions")
    if err := _check_positions(args.popularity_tokens, cfg):
        return _fail(err)
    try:
        calibration = _calibration(args, cfg, [args.policy])
    except ValueError as e:
        return _fail(str(e))

    import torch
    from tqdm import tqdm
    if args.threads:
        torch.set_num_threads(args.threads)
    kernel = _cpu_kernel(args.cpu_kernel, cfg)
    cost = _cost_model(args.cost, cfg.hidden, kernel)
    gpu_mem = _gpu_mem(args.gpu_mem, cfg)
    policy = _policy(args.policy, cost, cfg, args)
    popularity, made = profile(source, calibration, measured=[list(prompt)]) \
        if policy.uses_popularity else (None, None)
    if popularity is not None:
        policy.set_popularity(popularity)
    engine = _engine(policy, cfg, gpu_mem, args.threads, kernel)
    bar = tqdm(total=len(prompt) + args.n_predict - 1, desc="tokens", unit="tok", file=sys.stderr,
               disable=args.no_progress)
    from impl.scheinfer.engine import HybridDecoder
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
    ranked = "" if made is None else ", popularity: key order" if popularity is None else \
        f", popularity from {made['tokens']} calibration tokens ({made['prompt_label']}, {made['seconds']:.2f} s)"
    gg_mode = f", gg-mode {policy.gg_mode}" if hasattr(policy, "gg_mode") else ""
    print(f"policy: {policy.name}{gg_mode}, gpu-mem {gpu_mem} B, resident FFN {engine.resident_bytes} B, "
          f"device {engine.device}, GPU and PCIe lanes {gpu_lanes(engine.device)}, cost {cost.source}, "
          f"cpu kernel {engine.kernel.name} ({engine.kernel.how}){ranked}")
    if args.timeline:
        from impl.common.records import atomic_write_text, write_record
        atomic_write_text(args.timeline, json.dumps([dataclasses.asdict(e) for e in engine.events], default=str))
        if args.out_record:
            popularity_record = None if made is None else \
                {**made, **resident_summary(engine.placement, cfg, popularity)}
            write_record(args.out_record, _timeline_record(args, cfg, policy, engine, cost, gpu_mem, prompt, out,
                                                           prefill, decode, popularity_record))
    return 0


def _timeline_record(args, cfg, policy, engine, cost, gpu_mem: int, prompt: list[int], out, prefill: float,
                     decode: float, popularity: dict | None) -> dict:
    """The run record of one generation whose lane events went to --timeline: what ran where
    (device, GPU lanes emulated or not, policy, budget, cost model, popularity profile), the
    speeds measured and the events' file."""
    from impl.common.records import make_record
    lanes = {}
    for e in engine.events:
        lanes.setdefault(e.lane, []).append(e.end - e.start)
    return make_record(
        experiment="scheinfer_timeline", system=policy.name, tier="cluster" if engine.cuda else "emu",
        topology={"name": "single-host", "device": str(engine.device), "threads": args.threads},
        model={"path": str(args.model), "arch": cfg.arch, "hidden": cfg.hidden, "layers": cfg.num_layers,
               "experts": cfg.num_experts, "dtype": "float32"},
        config={k: v for k, v in vars(args).items() if k != "cmd"},
        metrics={"prefill_tok_s": [prefill], "decode_tok_s": [decode]}, seed=0,
        trace_id=f"tokens:{','.join(map(str, prompt))}",
        extra={"gpu_lanes": gpu_lanes(engine.device), "events_file": str(args.timeline), "events": len(engine.events),
               "lane_busy_s": {lane: sum(d) for lane, d in lanes.items()}, "gpu_mem_bytes": gpu_mem,
               "resident_ffn_bytes": engine.resident_bytes, "cost_model": cost.source,
               "cpu_kernel": engine.kernel.as_dict(), "new_tokens": out.decode_steps + 1, "popularity": popularity,
               "note": "MEASURED lane events of the HybridEngine on this host"
                       + ("" if engine.cuda else "; its GPU and PCIe lanes are emulated on the CPU")})


def _check_positions(n: int, cfg) -> str | None:
    """The one-line error of a calibration prompt longer than the model's positions."""
    if n > cfg.max_position_embeddings:
        return (f"--popularity-tokens={n} is not allowed; expected 0..{cfg.max_position_embeddings} "
                "(the model's positions)")
    return None


def _split_list(text: str, name: str, kind=str) -> list:
    try:
        items = [kind(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected a comma-separated list") from None
    if not items:
        raise ValueError(f"{name}={text!r}: expected at least one value")
    return items


def _validate_bench(args) -> str | None:
    model = Path(args.model)
    if model.suffix != ".gguf" or not model.is_file():
        return f"--model {model}: expected an existing .gguf file"
    try:
        args.policies = _split_list(args.policies, "--policies")
        args.prompt_tokens = _split_list(args.prompt_tokens, "--prompt-tokens", int)
    except ValueError as e:
        return str(e)
    for p in args.policies:
        if p not in CLI_POLICIES:
            return f"--policies: {p!r} is not allowed; expected {', '.join(CLI_POLICIES)}"
    if min(args.prompt_tokens) < 1:
        return f"--prompt-tokens: {min(args.prompt_tokens)} is not allowed; expected integers >= 1"
    for name, low, high in (("n_predict", 1, MAX_TOKENS), ("repeats", 1, MAX_REPEATS),
                            ("popularity_tokens", 0, MAX_TOKENS)):
        if err := _check_int(args, name, low, high):
            return err
    if err := _check_text(args.calibration_text):
        return err
    if args.deadline_s is not None and not (math.isfinite(args.deadline_s) and 0 < args.deadline_s <= MAX_SECONDS):
        return f"--deadline-s={args.deadline_s} is not allowed; expected seconds > 0 (at most {MAX_SECONDS:g})"
    err = _check_output("--out-csv", args.out_csv) or _check_output("--out-record", args.out_record)
    if err:
        return err
    err = _validate_engine_options(args)
    if err:
        return err
    if args.llamacpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            return "--llamacpp needs llama-cpp-python (pip install -e '.[llamacpp]')"
    if args.llamacpp_offload is not None:
        if not args.llamacpp:
            return "--llamacpp-offload needs --llamacpp"
        try:
            args.llamacpp_offload = _parse_offload(args.llamacpp_offload)
        except ValueError as e:
            return str(e)
    return None


def _parse_offload(text: str) -> str | list[tuple[int | str, int]]:
    """'auto', or 'ngl=N[,ncmoe=K];...' as [(N or 'all', K)] (module doc)."""
    if text.strip() == "auto":
        return "auto"
    out = []
    for spec in filter(None, (t.strip() for t in text.split(";"))):
        kv = dict(item.partition("=")[::2] for item in spec.split(","))
        ngl, ncmoe = kv.pop("ngl", None), kv.pop("ncmoe", "0")
        if kv or ngl is None or not (ngl == "all" or ngl.isdigit()) or not ncmoe.isdigit():
            raise ValueError(f"--llamacpp-offload: {spec!r} is not allowed; expected 'auto' or "
                             "'ngl=N[,ncmoe=K]' items separated by ';' (N an integer >= 0 or 'all', K >= 0)")
        out.append((ngl if ngl == "all" else int(ngl), int(ncmoe)))
    if not out:
        raise ValueError(f"--llamacpp-offload={text!r}: expected 'auto' or at least one 'ngl=N[,ncmoe=K]'")
    return out


def _llamacpp_systems(args, n_ctx: int, threads: int, gpu_mem: int) -> dict:
    """llama.cpp system name -> its settings (one per --llamacpp-offload setting)."""
    from dataclasses import replace
    from baselines.llamacpp.runner import LlamaCppSettings, gpu_weight_bytes, settings_within_budget
    base = LlamaCppSettings(n_ctx=n_ctx, n_threads=threads)
    if args.llamacpp_offload is None:
        return {"llama.cpp": base}
    if args.llamacpp_offload == "auto":
        chosen = settings_within_budget(args.model, gpu_mem, base)
    else:
        n_layer = gpu_weight_bytes(args.model, base)["n_layer"]
        chosen = [replace(base, n_gpu_layers=n_layer + 1 if n == "all" else n, n_cpu_moe=k)
                  for n, k in args.llamacpp_offload]
    return {f"llama.cpp(ngl={s.n_gpu_layers},ncmoe={s.n_cpu_moe})": s for s in chosen}


def _ratios(frame, system: str = "scheinfer") -> dict:
    """`system`'s median tok/s over each other system's, per phase and prompt length (this run)."""
    med = frame.groupby(["system", "prompt_tokens"])[["prefill_tok_s", "decode_tok_s"]].median()
    out: dict = {}
    if system not in med.index.get_level_values(0):
        return out
    for (other, n), row in med.iterrows():
        if other == system:
            continue
        for ph in ("prefill", "decode"):
            out.setdefault(ph, {}).setdefault(f"prompt={n}", {})[other] = float(
                med.loc[(system, n), f"{ph}_tok_s"] / row[f"{ph}_tok_s"])
    return out


def _gguf_file_type(path: Path) -> str:
    from gguf import LlamaFileType
    from impl.scheinfer.weights import gguf_field, open_gguf
    code = gguf_field(open_gguf(path), "general.file_type", int, None, path)
    if code is None:
        return "unknown"
    return LlamaFileType(code).name if code in LlamaFileType._value2member_map_ else f"unknown ({code})"


def cmd_bench(args) -> int:
    err = _validate_bench(args)
    if err:
        return _fail(err)
    from impl.common.config import ConfigError
    from impl.scheinfer.weights import WeightFormatError, load_weights
    try:
        source = load_weights(Path(args.model))
    except (WeightFormatError, ConfigError, OSError) as e:
        return _fail(str(e))
    cfg = source.config
    n_ctx = max(args.prompt_tokens) + args.n_predict + 1
    if n_ctx > cfg.max_position_embeddings:
        return _fail(f"--prompt-tokens {max(args.prompt_tokens)} + --n-predict {args.n_predict} exceed the "
                     f"model's {cfg.max_position_embeddings} positions")
    if err := _check_positions(args.popularity_tokens, cfg):
        return _fail(err)
    try:
        calibration = _calibration(args, cfg, args.policies)
    except ValueError as e:
        return _fail(str(e))

    import torch
    from tqdm import tqdm
    from impl.scheinfer.engine import HybridDecoder
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    kernel = _cpu_kernel(args.cpu_kernel, cfg)
    cost = _cost_model(args.cost, cfg.hidden, kernel)
    gpu_mem = _gpu_mem(args.gpu_mem, cfg)
    prompts = {n: [1 + (i % (cfg.vocab_size - 1)) for i in range(n)] for n in args.prompt_tokens}
    cuda = torch.cuda.is_available()
    torch.backends.cuda.matmul.allow_tf32 = args.gpu_matmul == "tf32"
    llama = _llamacpp_systems(args, n_ctx, threads, gpu_mem) if args.llamacpp else {}
    from baselines.llamacpp.runner import SeparateProcess
    llama_process = SeparateProcess()    # llama.cpp apart from the engines' threads (SeparateProcess)
    policies = {name: _policy(name, cost, cfg, args) for name in args.policies}
    ranked = [name for name, policy in policies.items() if policy.uses_popularity]
    popularity, made = None, None
    decoders, engine_of, placement = {}, {}, {}
    try:
        # weights loaded once per policy, outside the timings; the policies that need a popularity
        # profile last, so that it is made on a decoder already loaded (module doc)
        for name in sorted(args.policies, key=ranked.__contains__):
            if name in ranked and made is None:
                popularity, made = profile(source, calibration, next(iter(decoders.items()), None),
                                           measured=list(prompts.values()))
            policy = policies[name]
            if name in ranked and popularity is not None:
                policy.set_popularity(popularity)
            engine = _engine(policy, cfg, gpu_mem, args.threads, kernel)
            engine_of[name] = engine
            before = torch.cuda.memory_allocated() if cuda else 0
            decoders[name] = HybridDecoder(source, engine)
            placement[name] = {"resident_ffn_bytes": engine.placement.resident_bytes,
                               "staging_bytes": engine.placement.staging_bytes,
                               "device_bytes_loaded": torch.cuda.memory_allocated() - before if cuda else None}
            if name in ranked:
                placement[name].update(resident_summary(engine.placement, cfg, popularity))
        engines = [engine_of[name] for name in args.policies]
        device = str(engines[0].device)
        systems = [*args.policies, *llama]
        llama_used: dict[str, list[int]] = {name: [] for name in llama}
        rows = []
        bar = tqdm(total=args.repeats * len(prompts) * len(systems), desc="runs", file=sys.stderr,
                   disable=args.no_progress)
        started = time.monotonic()
        for r in range(args.repeats):
            if r and args.deadline_s is not None and time.monotonic() - started > args.deadline_s:
                print(f"--deadline-s {args.deadline_s:g} passed: {r} of {args.repeats} rounds done", file=sys.stderr)
                break
            for n, prompt in prompts.items():
                for system in systems:
                    if system in llama:
                        res = llama_process.measure_speed(args.model, prompt, args.n_predict, llama[system], repeats=1,
                                                          device_free=cuda)
                        pre, dec = res.prefill_median, res.decode_median
                        if res.device_bytes_used is not None:
                            llama_used[system].append(res.device_bytes_used)
                    else:
                        d = decoders[system]
                        for _ in range(2):  # the first generation warms caches and thread pools up
                            out = d.generate([prompt], args.n_predict + 1, eos_token_id=None)
                        pre, dec = out.prompt_tokens / out.prefill_s, out.decode_steps / out.decode_s
                    rows.append({"round": r, "system": system, "prompt_tokens": n, "n_predict": args.n_predict,
                                 "prefill_tok_s": pre, "decode_tok_s": dec, "device": device,
                                 "gpu_lanes": gpu_lanes(device) if system not in llama else
                                 ("cuda" if cuda else "CPU only (the real llama.cpp, nothing emulated)"),
                                 "threads": threads, "gpu_mem_bytes": gpu_mem,
                                 "popularity_tokens": args.popularity_tokens if system in ranked else None,
                                 "gg_mode": getattr(policies.get(system), "gg_mode", None)})
                    bar.update()
            # after every round, so that a run stopped from outside keeps the rounds it finished
            frame = _write_bench(args, cfg, rows, systems, device, threads, cost, engines[0].kernel, gpu_mem,
                                 placement, llama, llama_used, {"used_by": ranked, **(made or {})})
        bar.close()
    finally:
        for e in engine_of.values():
            e.close()
        llama_process.close()
    med = frame.groupby(["prompt_tokens", "system"], sort=False)[["prefill_tok_s", "decode_tok_s"]].median()
    print(f"device {device}, GPU and PCIe lanes {gpu_lanes(device)}, {threads} threads, cpu kernel "
          f"{engines[0].kernel.name} ({engines[0].kernel.how}), {frame['round'].nunique()} rounds (medians, tok/s):")
    print(med.to_string(float_format=lambda v: f"{v:.1f}"))
    return 0


def _write_bench(args, cfg, rows, systems, device, threads, cost, kernel, gpu_mem, placement, llama, llama_used,
                 popularity: dict):
    """The bench's CSV (one row per round, system and prompt length) and run record, atomically;
    `popularity`: the profile given to the policies that rank FFNs by popularity."""
    import pandas as pd
    from impl.common.records import make_record
    from impl.scheinfer.cpu_kernels import host_info
    frame = pd.DataFrame(rows)
    frame["popularity_tokens"] = frame["popularity_tokens"].astype("Int64")    # empty: no profile used
    extra = {"cost_model": cost.source, "cpu_kernel": kernel.as_dict(), "host": host_info(), "weights_file_type": _gguf_file_type(Path(args.model)),
             "note": "MEASURED on this host; without CUDA the engine's GPU and PCIe lanes run on the CPU (emulated)",
             "gpu_lanes": gpu_lanes(device),
             "gpu_fp32_matmul": {"ours": args.gpu_matmul if device.startswith("cuda") else "no GPU",
                                 "llama.cpp": None if not llama else "tf32 (its CUDA backend, for F32 weights)"
                                 if device.startswith("cuda") else "no GPU"},
             "rounds_done": int(frame["round"].nunique()),
             "ratios": {"definition": "scheinfer median tok/s / other system's median tok/s, this run",
                        **_ratios(frame)},
             "budget": _budget_record(gpu_mem, placement, llama, llama_used, args.model),
             "popularity": popularity}
    if args.cost:
        extra["cost_file"] = json.loads(Path(args.cost).read_text())
    if llama:
        from baselines.llamacpp.runner import llama_cpp_info
        extra["llamacpp_info"] = llama_cpp_info()
    metrics = {f"{ph}_tok_s/{g.system.iloc[0]}/prompt={g.prompt_tokens.iloc[0]}": g[f"{ph}_tok_s"].tolist()
               for _, g in frame.groupby(["system", "prompt_tokens"], sort=False) for ph in ("prefill", "decode")}
    record = make_record(
        experiment="scheinfer_bench", system=",".join(systems), tier="cluster" if device.startswith("cuda") else "emu",
        topology={"name": "single-host", "device": device, "threads": threads},
        model={"path": str(args.model), "arch": cfg.arch, "hidden": cfg.hidden, "layers": cfg.num_layers,
               "experts": cfg.num_experts, "dtype": "float32", "decoder_config": cfg.as_dict()},
        config={k: v for k, v in vars(args).items() if k not in ("cmd",)}, metrics=metrics, seed=0, extra=extra)
    cli.write_csv_and_record(frame, args.out_csv, record, args.out_record)
    return frame


def _budget_record(gpu_mem: int, placement: dict, llama: dict, llama_used: dict, model: str) -> dict:
    """How the GPU budget binds each system, with what each put on (or took of) the device."""
    from baselines.llamacpp.runner import gpu_weight_bytes
    out = {"gpu_mem_bytes": gpu_mem, "engine_policies": {
        "enforcement": "the engine's placement (impl.scheinfer.policy.place): resident FFN / expert rows plus "
                       "the staging buffers <= gpu_mem_bytes; attention, embeddings, norms, routers, lm_head "
                       "and the KV cache live on the device besides (device_bytes_loaded includes them)",
        **placement}}
    if llama:
        out["llama.cpp"] = {
            "enforcement": "the offload setting is chosen (or checked) so that the FFN / expert weights it puts "
                           "on the GPU, counted from the GGUF's tensor sizes by llama.cpp's placement rules, are "
                           "<= gpu_mem_bytes; the other weights of the offloaded layers, the KV cache and compute "
                           "buffers come besides (device_bytes_used, measured, includes them; for batches of 32 "
                           "tokens or more llama.cpp copies CPU-resident weights into its compute buffers to "
                           "multiply on the GPU, so those buffers can be large)",
            **{name: {"command_line": s.command_line(model), "gpu_weight_bytes": gpu_weight_bytes(model, s),
                      "within_budget": gpu_weight_bytes(model, s)["ffn"] <= gpu_mem,
                      "device_bytes_used": llama_used[name] or None}
               for name, s in llama.items()}}
    return out


def cmd_calibrate(args) -> int:
    from impl.scheinfer.calibrate import calibrate
    kw = dict(widths=(64, 128, 256), rows=(1, 8, 32), reps=3) if args.quick else {}
    if err := _check_int(args, "hidden", 1, 1 << 16) or _check_output("--out", args.out):
        return _fail(err)
    try:
        for name in ("widths", "rows"):
            if getattr(args, name) is not None:
                values = _split_list(getattr(args, name), f"--{name}", int)
                if min(values) < 1 or max(values) > 1 << 16:
                    bad = min(values) if min(values) < 1 else max(values)
                    raise ValueError(f"--{name}: {bad} is not allowed; expected integers in 1..{1 << 16}")
                kw[name] = tuple(values)
    except ValueError as e:
        return _fail(str(e))
    c = calibrate(hidden=args.hidden, **kw)
    text = json.dumps(c.as_dict(), indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = cli.ArgumentParser(prog="python -m impl.experiments.scheinfer", description=cli.describe(__doc__))
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate tokens with the hybrid engine")
    g.add_argument("--model", required=True, help=".gguf file or HF checkpoint directory")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text (byte-level tokenization; see module doc)")
    src.add_argument("--tokens", help="token ids, e.g. '1,5,9'")
    g.add_argument("--n-predict", type=int, required=True)
    g.add_argument("--gpu-mem", type=int, default=None, help="GPU bytes for FFN weights + staging (default: half the FFN bytes)")
    g.add_argument("--policy", default="scheinfer")
    g.add_argument("--assign", default="split")
    g.add_argument("--gg-mode", default="uniform",
                   help="the scheinfer policy's resident rows: 'uniform' (the same fraction of every FFN) or "
                        "'popularity' (whole FFNs, most popular first; module doc)")
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--tile", type=int, default=64)
    g.add_argument("--cost", default=None, help="a JSON written by 'calibrate --out'")
    g.add_argument("--cpu-kernel", default=None,
                   help="CPU products' kernel (default: $SCHEINFER_CPU_KERNEL, else auto: measured at start-up)")
    g.add_argument("--popularity-tokens", type=int, default=DEFAULT_POPULARITY_TOKENS,
                   help="calibration tokens of the popularity profile of a policy that ranks FFNs by popularity "
                        "(fiddler; scheinfer with --gg-mode popularity); 0: key order (module doc)")
    g.add_argument("--calibration-text", default=None,
                   help="a UTF-8 text file whose first --popularity-tokens tokens (the model's tokenizer) the "
                        "profile is made on (default: impl/scheinfer/calibration_text.txt; module doc)")
    g.add_argument("--timeline", default=None, help="write lane events as JSON")
    g.add_argument("--out-record", default=None, help="the timeline's run record (JSON; needs --timeline)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--no-progress", action="store_true")
    b = sub.add_parser("bench", help="measure tok/s of every policy (and llama.cpp) on one model")
    b.add_argument("--model", required=True, help=".gguf file")
    b.add_argument("--prompt-tokens", default="16,64", help="prompt lengths, e.g. '16,64'")
    b.add_argument("--n-predict", type=int, default=16)
    b.add_argument("--policies", default="scheinfer,fiddler,layers")
    b.add_argument("--llamacpp", action="store_true", help="also the real llama.cpp on the same file")
    b.add_argument("--llamacpp-offload", default=None,
                   help="'auto' (settings within --gpu-mem) or 'ngl=N[,ncmoe=K];...' (module doc)")
    b.add_argument("--gpu-mem", type=int, default=None, help="as for generate")
    b.add_argument("--assign", default="split")
    b.add_argument("--gg-mode", default="uniform", help="as for generate")
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--tile", type=int, default=64)
    b.add_argument("--cost", default=None)
    b.add_argument("--cpu-kernel", default=None, help="as for generate")
    b.add_argument("--gpu-matmul", choices=GPU_MATMUL, default="ieee",
                   help="float32 products on a CUDA GPU: 'ieee' (torch's default) or 'tf32' (tensor cores, "
                        "the precision llama.cpp's CUDA backend always uses for F32 weights)")
    b.add_argument("--popularity-tokens", type=int, default=DEFAULT_POPULARITY_TOKENS, help="as for generate")
    b.add_argument("--calibration-text", default=None, help="as for generate")
    b.add_argument("--repeats", type=int, default=3, help="alternating rounds")
    b.add_argument("--deadline-s", type=float, default=None,
                   help="start no new round after this many seconds of measuring (the rounds done are written)")
    b.add_argument("--out-csv", required=True)
    b.add_argument("--out-record", required=True)
    b.add_argument("--no-progress", action="store_true")
    c = sub.add_parser("calibrate", help="fit the cost model on this machine")
    c.add_argument("--out", default=None)
    c.add_argument("--hidden", type=int, default=256)
    c.add_argument("--quick", action="store_true")
    c.add_argument("--widths", default=None, help="FFN widths of the CPU / GPU fits, e.g. 256,1024,4096")
    c.add_argument("--rows", default=None, help="token counts of the fits, e.g. 1,16,64,256")
    args = ap.parse_args(argv)
    return {"generate": cmd_generate, "bench": cmd_bench, "calibrate": cmd_calibrate}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
