# ScheInfer experiments: the sim tier (tok/s of ScheInfer, llama.cpp, Fiddler on assumed hardware
# classes) and MEASURED lane timelines of the real HybridEngine on a small generated model.

# The sim config's keys and types now (its hardware file is an input); the rest in the deep checks (checks.smk).
SCHEINFER_SIM_CONFIG = scheinfer_sim_config()


localrules:
    plot_scheinfer_sim,


rule scheinfer_sim:
    """Sim tier: prefill / decode / overall tok/s per hardware class, model and policy (modeled)."""
    input:
        code=code_inputs("impl.experiments.scheinfer.sim"),
        config=experiment_config("scheinfer_sim"),
        hardware=repo_path(SCHEINFER_SIM_CONFIG.hardware_file),
    output:
        csv="results/raw/scheinfer_sim/sim.csv",
        record="results/raw/scheinfer_sim/sim.json",
    log:
        "results/logs/scheinfer_sim/sim.log",
    params:
        overrides=set_flags("scheinfer_sim"),
    threads: 1
    resources:
        runtime=10,
        mem_mb=4000,
    shell:
        "python -m impl.experiments.scheinfer.sim --config {input.config} {params.overrides} --no-progress"
        " --out-csv {output.csv} --out-record {output.record} > {log} 2>&1"


rule scheinfer_tiny_model:
    """A small GGUF with the structure of a real model (impl.scheinfer.generate_models)."""
    input:
        code=code_inputs("impl.scheinfer.generate_models"),
    output:
        gguf="resources/scheinfer/model.gguf",
    log:
        "results/logs/scheinfer_timeline/model.log",
    params:
        kind=SCHEINFER_TIMELINE["kind"],
        overrides=scheinfer_model_flags(),
    threads: 1
    resources:
        runtime=5,
        mem_mb=2000,
    shell:
        "python -m impl.scheinfer.generate_models --kind {params.kind} {params.overrides} --out {output.gguf} > {log} 2>&1"


rule scheinfer_cost:
    """The engine's cost model fitted on this machine (GPU lanes emulated without CUDA)."""
    input:
        code=code_inputs("impl.experiments.scheinfer"),
    output:
        cost="resources/scheinfer/cost.json",
    log:
        "results/logs/scheinfer_timeline/cost.log",
    params:
        hidden=scheinfer_tiny_hidden(),
    threads: 1
    resources:
        runtime=5,
        mem_mb=2000,
    shell:
        "python -m impl.experiments.scheinfer calibrate --quick --hidden {params.hidden} --out {output.cost} > {log} 2>&1"


rule scheinfer_timeline:
    """One generation with the real HybridEngine under one policy ('layers' is our engine's
    llama.cpp-style layer offload, not llama.cpp); its lane events as JSON, with their run record."""
    input:
        code=code_inputs("impl.experiments.scheinfer"),
        model=rules.scheinfer_tiny_model.output.gguf,
        cost=rules.scheinfer_cost.output.cost,
    output:
        events="results/raw/scheinfer_timeline/{policy}.json",
        record="results/raw/scheinfer_timeline/{policy}.record.json",
        stdout="results/raw/scheinfer_timeline/{policy}.txt",
    log:
        "results/logs/scheinfer_timeline/{policy}.log",
    wildcard_constraints:
        policy="scheinfer|fiddler|layers",
    params:
        tokens=scheinfer_prompt_ids(),
        n_predict=SCHEINFER_TIMELINE["n_predict"],
        gpu_mem=SCHEINFER_TIMELINE["gpu_mem"],
        tile=SCHEINFER_TIMELINE["tile"],
    threads: 1
    resources:
        runtime=5,
        mem_mb=2000,
    shell:
        "python -m impl.experiments.scheinfer generate --model {input.model} --tokens {params.tokens}"
        " --n-predict {params.n_predict} --policy {wildcards.policy} --cost {input.cost} --tile {params.tile}"
        " --gpu-mem {params.gpu_mem} --threads 1 --ignore-eos --no-progress --timeline {output.events}"
        " --out-record {output.record} > {output.stdout} 2> {log}"


rule plot_scheinfer_sim:
    """ScheInfer speedups and partition ratios (sim), the measured lane timeline, and the
    paper-vs-ours report."""
    input:
        code=code_inputs("figures.scheinfer_sim"),
        sim=rules.scheinfer_sim.output.csv,
        events=expand("results/raw/scheinfer_timeline/{policy}.json", policy=SCHEINFER_TIMELINE["policies"]),
        stdout=expand("results/raw/scheinfer_timeline/{policy}.txt", policy=SCHEINFER_TIMELINE["policies"]),
        paper=paper_csv("scheinfer_speedup"),
        gpu=scheinfer_gpu_evidence(),
    output:
        figures=[
            f"results/figures/scheinfer_{name}.{ext}"
            for name in ("speedup", "partition", "timeline")
            for ext in ("pdf", "png")
        ],
        report="results/figures/scheinfer_report.md",
    log:
        "results/logs/figures/scheinfer_sim.log",
    params:
        model=scheinfer_timeline_model(),
        gpu=lambda wc, input: (" --gpu-bench {} --gpu-bench-record {} --gpu-hardware {}".format(*input.gpu)
                               if input.gpu else ""),
    threads: 1
    resources:
        runtime=5,
        mem_mb=2000,
    shell:
        "python -m figures.scheinfer_sim --sim {input.sim} --timeline {input.events}"
        " --timeline-log {input.stdout} --timeline-model '{params.model}'{params.gpu} --out-dir results/figures"
        " > {log} 2>&1"
