# Checks before any job runs, in the workflow's one `onstart:` handler (Snakemake keeps only the
# last `onstart:` it reads, so every such check lives here). Snakemake calls it in its main
# process once it has planned the jobs of a call that has some to run, before the first starts:
# never in a dry run nor when nothing is to be done, and with the Slurm executor on the submitting
# host (its jobs run with --no-hooks). What it raises stops the run there, with no job started.
#
# The deep config checks run here, not as a job the experiments take as input: Snakemake (9.27)
# plans nothing downstream of a job that must rerun across an `ancient` input, so such a job
# rerunning for a changed config would leave the experiments that config feeds unplanned until
# the next call, and a job they did not wait for could not stop them. Here the checks plan
# nothing: each experiment reruns for its own changed config, code or params in the same call.
import subprocess
import sys


def stop_on_slurm_placeholders():
    """A real run with the Slurm executor and the profile's placeholders would submit jobs to a
    partition that does not exist: stop before anything is submitted, saying what to edit."""
    plugin = workflow.executor_plugin
    if plugin is not None and plugin.name == "slurm" and (found := slurm_placeholders()):
        raise SystemExit(
            "The Slurm profile still has placeholders (" + "; ".join(found) + "). Edit slurm_partition and "
            "slurm_account in workflows/profiles/slurm/config.yaml (or a copy of it for your site; "
            "--slurm-no-account to skip the account). Passing --default-resources on the command line "
            "replaces the profile's whole default-resources (runtime and mem_mb too)."
        )


def check_experiment_configs():
    """Resolve every experiment config with the experiments' own checks (models, topologies,
    systems, hardware classes): workflows/scripts/check_configs.py, in a process of its own with
    Snakemake's Python (the experiments import torch; Snakemake's own process never imports it,
    so the workflow parses and dry-runs without it). A bad config, or a Python that cannot import
    the experiments, prints one line and stops the run with the script's exit code (2)."""
    script = repo_path("workflows/scripts/check_configs.py")
    code = subprocess.run([sys.executable, script, "--checks", json.dumps(config_checks())]).returncode
    if code:
        raise SystemExit(code)


onstart:
    stop_on_slurm_placeholders()
    check_experiment_configs()
