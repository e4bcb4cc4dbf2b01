"""`python -m impl.experiments.scheinfer`: generation output, byte-level prompts, one-line errors (exit 2)."""
import json
import subprocess
import sys

import pytest
import torch

from impl.experiments.scheinfer.__main__ import byte_tokenize, main
from impl.scheinfer.decoder import Decoder
from impl.scheinfer.generate_models import generate
from impl.scheinfer.partition import REFERENCE_COST
from impl.scheinfer.weights import GGUFWeights


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("scheinfer_cli")
    cost = d / "cost.json"
    cost.write_text(json.dumps({"cost": json.loads(REFERENCE_COST.to_json())}))
    return {"mixtral": generate("mixtral", d / "mixtral.gguf", seed=2), "llama": generate("llama", d / "llama.gguf"),
            "st": generate("llama", d / "llama_st"), "qwen": generate("qwen2_moe", d / "qwen.gguf", seed=3),
            "cost": cost, "dir": d}


def _ok(capsys, argv):
    assert main(argv) == 0
    return capsys.readouterr()


@pytest.mark.parametrize("policy", ["scheinfer", "fiddler", "layers"])
def test_generate_tokens_match_reference(files, capsys, policy):
    argv = ["generate", "--model", str(files["mixtral"]), "--tokens", "1,5,9,33", "--n-predict", "4",
            "--policy", policy, "--cost", str(files["cost"]), "--tile", "16", "--ignore-eos", "--threads", "1"]
    out = _ok(capsys, argv)
    lines = out.out.splitlines()
    ref = Decoder(GGUFWeights(files["mixtral"])).generate([[1, 5, 9, 33]], 4).tokens[0]
    assert list(map(int, lines[0].split())) == ref
    assert lines[1].startswith("prefill: 4 tokens,") and lines[1].endswith("tok/s")
    assert lines[2].startswith("decode: 3 tokens,") and f"policy: {policy}" in lines[3]
    assert "tokens" in out.err                      # tqdm progress on stderr


def test_prompt_is_byte_tokenized_and_timeline_written(files, capsys):
    from impl.common.records import validate_record
    assert byte_tokenize(files["llama"], "hi") == [1, 3 + ord("h"), 3 + ord("i")]
    tl, rec = files["dir"] / "timeline.json", files["dir"] / "timeline.record.json"
    out = _ok(capsys, ["generate", "--model", str(files["llama"]), "--prompt", "hi", "--n-predict", "2",
                       "--cost", str(files["cost"]), "--gpu-mem", "0", "--timeline", str(tl), "--out-record", str(rec),
                       "--no-progress"])
    assert "prefill: 3 tokens" in out.out
    events = json.loads(tl.read_text())
    assert events and {e["lane"] for e in events} == {"cpu"}       # no GPU memory: CPU only
    record = json.loads(rec.read_text())
    validate_record(record)
    lanes = "cuda" if torch.cuda.is_available() else "emulated on CPU"
    assert f"GPU and PCIe lanes {lanes}" in out.out.splitlines()[-1]
    assert (record["experiment"], record["system"], record["extra"]["gpu_lanes"]) == ("scheinfer_timeline", "scheinfer",
                                                                                      lanes)
    assert record["extra"]["events"] == len(events) and record["extra"]["events_file"] == str(tl)
    assert record["metrics"]["decode_tok_s"]["n"] == 1


MIXTRAL_RUN = ["--model", "{mixtral}", "--tokens", "1", "--n-predict", "2"]


