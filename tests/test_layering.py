"""The folder tree is the architecture: layers import downwards only, and nothing imports in a
cycle — including imports written inside functions, which Python would only resolve late, and
relative imports, which are resolved here (and refused by the linter: `ban-relative-imports`)."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "palm_rlhf"

# what each lower layer may import from the package (besides itself); anything else is refused.
# A layer is a sub-package (model/) or a module directly in palm_rlhf/ (checkpoint.py). The
# bottom holds pure code: the beartype config, the tensor math (functional/), checkpoint I/O and
# the option vocabulary, then model/ and data/, which never import each other.
BOTTOM = {"typecheck", "checkpoint", "options"}
ALLOWED = {
    "typecheck": set(),
    "checkpoint": set(),
    "options": set(),
    "functional": {"typecheck"},
    "model": BOTTOM | {"functional"},
    "data": BOTTOM | {"functional"},
    "train": BOTTOM | {"functional", "model", "data"},
    "rl": BOTTOM | {"functional", "model", "data", "train"},
    "label": BOTTOM | {"functional", "model", "data", "train"},
}
# Everything else directly in palm_rlhf/ (cli.py, chat.py, plot.py, __main__.py, drop-in front
# doors such as grpo.py) and the package's __init__ are the top: they may import any layer, and
# no layer may import them. A new sub-package must be placed in ALLOWED (see test below).
TOP = "top"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module a `from ... import` names, with relative levels resolved against the
    importing module (`from .x import y` in palm_rlhf/model/palm.py is palm_rlhf.model.x)."""
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    # a package's __init__ is its own level-1 base; a module's base is its parent package
    base = base if is_package else base[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def package_imports(path: Path, importer: str = "palm_rlhf._probe") -> set[str]:
    """Every palm_rlhf name `path` imports, at any depth of its syntax tree: for `from m import
    a`, both m and m.a (m.a counts when it is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = absolute(node, importer, is_package)
            if module.split(".")[0] == "palm_rlhf":
                found.add(module)
                found.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "palm_rlhf")
    return found


def relative_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return [
        f"{where}:{node.lineno}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level > 0
    ]


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in package_imports(path, name):
            # `from palm_rlhf.x import y` names module x.y when y is a submodule, else x
            while imported not in modules and "." in imported:
                imported = imported.rsplit(".", 1)[0]
            if imported in modules and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return TOP  # the package's __init__: it re-exports the public names of every layer
    if parts[1] in ALLOWED:
        return parts[1]
    is_subpackage = (PACKAGE / parts[1]).is_dir()
    return f"unplaced sub-package {parts[1]}/" if is_subpackage else TOP


def upward_imports(graph: dict[str, set[str]], source_layer: str) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        if layer(module) != source_layer:
            continue
        for target in sorted(targets):
            target_layer = layer(target)
            if target_layer != source_layer and target_layer not in ALLOWED[source_layer]:
                bad.append(f"{module} -> {target}")
    return bad


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
    bad = upward_imports(import_graph(), source_layer)
    assert not bad, f"{source_layer} imports above its layer: {bad}"


def test_every_module_has_a_layer():
    unplaced = sorted({layer(m) for m in import_graph() if layer(m).startswith("unplaced")})
    assert not unplaced, f"add to ALLOWED in tests/test_layering.py: {unplaced}"


def python_files():
    """The repository's own Python files (not .git, virtual environments or other dot folders)."""
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        if not any(part.startswith(".") or part == "site-packages" for part in parts):
            yield path


def test_no_relative_imports_and_the_linter_refuses_them():
    bad = [hit for path in python_files() for hit in relative_imports(path)]
    assert not bad, f"relative imports (write palm_rlhf.x in full): {bad}"
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib

    lint = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    assert "TID252" in lint["select"] or "TID" in lint["select"], lint["select"]
    assert lint["flake8-tidy-imports"]["ban-relative-imports"] == "all"


# the checker itself can fail


def test_cycle_finder_finds_a_planted_cycle():
    """A two-module cycle and a three-module cycle are found."""
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_function_level_imports_are_seen(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from palm_rlhf.model.palm import PaLM\n    return PaLM\n")
    assert package_imports(source) == {"palm_rlhf.model.palm", "palm_rlhf.model.palm.PaLM"}


def test_relative_imports_are_resolved(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "from .attention import sdpa\nfrom .. import rl\nfrom ..rl.ppo import trainer\n"
        "def f():\n    from ..train import run\n"
    )
    found = package_imports(source, "palm_rlhf.model.palm")
    assert {"palm_rlhf.model.attention", "palm_rlhf.rl", "palm_rlhf.rl.ppo.trainer"} <= found
    assert "palm_rlhf.train.run" in found
    package = tmp_path / "__init__.py"
    package.write_text("from .palm import PaLM\n")
    assert "palm_rlhf.model.palm" in package_imports(package, "palm_rlhf.model")
    assert len(relative_imports(source)) == 4 and len(relative_imports(package)) == 1


def test_planted_upward_imports_are_refused():
    """model -> rl, functional -> model, model -> the package root and model -> cli are upward;
    model -> functional and model -> typecheck are allowed."""
    graph = {
        "palm_rlhf.model.palm": {
            "palm_rlhf.rl.rollout",
            "palm_rlhf.functional.kl",
            "palm_rlhf.typecheck",
            "palm_rlhf",
            "palm_rlhf.cli",
        },
        "palm_rlhf.functional.kl": {"palm_rlhf.model.palm", "palm_rlhf.typecheck"},
        "palm_rlhf.data.records": {"palm_rlhf.model.palm"},
    }
    assert upward_imports(graph, "model") == [
        "palm_rlhf.model.palm -> palm_rlhf",
        "palm_rlhf.model.palm -> palm_rlhf.cli",
        "palm_rlhf.model.palm -> palm_rlhf.rl.rollout",
    ]
    assert upward_imports(graph, "functional") == [
        "palm_rlhf.functional.kl -> palm_rlhf.model.palm"
    ]
    assert upward_imports(graph, "data") == ["palm_rlhf.data.records -> palm_rlhf.model.palm"]


def test_package_root_stays_small():
    """At most about a dozen modules directly in palm_rlhf/; the rest live in layers."""
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= 12, sorted(top)
