"""Figure conventions (fixed styles, PDF + PNG with Type 42 fonts), the papers' CSV convention,
and the Table II figure and markdown table from a hand-made tidy CSV."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from figures import hiermoe_table2 as fig_t2  # noqa: E402
from figures import style  # noqa: E402
from impl.common.paper import PAPER_DIR, REQUIRED_KEYS, read_paper_csv  # noqa: E402


def test_every_system_has_its_own_style():
    assert len(style.SYSTEM_ORDER) == len(set(style.SYSTEM_ORDER)) >= 10
    pairs = {(s.color, s.hatch) for s in style.SYSTEM_STYLES.values()}
    assert len(pairs) == len(style.SYSTEM_ORDER)
    for systems in style.PAPER_SYSTEMS.values():  # within one paper's figure: all colours differ
        assert len({style.style_for(s).color for s in systems}) == len(systems)
        assert len({style.style_for(s).hatch for s in systems}) == len(systems)
    assert style.style_for("HierMoE") == style.SYSTEM_STYLES["HierMoE"]
    with pytest.raises(ValueError, match="no style for 'Hiermoe'; known: Megatron-LM, "):
        style.style_for("Hiermoe")


def test_the_styled_systems_are_the_registrys():
    """Each paper's styled systems are systems of that paper's list, in its order, and include
    every baseline and the paper's own system (the ones its figures compare)."""
    from impl.experiments import systems

    assert tuple(style.STYLE_SLOTS) == systems.PAPERS
    for paper, styled in style.PAPER_SYSTEMS.items():
        listed = [s.name for s in systems.paper_systems(paper)]
        assert list(styled) == [name for name in listed if name in styled], paper
        assert {s.name for s in systems.paper_systems(paper, roles=("baseline", "ours"))} <= set(styled), paper


def test_save_writes_pdf_with_type42_fonts_and_png(tmp_path):
    style.set_style()
    fig, ax = plt.subplots()
    ax.bar([0, 1], [1, 2])
    ax.set_title("fonts")
    pdf, png = style.save(fig, tmp_path / "sub" / "f.pdf", source="x.csv")
    plt.close(fig)
    assert (pdf, png) == (tmp_path / "sub" / "f.pdf", tmp_path / "sub" / "f.png")
    data = pdf.read_bytes()
    assert b"/Type3" not in data and (b"/FontFile2" in data or b"/CIDFontType2" in data)
    assert png.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in pdf.parent.iterdir()) == ["f.pdf", "f.png"]


def test_paper_csvs_follow_the_convention():
    files = sorted(PAPER_DIR.glob("*.csv"))
    assert files
    for path in files:
        table, header = read_paper_csv(path)
        assert all(header[k] for k in REQUIRED_KEYS)
        assert table["value"].notna().all()


