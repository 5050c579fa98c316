"""The layering that docs/architecture.md describes, checked on the source.

Imports are read with `ast` (nothing is executed). "Loads" means the module-level
imports and everything they load in turn: what `import micropay.X` pulls in. Imports
inside functions (the composition roots wire optional features in lazily) and under
`if TYPE_CHECKING:` are listed separately and only count where a rule says so.
"""
from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "plugin" / "micropay"

# The pure core: rules and formats, no I/O framework, no adapter, no feature.
CORE = {"l402", "tokens", "macaroon", "streams", "receipts", "canonical", "tlv", "params", "errors",
        "patterns", "pricing", "inputs", "tomlpos", "ratelimit", "tasks", "metrics", "secretfile",
        "payment_auth", "discovery"}
# Services: they take ports (Node, RecordStore, Store, Poster) and never load an adapter.
SERVICES = {"challenger", "settlement", "invoices", "stream_runner", "stream_attribution",
            "games.purchases", "games.payouts", "games.webhooks", "games.events", "games.service",
            "games.apikeys"}
ADAPTERS = {"lightning.cln", "lightning.sandbox", "lightning.datastore", "store.sqlite", "store.postgres",
            "games.http.poster"}
# Where aiohttp may be imported: the HTTP edges and the clients.
AIOHTTP_HOMES = ("sidecar", "games.http", "http", "client", "session_client", "cli")


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _under(name: str, homes) -> bool:
    return any(name == h or name.startswith(h + ".") for h in homes)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING" or (
        isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")


@cache
def _imports(name: str) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(module-level micropay imports, micropay imports inside functions, third-party
    top-level packages imported anywhere). Imports under TYPE_CHECKING are annotations
    only and are left out."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    eager: set[str] = set()
    lazy: set[str] = set()
    typing_only: set[str] = set()
    third: set[str] = set()

    def targets(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            out = [a.name for a in node.names]
        else:
            assert isinstance(node, ast.ImportFrom)
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                out = ["micropay" + ("." + module if module else "")]
            else:
                out = [node.module or ""]
            out += [f"{out[0]}.{a.name}" for a in node.names]   # `from pkg import submodule`
        return out

    def record(node: ast.AST, bucket: set[str]) -> None:
        for full in targets(node):
            if full == "micropay" or full.startswith("micropay."):
                local = full[len("micropay."):] if full != "micropay" else ""
                if local in MODULES:
                    bucket.add(local)
            elif full:
                third.add(full.split(".")[0])

    def walk(body, top: bool) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                record(node, eager if top else lazy)
            elif isinstance(node, ast.If) and _is_type_checking(node):
                for imp in node.body:
                    record(imp, typing_only)
            elif isinstance(node, (ast.If, ast.Try, ast.With)) and top:
                walk(node.body, True)
                for extra in (getattr(node, "orelse", []), getattr(node, "finalbody", [])):
                    walk(extra, True)
                for handler in getattr(node, "handlers", []):
                    walk(handler.body, True)
            else:
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, ast.stmt) or isinstance(child, ast.excepthandler):
                        walk([child] if isinstance(child, ast.stmt) else child.body, False)

    walk(ast.parse(path.read_text(encoding="utf-8")).body, True)
    eager.discard(name)
    lazy -= eager
    lazy.discard(name)
    return frozenset(eager), frozenset(lazy), frozenset(third)


@cache
def loads(name: str) -> frozenset[str]:
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        parents = {current.rsplit(".", i)[0] for i in range(1, current.count(".") + 1)}
        for dep in _imports(current)[0] | {p for p in parents if p in MODULES}:   # a.b runs a/__init__
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    seen.discard(name)
    return frozenset(seen)


def _third_party_loaded(name: str) -> set[str]:
    out = set(_imports(name)[2])
    for dep in loads(name):
        out |= _imports(dep)[2]
    return out


def test_the_rules_name_modules_that_exist():
    for name in CORE | SERVICES | ADAPTERS:
        assert name in MODULES, f"{name} is named in a rule but micropay/{name}.py does not exist"


@pytest.mark.parametrize("name", sorted(CORE))
def test_the_core_is_pure(name):
    """Core modules load only other core modules, and no I/O framework."""
    stray = {m for m in loads(name) if m not in CORE and m != ""}
    assert not stray, f"{name} loads {sorted(stray)}"
    assert not _third_party_loaded(name) & {"aiohttp", "pyln", "psycopg", "asyncpg"}


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_services_take_ports_and_never_load_an_adapter(name):
    reached = loads(name)
    assert not reached & ADAPTERS, f"{name} loads adapters {sorted(reached & ADAPTERS)}"
    assert "aiohttp" not in _third_party_loaded(name), f"{name} loads aiohttp"
    assert not {m for m in reached if _under(m, ("sidecar", "games.http", "http"))}


def test_aiohttp_lives_only_at_the_http_edges():
    users = {name for name in MODULES if "aiohttp" in _imports(name)[2]}
    assert users, "the check found no aiohttp import at all: the scanner is broken"
    stray = {name for name in users if not _under(name, AIOHTTP_HOMES)}
    assert not stray, f"aiohttp imported outside the HTTP edges: {sorted(stray)}"


def test_pyln_is_only_the_plugin_entry_point():
    users = {name for name in MODULES if "pyln" in _imports(name)[2]}
    assert users == {"cln_plugin"}, users


def test_features_do_not_reach_into_each_other():
    """games never imports the sidecar; the store, the node adapters, the HTTP helpers and
    the core services never import games. configfile is the one place that reads the
    whole file, [games] table included, so it may load games.config."""
    for name in MODULES:
        eager, lazy, _ = _imports(name)
        deps = eager | lazy
        if _under(name, ("games",)):
            assert not {d for d in deps if _under(d, ("sidecar",))}, f"{name} imports the sidecar"
        if _under(name, ("store", "config", "lightning", "http", "challenger", "settlement")):
            games = {d for d in deps if _under(d, ("games",))}
            assert not games, f"{name} imports the games feature: {sorted(games)}"
    assert {d for d in _imports("configfile")[0] if _under(d, ("games",))} == {"games.config"}


def test_the_sidecar_does_not_load_games_unless_configured():
    assert not {m for m in loads("sidecar.app") if _under(m, ("games",))}


def test_no_import_cycles():
    """Module-level imports form no cycle (lazy imports inside functions are how the
    composition roots wire optional features in; they are not dependencies of the module)."""
    graph = {name: _imports(name)[0] for name in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_scanner_sees_an_import_it_should():
    """Guard the guard: known edges must be found, or every rule above passes vacuously."""
    assert "store.l402" in _imports("challenger")[0]
    assert "lightning.base" in loads("stream_runner")
    assert "games.service" in _imports("sidecar.app")[1]          # wired in lazily
    assert "games.service" in _imports("sidecar.app")[1] and "games.service" not in loads("sidecar.app")
