"""The project's source files a job runs, as inputs of its rule: change one and the job reruns.

Snakemake's own `code` trigger sees a rule's shell or run text, not the modules that
`python -m impl.experiments...` imports, so without these inputs a results folder would keep
results of older code as current. `CodeInputs(repo)(*runs)` lists, for the modules (or scripts)
a job runs, their own files, the `__init__.py` of every package above them (Python runs those
first) and the same for every project module they import, transitively; a package run with
`python -m` adds its `__main__.py`. Read from the source with `ast`, nothing imported (the
workflow parses without torch).

What counts as an import of one of our packages (`PACKAGES`), read by `read_imports`, which
`tests/unit/test_layers.py` uses too (the layers it checks are the imports followed here):
* `import` and `from ... import` statements anywhere in a module, inside functions too (a lazy
  import runs when the job calls it), relative ones resolved; `from pkg import name` counts
  `pkg.name` when that is a module;
* a string constant naming one of our modules (`importlib.import_module("baselines.x")`, a
  provider list), docstrings aside. Registries are filled by importing the registering modules,
  which the papers' system lists (`impl.experiments.<paper>.systems`) and the registry of every
  system (`impl.experiments.systems`) do with plain imports, so a name looked up by string is covered;
* `importlib.import_module` with a computed name, as a package's lazy `__getattr__` (PEP 562)
  does: `impl.common.routing` loads its submodules on first use, named in a dict, so the calling
  module's package counts with all its modules (which ones a job touches is known only at run
  time).

Files a module reads at run time as part of the code count with it (`RUN_TIME_FILES`: the
ScheInfer CPU kernels' C++, built on first use; the default calibration text of the popularity
profile). Not followed: data files read by path (configs, papers' CSVs); rules list those they
read as inputs of their own.

The DAG is built on every snakemake call, dry runs included, and parsing every module costs about
a second: what each file imports is kept in a cache file (`CACHE`, keyed by path, mtime and size),
written once per parse (`save`, at the end of the Snakefile) by a rename, so a reader never sees
half of it; an unreadable or malformed cache is ignored and rebuilt, an unwritable one only costs
the time.
"""
from __future__ import annotations

import ast
import json
import os
import tempfile
from pathlib import Path

__all__ = ["PACKAGES", "RUN_TIME_FILES", "CACHE", "CodeInputs", "project_modules", "read_imports", "known_module"]

# The top-level packages that are this project's code; imports of anything else are not followed.
PACKAGES = ("impl", "baselines", "figures")
# module -> a file, or a folder of files, it reads as part of the code when it runs
RUN_TIME_FILES = {"impl.scheinfer.cpu_kernels": "impl/scheinfer/csrc",
                  "impl.experiments.scheinfer.calibration_prompt": "impl/scheinfer/calibration_text.txt"}
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moe-repro" / "code-imports.json"
_FORMAT = 2   # 2: docstrings name no module


