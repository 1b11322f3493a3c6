"""The package's shape: every module imports on its own, the import graph has no cycle, no module is too long.

A module that only imports because something else happened to be imported first breaks the day that order
changes; a cycle makes which module finishes first depend on who imported first (and hides half-initialised
modules behind function-level imports); a long module usually does several jobs. These are checked statically
(ast) and, for the first, for real in fresh interpreters.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "skipgpt_dist"
MAX_LINES = 400


def package_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under skipgpt_dist (packages by their __init__)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module name a `from X import ...` statement names (relative levels resolved)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]  # a package's own `from . import x` is relative to itself
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its file (module level and inside functions).

    `from pkg import name` counts as importing pkg.name when that is a module, else pkg itself. Importing
    `pkg.sub` from outside pkg also runs pkg/__init__ first, so that is an edge too; from inside pkg it is not
    (pkg/__init__ re-exporting its own submodules is no cycle)."""
    modules = package_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(name, is_package, node)
                subs = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in modules]
                targets = subs if len(subs) == len(node.names) else subs + [source]
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a non-module attribute: its module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
                    graph[name].update(_packages_run_first(name, target, modules))
    return graph


def _packages_run_first(importer: str, target: str, modules) -> set[str]:
    """The packages whose __init__ runs when `importer` imports `target`: those above `target` that are not
    already above `importer` (those ran before `importer` itself)."""
    parts = target.split(".")
    above = {".".join(parts[:i]) for i in range(1, len(parts))}
    importer_above = {".".join(importer.split(".")[:i]) for i in range(1, len(importer.split(".")))}
    return {p for p in above - importer_above if p in modules and p != importer}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of the graph as [a, b, ..., a], or [] if there is none (iterative depth-first search)."""
    state = {node: 0 for node in graph}  # 0 unvisited, 1 on the current path, 2 done
    for root in sorted(graph):
        if state[root]:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
            elif state[child] == 1:
                return path[path.index(child):] + [child]
            elif state[child] == 0:
                state[child] = 1
                path.append(child)
                stack.append(iter(sorted(graph[child])))
    return []


def test_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle in skipgpt_dist: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_module_is_over_the_line_limit():
    too_long = {}
    for path in package_modules().values():
        rel = path.relative_to(REPO).as_posix()
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES:
            too_long[rel] = lines
    assert not too_long, f"modules over {MAX_LINES} lines (split them along their jobs): {too_long}"


def third_party_imports() -> list[str]:
    """Top-level modules outside the package that some package module imports at module level."""
    found = set()
    for path in package_modules().values():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
                found.add(node.module)
    return sorted(name for name in found if name.split(".")[0] != "skipgpt_dist")


# Runs in one fresh interpreter: the third-party libraries the package imports at module level are imported once,
# then each package module is imported in its own forked child, so every child starts with nothing of skipgpt_dist
# imported (checked) and pays only for the package's own code (a fresh `python -c` per module costs seconds each,
# mostly torch). argv: the libraries, "--", the modules.
_FORK_EACH = r"""
import importlib, os, sys, traceback
split = sys.argv.index("--")
for lib in sys.argv[1:split]:
    try:
        importlib.import_module(lib)
    except ImportError:
        pass
assert not [m for m in sys.modules if m.split(".")[0] == "skipgpt_dist"], "imported skipgpt_dist before forking"
failed = []
for name in sys.argv[split + 1:]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(name)
            code = 0
        except BaseException:
            os.write(write, traceback.format_exc().strip().splitlines()[-1].encode())
            code = 1
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as fh:
        message = fh.read()
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failed.append(f"{name}: {message or 'exit status ' + str(status)}")
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_on_its_own():
    """Each module imported first, alone, in a process where no other module of the package was imported."""
    names = sorted(package_modules())
    proc = subprocess.run([sys.executable, "-c", _FORK_EACH, *third_party_imports(), "--", *names], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, "modules that do not import on their own:\n" + proc.stdout + proc.stderr[-2000:]
