"""The package's layout as docs/architecture.md states it: wings in one import order, and no import loops.

Reads the source (every import, those inside functions too), so a change that makes a lower wing reach up, or two
modules import each other, fails here with the offending import named.
"""

from __future__ import annotations

import ast
from pathlib import Path

import transformers_qwen35

PACKAGE = Path(transformers_qwen35.__file__).parent
# Bottom to top: a module may import its own wing and the wings before it. The top level (__init__, registration,
# __main__) is the package's face and may import any wing.
WINGS = ["kernels", "core", "training", "generation", "model", "chat", "cli"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_of(path: Path) -> list[str]:
    return list(path.relative_to(PACKAGE).parent.parts)


def _imports() -> dict[str, set[str]]:
    """Each module (dotted, relative to the package) -> the package modules it imports."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                base = _package_of(path)[: len(_package_of(path)) - (node.level - 1)]
                stem = base + (node.module.split(".") if node.module else [])
                for alias in node.names:
                    candidate = ".".join([*stem, alias.name])
                    targets.add(candidate if candidate in modules else ".".join(stem))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                absolute = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                for module in absolute:
                    if module and module.startswith("transformers_qwen35."):
                        targets.add(module.removeprefix("transformers_qwen35."))
        graph[name] = {target for target in targets if target != name}
    return graph


def _wing(module: str) -> int | None:
    head = module.split(".")[0]
    return WINGS.index(head) if head in WINGS else None


def test_every_module_belongs_to_a_wing_or_the_face():
    face = {"", "registration", "__main__"}
    strays = [name for name in _imports() if _wing(name) is None and name not in face]
    assert not strays, f"modules outside the wings {WINGS}: {strays} (docs/architecture.md says where each belongs)"


def test_no_wing_imports_a_wing_above_it():
    reaching_up = []
    for module, targets in _imports().items():
        own = _wing(module)
        if own is None:
            continue  # the face
        for target in targets:
            wing = _wing(target)
            if target == "" and own == len(WINGS) - 1:
                continue  # the command line reads the package's __version__
            if wing is None or wing > own:
                reaching_up.append(f"{module} imports {target or 'the package itself'}")
    assert not reaching_up, "\n".join(sorted(reaching_up))


def test_no_import_loops():
    graph = _imports()
    loops = []
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if target.startswith(module + ".") or module.startswith(target + ".") or target not in graph:
                continue  # a package and its own modules, or a name that is not a module
            if state.get(target) == "open":
                loops.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not loops, "import loops:\n" + "\n".join(loops)


def test_the_graph_is_read():
    """The checks above see the imports they judge: known edges of each kind are found."""
    graph = _imports()
    assert "core.cache" in graph["model.modeling"]  # from ..core.cache import ...
    assert "generation.speculative" in graph["generation.mixin"]  # from . import speculative
    assert "training.graphs" in graph["model.modeling"]  # from ..training import graphs as training_graphs
    assert "chat.processing" in graph["cli.demo"]  # an import inside a function
    assert "kernels.reference.gated_delta_rule" in graph["kernels.dispatch"]
