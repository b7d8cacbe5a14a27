"""The package's imports run one way: no cycle, lazy imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Optional

PACKAGE = Path(__file__).resolve().parent.parent / "mor_dist"


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a package's __init__ is a module of its own)."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> Optional[list[str]]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 50 and "mor_dist.layout" in graph["mor_dist.config"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_subpackages_import_one_way():
    """The layers of docs/architecture.md: no subpackage or top-level module imports one that imports it back."""
    layers: dict[str, set[str]] = {}
    for name, targets in import_graph(PACKAGE).items():
        source = name.split(".")[1] if "." in name else name
        layers.setdefault(source, set()).update(t.split(".")[1] for t in targets if "." in t)
    layers = {name: targets - {name} for name, targets in layers.items()}
    for target in set().union(*layers.values()) - set(layers):
        layers[target] = set()
    assert find_cycle(layers) is None, " -> ".join(find_cycle(layers))


def test_a_reintroduced_cycle_is_found(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "config.py").write_text("from pkg.errors import Error\n")
    (package / "errors.py").write_text("class Error(Exception):\n    pass\n")
    (package / "sub" / "plan.py").write_text("def plan():\n    from pkg.config import Error  # lazy\n")
    assert find_cycle(import_graph(package)) is None
    (package / "errors.py").write_text("def check():\n    from .sub import plan  # lazy, relative\n")
    cycle = find_cycle(import_graph(package))
    assert cycle is not None and cycle[0] == cycle[-1]
    assert set(cycle) == {"pkg.errors", "pkg.sub.plan", "pkg.config"}


def imported_top_level_modules(package: Path) -> set[str]:
    """Top-level names of every module the package imports (lazy imports inside functions included) or looks up
    with `find_spec("name")` to switch a backend on (Transformer Engine: megatron-core imports it)."""
    names = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "find_spec" and node.args and \
                    isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names.add(node.args[0].value.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
    return names


def test_every_declared_dependency_is_imported():
    """Runtime dependencies and the GPU extras: each is imported by mor_dist (no stale declarations)."""
    import importlib.metadata
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r).name for r in [*project["dependencies"], *project["optional-dependencies"]["gpu"]]]
    modules_of: dict[str, set[str]] = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            modules_of.setdefault(dist.lower().replace("_", "-"), set()).add(module)
    modules_of.update({"transformer-engine": {"transformer_engine"}, "nvidia-ml-py": {"pynvml"}})  # GPU only
    imported = imported_top_level_modules(PACKAGE)
    unused = [name for name in declared if not modules_of[name.lower().replace("_", "-")] & imported]
    assert len(declared) > 10 and unused == [], f"declared but never imported: {unused}"
