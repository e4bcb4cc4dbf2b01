# Cluster tier: paper-scale runs on a Slurm GPU cluster through snakemake-executor-plugin-slurm.
# NOT part of the default target: `snakemake --workflow-profile workflows/profiles/slurm cluster`.
# Multi-node rules declare what the plugin needs for one launcher per node (ANCHORS 7.1): nodes,
# tasks (one per node, > 1), mpi="srun" (the job step is not wrapped in `srun -n1`; the shell
# calls {resources.mpi} itself, through workflows/scripts/launch_cluster.sh), gres per node,
# tasks_per_gpu=0 (no --ntasks-per-gpu), runtime, mem_mb. Partition and account live in the
# profile only.

# Before any job starts (checks.smk), every cluster run's config is resolved and a Slurm run with
# the profile's placeholders stops.


rule cluster_layer_bench:
    """One variant's MoE layer at paper scale on the paper's testbed (tier cluster, NCCL)."""
    input:
        code=code_inputs("impl.experiments.layer_bench"),
        launch=LAUNCH,
    output:
        record="results/raw/cluster/layer_bench/{paper}/{variant}.json",
    log:
        "results/logs/cluster/layer_bench/{paper}/{variant}.log",
    wildcard_constraints:
        paper="|".join(CLUSTER_BENCH),
    params:
        gpus_per_node=lambda wc: cluster_topology(wc).gpus_per_node,
        overrides=lambda wc: as_flags(overrides_of(cluster_bench_settings(wc.paper, wc.variant))),
    threads: 16
    resources:
        nodes=lambda wc: cluster_topology(wc).num_nodes,
        tasks=lambda wc: cluster_topology(wc).num_nodes,   # one torchrun per node
        mpi="srun",
        gres=lambda wc: f"gpu:{cluster_topology(wc).gpus_per_node}",
        tasks_per_gpu=0,
        runtime=lambda wc: CLUSTER_BENCH[wc.paper].get("runtime", 60),
        mem_mb=lambda wc: CLUSTER_BENCH[wc.paper].get("mem_mb", 200000),
    shell:
        "bash {input.launch} --srun '{resources.mpi}' --gpus-per-node {params.gpus_per_node}"
        " -- -m impl.experiments.layer_bench {params.overrides} --out-record {output.record} > {log} 2>&1"


rule cluster_scheinfer_bench:
    """ScheInfer's policies beside the real llama.cpp on one GPU (measured tok/s)."""
    input:
        code=code_inputs("impl.experiments.scheinfer"),
        model=scheinfer_cluster_model(),
    output:
        csv="results/raw/cluster/scheinfer/bench.csv",
        record="results/raw/cluster/scheinfer/bench.json",
    log:
        "results/logs/cluster/scheinfer/bench.log",
    params:
        args=CLUSTER["scheinfer"].get("args", ""),
    threads: 8
    resources:
        gres="gpu:1",
        tasks_per_gpu=0,
        runtime=CLUSTER["scheinfer"].get("runtime", 60),
        mem_mb=CLUSTER["scheinfer"].get("mem_mb", 64000),
    shell:
        "python -m impl.experiments.scheinfer bench --model {input.model} {params.args} --threads {threads} --no-progress"
        " --out-csv {output.csv} --out-record {output.record} > {log} 2>&1"


rule cluster:
    """Target of the cluster tier: every paper's cluster runs (never part of the default target)."""
    input:
        [f"results/raw/cluster/layer_bench/{paper}/{variant}.json"
         for paper, entry in CLUSTER_BENCH.items() for variant in entry["variants"]],
        rules.cluster_scheinfer_bench.output,


localrules:
    cluster,
