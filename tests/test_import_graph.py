"""The import rule of the README, checked on the source: which package may import which, and no cycles.

The graph is read from the AST of every module of the packages pyproject.toml ships (plus `bench/`): every
`import` and `from ... import` anywhere in a module counts, including those inside functions (lazy imports).
Imports under `if TYPE_CHECKING:` count for the direction rules (a type is a dependency too) but not for cycles
(they never run). `from pkg import name` is an edge to `pkg.name` when that is a module, else to `pkg`.

The rules (`RULES`; the most specific importer prefix applies):
    m2pt                 imports nothing of ours (the core)
    prompts_store        -> m2pt
    server               -> prompts_store, m2pt; never server.api (domain code does not depend on HTTP)
    server.api           -> server, prompts_store, m2pt
    server.app / .cli / .cluster  -> server (incl. server.api), prompts_store, m2pt
    server.engine        -> never server.api, server.settings, server.app, server.cli, server.cluster
    training             -> m2pt, prompts_store; never training.demo (the trainer does not depend on the demo)
    training.demo        -> training, prompts_store, m2pt
    m2pt_cli             -> m2pt, prompts_store, server, training (the `m2pt` command dispatches to all)
    bench                -> anything; nothing of ours imports bench
"""

from __future__ import annotations

import ast
import fnmatch
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTRA_ROOTS = ("bench",)  # not shipped, but part of the graph (it must not be imported, nor form cycles)


@dataclass(frozen=True)
class Rule:
    importer: str  # module prefix the rule applies to
    may_import: tuple[str, ...]  # prefixes of our modules it may import
    must_not_import: tuple[str, ...] = ()  # exceptions inside `may_import`
    why: str = ""


SERVER_TOP = ("server", "prompts_store", "m2pt")
RULES = (
    Rule("m2pt", ("m2pt",), why="m2pt is the core: it imports nothing of ours"),
    Rule("prompts_store", ("prompts_store", "m2pt"), why="the store sits on the core only"),
    Rule(
        "server", SERVER_TOP, ("server.api",), why="only server.app/cli/cluster/api may import the HTTP layer"
    ),
    Rule("server.api", SERVER_TOP, why="the HTTP layer sits on server, the store and the core"),
    Rule("server.app", SERVER_TOP, why="the app factory wires server, the store and the core"),
    Rule("server.cli", SERVER_TOP, why="the server CLI wires server, the store and the core"),
    Rule("server.cluster", SERVER_TOP, why="the cluster deployment wraps the server"),
    Rule(
        "server.engine",
        SERVER_TOP,
        ("server.api", "server.settings", "server.app", "server.cli", "server.cluster"),
        why="the engine knows nothing of HTTP, the server's settings or how it is deployed",
    ),
    Rule(
        "training",
        ("training", "m2pt", "prompts_store"),
        ("training.demo",),
        why="the trainer sits on the core and the store, and does not depend on the demo",
    ),
    Rule("training.demo", ("training", "m2pt", "prompts_store"), why="the demo sits on the trainer"),
    Rule("m2pt_cli", ("m2pt_cli", "m2pt", "prompts_store", "server", "training"), why="the CLI dispatches"),
    Rule("bench", ("bench", "m2pt", "m2pt_cli", "prompts_store", "server", "training"), why="benchmarks"),
)

# Edges that break a rule on purpose, with the reason. Keep this list short.
ALLOWED_EDGES: dict[tuple[str, str], str] = {
    (
        "training.builtin",
        "training.demo.synthetic",
    ): "the built-in `synthetic:<task>` datasets are drawn by the "
    "demo's scene generator (lazy import inside `synthetic_records`)",
}


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    line: int
    type_only: bool  # under `if TYPE_CHECKING:`


def shipped_roots(root: Path = ROOT) -> list[str]:
    """Top-level packages pyproject.toml ships (its setuptools `include` patterns), plus `EXTRA_ROOTS`."""
    config = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["packages"]["find"]["include"]
    found = [
        d.name
        for d in sorted(root.iterdir())
        if (d / "__init__.py").is_file() and any(fnmatch.fnmatch(d.name, p) for p in patterns)
    ]
    return found + [r for r in EXTRA_ROOTS if (root / r / "__init__.py").is_file()]


