# Model against measurement on an emulated cluster (impl.experiments.emu_validation). NOT part of
# the default target or CI: `make emu` (= snakemake emu_validation) runs it; it needs root, `ip`
# and `tc`, and keeps both cores busy for about an hour, so every job takes both cores.
rule emu_calibration:
    """Alpha-beta fits of every AlltoAll step of one emulated cluster (Fig. 9's method)."""
    input:
        code=code_inputs("impl.common.calibrate"),
    output:
        profile=f"{EMU_DIR}/calibration/{{topology}}.yaml",
    log:
        f"results/logs/emu_validation/calibration-{{topology}}.log",
    params:
        flags=emu_calibration_flags(),
        rate=EMU.network.rate,
    threads: 2
    resources:
        runtime=30,
        mem_mb=8000,
    shell:
        "python -m impl.common.calibrate --topology {wildcards.topology} {params.flags} --gemm-tokens ''"
        " --timeout 600 --deadline 3600 --name emu-{wildcards.topology}-{params.rate} --quiet"
        " --out {output.profile} > {log} 2>&1"


rule emu_layer_bench:
    """One variant's dispatch and combine, timed apart, on one emulated cluster and routing (one of
    `runs` independent processes whose repeats the table pools)."""
    input:
        code=code_inputs("impl.experiments.layer_bench"),
        profile=lambda wc: emu_profile(wc.topology) if emu_val.uses_profile(EMU.variants[wc.variant]) else [],
    output:
        record=f"{EMU_DIR}/{{topology}}/{{routing}}/{{variant}}/run{{run}}.json",
    log:
        f"results/logs/emu_validation/{{topology}}/{{routing}}/{{variant}}/run{{run}}.log",
    wildcard_constraints:
        routing="|".join(EMU.routings),
        variant="|".join(EMU.variants),
        run=r"\d+",
    params:
        overrides=lambda wc, input: as_flags(emu_val.bench_overrides(EMU, wc.topology, wc.routing, wc.variant,
                                                                    input.profile or None)),
    threads: 2
    resources:
        runtime=60,
        mem_mb=12000,
    shell:
        "python -m impl.experiments.layer_bench {params.overrides} --out-record {output.record} > {log} 2>&1"


rule emu_validation_table:
    """Measured vs predicted dispatch and combine of every run, with the model's error."""
    input:
        code=code_inputs("impl.experiments.emu_validation"),
        records=[f"{EMU_DIR}/{t}/{r}/{v}/run{i}.json" for t, r, v, i in EMU_RUNS],
        profiles=[emu_profile(t) for t in EMU.topologies],
        config=experiment_config("emu_validation"),
    output:
        csv=f"{EMU_DIR}/emu_validation.csv",
    log:
        "results/logs/emu_validation/table.log",
    params:
        overrides=set_flags("emu_validation"),
        profiles=" ".join(f"--profile {t}={emu_profile(t)}" for t in EMU.topologies),
    threads: 1
    resources:
        runtime=10,
        mem_mb=4000,
    shell:
        "python -m impl.experiments.emu_validation table --config {input.config} {params.overrides}"
        " --record {input.records} {params.profiles} --out-csv {output.csv} > {log} 2>&1"


rule plot_emu_validation:
    """Figure and markdown table: measured vs predicted per variant, the ratios to flat."""
    input:
        code=code_inputs("figures.emu_validation"),
        csv=rules.emu_validation_table.output.csv,
    output:
        pdf="results/figures/emu_validation.pdf",
        png="results/figures/emu_validation.png",
        md="results/figures/emu_validation.md",
    log:
        "results/logs/figures/emu_validation.log",
    params:
        baseline=EMU.baseline,
    threads: 1
    resources:
        runtime=5,
        mem_mb=2000,
    shell:
        "python -m figures.emu_validation --csv {input.csv} --baseline {params.baseline}"
        " --out {output.pdf} --out-md {output.md} > {log} 2>&1"


rule emu_validation:
    """Target of `make emu`: the emulated-cluster validation, figure and table."""
    input:
        rules.plot_emu_validation.output,


localrules:
    plot_emu_validation,
    emu_validation,
