"""The paying client's persisted state: cached tokens, the spending ledger the budgets
count, invoices found dead at the node, and Payment sessions left open. One JSON file
(mode 0600), locked while it is updated, so several runs and processes share it."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core.canonical import query_digest
from ..core.errors import BadRequest, ConfigError
from ..core.inputs import load_json
from ..core.patterns import method_allowed, path_matches
from ..core.secretfile import private_dir, read_secret, write_secret


@dataclass
class CachedToken:
    origin: str
    macaroon: str
    preimage: str
    payment_hash: str
    paths: list[str]
    methods: list[str] | None
    valid_until: int | None
    credits: int | None
    usable: bool = True
    queries: list[str] | None = None     # query= caveats: bought for exactly these query strings

    def covers(self, origin: str, method: str, path: str, now: float, query: str = "") -> bool:
        return (self.usable and self.origin == origin
                and (self.queries is None or query_digest(query) in self.queries)
                and method_allowed(frozenset(self.methods) if self.methods is not None else None, method)
                and all(path_matches(p, path) for p in self.paths)
                and (self.valid_until is None or now < self.valid_until))


@dataclass
class Spend:
    payment_hash: str
    host: str
    amount_msat: int
    fee_msat: int
    ts: int
    status: str        # "paying" (intent recorded before paying) or "paid"
    origin: str = ""
    bolt11: str = ""   # kept while "paying", so a run that died mid-payment can finish it
    macaroon: str = ""
    challenge: dict[str, str] | None = None   # a Payment (MPP) charge: its echo, kept while "paying"
    resource: str = ""                        # "METHOD /path" a Payment charge was asked for
    orphan_since: int | None = None           # first seen pending at the node with no HTLC behind it


@dataclass
class ClientState:
    tokens: list[CachedToken] = field(default_factory=list)
    spends: dict[str, Spend] = field(default_factory=dict)
    dead: dict[str, int] = field(default_factory=dict)   # payment hash -> when found dead at the node
    # Payment sessions whose deposit is paid and that are not known closed (session id ->
    # what closing them needs: client/sessions.py's OpenSession's fields), so a run that died
    # mid-session closes them at its next start and the refund comes back at once.
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)


class TokenCache:
    """JSON file (0600) with tokens and the spending ledger, locked while updated."""

    def __init__(self, path: Path | None) -> None:
        if path is not None and path.is_dir():
            raise ConfigError(f"the token cache must be a file, and {path} is a directory "
                              f"(for example {path / 'client.json'})")
        self.path = path
        self.state = ClientState()
        self.load()

    def forget_spends(self) -> int:
        """Start the budgets over: drop the record of completed payments (tokens stay; a
        payment still being made stays, so it is finished and counted). Returns how many."""
        with self.locked() as state:
            done = [h for h, s in state.spends.items() if s.status == "paid"]
            for h in done:
                del state.spends[h]
        return len(done)

    def load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            doc = load_json(read_secret(self.path) or b"{}", f"{self.path}")
            self.state = ClientState(
                tokens=[CachedToken(**t) for t in doc.get("tokens", [])],
                spends={k: Spend(**v) for k, v in doc.get("spends", {}).items()},
                dead={k: int(v) for k, v in doc.get("dead", {}).items()},
                sessions={k: dict(v) for k, v in doc.get("sessions", {}).items()})
        except (BadRequest, TypeError, AttributeError, ValueError):
            raise ConfigError(f"{self.path}: the token cache is corrupt; move it aside to start a new one "
                              "(it holds the spending ledger the budgets count)") from None

    def save(self) -> None:
        if self.path is None:
            return
        doc = {"tokens": [asdict(t) for t in self.state.tokens if t.usable],
               "spends": {k: asdict(v) for k, v in self.state.spends.items()},
               "dead": self.state.dead, "sessions": self.state.sessions}
        write_secret(self.path, json.dumps(doc, indent=1).encode())

    @contextlib.contextmanager
    def locked(self):
        """Reload, let the caller change state, save: one process at a time."""
        if self.path is None:
            yield self.state
            return
        private_dir(self.path.parent)
        with os.fdopen(os.open(self.path.with_suffix(".lock"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600),
                       "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.load()
                yield self.state
                self.save()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def spent(self, host: str | None, since: float) -> int:
        return sum(s.amount_msat + s.fee_msat for s in self.state.spends.values()
                   if (host is None or s.host == host) and s.ts >= since)
