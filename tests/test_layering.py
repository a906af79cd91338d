"""The import layers: util/ at the bottom, ops/ beside it, models/ and datasets/ above, the
command line (cli/) above those, then engine.py, the run's plumbing (runner/), the evaluation
extras (extras/) and main.py on top -- and no import circle.

Every import counts, including those inside functions (a function-local import hides an
upward dependency; it does not remove it).
"""
import ast
import os
from typing import Dict, List, Set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("util", "ops", "models", "datasets", "cli", "runner", "extras")
TOP_MODULES = ("engine", "main")
# what each layer must not import (its own layer and those below are fine)
FORBIDDEN = {
    "util": {"ops", "models", "datasets", "cli", "engine", "runner", "extras", "main"},
    "ops": {"util", "models", "datasets", "cli", "engine", "runner", "extras", "main"},
    "models": {"datasets", "cli", "engine", "runner", "extras", "main"},
    "datasets": {"models", "cli", "engine", "runner", "extras", "main"},
    "cli": {"engine", "runner", "extras", "main"},
    "engine": {"runner", "extras", "main"},
    "runner": {"extras", "main"},
    "extras": {"main"},
}


def _module_files() -> Dict[str, str]:
    """{dotted module name: file} for the project's modules."""
    files = {name: os.path.join(ROOT, name + ".py") for name in TOP_MODULES}
    for package in PACKAGES:
        for folder, _, names in os.walk(os.path.join(ROOT, package)):
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    files[dotted[: -len(".__init__")] if dotted.endswith(".__init__") else dotted] = path
    return files


def _resolve(name: str, modules: Set[str]) -> str:
    """The longest project module that ``name`` (a dotted import target) is or lies in; '' if none."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return ""


def _imports(module: str, path: str, modules: Set[str]) -> Set[str]:
    """Project modules that ``module`` imports anywhere in its file."""
    is_package = path.endswith("__init__.py")
    package = module if is_package else module.rpartition(".")[0]
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        targets: List[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved and resolved != module:
                found.add(resolved)
    return found


def _graph() -> Dict[str, Set[str]]:
    files = _module_files()
    modules = set(files)
    return {module: _imports(module, path, modules) for module, path in files.items()}


def test_no_layer_imports_a_layer_above_it():
    wrong = []
    for module, targets in _graph().items():
        layer = module.split(".")[0]
        for target in sorted(targets):
            if target.split(".")[0] in FORBIDDEN.get(layer, ()):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    graph = _graph()
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(module: str, path: List[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            # a submodule importing its own package's __init__ is how relative imports work, not a circle
            if module.startswith(target + "."):
                continue
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "\n".join(circles)


def test_the_checker_sees_function_local_and_relative_imports(tmp_path):
    """The graph builder itself: a function-local import and a relative one are both edges."""
    source = tmp_path / "mod.py"
    source.write_text("from .sibling import x\n\ndef f():\n    import util.dist\n")
    found = _imports("models.mod", str(source), {"models.sibling", "util.dist", "models.mod"})
    assert found == {"models.sibling", "util.dist"}


def test_every_package_has_a_layer():
    """A new top-level package must be placed in the layers above (else nothing checks its imports)."""
    packages = {name for name in os.listdir(ROOT)
                if os.path.isfile(os.path.join(ROOT, name, "__init__.py"))} - {"tests", "scripts"}
    assert packages <= set(PACKAGES), sorted(packages - set(PACKAGES))
    assert set(FORBIDDEN) == set(PACKAGES) | {"engine"}
