"""The folder tree is the architecture: layers import downwards only, and nothing imports in a
cycle — including imports written inside functions, which Python would only resolve late."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "palm_rlhf"

# what each layer may import from the package (besides itself); everything else is refused
ALLOWED = {
    "checkpoint": set(),
    "options": set(),
    "typecheck": set(),
    "functional": {"typecheck"},
    "model": {"checkpoint", "typecheck", "functional"},
    "data": {"checkpoint"},
    "train": {"checkpoint", "options", "typecheck", "functional", "model", "data"},
    "rl": {"checkpoint", "options", "typecheck", "functional", "model", "data", "train"},
    "label": {"checkpoint", "options", "typecheck", "functional", "model", "data", "train"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(path: Path) -> set[str]:
    """Every palm_rlhf module `path` imports, at any depth of its syntax tree."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("palm_rlhf"):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("palm_rlhf"))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in package_imports(path):
            # `from palm_rlhf.x import y` names module x (or y when y is a submodule of x)
            while imported not in modules and "." in imported:
                imported = imported.rsplit(".", 1)[0]
            if imported in modules and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "palm_rlhf"


def find_cycle(graph: dict[str, set[str]]):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycles():
    graph = import_graph()
    # package __init__ files re-export public names; a submodule importing its own package's
    # __init__ would be a cycle, and is reported like any other
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


@pytest.mark.parametrize("source_layer", sorted(ALLOWED))
def test_layers_import_downwards_only(source_layer):
    graph = import_graph()
    bad = []
    for module, targets in graph.items():
        if layer(module) != source_layer:
            continue
        for target in targets:
            target_layer = layer(target)
            if target_layer in (source_layer, "palm_rlhf"):
                if target_layer == "palm_rlhf" and target != "palm_rlhf":
                    bad.append(f"{module} -> {target}")
                continue
            if target_layer not in ALLOWED[source_layer]:
                bad.append(f"{module} -> {target}")
    assert not bad, f"{source_layer}/ imports above its layer: {bad}"


def test_cycle_finder_finds_a_planted_cycle():
    """The checker itself can fail: a two-module cycle and a three-module cycle are found."""
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_function_level_imports_are_seen(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from palm_rlhf.model.palm import PaLM\n    return PaLM\n")
    assert package_imports(source) == {"palm_rlhf.model.palm"}


def test_package_root_stays_small():
    """At most about a dozen modules directly in palm_rlhf/; the rest live in layers."""
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= 12, sorted(top)


def test_no_module_is_huge():
    sizes = {
        str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")
    }
    assert max(sizes.values()) <= 500, {k: v for k, v in sizes.items() if v > 500}
