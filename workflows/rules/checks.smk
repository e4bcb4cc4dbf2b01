# The deep config checks: every experiment config resolved with the experiment's own checks, in
# one job that the experiments it checks wait for, scheduled before any other (priority); the
# workflow itself parses without torch. Its output is an `ancient` input, so rechecking a changed
# config reruns no experiment.


localrules:
    check_configs,


rule check_configs:
    """Resolve every experiment config (models, topologies, systems, hardware classes)."""
    input:
        code=code_inputs("workflows/scripts/check_configs.py"),
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