def project_modules(repo: Path, with_main: bool = False) -> dict[str, Path]:
    """{dotted name: file} of every module of our packages under `repo` (a package as its
    `__init__.py`; `__main__` files only with `with_main`, as `pkg.__main__`)."""
    out = {}
    for package in PACKAGES:
        for path in (repo / package).rglob("*.py"):
            parts = list(path.relative_to(repo).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if with_main or parts[-1] != "__main__":
                out[".".join(parts)] = path
    return out


def read_imports(source: str | bytes, filename: str, package: str | None) -> tuple[list[str], list[str], bool]:
    """What one file (in `package`; None for a script) imports of our packages: (the dotted names
    of its import statements, relative ones resolved; the dotted strings outside docstrings that
    start with one of our packages; whether it calls `import_module` with a computed name). A
    name may go below a module (`from pkg import function`): `known_module` resolves it."""
    tree = ast.parse(source, filename)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    imports: list[str] = []
    strings: set[str] = set()
    computed = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                if package is None:
                    continue
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            imports += [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value.split(":")[0]                               # "module:attribute" too
            if "." in text and text.split(".")[0] in PACKAGES and text.isascii() and " " not in text:
                strings.add(text)
        elif isinstance(node, ast.Call) and _is_import_module(node.func):
            computed |= not (node.args and isinstance(node.args[0], ast.Constant))
    return sorted({name for name in imports if name.split(".")[0] in PACKAGES}), sorted(strings), computed


def known_module(name: str, known) -> str:
    """The longest leading part of the dotted `name` that is a module in `known` ('' if none)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


class CodeInputs:
    """Callable: `code_inputs("impl.experiments.scheinfer.sim", "workflows/scripts/x.py")` -> sorted
    absolute paths of the files they run. One instance per workflow parse; results are cached,
    and `save()` writes what it read to the cache file."""

    def __init__(self, repo: Path | str, cache: Path | None = CACHE):
        self.repo = Path(repo).resolve()
        self.modules = project_modules(self.repo)
        self._cache_file = cache
        self._scans = self._load_cache()
        self._scans_changed = False
        self._closures: dict[tuple[str, ...], list[str]] = {}

    def __call__(self, *runs: str) -> list[str]:
        """The files that the given modules (dotted, as `python -m` takes them) or scripts (a path
        relative to the repository; a `.py` one is followed like a module) run."""
        if runs not in self._closures:
            files: set[Path] = set()
            pending: list[str] = []
            for run in runs:
                if "/" in run or run.endswith((".py", ".sh")):
                    script = self.repo / run
                    if not script.is_file():
                        raise ValueError(f"code_inputs: {run}: no such file in {self.repo}")
                    files.add(script)
                    if script.suffix == ".py":
                        pending += self._imports_of(script, package=None)
                    continue
                if run not in self.modules:
                    raise ValueError(f"code_inputs: {run!r} is not a module of {', '.join(PACKAGES)} in {self.repo}")
                pending.append(run)
                main = self.modules[run].with_name("__main__.py")
                if self.modules[run].name == "__init__.py" and main.is_file():   # python -m package
                    files.add(main)
                    pending += self._imports_of(main, package=run)
            seen: set[str] = set()
            while pending:
                module = pending.pop()
                if module in seen:
                    continue
                seen.add(module)
                parts = module.split(".")
                pending += [".".join(parts[:i]) for i in range(1, len(parts))]      # parent packages
                files.add(self.modules[module])
                if module in RUN_TIME_FILES:
                    path = self.repo / RUN_TIME_FILES[module]
                    files.update([f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path])
                pending += self._imports_of(self.modules[module], package=self._package(module))
            self._closures[runs] = sorted(str(f) for f in files)
        return list(self._closures[runs])

    def _package(self, module: str) -> str:
        return module if self.modules[module].name == "__init__.py" else module.rpartition(".")[0]

    def _imports_of(self, path: Path, package: str | None) -> set[str]:
        """Our modules that the file at `path` (in `package`; None for a script) imports."""
        imports, strings, computed = self._scan(path, package)
        found = {name for name in strings if name in self.modules}
        if computed and package:
            found |= {m for m in self.modules if m.startswith(package + ".")}
        found |= {known_module(name, self.modules) for name in imports} - {""}
        return found

    def _scan(self, path: Path, package: str | None) -> tuple[list[str], list[str], bool]:
        """(dotted names imported, dotted strings of our packages, whether a computed
        import_module is called) of one file, from the cache while the file is unchanged."""
        stat = path.stat()
        key, stamp = str(path), [stat.st_mtime_ns, stat.st_size]
        cached = self._scans.get(key)
        if cached and cached["stamp"] == stamp:
            return cached["imports"], cached["strings"], cached["computed"]
        imports, strings, computed = read_imports(path.read_bytes(), str(path), package)
        self._scans[key] = {"stamp": stamp, "imports": imports, "strings": strings, "computed": computed}
        self._scans_changed = True
        return imports, strings, computed

    def _load_cache(self) -> dict:
        """The cache file's entries; none when it is missing, unreadable, of another format or
        malformed in any entry (it is then rebuilt whole)."""
        if self._cache_file is None:
            return {}
        try:
            data = json.loads(self._cache_file.read_text())
            files = data["files"] if data.get("format") == _FORMAT else {}
            if not all(_is_scan(entry) for entry in files.values()):
                return {}
            return files
        except (OSError, ValueError, KeyError, TypeError, AttributeError):   # unreadable or not our format
            return {}

    def save(self) -> None:
        """Write the cache when this parse read a file anew: atomically (a new file renamed over
        the old one, so several snakemake processes may parse at once and an interrupted write
        leaves the old cache), without the entries of files that no longer exist."""
        if self._cache_file is None or not self._scans_changed:
            return
        files = {key: value for key, value in self._scans.items() if Path(key).is_file()}
        try:
            self._cache_file.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self._cache_file.parent, delete=False, suffix=".tmp") as out:
                try:
                    json.dump({"format": _FORMAT, "files": files}, out)
                    out.close()
                    os.replace(out.name, self._cache_file)
                finally:
                    Path(out.name).unlink(missing_ok=True)
            self._scans_changed = False
        except OSError:
            pass


def _is_scan(entry) -> bool:
    """A cache entry as `_scan` writes it."""
    return (isinstance(entry, dict) and isinstance(entry.get("stamp"), list) and len(entry["stamp"]) == 2
            and all(isinstance(n, int) for n in entry["stamp"]) and isinstance(entry.get("computed"), bool)
            and all(isinstance(entry.get(k), list) and all(isinstance(n, str) for n in entry[k])
                    for k in ("imports", "strings")))


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module")
