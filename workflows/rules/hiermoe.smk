# HierMoE experiments (tier 'sim' here: measured on routing masks in one process).
from impl.common.config import config_hash
from impl.common.records import record_path
from impl.experiments.hiermoe import table2_config as table2

# Build and check the Table II config now, so a bad key or value stops the workflow before any
# job runs, with the experiment's own error message.
TABLE2_CONFIG = table2.load_config(
    experiment_config("hiermoe_table2"), experiment_overrides("hiermoe_table2")
)
# Results are named by the config's hash (results/raw/<experiment>/<system>/<topology>/<hash>),
# so runs of different configs sit side by side and switching back reuses the earlier one.
TABLE2_RECORD = record_path(
    "results", table2.EXPERIMENT, table2.SYSTEM, table2.TOPOLOGY, config_hash(TABLE2_CONFIG)
)


rule hiermoe_table2:
    """HierMoE Table II: token duplication rate per number of expert groups R and top-K."""
    input:
        code=code_inputs("impl.experiments.hiermoe.table2"),
        config=experiment_config("hiermoe_table2"),
        paper=paper_csv(TABLE2_CONFIG.paper),
    output:
        csv=str(TABLE2_RECORD.with_suffix(".csv")),
        record=str(TABLE2_RECORD),
    log:
        str(Path("results/logs") / TABLE2_RECORD.relative_to("results/raw").with_suffix(".log")),
    params:
        overrides=set_flags("hiermoe_table2"),
    threads: 1
    resources:
        runtime=15,
        mem_mb=4000,
    shell:
        "python -m impl.experiments.hiermoe.table2 --config {input.config} {params.overrides} --no-progress"
        " --out-csv {output.csv} --out-record {output.record} > {log} 2>&1"


rule hiermoe_calibration:
    """Our alpha-beta fits of the AlltoAll kinds on this machine (Fig. 9, right panel)."""
    input:
        code=code_inputs("impl.common.calibrate"),
    output:
        profile="resources/calibration/{topology}-{backend}.yaml",
    log:
        "results/logs/calibration/{topology}-{backend}.log",
    priority: 10  # both cores while nothing else runs: first
    params:
        extra=config["hiermoe_calibration"]["args"],
    threads: 2
    resources:
        runtime=20,
        mem_mb=4000,
    shell:
        "python -m impl.common.calibrate --topology {wildcards.topology} --backend {wildcards.backend}"
        " {params.extra} --quiet --out {output.profile} > {log} 2>&1"


rule hiermoe_sim:
    """One sim-tier HierMoE run: every listed system on one routing stream (once per variant of a
    sweep run, in one process)."""
    input:
        code=code_inputs("impl.experiments.hiermoe.sim"),
        config=lambda wc: repo_path(SIM_RUNS[wc.run]["config"]),
    output:
        csv="results/raw/hiermoe_sim/{run}.csv",
        record="results/raw/hiermoe_sim/{run}.json",
    log:
        "results/logs/hiermoe_sim/{run}.log",
    benchmark:
        "results/benchmarks/hiermoe_sim/{run}.tsv"
    wildcard_constraints:
        run="|".join(SIM_RUNS),
    params:
        overrides=lambda wc: as_flags(sim_overrides(wc.run)),
        variants=lambda wc: sim_variant_flags(wc.run),
    threads: 1
    resources:
        runtime=30,
        mem_mb=4000,
    shell:
        "python -m impl.experiments.hiermoe.sim --config {input.config} {params.variants} {params.overrides} --no-progress"
        " --out-csv {output.csv} --out-record {output.record} > {log} 2>&1"


rule hiermoe_swap_measure:
    """One expert swap on local gloo ranks (tier emu) beside the sim's model of it (this machine's
    calibration): what the report says about the swap cost's model."""
    input:
        code=code_inputs("impl.experiments.hiermoe.swap_measure"),
        profile=calibration_profile(),
    output:
        csv="results/raw/hiermoe_swap/measure.csv",
        record="results/raw/hiermoe_swap/measure.json",
    log:
        "results/logs/hiermoe_swap/measure.log",
    benchmark:
        "results/benchmarks/hiermoe_swap/measure.tsv"
    priority: 10  # both cores while nothing else runs: right after the calibration
    params:
        overrides=set_flags("hiermoe_swap_measure"),
        topology=config["hiermoe_calibration"]["topology"],
    threads: 2
    resources:
        runtime=15,
        mem_mb=4000,
    shell:
        "python -m impl.experiments.hiermoe.swap_measure --profile {input.profile} --set topology={params.topology}"
        " {params.overrides} --out-csv {output.csv} --out-record {output.record} > {log} 2>&1"


rule hiermoe_swap_gap:
    """What the expert swap can gain on our routing: HierD-ES planned until it stops, on routings of
    several skews that stay (the report's explanation of the swap gain's gap to the paper); one
    sweep per run of the config (a model, or an ablation of its routing)."""
    input:
        code=code_inputs("impl.experiments.hiermoe.swap_gap"),
        config=lambda wc: repo_path(SWAP_GAP_RUNS[wc.run]["config"]),
    output:
        csv="results/raw/hiermoe_swap_gap/{run}.csv",
        record="results/raw/hiermoe_swap_gap/{run}.json",
    log:
        "results/logs/hiermoe_swap_gap/{run}.log",
    benchmark:
        "results/benchmarks/hiermoe_swap_gap/{run}.tsv"
    wildcard_constraints:
        run="|".join(SWAP_GAP_RUNS),
    params:
        overrides=lambda wc: as_flags(run_overrides("hiermoe_swap_gap", wc.run)),
    threads: 1
    resources:
        runtime=30,
        mem_mb=4000,
    shell:
        "python -m impl.experiments.hiermoe.swap_gap --config {input.config} {params.overrides} --no-progress"
        " --out-csv {output.csv} --out-record {output.record} > {log} 2>&1"


rule hiermoe_scaleout:
    """Beyond the paper (not in the default target): AlltoAll speedups from 32 to 1,024 GPUs,
    8 per node, D = 2..4, with the crossover points; `snakemake --cores 2 hiermoe_scaleout`."""
    input:
        code=code_inputs("impl.experiments.hiermoe.scaleout", "figures.hiermoe_scaleout"),
        config=repo_path(config["hiermoe_scaleout"]["config"]),
    output:
        csv="results/raw/hiermoe_scaleout/scaleout.csv",
        record="results/raw/hiermoe_scaleout/scaleout.json",
        pdf="results/figures/hiermoe_scaleout.pdf",
        png="results/figures/hiermoe_scaleout.png",
        md="results/figures/hiermoe_scaleout.md",
    log:
        "results/logs/hiermoe_scaleout/scaleout.log",
    params:
        overrides=as_flags(overrides_of(config["hiermoe_scaleout"].get("set", {}))),
    threads: 1
    resources:
        runtime=60,
        mem_mb=8000,
    shell:
        "(python -m impl.experiments.hiermoe.scaleout --config {input.config} {params.overrides} --no-progress"
        " --out-csv {output.csv} --out-record {output.record}"
        " && python -m figures.hiermoe_scaleout --csv {output.csv} --out results/figures/hiermoe_scaleout"
        " --out-md {output.md}) > {log} 2>&1"