@pytest.mark.parametrize("argv,msg", [
    (["--model", "{dir}/missing.gguf", "--tokens", "1", "--n-predict", "2"], "no such file"),
    (["--model", "{mixtral}", "--tokens", "1", "--n-predict", "-1"], "--n-predict=-1"),
    ([*MIXTRAL_RUN, "--policy", "magic"], "--policy='magic'"),
    (["--model", "{mixtral}", "--tokens", "1,x", "--n-predict", "2"], "--tokens"),
    (["--model", "{mixtral}", "--tokens", "1,99999", "--n-predict", "2"], "outside the vocabulary"),
    (["--model", "{st}", "--prompt", "hi", "--n-predict", "2"], "pass --tokens"),
    (["--model", "{gpt2}", "--tokens", "1", "--n-predict", "2"], "not supported"),
    ([*MIXTRAL_RUN, "--gpu-mem", "-5"], "--gpu-mem"),
    ([*MIXTRAL_RUN, "--popularity-tokens", "-1"], "--popularity-tokens=-1"),
    ([*MIXTRAL_RUN, "--popularity-tokens", "100000"], "the model's positions"),
    ([*MIXTRAL_RUN, "--gg-mode", "even"],
     "--gg-mode='even' is not allowed; expected one of uniform, popularity"),
    ([*MIXTRAL_RUN, "--calibration-text", "{dir}/missing.txt"], "missing.txt: no such file"),
    ([*MIXTRAL_RUN, "--calibration-text", "{dir}/empty.txt"], "empty.txt: the file has no text"),
    ([*MIXTRAL_RUN, "--policy", "fiddler", "--calibration-text", "{dir}/short.txt"],
     "tokens by the model's tokenizer, fewer than the --popularity-tokens 64 the profile needs"),
    (["--model", "{st}", "--tokens", "1", "--n-predict", "2", "--policy", "fiddler", "--calibration-text",
      "{dir}/short.txt"],
     "has no tokenizer to split it (an HF checkpoint directory"),
])
def test_bad_input_is_one_line_exit_2(files, capsys, monkeypatch, argv, msg):
    """One line, exit 2, before any work (the cost model's calibration comes before the weights)."""
    import gguf
    from impl.experiments.scheinfer import __main__ as cli_main
    monkeypatch.setattr(cli_main, "_cost_model", lambda *a, **k: pytest.fail("work started before the error"))
    (files["dir"] / "empty.txt").write_text(" \n")
    (files["dir"] / "short.txt").write_text("Hi.")
    gpt2 = files["dir"] / "gpt2.gguf"
    if not gpt2.exists():
        w = gguf.GGUFWriter(str(gpt2), "gpt2")
        w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    paths = {k: str(v) for k, v in files.items()} | {"gpt2": str(gpt2)}
    assert main(["generate"] + [a.format(**paths) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err


@pytest.mark.parametrize("cmd", ["generate", "bench"])
def test_a_cpu_kernel_this_host_cannot_run_is_one_line_before_work(files, capsys, monkeypatch, tmp_path, cmd):
    """A native kernel the CPU lacks, or a bad $SCHEINFER_CPU_KERNEL: one line naming it and what
    this host runs, exit 2, before the kernel probe or the cost model."""
    from impl.experiments.scheinfer import __main__ as cli_main
    from impl.scheinfer import cpu_kernels
    monkeypatch.setattr(cli_main, "_cost_model", lambda *a, **k: pytest.fail("work started before the error"))
    monkeypatch.setattr(cpu_kernels, "supported_isas", lambda: ("sse",))
    run = ["--model", str(files["mixtral"])] + (["--tokens", "1", "--n-predict", "2"] if cmd == "generate" else
                                                 ["--out-csv", str(tmp_path / "b.csv"), "--out-record", str(tmp_path / "b.json")])
    for argv, env, msg in ((["--cpu-kernel", "avx512"], None, "--cpu-kernel: cpu kernel='avx512' is not available "
                            "on this host (this CPU runs sse); expected one of auto, torch, sse"),
                           ([], "avx3", "--cpu-kernel: cpu kernel='avx3' is not allowed")):
        if env:
            monkeypatch.setenv("SCHEINFER_CPU_KERNEL", env)
        assert main([cmd, *run, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err, err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--n-predict", "2"])
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.slow
def test_module_entry_point(files):
    r = subprocess.run([sys.executable, "-m", "impl.experiments.scheinfer", "generate", "--model", str(files["llama"]),
                        "--tokens", "1 2 3", "--n-predict", "2", "--cost", str(files["cost"]), "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()[0].split()) == 2


def test_bench_measures_llamacpp_in_its_own_process(files, capsys, tmp_path, monkeypatch):
    """--llamacpp: llama.cpp's rows come from `SeparateProcess` (its own process), never from an
    in-process call, and the child is gone when the command returns."""
    pytest.importorskip("llama_cpp")
    from baselines.llamacpp import runner
    made = []
    real = runner.SeparateProcess

    class Recorded(real):
        def __init__(self):
            super().__init__()
            made.append(self)

    monkeypatch.setattr(runner, "SeparateProcess", Recorded)
    monkeypatch.setattr(runner, "measure_speed", lambda *a, **k: pytest.fail("llama.cpp measured in this process"))
    csv, rec = tmp_path / "b.csv", tmp_path / "b.json"
    _ok(capsys, ["bench", "--model", str(files["mixtral"]), "--prompt-tokens", "4", "--n-predict", "3",
                 "--policies", "scheinfer", "--repeats", "1", "--cost", str(files["cost"]), "--llamacpp",
                 "--threads", "1", "--out-csv", str(csv), "--out-record", str(rec), "--no-progress"])
    import pandas as pd
    frame = pd.read_csv(csv)
    assert set(frame["system"]) == {"scheinfer", "llama.cpp"} and (frame["decode_tok_s"] > 0).all()
    assert len(made) == 1 and made[0]._pool is None


def test_bench_writes_rounds_and_a_valid_record(files, capsys, tmp_path):
    from impl.common.records import validate_record
    csv, rec = tmp_path / "b.csv", tmp_path / "b.json"
    out = _ok(capsys, ["bench", "--model", str(files["mixtral"]), "--prompt-tokens", "4,9", "--n-predict", "3",
                       "--policies", "scheinfer,layers", "--repeats", "2", "--cost", str(files["cost"]),
                       "--tile", "16", "--threads", "1", "--out-csv", str(csv), "--out-record", str(rec),
                       "--no-progress"])
    import pandas as pd
    frame = pd.read_csv(csv)
    assert len(frame) == 2 * 2 * 2 and set(frame["system"]) == {"scheinfer", "layers"}
    lanes = "cuda" if torch.cuda.is_available() else "emulated on CPU"
    assert set(frame["gpu_lanes"]) == {lanes} and f"GPU and PCIe lanes {lanes}" in out.out
    assert (frame["prefill_tok_s"] > 0).all() and (frame["decode_tok_s"] > 0).all()
    record = json.loads(rec.read_text())
    validate_record(record)
    assert record["tier"] == "emu" and record["experiment"] == "scheinfer_bench"
    assert record["extra"]["gpu_lanes"] == lanes
    assert record["metrics"]["decode_tok_s/layers/prompt=9"]["n"] == 2
    assert "device cpu" in out.out


@pytest.mark.parametrize("args, message", [
    (["--policies", "scheinfer,vllm"], "--policies: 'vllm' is not allowed"),
    (["--prompt-tokens", "0,4"], "--prompt-tokens: 0 is not allowed"),
    (["--prompt-tokens", "a"], "--prompt-tokens='a': expected a comma-separated list"),
    (["--repeats", "0"], "--repeats=0 is not allowed"),
    (["--assign", "greedy"], "--assign='greedy' is not allowed"),
    (["--llamacpp-offload", "auto"], "--llamacpp-offload needs --llamacpp"),
    (["--deadline-s", "0"], "--deadline-s=0.0 is not allowed"),
    (["--popularity-tokens", "-3"], "--popularity-tokens=-3 is not allowed"),
    (["--popularity-tokens", "100000"], "--popularity-tokens=100000 is not allowed"),
    (["--gg-mode", "Popularity"], "--gg-mode='Popularity' is not allowed"),
    (["--calibration-text", "/nonexistent/text.txt"], "--calibration-text /nonexistent/text.txt: no such file"),
    (["--popularity-tokens", "5000"], "fewer than the --popularity-tokens 5000 the profile needs"),
])
def test_bench_bad_arguments_fail_before_work(files, capsys, tmp_path, args, message):
    rc = main(["bench", "--model", str(files["mixtral"]), "--out-csv", str(tmp_path / "b.csv"),
               "--out-record", str(tmp_path / "b.json"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b.csv").exists()


def test_offload_specs_and_ratios():
    import pandas as pd
    from impl.experiments.scheinfer.__main__ import _parse_offload, _ratios
    assert _parse_offload("auto") == "auto"
    assert _parse_offload("ngl=all,ncmoe=2; ngl=3") == [("all", 2), (3, 0)]
    for bad in ("ngl=x", "ncmoe=2", "ngl=2,foo=1", ";"):
        with pytest.raises(ValueError, match="--llamacpp-offload"):
            _parse_offload(bad)
    frame = pd.DataFrame([{"system": s, "prompt_tokens": 8, "prefill_tok_s": p, "decode_tok_s": d}
                          for s, p, d in (("scheinfer", 30.0, 6.0), ("fiddler", 10.0, 4.0), ("scheinfer", 50.0, 6.0))])
    assert _ratios(frame) == {"prefill": {"prompt=8": {"fiddler": 4.0}}, "decode": {"prompt=8": {"fiddler": 1.5}}}


@pytest.fixture
def placements(monkeypatch):
    """policy name -> the placement of the engine the CLI built for it."""
    from impl.scheinfer import engine
    made = {}

    class Recording(engine.HybridDecoder):
        def __init__(self, source, eng, **kw):
            super().__init__(source, eng, **kw)
            made[eng.policy.name] = eng.placement
    monkeypatch.setattr(engine, "HybridDecoder", Recording)
    return made


@pytest.fixture
def built(monkeypatch):
    """The names of the policies the CLI built, one entry per construction."""
    from impl.scheinfer import policy
    names, make = [], policy.make_policy
    monkeypatch.setattr(policy, "make_policy", lambda name, **kw: names.append(name) or make(name, **kw))
    return names


def _calibration_counts(model, n: int) -> dict:
    """Tokens per FFN on the CLI's calibration prompt (the default text's first n tokens),
    counted on the reference decoder."""
    from impl.experiments.scheinfer.calibration_prompt import calibration_prompt
    from impl.scheinfer.policy import PopularityCounter
    src = GGUFWeights(model)
    counter = PopularityCounter.for_config(src.config)
    Decoder(src, route_observer=counter).logits(list(calibration_prompt(model, src.config.vocab_size, n).tokens))
    return counter.counts


def test_bench_gives_fiddler_the_calibration_profile(files, capsys, tmp_path, placements, built):
    """Fiddler's resident experts are the most popular on the calibration prompt (profiled on the
    decoder loaded for scheinfer), the shared experts first; the record and CSV say so; each
    policy is built once."""
    import pandas as pd
    from impl.scheinfer.policy import ffn_widths
    model, n, row = files["qwen"], 16, 3 * 64 * 4                 # tiny qwen2_moe: hidden 64, float32
    budget = 64 * row + 2 * 64 * row + 10 * 16 * row               # staging, both shared experts, 10 routed
    csv, rec = tmp_path / "b.csv", tmp_path / "b.json"
    _ok(capsys, ["bench", "--model", str(model), "--prompt-tokens", "3", "--n-predict", "1", "--policies",
                 "fiddler,scheinfer", "--repeats", "1", "--cost", str(files["cost"]), "--tile", "16", "--threads", "1",
                 "--gpu-mem", str(budget), "--popularity-tokens", str(n), "--out-csv", str(csv),
                 "--out-record", str(rec), "--no-progress"])
    assert built == ["fiddler", "scheinfer"]
    counts = _calibration_counts(model, n)
    popularity = json.loads(rec.read_text())["extra"]["popularity"]
    assert popularity["counts"] == {f"{layer}.{e}": c for (layer, e), c in counts.items()}
    assert popularity["used_by"] == ["fiddler"] and popularity["tokens"] == n
    assert "'scheinfer'" in popularity["profiled_with"] and popularity["calibration_prompt"]["kind"] == "text"
    assert popularity["ffns_counted"] == len(counts) and popularity["ffns"] == 2 * 61
    frame = pd.read_csv(csv)
    assert frame.set_index("system")["popularity_tokens"].fillna(-1).to_dict() == {"fiddler": n, "scheinfer": -1}

    gg, widths = placements["fiddler"].gg, ffn_widths(GGUFWeights(model).config)
    resident = {k for k, g in gg.items() if g}
    assert all(gg[k] == widths[k] for k in resident)               # whole experts only
    assert {(0, "shared"), (1, "shared")} <= resident and len(resident) == 12
    routed = [k for k in widths if k[1] != "shared"]
    assert min(counts.get(k, 0) for k in routed if k in resident) >= max(counts.get(k, 0) for k in routed
                                                                         if k not in resident)


@pytest.mark.parametrize("n", [0, 24])
def test_generate_places_fiddler_by_profile_or_key_order(files, capsys, placements, built, n):
    """--popularity-tokens 0: Fiddler's residents in key order, as without a profile; else the
    profile of n calibration tokens on the reference decoder, given to the policy built once."""
    from baselines.fiddler.policy import FiddlerPolicy
    from impl.scheinfer.partition import REFERENCE_COST
    from impl.scheinfer.policy import ffn_widths, place
    model, budget = files["qwen"], 200_000
    out = _ok(capsys, ["generate", "--model", str(model), "--tokens", "1,5,9", "--n-predict", "2", "--policy", "fiddler",
                       "--cost", str(files["cost"]), "--gpu-mem", str(budget), "--popularity-tokens", str(n),
                       "--threads", "1", "--no-progress"])
    assert built == ["fiddler"]
    popularity = _calibration_counts(model, n) if n else None
    assert ("popularity: key order" if n == 0 else f"popularity from {n} calibration tokens") in out.out
    cfg = GGUFWeights(model).config
    expected = place(FiddlerPolicy(REFERENCE_COST, cfg.hidden, 4, popularity), ffn_widths(cfg), cfg.hidden, 4, budget)
    assert placements["fiddler"].gg == expected.gg
    keyed = place(FiddlerPolicy(REFERENCE_COST, cfg.hidden, 4), ffn_widths(cfg), cfg.hidden, 4, budget)
    assert (placements["fiddler"].gg == keyed.gg) == (n == 0)


def _most_popular_first(gg: dict, widths: dict, counts: dict) -> set:
    """The FFNs a placement holds, checked to be whole and the most popular (by `counts`) of the
    routed experts; returns them."""
    resident = {k for k, g in gg.items() if g}
    assert all(gg[k] == widths[k] for k in resident)               # whole FFNs only
    routed = [k for k in widths if k[1] != "shared"]
    assert min(counts.get(k, 0) for k in routed if k in resident) >= max(counts.get(k, 0) for k in routed
                                                                         if k not in resident)
    return resident


def test_gg_mode_popularity_places_the_most_popular_experts_first(files, capsys, placements, tmp_path):
    """--gg-mode popularity: scheinfer's resident rows are whole FFNs in decreasing popularity on
    the calibration profile (the shared experts, which see every token, first), as generate says;
    the default 'uniform' places by its own rule (resident_rows). bench records the
    mode (CSV column and record) and gives the profile to scheinfer."""
    import pandas as pd
    from impl.scheinfer.partition import REFERENCE_COST
    from impl.scheinfer.policy import ScheInferPolicy, ffn_widths, place
    model, n, row = files["qwen"], 24, 3 * 64 * 4                 # tiny qwen2_moe: hidden 64, float32
    budget = 2 * 64 * row + 2 * 64 * row + 10 * 16 * row           # two staging buffers, both shared experts, 10 routed
    cfg = GGUFWeights(model).config
    widths, counts = ffn_widths(cfg), _calibration_counts(model, n)
    common = ["--model", str(model), "--cost", str(files["cost"]), "--gpu-mem", str(budget), "--tile", "16",
              "--threads", "1", "--popularity-tokens", str(n), "--no-progress"]
    out = _ok(capsys, ["generate", "--tokens", "1,5,9", "--n-predict", "2", "--gg-mode", "popularity", *common])
    assert "policy: scheinfer, gg-mode popularity," in out.out and f"popularity from {n} calibration tokens" in out.out
    gg = placements["scheinfer"].gg
    expected = place(ScheInferPolicy(REFERENCE_COST, cfg.hidden, 4, tile=16, gg_mode="popularity", popularity=counts),
                     widths, cfg.hidden, 4, budget)
    assert gg == expected.gg
    assert _most_popular_first(gg, widths, counts) >= {(0, "shared"), (1, "shared")} and sum(map(bool, gg.values())) == 12
    out = _ok(capsys, ["generate", "--tokens", "1,5,9", "--n-predict", "2", *common])
    assert "policy: scheinfer, gg-mode uniform," in out.out and "popularity from" not in out.out
    uniform = place(ScheInferPolicy(REFERENCE_COST, cfg.hidden, 4, tile=16), widths, cfg.hidden, 4, budget)
    assert placements["scheinfer"].gg == uniform.gg != expected.gg

    csv, rec = tmp_path / "b.csv", tmp_path / "b.json"
    _ok(capsys, ["bench", "--prompt-tokens", "3", "--n-predict", "1", "--policies", "scheinfer,layers", "--repeats", "1",
                 "--gg-mode", "popularity", "--out-csv", str(csv), "--out-record", str(rec), *common])
    frame = pd.read_csv(csv).set_index("system")
    assert frame["gg_mode"].fillna("").to_dict() == {"scheinfer": "popularity", "layers": ""}
    assert frame["popularity_tokens"].fillna(-1).to_dict() == {"scheinfer": n, "layers": -1}
    record = json.loads(rec.read_text())
    assert record["config"]["gg_mode"] == "popularity" and record["extra"]["popularity"]["used_by"] == ["scheinfer"]
    assert placements["scheinfer"].gg == expected.gg
