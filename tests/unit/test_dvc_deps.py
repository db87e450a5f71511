"""Every DVC stage depends on exactly the code it runs.

A stage reruns only when one of its ``deps`` changes, so a module the stage
imports but does not list (``config.py``, whose defaults fill every unset key)
lets ``dvc repro`` keep an output that the current code would not produce,
and a listed module it never imports reruns it for nothing. The code a stage
runs is the stage function's library imports in ``stages.py``, followed
through every ``latentlab`` import (module level or inside a function, and
``importlib`` names), read from the source without importing it.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
DVC_FILES = [ROOT / "dvc.yaml", *sorted((ROOT / "pipelines").glob("*/dvc.yaml"))]

# Code no stage output depends on, left out of every stage's deps (dvc.yaml says so):
# the package docstring and version; exception classes and their messages; the
# adapters that only route params to the library function and log to MLflow.
NOT_DEPS = {"latentlab", "latentlab.errors", "latentlab.stages", "latentlab.tracking", "latentlab.cli"}


def module_file(name: str) -> Path | None:
    """The source file of module ``name`` (a package's ``__init__.py``), or None when it is not ours."""
    base = SRC / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def direct_imports(name: str) -> frozenset[str]:
    """The ``latentlab`` modules that module ``name`` imports anywhere in its source."""
    source = module_file(name)
    assert source is not None, name
    package = name if source.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # a relative import
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            found.add(base)
            # ``from latentlab.models import conv`` imports the module latentlab.models.conv.
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.add(node.value)  # importlib.import_module("latentlab.data.speech")
    return frozenset(m for m in found if m.startswith("latentlab") and module_file(m) is not None)


def has_code(name: str) -> bool:
    """Whether the module holds anything but its docstring (``models/__init__.py`` does not)."""
    source = module_file(name)
    assert source is not None
    body = ast.parse(source.read_text()).body
    return any(not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) for node in body)


def closure(entries: set[str]) -> set[str]:
    """Every module that importing ``entries`` runs: their imports, followed, and each one's parent packages."""
    seen: set[str] = set()
    todo = list(entries)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(direct_imports(name))
            parent = name.rpartition(".")[0]
            if parent:
                todo.append(parent)
    return {name for name in seen if has_code(name)}


def stage_entry_modules(command: str) -> set[str]:
    """The library modules that ``stages.<command>`` imports, with stages.py's own module-level imports."""
    tree = ast.parse((SRC / "latentlab" / "stages.py").read_text())
    module_level = {
        node.module
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("latentlab")
    }
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert command in functions, f"stages.py has no function {command!r} for `latentlab {command}`"
    entries = set(module_level)
    for node in ast.walk(functions[command]):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("latentlab"):
            entries.add(node.module)
        # anomaly and sparsity run through _study(name, ...), which imports latentlab.{name}.
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_study":
            first = node.args[0]
            assert isinstance(first, ast.Constant)
            entries.add(f"latentlab.{first.value}")
    return entries


def stages() -> list[tuple[str, str, list[str]]]:
    """(dvc.yaml, stage name, deps) for every stage of every dvc.yaml."""
    found = []
    for dvc_file in DVC_FILES:
        for name, stage in yaml.safe_load(dvc_file.read_text())["stages"].items():
            body = stage.get("do", stage)
            found.append((str(dvc_file.relative_to(ROOT)), name, [str(d) for d in body["deps"]] + [body["cmd"]]))
    return found


def modules_in(dep: str) -> set[str]:
    """The modules with code whose source the dep path holds (a file, or every file of a folder)."""
    path = ROOT / dep
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    names = {".".join(f.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__") for f in files}
    return {name for name in names if module_file(name) is not None and has_code(name)}


@pytest.mark.parametrize(("dvc_file", "stage", "deps"), stages(), ids=lambda v: v if isinstance(v, str) else "")
def test_stage_lists_exactly_the_code_it_runs(dvc_file: str, stage: str, deps: list[str]) -> None:
    *deps, cmd = deps
    words = cmd.split()
    assert words[0] == "latentlab", f"{dvc_file}: {stage}: cmd {cmd!r} is not a latentlab command"
    runs = closure(stage_entry_modules(words[1])) - NOT_DEPS
    listed = {dep: modules_in(dep) for dep in deps if dep.startswith("src/")}
    missing = sorted(runs - set().union(*listed.values()))
    # A folder is listed only when the stage runs all of it: else an edit to the rest reruns it for nothing.
    unused = sorted(dep for dep, modules in listed.items() if not modules or modules - runs)
    assert not missing, f"{dvc_file}: stage {stage} runs code it does not list in deps: {missing}"
    assert not unused, f"{dvc_file}: stage {stage} lists code it never runs: {unused}"


def test_the_import_reader_follows_function_level_and_importlib_imports() -> None:
    # corrupt.py imports data.speech through importlib (it pulls in librosa); train.py
    # imports corrupt inside a function; the engine reaches every model through the registry.
    assert "latentlab.data.speech" in direct_imports("latentlab.corrupt")
    assert "latentlab.corrupt" in direct_imports("latentlab.train")
    assert {"latentlab.models.conv", "latentlab.models.vae"} <= closure({"latentlab.engine"})
    assert "latentlab.anomaly" in stage_entry_modules("anomaly")