def module_files(root: Path, packages: list[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under each package (`pkg/__init__.py` is `pkg`)."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, type_only: bool = False):
    """(node, type_only) for every Import/ImportFrom under `tree`, tracking `if TYPE_CHECKING:` bodies."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, type_only
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), True)
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), type_only)
        else:
            yield from _imports(node, type_only)


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is one of our modules (`import a.b.c` loads a.b.c, else a.b ...)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _wanted(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules) -> list[str]:
    """The module names an import statement loads (`from pkg import name`: `pkg.name` if a module, else `pkg`)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = importer.split(".") if is_package else importer.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules) -> list[str]:
    return [
        t for t in (_known(n, modules) for n in _wanted(node, importer, is_package, modules)) if t is not None
    ]


def missing_modules(root: Path, packages: list[str]) -> list[str]:
    """Imports of our packages that name no module we have (a stale path after a move, say)."""
    modules = module_files(root, packages)
    out = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, _ in _imports(tree):
            for wanted in _wanted(node, name, path.name == "__init__.py", modules):
                if wanted.split(".")[0] in packages and wanted not in modules:
                    out.append(f"{name} (line {node.lineno}) imports {wanted}, which does not exist")
    return out


def import_edges(root: Path, packages: list[str]) -> list[Edge]:
    """Every import of one of our modules by one of our modules (see the module docstring)."""
    modules = module_files(root, packages)
    edges = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, type_only in _imports(tree):
            for target in _targets(node, name, path.name == "__init__.py", modules):
                if target != name:
                    edges.append(Edge(name, target, node.lineno, type_only))
    return edges


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def rule_for(module: str) -> Rule | None:
    matching = [r for r in RULES if _under(module, r.importer)]
    return max(matching, key=lambda r: len(r.importer), default=None)


def violations(edges: list[Edge]) -> list[tuple[Edge, Rule]]:
    out = []
    for edge in edges:
        rule = rule_for(edge.importer)
        assert rule is not None, f"{edge.importer} is in no layer of RULES"
        allowed = any(_under(edge.imported, p) for p in rule.may_import)
        if not allowed or any(_under(edge.imported, p) for p in rule.must_not_import):
            out.append((edge, rule))
    return out


def cycles(edges: list[Edge]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan), over the edges that run."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        if not e.type_only:
            graph.setdefault(e.importer, set()).add(e.imported)
            graph.setdefault(e.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

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
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return import_edges(ROOT, shipped_roots())


def test_every_module_is_in_a_layer():
    modules = module_files(ROOT, shipped_roots())
    assert {"m2pt", "prompts_store", "server", "training", "m2pt_cli", "bench"} <= {
        m.split(".")[0] for m in modules
    }
    assert [m for m in modules if rule_for(m) is None] == []


def test_every_import_of_ours_names_a_module():
    assert missing_modules(ROOT, shipped_roots()) == []


def test_imports_follow_the_layers(edges):
    tolerated = ALLOWED_EDGES
    bad = [
        f"{e.importer} -> {e.imported} (line {e.line}{', TYPE_CHECKING' if e.type_only else ''}): {rule.why}"
        for e, rule in violations(edges)
        if (e.importer, e.imported) not in tolerated
    ]
    assert bad == [], "imports against the README's import rule:\n" + "\n".join(bad)


def test_no_import_cycles(edges):
    found = [sorted(c) for c in cycles(edges)]
    assert found == [], f"import cycles (imports inside functions count): {found}"


def test_allowances_are_still_needed(edges):
    """An allowed edge that no longer exists is stale: delete it, so the list stays the set of real exceptions."""
    present = {(e.importer, e.imported) for e, _ in violations(edges)}
    stale = [k for k in ALLOWED_EDGES if k not in present]
    assert stale == [], f"delete these allowances, they no longer apply: {stale}"


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_finds_lazy_relative_and_type_only_imports(tmp_path):
    """The graph reader itself, on a made-up tree: a function-level cycle, a relative import against the
    layers, and a TYPE_CHECKING-only cycle (a direction violation, but not a cycle)."""
    _write(
        tmp_path,
        {
            "m2pt/__init__.py": "",
            "m2pt/a.py": "def f():\n    from m2pt import b\n",
            "m2pt/b.py": "import m2pt.a\n",
            "m2pt/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from prompts_store import d\n",
            "prompts_store/__init__.py": "",
            "prompts_store/d.py": "from .e import thing\nimport m2pt.c\n",
            "prompts_store/e.py": "def thing():\n    from ..server import api\n    import m2pt.gone\n",
            "server/__init__.py": "",
            "server/api.py": "",
        },
    )
    found = import_edges(tmp_path, ["m2pt", "prompts_store", "server"])
    pairs = {(e.importer, e.imported, e.type_only) for e in found}
    assert ("m2pt.a", "m2pt.b", False) in pairs and ("m2pt.b", "m2pt.a", False) in pairs
    assert ("m2pt.c", "prompts_store.d", True) in pairs and (
        "prompts_store.d",
        "prompts_store.e",
        False,
    ) in pairs
    assert ("prompts_store.e", "server.api", False) in pairs
    assert cycles(found) == [frozenset({"m2pt.a", "m2pt.b"})]  # m2pt.c <-> prompts_store.d is type-only
    bad = {(e.importer, e.imported) for e, _ in violations(found)}
    assert bad == {("m2pt.c", "prompts_store.d"), ("prompts_store.e", "server.api")}
    assert missing_modules(tmp_path, ["m2pt", "prompts_store", "server"]) == [
        "prompts_store.e (line 3) imports m2pt.gone, which does not exist"
    ]
