"""A job reruns when the code it runs changes: every rule that runs project code lists the Python
files it runs (workflows/scripts/code_inputs.py) as its input `code`. Checked on the import
reader itself (a small made-up package and the real modules against what importing them loads),
on the rule files (every `python -m` module a rule runs is among its code inputs), and on dry runs
in a copy of the workflow with a complete results folder, where editing one paper's module plans
the jobs that run it again and no job of another paper."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SNAKEMAKE = BIN / "snakemake"

_spec = importlib.util.spec_from_file_location("code_inputs", REPO / "workflows/scripts/code_inputs.py")
code_inputs_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(code_inputs_module)
CodeInputs = code_inputs_module.CodeInputs


def relative(paths, root):
    return {str(Path(p).relative_to(root)) for p in paths}


@pytest.fixture
def toy(tmp_path):
    """A made-up repository with each kind of import the reader follows, and modules it must not reach."""
    files = {
        "impl/__init__.py": "",
        "impl/common/__init__.py": "",
        "impl/common/base.py": "import os\nimport numpy\n",
        "impl/common/unused.py": "",
        "impl/common/lazy/__init__.py": ("import importlib\n_HOME = {'A': 'alpha'}\n"
                                         "def __getattr__(name):\n"
                                         "    return getattr(importlib.import_module(f'.{_HOME[name]}', __name__), name)\n"),
        "impl/common/lazy/alpha.py": "A = 1\n",
        "impl/common/lazy/beta.py": "B = 2\n",
        "impl/sys/__init__.py": "",
        "impl/sys/core.py": "from ..common import base\nfrom impl.common.lazy import A\n",
        "impl/sys/deferred.py": "X = 1\n",
        "impl/sys/plugin.py": "",
        "impl/sys/run.py": ("from . import core\nPROVIDERS = ['impl.sys.plugin']\n"
                            "def main():\n    from impl.sys.deferred import X\n"),
        "impl/tool/__init__.py": "",
        "impl/tool/__main__.py": "from impl.common.base import os\n",
        "baselines/__init__.py": "",
        "figures/__init__.py": "",
        "figures/plot.py": '"""Reads impl.sys.plugin output."""\nimport figures.style\n',
        "figures/style.py": "",
        "workflows/scripts/check.py": "def go():\n    from impl.sys import core\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_follows_every_kind_of_import_of_our_packages_and_nothing_else(toy):
    code_inputs = CodeInputs(toy, cache=None)
    assert relative(code_inputs("impl.sys.run"), toy) == {
        "impl/__init__.py", "impl/sys/__init__.py", "impl/sys/run.py",   # the module and its packages
        "impl/sys/core.py",                                              # from . import core
        "impl/common/__init__.py", "impl/common/base.py",                # from ..common import base
        "impl/common/lazy/__init__.py",                                  # from impl.common.lazy import A ...
        "impl/common/lazy/alpha.py", "impl/common/lazy/beta.py",         # ... which imports by a computed name
        "impl/sys/deferred.py",                                          # an import inside a function
        "impl/sys/plugin.py",                                            # a module named by a string
    }
    # python -m package runs its __main__; a docstring naming a module imports nothing
    assert relative(code_inputs("impl.tool"), toy) == {"impl/__init__.py", "impl/tool/__init__.py",
                                                       "impl/tool/__main__.py", "impl/common/__init__.py",
                                                       "impl/common/base.py"}
    assert relative(code_inputs("figures.plot"), toy) == {"figures/__init__.py", "figures/plot.py", "figures/style.py"}
    # a script run by path, and a shell script (itself only)
    assert "workflows/scripts/check.py" in relative(code_inputs("workflows/scripts/check.py"), toy)
    assert "impl/sys/core.py" in relative(code_inputs("workflows/scripts/check.py"), toy)
    with pytest.raises(ValueError, match="impl.nothing"):
        code_inputs("impl.nothing")


def test_the_cache_file_is_reread_only_while_a_file_is_unchanged(toy, tmp_path):
    cache = tmp_path / "cache" / "imports.json"
    first = CodeInputs(toy, cache=cache)
    assert "impl/sys/plugin.py" not in relative(first("impl.sys.core"), toy)
    first("impl.tool")
    assert not cache.exists()                                          # nothing written before save()
    first.save()
    assert str(toy / "impl/sys/core.py") in json.loads(cache.read_text())["files"]
    core = toy / "impl/sys/core.py"
    core.write_text(core.read_text() + "import impl.sys.plugin\n")
    assert "impl/sys/plugin.py" in relative(CodeInputs(toy, cache=cache)("impl.sys.core"), toy)


def test_a_parse_writes_the_cache_once_by_a_rename(toy, tmp_path, monkeypatch):
    """However many closures a cold parse reads, `save` writes one new file and renames it over
    the cache (never the cache itself); a second save with nothing new read writes nothing."""
    cache = tmp_path / "cache" / "imports.json"
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(code_inputs_module.os, "replace", lambda a, b: (renames.append((a, b)), real_replace(a, b)))
    code_inputs = CodeInputs(toy, cache=cache)
    for run in ("impl.sys.run", "impl.tool", "figures.plot", "workflows/scripts/check.py"):
        code_inputs(run)
    code_inputs.save()
    code_inputs.save()
    assert [Path(b) for _, b in renames] == [cache] and Path(renames[0][0]).parent == cache.parent
    assert os.listdir(cache.parent) == ["imports.json"]                # no temporary file left


def test_a_failed_write_leaves_the_old_cache_and_no_temporary_file(toy, tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "imports.json"
    cache.parent.mkdir()
    cache.write_text("old")
    code_inputs = CodeInputs(toy, cache=cache)
    code_inputs("impl.sys.run")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(code_inputs_module.json, "dump", broken)
    code_inputs.save()                                                 # an unwritable cache costs only time
    assert cache.read_text() == "old" and os.listdir(cache.parent) == ["imports.json"]


@pytest.mark.parametrize("spoiled", [
    "not json",
    '{"format": 2, "files": {"x": {"stamp": [1, 2], "imp',                         # cut short
    '{"format": 2, "files": ["x"]}',
    '{"format": 2, "files": {"x": {"stamp": "new", "imports": [], "strings": [], "computed": false}}}',
    '{"format": 2, "files": {"x": {"stamp": [1, 2], "imports": [3], "strings": [], "computed": false}}}',
])
def test_a_spoiled_cache_is_ignored_and_rebuilt(toy, tmp_path, spoiled):
    cache = tmp_path / "imports.json"
    cache.write_text(spoiled)
    code_inputs = CodeInputs(toy, cache=cache)
    assert "impl/sys/plugin.py" in relative(code_inputs("impl.sys.run"), toy)
    code_inputs.save()
    assert str(toy / "impl/sys/run.py") in json.loads(cache.read_text())["files"]


def test_scheinfer_sim_covers_its_engine_policy_and_registered_baselines():
    files = relative(CodeInputs(REPO, cache=None)("impl.experiments.scheinfer.sim"), REPO)
    assert {"impl/experiments/scheinfer/sim.py", "impl/experiments/__init__.py", "impl/scheinfer/policy.py",
            "impl/scheinfer/partition.py", "baselines/fiddler/policy.py", "impl/common/routing/gates.py"} <= files
    assert "impl/fsmoe/layer.py" not in files


def test_the_native_kernels_sources_count_with_the_module_that_builds_them():
    files = relative(CodeInputs(REPO, cache=None)("impl.scheinfer.cpu_kernels"), REPO)
    sources = {str(f.relative_to(REPO)) for f in (REPO / "impl/scheinfer/csrc").rglob("*") if f.is_file()}
    assert "impl/scheinfer/csrc/cpu_kernels.cpp" in sources and sources <= files
    assert not any("csrc" in f for f in relative(CodeInputs(REPO, cache=None)("impl.fsmoe.layer"), REPO))


def test_the_default_calibration_text_counts_with_the_scheinfer_cli():
    """The CLI's popularity profile reads the shipped text at run time: editing it reruns the
    jobs that run the CLI (and no others)."""
    assert "impl/scheinfer/calibration_text.txt" in relative(CodeInputs(REPO, cache=None)("impl.experiments.scheinfer"), REPO)
    assert "impl/scheinfer/calibration_text.txt" not in relative(CodeInputs(REPO, cache=None)("impl.fsmoe.layer"), REPO)


def rule_blocks():
    """(file, rule, text) of every rule in workflows/rules."""
    for path in sorted((REPO / "workflows/rules").glob("*.smk")):
        text = path.read_text()
        for match in re.finditer(r"^rule (\w+):\n(.*?)(?=^rule |\Z)", text, re.S | re.M):
            yield path.name, match.group(1), match.group(2)


def test_every_rule_that_runs_our_code_lists_what_it_runs():
    """A new rule, or a command that runs another module, without its code inputs fails here."""
    missing = []
    for name, rule, body in rule_blocks():
        runs = set(re.findall(r"\s-m ((?:impl|baselines|figures)[\w.]*)", body)) | set(re.findall(r'"\.\./scripts/(\w+\.py)"', body))
        if not runs and not re.search(r"^    (shell|script|run):", body, re.M):
            continue
        listed = re.search(r"code=code_inputs\(([^)]*)\)", body)
        listed = set(re.findall(r'"([^"]+)"', listed.group(1))) if listed else set()
        missing += [f"{name}:{rule}: {run}" for run in runs
                    if run not in listed and f"workflows/scripts/{run}" not in listed]
        if not listed:
            missing.append(f"{name}:{rule}: no code input")
    assert not missing, missing


@pytest.mark.slow
@pytest.mark.parametrize("module", ["impl.experiments.scheinfer.sim", "impl.experiments.hiermoe.sim"])
def test_covers_every_project_module_that_importing_it_loads(module):
    """What Python actually loads (a superset is fine: imports inside functions and every module
    of a lazy package count too)."""
    probe = ("import importlib, json, sys; importlib.import_module(sys.argv[1]); "
             "print(json.dumps([getattr(m, '__file__', None) for m in list(sys.modules.values())]))")
    proc = subprocess.run([sys.executable, "-c", probe, module], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = {Path(f).resolve() for f in json.loads(proc.stdout.splitlines()[-1]) if f}
    ours = {f for f in loaded if f.is_relative_to(REPO) and f.relative_to(REPO).parts[0] in ("impl", "baselines", "figures")}
    listed = {Path(f) for f in CodeInputs(REPO, cache=None)(module)}
    assert ours and not ours - listed, sorted(str(f.relative_to(REPO)) for f in ours - listed)


# One module of each paper's own code, and the jobs an edit of it may rerun: that paper's.
PAPER_EDITS = {"scheinfer": "impl/scheinfer/policy.py", "hiermoe": "impl/hiermoe/dedup_a2a.py",
               "fsmoe": "impl/fsmoe/planner.py"}
# Jobs that run the edited module, planned for it (their figures then for their new results).
RUN_BY = {"scheinfer": {"scheinfer_sim", "scheinfer_cost"}, "hiermoe": {"hiermoe_sim"},
          "fsmoe": {"fsmoe_part", "fsmoe_grid"}}


@pytest.mark.slow
@pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake is not installed in this environment")
def test_editing_a_papers_module_reruns_that_papers_jobs_and_nothing_else(tmp_path):
    """In a copy of the workflow (the repository's own files stay as they are) with a complete
    results folder of the default target (every output faked, newer than every input): nothing
    is to be done; after an edit of one paper's own code, the jobs that run it are planned with
    'updated input files', and no job of another paper (each paper's experiments and figures
    import that paper's systems only, impl.experiments.<paper>.systems)."""
    repo = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__")
    for part in ("impl", "baselines", "figures", "workflows"):
        shutil.copytree(REPO / part, repo / part, ignore=ignore)
    shutil.copy2(REPO / "Snakefile", repo / "Snakefile")
    work = tmp_path / "work"
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(repo),
               XDG_CACHE_HOME=str(tmp_path / "cache"))

    def snakemake(*args):
        proc = subprocess.run([str(SNAKEMAKE), "--snakefile", str(repo / "Snakefile"), "--directory", str(work),
                               *args], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    def planned():
        """{rule: its first job's reason} of a dry run of the default target."""
        return dict(reversed(re.findall(r"^rule (\w+):\n(?:.*\n)*?\s+reason: (.*)$", snakemake("-n"), re.M)))

    now = time.time()
    for line in snakemake("--summary").splitlines():       # output_file, date, rule, ... of every job
        if "\t" in line and not line.startswith("output_file"):
            output = work / line.split("\t")[0]
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text("{}")
            os.utime(output, (now, now))
    assert planned() == {}
    for paper, module in PAPER_EDITS.items():
        original = (repo / module).read_text()
        (repo / module).write_text(original + "# edited\n")
        later = time.time() + 10                    # newer than the results on any clock granularity
        os.utime(repo / module, (later, later))
        reasons = planned()
        jobs = set(reasons) - {"all"}
        assert RUN_BY[paper] <= jobs and any(rule.startswith(f"plot_{paper}") for rule in jobs), (module, jobs)
        assert all(paper in rule for rule in jobs), (module, sorted(jobs))
        for rule in RUN_BY[paper]:
            assert reasons[rule].startswith("Updated input files:") and module in reasons[rule], reasons[rule]
        (repo / module).write_text(original)        # back to as before the results
        os.utime(repo / module, (now - 3600, now - 3600))
    assert planned() == {}
