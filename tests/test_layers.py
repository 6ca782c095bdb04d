"""The layer order of aengine/, checked from the source: every import (at module level, inside
functions, under TYPE_CHECKING) goes to the importer's own layer or a lower one, no module imports
another layer's private names, the module graph has no circle, and the engine does not depend on
clients/ (only the CLI's --shell branch loads clients.shell, inside the function)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "aengine"

# Top to bottom. A module belongs to the layer of its first name under aengine/ (a folder or a
# top-level module); it may import from its own layer and from any layer below it.
LAYERS = [
    ["__init__", "__main__"],
    ["serve"],
    ["llm"],
    ["engine"],
    ["scheduler", "tp"],
    ["runtime"],
    ["models"],
    ["layers", "attention"],
    ["cache", "tokenizer", "weights", "distributed"],
    ["config", "types"],
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(root: Path) -> dict[str, set[tuple[str, str]]]:
    """module -> {(imported module, imported name or "")} for every aengine import in its source."""
    pkg = root.name
    graph: dict[str, set[tuple[str, str]]] = {}
    for path in sorted(root.rglob("*.py")):
        mod = module_name(root, path)
        edges = graph.setdefault(mod, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update((a.name, "") for a in node.names if a.name.split(".")[0] == pkg)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = mod.split(".")[: -node.level + (path.name == "__init__.py") or None]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] == pkg:
                    edges.update((target, a.name) for a in node.names)
    return graph


def violations(root: Path) -> list[str]:
    graph = imports(root)
    found = []
    for mod, edges in graph.items():
        for target, name in sorted(edges):
            if target not in graph and f"{target}.{name}" in graph:
                target, name = f"{target}.{name}", ""  # `from pkg import submodule`
            src, dst = layer(mod), layer(target)
            if src not in RANK or dst not in RANK:
                found.append(f"{mod} -> {target}: a layer not in LAYERS ({src if src not in RANK else dst})")
            elif RANK[dst] < RANK[src]:
                found.append(f"{mod} ({src}) imports {target} ({dst}), a higher layer")
            if name.startswith("_") and src != dst and name != "__version__":
                found.append(f"{mod} imports the private {target}.{name} of another layer")
    # circles between modules: depth-first search over the module graph
    succ = {m: {t if t in graph else f"{t}.{n}" for t, n in e if (t if t in graph else f"{t}.{n}") in graph}
            for m, e in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(succ[m]):
            if state.get(t) == 1:
                found.append("import circle: " + " -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_imports_only_go_down() -> None:
    assert violations(ROOT) == []


def clients_imports(root: Path) -> list[str]:
    """Every import of clients/ in the tree, except one inside a function of __main__."""
    found = []
    for path in sorted(root.rglob("*.py")):
        mod, tree = module_name(root, path), ast.parse(path.read_text(), str(path))
        in_funcs = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)}
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n.split(".")[0] == "clients" for n in names) and not (
                    mod == f"{root.name}.__main__" and id(node) in in_funcs):
                found.append(f"{mod} imports clients")
    return found


def test_the_engine_does_not_depend_on_clients(tmp_path: Path) -> None:
    assert clients_imports(ROOT) == []
    (tmp_path / "aengine").mkdir()
    (tmp_path / "aengine" / "__main__.py").write_text("import clients.shell\n")
    (tmp_path / "aengine" / "engine.py").write_text("def f():\n    from clients.shell import run_shell\n")
    assert clients_imports(tmp_path / "aengine") == ["aengine.__main__ imports clients",
                                                     "aengine.engine imports clients"]


def test_every_layer_is_named_once() -> None:
    names = [n for names in LAYERS for n in names]
    assert len(names) == len(set(names))
    present = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
               if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert present == set(names), present ^ set(names)


def test_a_planted_upward_import_circle_and_private_import_are_caught(tmp_path: Path) -> None:
    """The check itself can fail: a copy of the tree with three planted mistakes."""
    root = tmp_path / "aengine"
    for path in ROOT.rglob("*.py"):
        dst = root / path.relative_to(ROOT)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(path.read_text())
    assert violations(root) == []
    (root / "cache" / "pool.py").write_text(
        (root / "cache" / "pool.py").read_text() + "\ndef f():\n    from aengine.runtime.runner import ModelRunner\n")
    (root / "types.py").write_text((root / "types.py").read_text() + "\nfrom aengine import config\n")
    (root / "config.py").write_text((root / "config.py").read_text() + "\nimport aengine.types\n")
    (root / "engine.py").write_text((root / "engine.py").read_text() + "\nfrom aengine.weights import _gguf_key\n")
    found = violations(root)
    assert any("aengine.cache.pool (cache) imports aengine.runtime.runner (runtime)" in f for f in found), found
    assert any(f.startswith("import circle") and "aengine.config" in f and "aengine.types" in f for f in found), found
    assert any("private aengine.weights._gguf_key" in f for f in found), found
