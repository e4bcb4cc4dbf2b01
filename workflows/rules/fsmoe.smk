# FSMoE experiments (tier sim: modeled on the paper's testbeds; tier emu: the real layer on this
# machine's gloo ranks) and its figures and report.

rule fsmoe_grid:
    """Table 4's configured layers on one testbed: every plan's degrees and iteration time."""
    input:
        code=code_inputs("impl.experiments.fsmoe.results"),
        config=experiment_config("fsmoe"),
    output:
        csv="results/raw/fsmoe/grid-{testbed}.csv",
        record="results/raw/fsmoe/grid-{testbed}.json",
    log:
        "results/logs/fsmoe/grid-{testbed}.log",
    wildcard_constraints:
        testbed="|".join(FSMOE_TESTBEDS),
    params:
        flags=lambda wc: fsmoe_flags(f"testbeds={{{wc.testbed}: fsmoe-testbed-{wc.testbed.lower()}}}"),
    threads: 1
    resources:
        runtime=20,
        mem_mb=2000,
    shell:
        "python -m impl.experiments.fsmoe.results --part grid --config {input.config} {params.flags}"
        " --no-progress --out-csv {output.csv} --out-record {output.record} > {log} 2>&1"


rule fsmoe_part:
    """The forward/backward degree statistic, Table 2's breakdown, the real models (Figs. 6-8, Table 6),
    the lane-order study of the plans' gaps over their lower bounds, or the link rates each unit
    reading of the communication betas implies."""
    input:
        code=code_inputs("impl.experiments.fsmoe.results"),
        config=experiment_config("fsmoe"),
    output:
        csv="results/raw/fsmoe/{part}.csv",
        record="results/raw/fsmoe/{part}.json",
    log:
        "results/logs/fsmoe/{part}.log",
    wildcard_constraints:
        part="statistic|table2|models|order|links",
    params:
        flags=fsmoe_flags(),
    threads: 1
    resources:
        runtime=20,
        mem_mb=2000,
    shell:
        "python -m impl.experiments.fsmoe.results --part {wildcards.part} --config {input.config} {params.flags}"
        " --no-progress --out-csv {output.csv} --out-record {output.record} > {log} 2>&1"


rule fsmoe_ablation:
    """One assumption changed (a unit reading): a sample of the grid, the real models and Table 2."""
    input:
        code=code_inputs("impl.experiments.fsmoe.results"),
        config=experiment_config("fsmoe"),
    output:
        grid="results/raw/fsmoe/ablation-{reading}-grid.csv",
        grid_record="results/raw/fsmoe/ablation-{reading}-grid.json",
        models="results/raw/fsmoe/ablation-{reading}-models.csv",
        models_record="results/raw/fsmoe/ablation-{reading}-models.json",
        table2="results/raw/fsmoe/ablation-{reading}-table2.csv",
        table2_record="results/raw/fsmoe/ablation-{reading}-table2.json",
    log:
        "results/logs/fsmoe/ablation-{reading}.log",
    wildcard_constraints:
        reading="|".join(FSMOE["ablation_readings"]) or "none",
    params:
        grid=lambda wc: fsmoe_flags(f"reading={wc.reading}", f"grid_sample={FSMOE['ablation_sample']}"),
        models=lambda wc: fsmoe_flags(f"reading={wc.reading}"),
    threads: 1
    resources:
        runtime=20,
        mem_mb=2000,
    shell:
        "(python -m impl.experiments.fsmoe.results --part grid --config {input.config} {params.grid} --no-progress"
        " --out-csv {output.grid} --out-record {output.grid_record}"
        " && python -m impl.experiments.fsmoe.results --part models --config {input.config} {params.models}"
        " --no-progress --out-csv {output.models} --out-record {output.models_record}"
        " && python -m impl.experiments.fsmoe.results --part table2 --config {input.config} {params.models}"
        " --out-csv {output.table2} --out-record {output.table2_record}) > {log} 2>&1"


rule fsmoe_calibration:
    """This machine's alpha-beta models of every FSMoE task (Fig. 5's bottom row, the emu prediction)."""
    input:
        code=code_inputs("impl.common.calibrate"),
    output:
        profile="resources/calibration/fsmoe-2x2-gloo.yaml",
    log:
        "results/logs/calibration/fsmoe-2x2-gloo.log",
    params:
        extra=FSMOE["calibration_args"],
    threads: 2
    resources:
        runtime=20,
        mem_mb=4000,
    shell:
        "python -m impl.common.calibrate --topology 2x2 --backend gloo --steps inter-1,intra-1"
        " --collectives a2a,allgather,reducescatter,allreduce {params.extra} --quiet --out {output.profile} > {log} 2>&1"


rule fsmoe_emu:
    """The real FSMoE layer on 4 local gloo ranks, FSMoE's schedule against the sequential one."""
    input:
        code=code_inputs("impl.experiments.fsmoe.emu"),
        profile=rules.fsmoe_calibration.output.profile,
    output:
        csv="results/raw/fsmoe/emu.csv",
        record="results/raw/fsmoe/emu.json",
    log:
        "results/logs/fsmoe/emu.log",
    params:
        flags=as_flags(overrides_of(FSMOE["emu"])),
    threads: 2
    resources:
        runtime=30,
        mem_mb=4000,
    shell:
        "python -m impl.experiments.fsmoe.emu --profile {input.profile} {params.flags}"
        " --out-csv {output.csv} --out-record {output.record} > {log} 2>&1"
