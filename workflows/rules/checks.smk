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
import shutil
import subprocess
import sys

# What the deep config checks printed, kept beside the jobs' logs.
CHECK_LOG = "results/logs/check_configs.log"


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


def job_python():
    """The Python the jobs run: their shell commands start `python`, found on PATH when each job
    starts. The checks run under that one, not Snakemake's own (`sys.executable`): Snakemake may
    live in an environment of its own (a Slurm login node's needs only the `workflow` extra and no
    torch), while `python` on PATH is the project's environment both locally and on a Slurm node
    (sbatch exports the submitting shell's environment by default). Making the jobs run
    `sys.executable` instead would tie them to Snakemake's environment. None when PATH has none."""
    return shutil.which("python")


def check_experiment_configs():
    """Resolve every experiment config with the experiments' own checks (models, topologies,
    systems, hardware classes): workflows/scripts/check_configs.py, in a process of its own with
    the jobs' Python (`job_python`; the experiments import torch, Snakemake's own process never
    does, so the workflow parses and dry-runs without it). Its output goes to stderr and to
    CHECK_LOG. A bad config, or a Python that cannot import the experiments, prints one line and
    stops the run with the script's exit code (2)."""
    python = job_python()
    if python is None:
        code, output = 2, ("check_configs: error: no `python` on PATH, which the jobs run; run Snakemake "
                           "from the project's environment (make run)\n")
    else:
        script = repo_path("workflows/scripts/check_configs.py")
        proc = subprocess.run([python, script, "--checks", json.dumps(config_checks())],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        code, output = proc.returncode, f"check_configs with {python}\n{proc.stdout}"
    sys.stderr.write(output)
    Path(CHECK_LOG).parent.mkdir(parents=True, exist_ok=True)
    Path(CHECK_LOG).write_text(output)
    if code:
        raise SystemExit(code)


onstart:
    stop_on_slurm_placeholders()
    check_experiment_configs()
