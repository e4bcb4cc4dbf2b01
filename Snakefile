# Reproduction pipeline for HierMoE, FSMoE and ScheInfer: experiments -> tidy CSVs and run
# records under results/, then figures with the papers' numbers drawn beside ours.
#
#   snakemake --cores 2                                         # default target, local
#   snakemake --workflow-profile workflows/profiles/local       # same, with the local profile
#   snakemake --workflow-profile workflows/profiles/slurm       # on a Slurm cluster
#   snakemake -n --config 'hiermoe_table2={set: {repeats: 2}}'  # dry run with an override
#
# Inputs shipped with the repository are found relative to this file; outputs go to results/
# under the working directory (--directory), so the workflow can run from anywhere.
#
# Jobs run `python` from PATH (the project's environment: `make run` puts it first), not the
# Python Snakemake runs in, which on a Slurm login node need not have torch; the config checks
# before the first job run with that same `python` (workflows/rules/checks.smk says why).
from snakemake.utils import min_version

min_version("9.0")


configfile: workflow.source_path("workflows/config/config.yaml")


include: "workflows/rules/common.smk"
include: "workflows/rules/checks.smk"
include: "workflows/rules/hiermoe.smk"
include: "workflows/rules/scheinfer.smk"
include: "workflows/rules/fsmoe.smk"
include: "workflows/rules/figures.smk"
include: "workflows/rules/emu.smk"
include: "workflows/rules/cluster.smk"


rule all:
    default_target: True
    input:
        rules.plot_hiermoe_table2.output,
        rules.plot_hiermoe_fig9.output,
        rules.plot_hiermoe_sim.output,
        rules.plot_scheinfer_sim.output,
        rules.plot_fsmoe.output,


# Every rule has listed its code inputs: what was read of the sources goes to the import cache,
# in one write (workflows/scripts/code_inputs.py).
code_inputs.save()


onerror:
    print(
        "\nThe workflow stopped with an error. Each job writes its log under results/logs/; "
        "rerun with --show-failed-logs to print the failed jobs' logs, "
        "and with --rerun-incomplete after an interruption."
    )