def test_paper_csv_without_citation_is_refused(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("# location: Table 1\n# quantity: q\n# unit: ms\nK,value\n2,1\n")
    with pytest.raises(ValueError, match="header lacks 'citation'"):
        read_paper_csv(bad)
    with pytest.raises(ValueError, match="not found; known: .*hiermoe_table2"):
        read_paper_csv("no_such_table")


def tidy_rows():
    """Two repeats of two cells, with values chosen so every printed number is known."""
    base = dict(experiment="hiermoe_table2", tier="sim", distribution="uniform", skew=1.0, E=256,
                tokens=100, copies=200, distinct=0, paper_source="hiermoe_table2")
    rows = []
    for r, k, measured, expected, paper in [(8, 2, (0.05, 0.07), 0.061, 0.06),
                                            (4, 2, (0.12, 0.13), 0.124, 0.12)]:
        for repeat, m in enumerate(measured):
            rows.append(dict(base, R=r, K=k, repeat=repeat, seed=repeat, measured=m, expected=expected,
                             paper=paper))
    return pd.DataFrame(rows)


def test_markdown_table_values():
    table = fig_t2.markdown_table2(tidy_rows(), source="t.csv")
    lines = [line for line in table.splitlines() if line.startswith("| 8 |") or line.startswith("| 4 |")]
    # median of (5, 7) = 6; p5 = 5.1, p95 = 6.9; 6 - 6 = 0; closed form 6.1 - 6 = +0.10
    assert lines[0] == "| 8 | 2 | 6 | 6.00 | 5.10-6.90 | 6.10 | +0.00 | +0.10 |"
    assert lines[1] == "| 4 | 2 | 12 | 12.50 | 12.05-12.95 | 12.40 | +0.50 | +0.40 |"
    assert "Largest difference from the paper: +0.50 pp; mean absolute difference 0.25 pp over 2 cells." in table
    assert "tier: sim" in table and "arXiv:2508.09591v1" in table and "`t.csv`" in table


def test_plot_cli_writes_all_outputs(tmp_path):
    csv = tmp_path / "t.csv"
    tidy_rows().to_csv(csv, index=False)
    out = tmp_path / "fig"
    code = fig_t2.main(["--csv", str(csv), "--out-pdf", str(out / "t2.pdf"), "--out-png", str(out / "t2.png"),
                        "--out-md", str(out / "t2.md")])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["t2.md", "t2.pdf", "t2.png"]


def test_plot_cli_rejects_bad_input(tmp_path, capsys):
    csv = tmp_path / "t.csv"
    tidy_rows().drop(columns=["expected"]).to_csv(csv, index=False)
    code = fig_t2.main(["--csv", str(csv), "--out-pdf", str(tmp_path / "a.pdf"), "--out-png", str(tmp_path / "a.png"),
                        "--out-md", str(tmp_path / "a.md")])
    assert code == 2 and "missing column 'expected'" in capsys.readouterr().err
    code = fig_t2.main(["--csv", str(csv), "--out-pdf", str(tmp_path / "a.pdf"), "--out-png", str(tmp_path / "b.png"),
                        "--out-md", str(tmp_path / "a.md")])
    assert code == 2 and "must be X.pdf and X.png with the same X" in capsys.readouterr().err


def _texts(fig) -> str:
    parts = [t.get_text() for t in fig.texts]
    for ax in fig.axes:
        parts += [t.get_text() for t in ax.texts] + [ax.get_title()]
        legend = ax.get_legend()
        if legend is not None:
            parts += [t.get_text() for t in legend.get_texts()]
    for legend in fig.legends:
        parts += [t.get_text() for t in legend.get_texts()]
    return " ".join(parts)


@pytest.mark.slow
def test_fsmoe_figures_draw_the_paper_beside_ours_and_say_modeled():
    from figures import fsmoe as fig_fs
    from impl.experiments.fsmoe.results import ResultsConfig, run_grid, run_models, run_table2

    cfg = ResultsConfig(grid_sample=4, fig6=(("A", "mixtral-7b"), ("B", "mixtral-7b")), fig7_seq=(512, 1024),
                        fig7_profiles={16: "fsmoe-testbed-a-16", 48: "fsmoe-testbed-a"}, gates=("gshard", "xmoe"))
    grid, models, t2 = run_grid(cfg, progress=False), run_models(cfg, progress=False), run_table2(cfg)
    figures = {"table5": fig_fs.plot_table5(fig_fs.table5(grid)), "fig6": fig_fs.plot_fig6(models),
               "fig7": fig_fs.plot_fig7(models), "table2": fig_fs.plot_table2(t2)}
    for name, fig in figures.items():
        text = _texts(fig)
        assert "MODELED" in text or "modeled" in text, name
        assert "paper" in text, name
        plt.close(fig)


def test_fsmoe_model_speedups_take_each_testbed_and_model_as_one_row():
    """Fig. 6 runs a model on both testbeds: each (testbed, model) is one bar, never averaged."""
    import pandas as pd
    from figures.fsmoe import model_speedups
    rows = [("A", "gpt2-xl", "DS-MoE", 300.0), ("A", "gpt2-xl", "FSMoE", 200.0),
            ("B", "gpt2-xl", "DS-MoE", 100.0), ("B", "gpt2-xl", "FSMoE", 80.0)]
    models = pd.DataFrame([{"figure": "fig6", "testbed": t, "model": m, "system": s, "iteration_ms": v}
                           for t, m, s, v in rows])
    sp = model_speedups(models, "fig6", []).set_index(["system", "baseline"])
    assert sp.loc[("FSMoE", "DS-MoE"), "low"] == 1.25 and sp.loc[("FSMoE", "DS-MoE"), "high"] == 1.5
    assert sp.loc[("FSMoE", "DS-MoE"), "mean"] == (1.25 + 1.5) / 2
    with pytest.raises(ValueError):            # a duplicated row is refused, not averaged
        model_speedups(pd.concat([models, models]), "fig6", [])


def test_fsmoe_overlap_cap_is_the_baseline_over_the_systems_lower_bound():
    import pandas as pd
    from figures.fsmoe import overlap_cap
    models = pd.DataFrame([
        {"figure": "fig6", "testbed": "A", "model": "m", "system": "DS-MoE", "iteration_ms": 300.0, "over_lower_bound": 1.0},
        {"figure": "fig6", "testbed": "A", "model": "m", "system": "FSMoE", "iteration_ms": 200.0, "over_lower_bound": 1.25}])
    assert overlap_cap(models).tolist() == [300.0 / 160.0]


@pytest.mark.parametrize("paper, ours, expected", [
    (1.12, 1.01, False),     # within 10% as ratios, but a 1% gain for a 12% one
    (1.09, 1.02, False),
    (1.16, 0.98, False),     # the sign of the gain differs
    (1.18, 1.23, True),
    (1.08, 1.06, True),
    (2.72, 2.60, True),      # large speedups: the ratio's 10% binds
    (2.72, 1.42, False),
    (1.03, 1.045, True),     # small paper gains: within 2 points
])
def test_a_fsmoe_speedup_reproduces_when_ratio_and_gain_agree(paper, ours, expected):
    from figures.fsmoe import reproduces
    assert reproduces(paper, ours) is expected


def test_fsmoe_table6_is_not_judged_when_the_runs_do_not_tell_the_gates_apart():
    from figures.fsmoe import UNDIFFERENTIATED, check_verdict, gates_differentiated

    def models(times):
        return pd.DataFrame([{"figure": "table6", "system": "DS-MoE", "gate": g, "iteration_ms": t}
                             for g, t in zip(("gshard", "xmoe", "sigmoid", "expert_choice"), times)])

    flat, spread = models([380.08, 380.08, 380.06, 380.06]), models([968.1, 1064.0, 986.6, 909.9])
    assert not gates_differentiated(flat) and gates_differentiated(spread)
    what = "Table 6, gshard: FSMoE over DS-MoE"
    assert check_verdict(what, 1.37, 1.37, gates_judged=False) == UNDIFFERENTIATED
    assert check_verdict(what, 1.37, 1.37, gates_judged=True) == "reproduces"
    assert check_verdict("Table 5, Testbed A, FSMoE over Tutel", 1.18, 1.23, gates_judged=False) == "reproduces"


def test_scheinfer_figures_say_what_was_run():
    """The partition plot is labelled as modeled fractions (not tok/s); the timeline's rows are
    named as our engine's policies, not as llama.cpp or Fiddler, and say where the GPU lanes ran."""
    from figures import scheinfer_sim as fig_si

    rows = [{"hardware": "hw", "model": "mixtral-8x7b", "system": s, "phase": ph, "tokens_per_s": 10.0,
             "cc_frac": 0.2, "cg_frac": 0.3, "gg_frac": 0.5} for s in ("ScheInfer", "llama.cpp", "Fiddler")
            for ph in ("prefill", "decode", "overall")]
    partition = fig_si.plot_partition(pd.DataFrame(rows))
    caption = " ".join(t.get_text() for t in partition.texts)
    assert "fractions" in caption and "MODELED" in caption and "tok/s" not in caption
    plt.close(partition)
    events = pd.DataFrame([{"lane": lane, "band": band, "layer": 0, "phase": ph, "start": 0.0, "end": 1e-4}
                           for lane, band in (("cpu", "cc"), ("h2d", "cg"), ("gpu", "gg")) for ph in ("prefill", "decode")])
    timeline = fig_si.plot_timeline({p: events for p in ("scheinfer", "fiddler", "layers")}, "cpu")
    titles = [ax.get_title() for ax in timeline.axes]
    assert any("engine policy 'layers'" in t for t in titles) and any("engine policy 'fiddler'" in t for t in titles)
    assert not any(t.startswith(("llama.cpp", "Fiddler")) for t in titles)
    caption = " ".join(t.get_text() for t in timeline.texts)
    assert "EMULATED on CPU" in caption and "not those programs" in caption
    plt.close(timeline)


def _scheinfer_rows(model, resident, tps, times, bands=(0.2, 0.3, 0.5)):
    """Sim CSV rows of one (hardware, model): tps and times (ffn_s, nonffn_s, act_s) per system."""
    return [{"hardware": "hw", "model": model, "system": sys_, "phase": ph, "tokens_per_s": tps[sys_],
             "time_s": sum(times[sys_]), **dict(zip(("ffn_s", "nonffn_s", "act_s"), times[sys_])),
             **dict(zip(("cc_frac", "cg_frac", "gg_frac"), bands)), "gg_work_frac": bands[2], "resident_frac": resident,
             "gpu_layers": 2,
             "num_layers": 4, "head_on_gpu": False, "prompt_tokens": 16, "decode_tokens": 4, "routing": "gate",
             "gg_mode": "uniform"}
            for sys_ in tps for ph in ("prefill", "decode", "overall")]


def test_scheinfer_report_bullets_follow_the_csv():
    """'All FFN rows resident' only where resident_frac == 1; a loss names the time part where
    ScheInfer loses most; Fiddler on a model other than Mixtral is our port of its policy; no
    typed-in claims about other models or about which way an assumption leans."""
    from figures import scheinfer_sim as fig_si
    fits = _scheinfer_rows("llama2-7b", 1.0, {"ScheInfer": 10.0, "llama.cpp": 10.0},
                           {"ScheInfer": (1, 1, 0), "llama.cpp": (1, 1, 0)})
    loses = _scheinfer_rows("qwen1.5-moe-a2.7b", 0.5, {"ScheInfer": 8.0, "llama.cpp": 4.0, "Fiddler": 10.0},
                            {"ScheInfer": (3, 1, 1), "llama.cpp": (5, 2, 0), "Fiddler": (1, 1, 0.5)})
    text = fig_si.report(pd.DataFrame(fits + loses))
    assert "**All FFN rows resident.** LLaMA-2-7B on hw" in text and "Qwen1.5-MoE on hw" not in text
    assert "Qwen1.5-MoE decode: ScheInfer 0.80x of our port of Fiddler's policy" in text
    assert "Most of the gap is FFN time" in text and "ScheInfer's is 3.00x of the baseline's" in text
    assert "| hw | qwen1.5-moe-a2.7b | decode | 2.00x | 0.80x (port) |" in text
    for claim in ("favourable", "more skewed", "launch overheads", "fits every assumed card"):
        assert claim not in text
    text = fig_si.report(pd.DataFrame(_scheinfer_rows("llama2-7b", 0.9, {"ScheInfer": 10.0, "llama.cpp": 10.0},
                                                      {"ScheInfer": (1, 1, 0), "llama.cpp": (1, 1, 0)})))
    assert "All FFN rows resident" not in text and "**Fiddler.**" not in text



def test_scheinfer_report_shows_the_other_gg_reading():
    """The report says which reading of GG the headline runs; ScheInfer under the other one
    (ScheInfer[GG popularity], gg_mode 'popularity' in its rows) gets a table per model and phase
    beside the headline, and a loss bullet says where that reading turns the conclusion; a loss
    of the other reading alone gets its own bullet; all computed from the rows."""
    from figures import scheinfer_sim as fig_si

    def rows(alt_tps):
        out = _scheinfer_rows("qwen1.5-moe-a2.7b", 0.5, {"ScheInfer": 8.0, "llama.cpp": 4.0, "Fiddler": 10.0,
                                                         "ScheInfer[GG popularity]": alt_tps},
                              {"ScheInfer": (3, 1, 1), "llama.cpp": (5, 2, 0), "Fiddler": (1, 1, 0.5),
                               "ScheInfer[GG popularity]": (0.5, 1, 0)})
        return pd.DataFrame([{**r, "gg_mode": "popularity", "gg_work_frac": 0.9} if "[GG" in r["system"] else r
                             for r in out])

    text = fig_si.report(rows(12.0))
    assert "gg_mode 'uniform', the same tile-snapped fraction of every FFN resident" in text
    assert "## ScheInfer with GG by popularity (ablation: the other reading)" in text
    assert "on the same routing it then runs: an oracle, like Fiddler's here" in text
    assert "| Qwen1.5-MoE | decode | 2.00x / 3.00x | 0.80x / 1.20x (port) | 1.50x | 50 % / 90 % / 50 % |" in text
    assert "| all of these | overall | 2.00x / 3.00x | 0.80x / 1.20x (port) | 1.50x | 50 % / 90 % / 50 % |" in text
    assert ("GG by popularity (ScheInfer[GG popularity]), ScheInfer is 1.20x of the baseline here: a win, so this "
            "conclusion turns on the reading; its FFN time (CPU, PCIe and GPU lanes) is 0.50x of the baseline's") in text
    text = fig_si.report(rows(3.0))
    assert "ScheInfer is 0.30x of the baseline here: still a loss;" in text
    assert ("**Qwen1.5-MoE decode, GG by popularity: ScheInfer 0.75x of llama.cpp** (hw), where the headline "
            "(gg_mode 'uniform') is 2.00x.") in text
    headline = rows(12.0)
    text = fig_si.report(headline[headline["system"] != "ScheInfer[GG popularity]"])
    assert "GG by popularity" not in text and "the other reading" not in text

WRONG_CSV = "a,b\n1,2\n"
# every figure CLI that reads results CSVs, with each CSV argument given the wrong file
FIGURE_CLIS = {
    "hiermoe_table2": lambda csv, out: ["--csv", csv, "--out-pdf", f"{out}/t.pdf", "--out-png", f"{out}/t.png",
                                        "--out-md", f"{out}/t.md"],
    "hiermoe_scaleout": lambda csv, out: ["--csv", csv, "--out", f"{out}/s", "--out-md", f"{out}/s.md"],
    "hiermoe_sim": lambda csv, out: [a for flag in ("--qwen3", "--deepseek", "--deepseek-ablation", "--node", "--table4", "--ablation",
                                                    "--ablation-persistent", "--ablation-long", "--ablation-long-persistent", "--skew", "--swap",
                                                    "--swap-gap")
                                    for a in (flag, csv)]
                                    + ["--out-dir", out],
    "scheinfer_sim": lambda csv, out: ["--sim", csv, "--timeline", csv, "--out-dir", out],
    "emu_validation": lambda csv, out: ["--csv", csv, "--out", f"{out}/e", "--out-md", f"{out}/e.md"],
    "fsmoe": lambda csv, out: ["--grid", csv, "--statistic", csv, "--table2", csv, "--models", csv, "--out-dir", out],
}


@pytest.mark.parametrize("name", sorted(FIGURE_CLIS))
def test_every_figure_names_the_missing_columns_of_a_wrong_csv(tmp_path, capsys, name):
    """A CSV from another experiment (or an older run) stops the figure with one line naming the
    file and its missing columns, before anything is drawn or written."""
    import importlib
    csv = tmp_path / "wrong.csv"
    csv.write_text(WRONG_CSV)
    out = tmp_path / "out"
    out.mkdir()
    code = importlib.import_module(f"figures.{name}").main(FIGURE_CLIS[name](str(csv), str(out)))
    err = capsys.readouterr().err
    assert code == 2 and f"{csv}: missing column" in err, err
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("name", sorted(FIGURE_CLIS))
def test_every_figure_refuses_a_csv_cut_short(tmp_path, capsys, name):
    """A results CSV that ends mid-line (a copy or a run cut short) stops the figure with one line
    naming the file, instead of a report made from a last row of NaN."""
    import importlib
    csv = tmp_path / "cut.csv"
    csv.write_text(WRONG_CSV + "3,")
    out = tmp_path / "out"
    out.mkdir()
    code = importlib.import_module(f"figures.{name}").main(FIGURE_CLIS[name](str(csv), str(out)))
    err = capsys.readouterr().err
    assert code == 2 and f"{csv}: ends mid-line" in err and len(err.strip().splitlines()) == 1, err
    assert list(out.iterdir()) == []


def _csv_with_its_record(tmp_path, frame, name="run.csv"):
    """A CSV and its run record written as every experiment CLI writes them."""
    from impl.common import cli
    from impl.common.records import make_record
    csv = tmp_path / name
    record = make_record(experiment="t", system="s", tier="sim", topology={"name": "t"}, model={}, config={},
                         metrics={}, seed=0)
    cli.write_csv_and_record(frame, str(csv), record, str(csv.with_suffix(".json")))
    return csv


@pytest.mark.parametrize("name", sorted(FIGURE_CLIS))
@pytest.mark.parametrize("damage", ["fewer rows", "edited"])
def test_every_figure_refuses_a_csv_its_run_record_does_not_describe(tmp_path, capsys, name, damage):
    """A CSV cut short at a line end (or edited) parses cleanly; its run record beside it says how
    many rows the run wrote and their sha256, so the figure stops with one line naming both files."""
    import importlib
    import io
    import pandas as pd
    csv = _csv_with_its_record(tmp_path, pd.read_csv(io.StringIO(WRONG_CSV)))
    lines = csv.read_text().splitlines(keepends=True)
    csv.write_text("".join(lines[:-1]) if damage == "fewer rows" else "".join(lines).replace("1", "7"))
    out = tmp_path / "out"
    out.mkdir()
    code = importlib.import_module(f"figures.{name}").main(FIGURE_CLIS[name](str(csv), str(out)))
    err = capsys.readouterr().err
    expected = "rows, but its run record" if damage == "fewer rows" else "sha256 differs"
    assert code == 2 and expected in err and str(csv.with_suffix(".json")) in err, err
    assert len(err.strip().splitlines()) == 1 and list(out.iterdir()) == []


def test_a_csv_its_run_record_describes_reads_as_written(tmp_path):
    """The check passes the untouched file, a file its record does not name (records of older
    runs), and a CSV without a record beside it."""
    import json
    import pandas as pd
    from figures.inputs import read_results
    frame = pd.DataFrame({"a": [1, 2, 3], "b": [0.5, float("nan"), 2.0]})
    csv = _csv_with_its_record(tmp_path, frame)
    pd.testing.assert_frame_equal(read_results(str(csv), ["a", "b"], "w"), frame)
    record = json.loads(csv.with_suffix(".json").read_text())
    assert record["outputs"] == {"run.csv": {"rows": 3, "sha256": record["outputs"]["run.csv"]["sha256"]}}
    del record["outputs"]
    csv.with_suffix(".json").write_text(json.dumps(record))
    csv.write_text(csv.read_text().splitlines(keepends=True)[0])
    assert read_results(str(csv), ["a"], "w", allow_empty=True).empty
    alone = tmp_path / "alone.csv"
    frame.to_csv(alone, index=False)
    assert len(read_results(str(alone), ["a"], "w")) == 3


def test_every_figure_cli_reading_csvs_is_in_the_bad_input_test():
    import pkgutil
    from pathlib import Path
    import figures
    readers = {m.name for m in pkgutil.iter_modules(figures.__path__)
               if "read_results(" in (Path(figures.__path__[0]) / f"{m.name}.py").read_text() and m.name != "inputs"}
    assert readers == set(FIGURE_CLIS)


@pytest.mark.parametrize("content", ["", "a,b\n", "\x00\x01 not\n\"a,b\n"], ids=["empty", "header-only", "garbage"])
def test_a_results_reader_names_the_file_of_an_empty_or_broken_csv(tmp_path, content):
    from figures.inputs import read_results
    path = tmp_path / "r.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"^{path}: "):
        read_results(str(path), ("a",), "the writer")


@pytest.mark.parametrize("record", ["", '{"tier": "cluster", "model": {', '{"model": {}}', "[]"],
                         ids=["empty", "truncated", "no-config", "not-an-object"])
def test_the_gpu_section_names_a_broken_bench_record(tmp_path, record):
    """Before anything is predicted or written: one ValueError naming the record file."""
    from figures.scheinfer_sim import gpu_section
    bench = tmp_path / "b.csv"
    bench.write_text("round,system,prompt_tokens,n_predict,prefill_tok_s,decode_tok_s,device\n"
                     "0,scheinfer,8,4,10.0,5.0,cuda:0\n")
    rec = tmp_path / "b.json"
    rec.write_text(record)
    with pytest.raises(ValueError, match=f"^{rec}: not a bench run record"):
        gpu_section(str(bench), str(rec), str(tmp_path / "unused.yaml"))
