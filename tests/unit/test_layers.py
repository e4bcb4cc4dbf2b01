"""Layers point one way: common < systems < baselines < experiments < figures, with no import
cycle between modules. Read from the source (nothing imported), including imports by string:
a string constant naming one of our modules (`importlib.import_module("baselines.x")`, a
provider list) counts as an import."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYER_NAMES = ("common", "systems", "baselines", "experiments", "figures")

# The import reader the workflow follows to list a job's code (workflows/scripts/code_inputs.py,
# loaded by path: the workflows folder is no package), so what is checked here is what it follows.
_spec = importlib.util.spec_from_file_location("code_inputs", ROOT / "workflows/scripts/code_inputs.py")
code_inputs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(code_inputs)


def layer_of(module: str) -> int:
    parts = module.split(".")
    if "experiments" in parts:
        return 3
    return {"figures": 4, "baselines": 2}.get(parts[0], 0 if parts[:2] == ["impl", "common"] else 1)


def project_modules() -> dict[str, Path]:
    return code_inputs.project_modules(ROOT, with_main=True)


def referenced_modules(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Our modules that `module` imports, statically or by a string naming them (a docstring
    names none)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    imports, strings, _ = code_inputs.read_imports(path.read_text(encoding="utf-8"), str(path), package)
    found = {code_inputs.known_module(name, known) for name in imports} | {s for s in strings if s in known}
    return found - {"", module}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = project_modules()
    return {m: referenced_modules(m, p, known) for m, p in known.items()}


def test_no_module_imports_a_higher_layer(graph):
    upward = sorted(f"{a} ({LAYER_NAMES[layer_of(a)]}) -> {b} ({LAYER_NAMES[layer_of(b)]})"
                    for a, deps in graph.items() for b in deps if layer_of(b) > layer_of(a))
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycle_between_modules(graph):
    """Tarjan's strongly connected components; a package importing its own submodules is fine."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            shortest = min(component, key=len)
            if len(component) > 1 and not all(c.startswith(shortest) for c in component):
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_string_and_relative_imports(tmp_path):
    known = {"impl.common.a": tmp_path / "a.py", "baselines.b": tmp_path / "b.py", "impl.common.c": tmp_path / "c.py"}
    src = tmp_path / "a.py"
    src.write_text('"""Docstring naming baselines.b is not an import."""\n'
                   "import importlib\nfrom .c import thing\nmod = importlib.import_module('baselines.b')\n")
    assert referenced_modules("impl.common.a", src, known) == {"baselines.b", "impl.common.c"}
    src.write_text('"""Only the docstring names baselines.b."""\n')
    assert referenced_modules("impl.common.a", src, known) == set()


# Modules that import without torch: what the workflow needs while it parses (a Slurm login node's
# Snakemake need not have torch) and what starts ranks before they load it.
TORCH_FREE = ("impl.common.config", "impl.common.topology", "impl.common.launcher", "impl.common.emu_cluster",
              "impl.common.routing", "impl.experiments.hiermoe.table2_config", "impl.experiments.scheinfer.sim_config",
              "impl.experiments.layer_bench_config", "impl.experiments.emu_validation_config", "impl.scheinfer.config")


def test_torch_free_modules_import_without_torch():
    import subprocess
    import sys
    code = ("import importlib, sys\n"
            "class NoTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' or name.startswith('torch.'):\n"
            "            raise ImportError(f'torch imported by {sys._getframe(1).f_globals.get(\"__name__\")}')\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            f"for m in {TORCH_FREE!r}:\n"
            "    importlib.import_module(m)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
