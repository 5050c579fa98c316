"""The plugin's options: names, defaults, types and ranges, and their validation. No I/O.

Every value is checked at start-up and on `setconfig`, before lightningd stores it: a
bad value is refused with a clear error (JSON-RPC -32602 on setconfig; the plugin
disables itself, saying why, at start-up). lightningd itself only checks that an int
option is a number at start-up; on setconfig it takes whatever the plugin accepts, and
a value it cannot print back ('abc') makes it exit.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any

from ..core.errors import BadRequest
from ..core.inputs import decimal
from ..core.params import MAX_MSAT

YEAR_S = 365 * 86400
_SERVICE = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class OptionSpec:
    name: str
    default: Any
    description: str
    kind: str = "int"            # int | string | listen | service | store | relays
    dynamic: bool = False
    minimum: int = 0
    maximum: int = MAX_MSAT
    unit: str = ""

    @property
    def opt_type(self) -> str:
        return "int" if self.kind == "int" else "string"

    def parse(self, raw: Any) -> Any:
        """The value lightningd (or an operator) gave, checked; BadRequest if it is not acceptable."""
        if self.kind == "int":
            value = raw if isinstance(raw, int) and not isinstance(raw, bool) else None
            if isinstance(raw, str):
                text = raw.strip()
                value = -decimal(text[1:], 30) if text.startswith("-") and decimal(text[1:], 30) is not None \
                    else decimal(text, 30)
            if value is None:
                raise BadRequest(f"{self.name}: {raw!r} is not a number")
            if not self.minimum <= value <= self.maximum:
                unit = f" {self.unit}" if self.unit else ""
                raise BadRequest(f"{self.name}: must be between {self.minimum} and {self.maximum}{unit}, got {value}")
            return value
        if not isinstance(raw, str):
            raise BadRequest(f"{self.name}: must be a string")
        if self.kind == "listen" and raw:
            host, sep, port = raw.rpartition(":")
            if not sep or not host or not 0 < (decimal(port, 5) or 0) < 65536:
                raise BadRequest(f"{self.name}: must be host:port, got {raw!r}")
        if self.kind == "store" and raw and not raw.startswith(("postgresql://", "postgres://", "sqlite:///")):
            raise BadRequest(f"{self.name}: must start with postgresql:// or sqlite:///")
        if self.kind == "relays" and raw:
            from ..nostr.keys import NostrError
            from ..nostr.urls import relay_url
            try:
                return ",".join(relay_url(u) for u in raw.split(",") if u.strip())
            except NostrError as exc:
                raise BadRequest(f"{self.name}: {exc}") from None
        if self.kind == "service" and not _SERVICE.fullmatch(raw):
            raise BadRequest(f"{self.name}: must be 1-64 of A-Z a-z 0-9 _ -, got {raw!r}")
        return raw


OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("micropay-data-dir", "", "Directory for micropay keys and database "
               "(default: <lightning-dir>/<network>/micropay)", "string"),
    OptionSpec("micropay-service", "micropay", "Service name in the L402 tokens this node issues", "service"),
    OptionSpec("micropay-invoice-expiry", 3600, "Default expiry of micropay-invoice invoices (seconds, 1 to "
               f"{YEAR_S})", dynamic=True, minimum=1, maximum=YEAR_S, unit="seconds"),
    OptionSpec("micropay-stream-max-total-msat", 0, "If set, no stream may have a max_total_msat (budget) "
               "above this (msat; 0: no node-wide cap)", dynamic=True, unit="msat"),
    OptionSpec("micropay-stream-min-interval", 1, "Smallest stream interval allowed (seconds, 1 to 86400)",
               dynamic=True, minimum=1, maximum=86400, unit="seconds"),
    OptionSpec("micropay-fetch-max-msat", 100_000, "micropay-fetch: default most paid for one request (msat)",
               dynamic=True, minimum=1, unit="msat"),
    OptionSpec("micropay-fetch-day-budget-msat", 1_000_000, "micropay-fetch: most paid per host per day (msat)",
               dynamic=True, minimum=1, unit="msat"),
    OptionSpec("micropay-payout-player-day-msat", 0, "micropay-payout: most paid to one player per UTC day "
               "(msat; 0 disables payouts)", dynamic=True, unit="msat"),
    OptionSpec("micropay-payout-day-msat", 0, "micropay-payout: most paid to all players per UTC day "
               "(msat; 0 disables payouts)", dynamic=True, unit="msat"),
    OptionSpec("micropay-payout-max-fee-msat", 5_000, "micropay-payout: routing fee limit per payout (msat)",
               dynamic=True, unit="msat"),
    OptionSpec("micropay-listen", "", "If set (host:port), run and supervise the L402 sidecar on this address",
               "listen"),
    OptionSpec("micropay-sidecar-config", "", "TOML config for the supervised sidecar (routes, upstream)",
               "string"),
    OptionSpec("micropay-fleet-store", "", "If set (postgresql://... or sqlite:///...), run the fleet agent: "
               "keep invoice pools of this node in that shared store, answer sidecars' asks, record "
               "settlements, and pay the store's payment queue within the micropay-fleet-pay-* caps", "store"),
    OptionSpec("micropay-fleet-pool-per-round", 200, "Fleet agent: most invoices created per second for the "
               "pools (1 to 10000)", dynamic=True, minimum=1, maximum=10_000),
    OptionSpec("micropay-fleet-pay-max-msat", 0, "Fleet agent: most one queued payment may deliver "
               "(msat; 0: the queue pays nothing)", dynamic=True, unit="msat"),
    OptionSpec("micropay-fleet-pay-subject-day-msat", 0, "Fleet agent: most paid to one subject (a player) "
               "per UTC day (msat)", dynamic=True, unit="msat"),
    OptionSpec("micropay-fleet-pay-day-msat", 0, "Fleet agent: most paid from the queue per UTC day (msat)",
               dynamic=True, unit="msat"),
    OptionSpec("micropay-fleet-pay-max-fee-msat", 5_000, "Fleet agent: routing fee limit per queued "
               "payment, refunds included (msat)", dynamic=True, unit="msat"),
)
OPTIONS += (
    OptionSpec("micropay-nwc-relay", "", "If set (ws:// or wss:// URLs, comma-separated), serve Nostr Wallet "
               "Connect for this node on these relays: apps and agents spend from it within the budgets of "
               "the connections micropay-nwc-create makes", "relays"),
)
SPECS = {s.name: s for s in OPTIONS}


class Settings:
    """The options' current, checked values. Dynamic ones change through `set`, which a
    setconfig reaches only with a value that `OptionSpec.parse` accepted."""

    def __init__(self, raw: dict[str, Any] | None = None) -> None:
        self._lock = threading.Lock()
        self._values = {s.name: s.parse(s.default) for s in OPTIONS}
        for name, value in (raw or {}).items():
            if name in SPECS and value is not None:
                self._values[name] = SPECS[name].parse(value)

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def set(self, name: str, raw: Any) -> Any:
        spec = SPECS.get(name)
        if spec is None or not spec.dynamic:
            raise BadRequest(f"{name} cannot be changed while the plugin runs")
        value = spec.parse(spec.default if raw is None else raw)
        with self._lock:
            self._values[name] = value
        return value
