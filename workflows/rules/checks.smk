# The deep config checks: every experiment config resolved with the experiment's own checks, in
# one job that the experiments it checks wait for, scheduled before any other (priority); the
# workflow itself parses without torch. Its output is an `ancient` input, so rechecking a changed
# config reruns no experiment.
#
# Unlike every other rule that runs our code, it does not list the code it runs as inputs: when a
# job must rerun, Snakemake (9.27) skips its own checks of every job downstream of it and, across
# an `ancient` input, does not plan them either, so a check rerun on every code change would hide
# the experiments' own changed code from that run (they would rerun only on the next call). The
# experiments check their own configs again as they start.


localrules:
    check_configs,


rule check_configs:
    """Resolve every experiment config (models, topologies, systems, hardware classes)."""
    output:
        CHECKED,
    log:
        "results/logs/check_configs.log",
    params:
        checks=json.dumps(config_checks()),
    priority: 100
    threads: 1
    resources:
        runtime=5,
        mem_mb=2000,
    script:
        "../scripts/check_configs.py"
