"""The layout and layering that docs/architecture.md describes, checked on the source.

Imports are read with `ast` (nothing is executed). "Loads" means the module-level
imports and everything they load in turn: what `import micropay.X` pulls in (a module
inside a package runs the package's `__init__` first). Imports inside functions (the
composition roots wire optional features in lazily) and under `if TYPE_CHECKING:` are
listed separately and only count where a rule says so.

Every rule is a function from an import graph to its violations. Each is run on the
real graph (no violation) and on the real graph with one import planted that breaks it
(the violation is found), so no rule can pass by being blind.
"""
from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "plugin" / "micropay"

# --- the rooms ---------------------------------------------------------------------------
# Each top-level folder of plugin/micropay and its one-line job (docs/architecture.md has
# the same table; test_the_docs_table_matches_the_tree keeps them together).
ROOMS = {
    "core": "rules every room uses: errors, input parsing, RPC params, tasks, metrics, secret files, "
            "limits, canonical targets, path patterns, receipts, HMAC-SHA256",
    "l402": "the L402 dialect: wire format, macaroons, tokens",
    "payment": 'the "Payment" dialect: the scheme (charge and session intents) and the session ledger',
    "streams": "streaming payments: schedule and accounting, the runner, TLV records, attribution",
    "seller": "the selling side without HTTP: the config file, prices, challenges, settlement, discovery",
    "lightning": "the Node and RecordStore ports and their adapters (lightningd, the sandbox)",
    "store": "the Store port, SQLite and PostgreSQL, schemas and the core repositories",
    "http": "what the HTTP edges share: problem responses, bounded bodies, caching headers",
    "sidecar": "the gate over HTTP (aiohttp): app, gate, reverse proxy, sessions, limits, server, embedding",
    "games": "in-app purchases: catalog, purchases, payouts, webhooks, live events, and their HTTP",
    "plugin": "the Core Lightning plugin: pyln glue, its runtime, options, micropay-fetch, invoices, "
              "the sidecar it supervises",
    "client": "the paying client: L402 and Payment challenges within budgets, Payment sessions",
    "nostr": "Nostr as NWC needs it: signed events, NIP-44 and NIP-04 encryption, relay connections",
    "nwc": "Nostr Wallet Connect: the wallet service for the node (connections, budgets, requests), URIs",
    "creators": "receiving tips: Lightning Addresses (LNURL-pay), zaps, tips split among collaborators",
}
# Loose files at the top: the entry points and what packaging needs there.
TOP_FILES = {"__init__.py", "__main__.py", "cli.py", "micropay.py", "requirements.txt", "py.typed"}

# The ports' own modules, which services may load (the adapters are the rest of their room).
LIGHTNING_PORTS = ("lightning.base", "lightning.bolt11codec", "lightning.outcome")
STORE_PORTS = ("store.base", "store.schema", "store.core", "store.l402", "store.cursors", "store.issued",
               "store.stream_usage", "store.sessions", "store.fleet")
ADAPTERS = {"lightning.cln", "lightning.sandbox", "lightning.datastore", "lightning.memrecords", "lightning.fleet",
            "store.sqlite", "store.postgres", "games.http.poster"}

# What each room may import at module level, besides itself (a module named, or anything
# under a folder named). The composition roots (sidecar.app, sidecar.embed,
# plugin.runtime, games.service, cli) may also reach further lazily, inside functions.
MAY_LOAD = {
    "core": (),
    "l402": ("core",),
    "payment": ("core", *LIGHTNING_PORTS, *STORE_PORTS, "seller.pricing"),
    "streams": ("core", *LIGHTNING_PORTS, "creators.lnurl"),     # the Lightning Address rule (pure)
    "lightning": ("core", "lightning", "store.fleet"),      # the fleet adapter reads the store
    "store": ("core",),
    "nostr": ("core",),
    "nwc": ("core", "nostr", *LIGHTNING_PORTS, "lightning.outcome", *STORE_PORTS, "seller.settlement"),
    "http": ("core", "l402.wire"),
    "seller": ("core", "l402", "payment.scheme", *LIGHTNING_PORTS, *STORE_PORTS, "games.config", "creators.config",
               "creators.lnurl"),
    "client": ("core", "l402", "payment.scheme", *LIGHTNING_PORTS, "nostr", "nwc.client", "nwc.uri", "nwc.protocol"),
    "games": ("core", "http", *LIGHTNING_PORTS, "store", "seller.config", "seller.configfile",
              "seller.pricing", "seller.settlement", "seller.tomlpos"),
    "plugin": ("core", "l402", "payment.scheme", "streams", "lightning", "store", "client", "nostr.urls", "nostr.keys"),
    "sidecar": ("core", "l402", "payment", "streams.attribution", "seller", "lightning", "store", "http"),
    "creators": ("core", "nostr", "http", *LIGHTNING_PORTS, *STORE_PORTS, "seller.settlement", "seller.config",
                 "seller.pricing", "games"),
}
CORE_THIRD_PARTY_BANNED = {"aiohttp", "pyln", "psycopg", "asyncpg"}
# Pure: rules and formats, with no I/O framework, no adapter, no port, no feature. Whole
# rooms, and the pure modules of other rooms.
PURE_ROOMS = ("core", "l402")
PURE_MODULES = {"payment.scheme", "streams.schedule", "streams.tlv", "seller.pricing", "seller.tomlpos",
                "seller.discovery", "nostr.keys", "nostr.event", "nostr.nip44", "nostr.nip04", "nostr.urls", "nwc.uri",
                "nwc.protocol", "creators.lnurl", "creators.zaps"}
# Services: they take ports (Node, RecordStore, Store, Poster) and never load an adapter.
SERVICES = {"seller.challenger", "seller.settlement", "plugin.invoices", "plugin.agent", "streams.runner",
            "streams.attribution", "payment.sessions", "games.purchases", "games.payouts", "games.webhooks",
            "games.events", "games.service", "games.apikeys", "nwc.service", "creators.service", "creators.shares",
            "creators.zap_outbox", "creators.feature"}
# Where aiohttp may be imported: the HTTP edges and the clients.
AIOHTTP_HOMES = ("sidecar", "games.http", "http", "client", "cli", "nostr.relay", "creators.lnurl_client",
                 "creators.zap_publish", "creators.http")
PYLN_HOMES = {"plugin.glue"}
# The top-level modules of release 0.2 that moved into rooms (their old paths still import).
OLD_PATHS = frozenset(importlib.import_module("micropay").MOVED)


def _under(name: str, homes) -> bool:
    return any(name == h or name.startswith(h + ".") for h in homes)


def _room(name: str) -> str:
    return name.split(".")[0]


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING" or (
        isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _scan(name: str, path: Path, modules) -> tuple[set[str], set[str], set[str]]:
    """(module-level micropay imports, micropay imports inside functions, third-party
    top-level packages imported anywhere). Imports under TYPE_CHECKING are annotations
    only and are left out."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    eager: set[str] = set()
    lazy: set[str] = set()
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
                if local in modules or (local.split(".")[0] in OLD_PATHS and local.split(".")[0] not in modules):
                    bucket.add(local)       # an old path is kept so that a rule can refuse it
            elif full:
                third.add(full.split(".")[0])

    def walk(body, top: bool) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                record(node, eager if top else lazy)
            elif isinstance(node, ast.If) and _is_type_checking(node):
                continue
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
    return eager, lazy, third


@dataclass
class Graph:
    """micropay's imports: module -> (eager, lazy, third-party)."""
    eager: dict[str, set[str]]
    lazy: dict[str, set[str]]
    third: dict[str, set[str]]
    _loads: dict[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def of_source(cls) -> "Graph":
        paths = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
        eager, lazy, third = {}, {}, {}
        for name, path in paths.items():
            eager[name], lazy[name], third[name] = _scan(name, path, paths)
        return cls(eager, lazy, third)

    @property
    def modules(self) -> set[str]:
        return set(self.eager)

    def loads(self, name: str) -> frozenset[str]:
        if name not in self._loads:
            seen: set[str] = set()
            todo = [name]
            while todo:
                current = todo.pop()
                parents = {current.rsplit(".", i)[0] for i in range(1, current.count(".") + 1)}
                for dep in self.eager.get(current, set()) | {p for p in parents if p in self.eager}:
                    if dep not in seen:
                        seen.add(dep)
                        todo.append(dep)
            seen.discard(name)
            self._loads[name] = frozenset(seen)
        return self._loads[name]

    def third_party_loaded(self, name: str) -> set[str]:
        out = set(self.third[name])
        for dep in self.loads(name):
            out |= self.third[dep]
        return out

    def planted(self, module: str, dep: str, *, lazy: bool = False, third: bool = False) -> "Graph":
        """This graph with one more import: `module` imports `dep`."""
        eager = {k: set(v) for k, v in self.eager.items()}
        lazies = {k: set(v) for k, v in self.lazy.items()}
        thirds = {k: set(v) for k, v in self.third.items()}
        (thirds if third else lazies if lazy else eager)[module].add(dep)
        return Graph(eager, lazies, thirds)


# --- the rules: each returns its violations ---------------------------------------------

def rule_rooms_import_only_what_they_may(g: Graph) -> list[str]:
    """Each room's module-level imports name only its own room and what MAY_LOAD allows it
    (what those load in turn is checked where they live)."""
    out = []
    for name in sorted(g.modules):
        room = _room(name)
        if room not in MAY_LOAD:
            continue
        allowed = (room, *MAY_LOAD[room])
        for dep in sorted(g.eager[name]):
            if dep == "" or _under(dep, allowed) or any(_under(a, (dep,)) for a in allowed):
                continue
            out.append(f"{name} imports {dep}, which room {room!r} may not use")
    return out


def _pure(name: str) -> bool:
    # A room's package __init__ is not checked itself, but what it loads is, from each pure
    # module that loads it (importing streams.schedule runs streams/__init__.py).
    return _room(name) in PURE_ROOMS or name in PURE_MODULES or name in ROOMS


def rule_core_is_pure(g: Graph) -> list[str]:
    """The pure modules (the core room, the L402 room, and the formats and rules in other
    rooms) load, through everything they import in turn, only pure modules, and no I/O
    framework or database driver."""
    out = []
    for name in sorted(m for m in g.modules if _pure(m) and (m not in ROOMS or m in PURE_ROOMS)):
        stray = {m for m in g.loads(name) if not _pure(m) and m != ""}
        if stray:
            out.append(f"{name} loads {sorted(stray)}")
        banned = g.third_party_loaded(name) & CORE_THIRD_PARTY_BANNED
        if banned:
            out.append(f"{name} loads {sorted(banned)}")
    return out


def rule_services_never_load_an_adapter(g: Graph) -> list[str]:
    out = []
    for name in sorted(SERVICES):
        reached = g.loads(name)
        if reached & ADAPTERS:
            out.append(f"{name} loads adapters {sorted(reached & ADAPTERS)}")
        if "aiohttp" in g.third_party_loaded(name):
            out.append(f"{name} loads aiohttp")
        edges = {m for m in reached if _under(m, ("sidecar", "games.http", "http"))}
        if edges:
            out.append(f"{name} loads HTTP edges {sorted(edges)}")
    return out


def rule_aiohttp_only_at_the_http_edges(g: Graph) -> list[str]:
    users = {name for name in g.modules if "aiohttp" in g.third[name]}
    if not users:
        return ["the check found no aiohttp import at all: the scanner is broken"]
    return [f"{name} imports aiohttp outside the HTTP edges" for name in sorted(users)
            if not _under(name, AIOHTTP_HOMES)]


def rule_pyln_only_in_the_plugin_glue(g: Graph) -> list[str]:
    users = {name for name in g.modules if "pyln" in g.third[name]}
    return [f"{name} imports pyln" for name in sorted(users - PYLN_HOMES)] + (
        [] if users else ["no module imports pyln: the scanner is broken"])


def rule_features_do_not_reach_into_each_other(g: Graph) -> list[str]:
    """games never imports the sidecar; the store, the node adapters, the HTTP helpers,
    the dialects and the selling services never import games, eagerly or lazily, except
    that the config file (seller.config, seller.configfile, seller.config_check) reads
    the [games] tables with games.config."""
    out = []
    for name in sorted(g.modules):
        deps = g.eager[name] | g.lazy[name]
        if _room(name) == "games" and any(_under(d, ("sidecar", "plugin", "client")) for d in deps):
            out.append(f"{name} imports another feature's edge")
        if _room(name) in ("store", "lightning", "http", "l402", "payment", "streams", "seller", "core"):
            games = {d for d in deps if _under(d, ("games",))}
            if name in ("seller.config", "seller.configfile", "seller.config_check"):
                games -= {"games.config"}
            if games:
                out.append(f"{name} imports the games feature: {sorted(games)}")
    return out


def rule_no_module_imports_an_old_path(g: Graph) -> list[str]:
    """Inside the package, imports name modules where they live: an old path (kept for
    users, see micropay.MOVED) would hide the real dependency from every rule above."""
    return [f"{name} imports the old path micropay.{dep}" for name in sorted(g.modules)
            for dep in sorted(g.eager[name] | g.lazy[name]) if dep not in g.modules]


def rule_the_sidecar_loads_games_only_when_configured(g: Graph) -> list[str]:
    return [f"sidecar.app loads {m}" for m in sorted(g.loads("sidecar.app")) if _room(m) == "games"]


def rule_no_import_cycles(g: Graph) -> list[str]:
    """Module-level imports form no cycle (lazy imports inside functions are how the
    composition roots wire optional features in; they are not dependencies)."""
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(g.eager[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for name in sorted(g.modules):
        if name not in state:
            visit(name)
    return [" -> ".join(c) for c in cycles]


# rule -> (module, import, kind) planted to prove the rule sees a violation
PLANTS = {
    rule_rooms_import_only_what_they_may: [
        ("l402.tokens", "seller.pricing", "eager"),           # a dialect leaning on the seller
        ("streams.schedule", "payment.scheme", "eager"),
        ("store.sessions", "payment.sessions", "eager"),
        ("client.payer", "sidecar.gate", "eager"),
        ("lightning.base", "store.base", "eager"),
        ("http.problems", "seller.pricing", "eager"),
        ("seller.challenger", "sidecar.app", "eager"),
        ("payment.sessions", "client.payer", "eager"),
        ("games.purchases", "payment.sessions", "eager"),
        ("plugin.runtime", "sidecar.app", "eager"),
        ("sidecar.gate", "plugin.glue", "eager"),
    ],
    rule_core_is_pure: [("core.errors", "lightning.base", "eager"), ("core.inputs", "aiohttp", "third"),
                        ("l402.tokens", "psycopg", "third"),
                        ("seller.pricing", "store.base", "eager"), ("payment.scheme", "store.sessions", "eager"),
                        ("streams.schedule", "lightning.base", "eager"), ("streams.tlv", "aiohttp", "third"),
                        ("seller.discovery", "lightning.outcome", "eager"),
                        ("seller.tomlpos", "seller.config", "eager")],
    rule_services_never_load_an_adapter: [("seller.challenger", "lightning.cln", "eager"),
                                          ("payment.sessions", "store.sqlite", "eager"),
                                          ("games.webhooks", "aiohttp", "third")],
    rule_aiohttp_only_at_the_http_edges: [("seller.pricing", "aiohttp", "third")],
    rule_pyln_only_in_the_plugin_glue: [("plugin.runtime", "pyln", "third")],
    rule_features_do_not_reach_into_each_other: [("games.service", "sidecar.app", "lazy"),
                                                 ("store.sessions", "games.repository", "lazy"),
                                                 ("seller.challenger", "games.config", "lazy")],
    rule_the_sidecar_loads_games_only_when_configured: [("sidecar.gate", "games.service", "eager"),
                                                        ("sidecar.proxy", "games.http.api", "eager")],
    rule_no_import_cycles: [("core.errors", "core.inputs", "eager")],
    rule_no_module_imports_an_old_path: [("sidecar.gate", "tokens", "old"), ("games.payouts", "sessions", "old-lazy"),
                                         ("plugin.runtime", "cln_plugin", "old")],
}
RULES = list(PLANTS)

GRAPH = Graph.of_source()


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
def test_rule_holds(rule):
    assert rule(GRAPH) == []


@pytest.mark.parametrize("rule, module, dep, kind",
                         [(rule, *plant) for rule, plants in PLANTS.items() for plant in plants],
                         ids=lambda v: getattr(v, "__name__", v))
def test_rule_fails_on_a_planted_import(rule, module, dep, kind):
    assert module in GRAPH.modules and (kind in ("third", "old", "old-lazy") or dep in GRAPH.modules), (module, dep)
    assert not kind.startswith("old") or dep in OLD_PATHS
    assert dep not in (GRAPH.eager[module] | GRAPH.lazy[module] | GRAPH.third[module])
    broken = GRAPH.planted(module, dep, lazy=kind.endswith("lazy"), third=kind == "third")
    assert rule(broken), f"{rule.__name__} did not notice {module} importing {dep}"


def test_purity_is_checked_through_what_a_module_loads():
    """A pure module that imports only pure modules still fails when one of those loads
    something impure: the check follows imports, not just the module's own lines."""
    assert "core.canonical" in GRAPH.loads("seller.pricing")
    broken = GRAPH.planted("core.canonical", "store.base")
    assert any(v.startswith("seller.pricing loads") for v in rule_core_is_pure(broken))


def test_the_rules_name_modules_that_exist():
    named = SERVICES | ADAPTERS | set(LIGHTNING_PORTS) | set(STORE_PORTS) | PYLN_HOMES
    for room, allowed in MAY_LOAD.items():
        named |= {a for a in allowed if "." in a}
    missing = {n for n in named if n not in GRAPH.modules}
    assert not missing, f"named in a rule but missing from plugin/micropay: {sorted(missing)}"


def test_the_top_level_is_rooms_and_entry_points():
    """plugin/micropay holds the rooms and, loose, only the entry points and packaging
    files: a new module goes into a room."""
    entries = {p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(ROOMS), f"rooms on disk {sorted(folders)} differ from ROOMS {sorted(ROOMS)}"
    assert entries - folders == TOP_FILES, sorted(entries - folders)
    assert set(MAY_LOAD) == set(ROOMS)


def test_the_docs_table_matches_the_tree():
    """docs/architecture.md's table names every room with its job, and no other."""
    text = (PACKAGE.parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| `") else []
        if len(cells) >= 2 and cells[0].startswith("`") and cells[0].endswith("/`"):
            rows[cells[0].strip("`/")] = cells[1]
    assert set(rows) == set(ROOMS), sorted(set(rows) ^ set(ROOMS))


def test_old_import_paths_still_work():
    """Each module moved out of the top level is found under its old path as the very
    same module object (docs/changelog.md lists them)."""
    import micropay
    for old, new in micropay.MOVED.items():
        assert importlib.import_module(f"micropay.{old}") is importlib.import_module(f"micropay.{new}"), old
    from micropay.client import L402Client
    from micropay.l402 import parse_challenges
    from micropay.streams import Stream
    assert L402Client.__module__ == "micropay.client.payer"
    assert parse_challenges.__module__ == "micropay.l402.wire" and Stream.__module__ == "micropay.streams.schedule"


def test_old_paths_run_with_python_m_and_survive_a_reload(tmp_path):
    """`python -m micropay.cln_plugin` still starts the plugin's entry point (outside
    lightningd it explains itself and exits), and reloading the package keeps exactly one
    finder, first on sys.meta_path."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "micropay.cln_plugin"], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0 and "lightningd" in out.stdout + out.stderr, (out.stdout, out.stderr)
    probe = ("import importlib, sys, micropay\n"
             "importlib.reload(micropay); importlib.reload(micropay)\n"
             "marks = [getattr(f, 'micropay_moved', False) for f in sys.meta_path]\n"
             "assert marks.count(True) == 1 and marks[0], marks\n"
             "import micropay.tokens, micropay.l402.tokens\n"
             "assert micropay.tokens is micropay.l402.tokens\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr


# The public names of the three modules that became packages, as release 0.2 had them.
PUBLIC_IN_0_2 = {
    "client": "BUDGET_HINT DAY_S MAX_CHALLENGE_BODY DEFAULT_MAX_BODY DEAD_KEPT_S Budget PaidInvoice Wallet "
              "PaymentNeverLeft NodeWallet SandboxHttpWallet CachedToken Spend ClientState TokenCache Result "
              "L402Client challenge_invoice BudgetExceeded",
    "streams": "MIN_PIECE_MSAT MAX_CONSECUTIVE_FAILURES MAX_BACKOFF_S MAX_RECIPIENTS STATES TLV_PODCAST Recipient "
               "InFlight Stream parse_recipients",
    "l402": "SCHEMES MAX_AUTHORIZATION_LEN PROBLEM_CONTENT_TYPE Credential parse_authorization format_authorization "
            "challenge_headers Challenge parse_challenges problem_body payment_required_body",
}


@pytest.mark.parametrize("package", sorted(PUBLIC_IN_0_2))
def test_packages_offer_every_name_their_module_did(package):
    module = importlib.import_module(f"micropay.{package}")
    names = PUBLIC_IN_0_2[package].split()
    assert [n for n in names if not hasattr(module, n)] == []
    assert set(names) <= set(module.__all__)


def test_the_scanner_sees_an_import_it_should():
    """Guard the guard: known edges must be found, or every rule above passes vacuously."""
    assert "store.l402" in GRAPH.eager["seller.challenger"]
    assert "lightning.base" in GRAPH.loads("streams.runner")
    assert "games.service" in GRAPH.lazy["sidecar.app"]          # wired in lazily
    assert "games.service" not in GRAPH.loads("sidecar.app")
