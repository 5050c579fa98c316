"""Configuration of the purchases API: catalog, purchase expiry, webhooks, payouts.

    [purchases]
    expiry_s = 900

    [[catalog]]
    sku = "gems-100"
    title = "100 gems"
    price_msat = 50_000
    max_per_player = 3           # optional: paid + pending purchases per player
    content = "<p>...</p>"       # optional: what the browser paywall unlocks

    [[webhooks]]
    name = "game-server"
    url = "http://127.0.0.1:9000/micropay"
    secret_file = "webhook-game-server.secret"   # relative to data_dir; created 0600
    events = ["purchase.paid"]                  # default: every event

    [webhook_retry]
    first_s = 1
    max_s = 600
    give_up_after_s = 259200

    [payouts]
    per_player_day_msat = 1_000_000
    per_day_msat = 50_000_000
    max_fee_msat = 5_000

    [events]
    max_streams = 2000                 # concurrent SSE/WebSocket streams, all callers
    max_streams_per_credential = 10    # per API key, or per purchase's client token
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..core.inputs import is_http_url
from ..seller.pricing import _Table
from ..core.tasks import backoff_delay

# What an API key may be allowed (apikeys.py checks them; the CLI offers them as choices).
API_KEY_SCOPES = ("purchases:write", "purchases:read", "events:read", "payouts:write", "tips:read")
DEFAULT_API_KEY_SCOPES = ("purchases:write", "purchases:read", "events:read")

SKU = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ENDPOINT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
EVENT_TYPES = ("purchase.paid", "purchase.expired", "payout.paid", "payout.failed", "tip.received")


@dataclass(frozen=True)
class CatalogItem:
    sku: str
    title: str
    price_msat: int
    max_per_player: int | None = None
    description: str = ""
    content: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"sku": self.sku, "title": self.title, "price_msat": self.price_msat,
                "max_per_player": self.max_per_player, "description": self.description,
                "unlockable": self.content is not None}


@dataclass(frozen=True)
class WebhookEndpoint:
    name: str
    url: str
    secret_file: Path
    events: frozenset[str] = frozenset(EVENT_TYPES)
    timeout_s: float = 10.0

    def secret_path(self, data_dir: Path) -> Path:
        return self.secret_file if self.secret_file.is_absolute() else data_dir / self.secret_file


WEBHOOK_JITTER = 0.1


@dataclass(frozen=True)
class RetryPolicy:
    first_s: int = 1
    max_s: int = 600
    give_up_after_s: int = 3 * 86400

    def delay(self, attempts: int) -> int:
        """Seconds to wait after the `attempts`-th failed attempt (1-based): doubling, capped,
        and up to a tenth shorter at random, so that retries after a receiver's outage
        spread out instead of arriving together."""
        return max(1, round(backoff_delay(attempts, self.first_s, self.max_s, jitter=WEBHOOK_JITTER)))


@dataclass(frozen=True)
class PayoutCaps:
    per_player_day_msat: int
    per_day_msat: int
    max_fee_msat: int = 5_000


@dataclass(frozen=True)
class GamesConfig:
    catalog: tuple[CatalogItem, ...] = ()
    expiry_s: int = 900
    webhooks: tuple[WebhookEndpoint, ...] = ()
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    payouts: PayoutCaps | None = None
    max_streams: int = 2000
    max_streams_per_credential: int = 10
    frame_ancestors: tuple[str, ...] = ()     # origins that may put the paywall in an <iframe>
    bitcoin_connect_file: str | None = None   # a browser bundle of @getalby/bitcoin-connect the paywall serves
    tips: bool = False                        # Lightning Addresses are served: their events share this hub

    @property
    def enabled(self) -> bool:
        return bool(self.catalog) or self.payouts is not None or self.tips

    def item(self, sku: str) -> CatalogItem | None:
        for it in self.catalog:
            if it.sku == sku:
                return it
        return None

    def endpoints_for(self, event_type: str) -> list[str]:
        return [w.name for w in self.webhooks if event_type in w.events]


GAMES_KEYS = {"catalog", "purchases", "webhooks", "webhook_retry", "payouts", "events", "paywall"}
_ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?")


def parse_games(top: _Table, source: str, index_offset: dict[str, int] | None = None) -> GamesConfig:
    """`index_offset`: where the entries given start in the file's lists (to name them right
    when entries are checked one at a time)."""
    offset = index_offset or {}
    items = []
    seen: set[str] = set()
    for i, raw in enumerate(top.get("catalog", list, []), offset.get("catalog", 0)):
        where = f"{source}: catalog[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a table")
        t = _Table(raw, where)
        t.check_keys({"sku", "title", "price_msat", "max_per_player", "description", "content"})
        sku = t.get("sku", str)
        if sku is None or not SKU.fullmatch(sku):
            raise t.fail("sku", "is required: 1-64 of A-Z a-z 0-9 . _ - (starting with a letter or digit)")
        if sku in seen:
            raise t.fail("sku", f"duplicate sku {sku!r}")
        seen.add(sku)
        price = t.positive_int("price_msat")
        if price is None:
            raise t.fail("price_msat", "is required")
        items.append(CatalogItem(sku, t.get("title", str, sku), price,
                                 t.positive_int("max_per_player", maximum=1_000_000),
                                 t.get("description", str, ""), t.get("content", str)))

    p = _Table(top.get("purchases", dict, {}), f"{source}: purchases")
    p.check_keys({"expiry_s"})
    expiry = p.positive_int("expiry_s", 900, maximum=7 * 86400) or 900

    hooks, names = [], set()
    for i, raw in enumerate(top.get("webhooks", list, []), offset.get("webhooks", 0)):
        where = f"{source}: webhooks[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a table")
        t = _Table(raw, where)
        t.check_keys({"name", "url", "secret_file", "events", "timeout_s"})
        name = t.get("name", str)
        if name is None or not ENDPOINT_NAME.fullmatch(name):
            raise t.fail("name", "is required: 1-64 of A-Z a-z 0-9 _ -")
        if name in names:
            raise t.fail("name", f"duplicate webhook name {name!r}")
        names.add(name)
        url = t.get("url", str)
        if url is None or not is_http_url(url):
            raise t.fail("url", "is required: an http:// or https:// URL with a host")
        events = t.get("events", list, list(EVENT_TYPES))
        bad = [e for e in events if e not in EVENT_TYPES]
        if bad or not events:
            raise t.fail("events", f"must be a non-empty list of {', '.join(EVENT_TYPES)}")
        secret = Path(t.get("secret_file", str, f"webhook-{name}.secret")).expanduser()
        timeout = t.positive_int("timeout_s", 10, maximum=120) or 10
        hooks.append(WebhookEndpoint(name, url, secret,
                                     frozenset(events), float(timeout)))

    r = _Table(top.get("webhook_retry", dict, {}), f"{source}: webhook_retry")
    r.check_keys({"first_s", "max_s", "give_up_after_s"})
    d = RetryPolicy()
    retry = RetryPolicy(r.positive_int("first_s", d.first_s, maximum=3600) or d.first_s,
                        r.positive_int("max_s", d.max_s, maximum=86400) or d.max_s,
                        r.positive_int("give_up_after_s", d.give_up_after_s, maximum=30 * 86400)
                        or d.give_up_after_s)
    if retry.max_s < retry.first_s:
        raise r.fail("max_s", "must be at least first_s")

    payouts = None
    if "payouts" in top.data:
        t = _Table(top.get("payouts", dict, {}), f"{source}: payouts")
        t.check_keys({"per_player_day_msat", "per_day_msat", "max_fee_msat"})
        per_player, per_day = t.positive_int("per_player_day_msat"), t.positive_int("per_day_msat")
        if per_player is None or per_day is None:
            raise t.fail("per_player_day_msat" if per_player is None else "per_day_msat",
                         "is required: payouts are capped per player and per day")
        payouts = PayoutCaps(per_player, per_day,
                             t.positive_int("max_fee_msat", 5_000, allow_zero=True) or 0)
    ev = _Table(top.get("events", dict, {}), f"{source}: events")
    ev.check_keys({"max_streams", "max_streams_per_credential"})
    max_streams = ev.positive_int("max_streams", 2000, maximum=1_000_000) or 2000
    per_credential = ev.positive_int("max_streams_per_credential", 10, maximum=1_000_000) or 10
    pw = _Table(top.get("paywall", dict, {}), f"{source}: paywall")
    pw.check_keys({"frame_ancestors", "bitcoin_connect_file"})
    ancestors = pw.get("frame_ancestors", list, [])
    if not all(isinstance(a, str) and (a == "'self'" or _ORIGIN.fullmatch(a)) for a in ancestors):
        raise pw.fail("frame_ancestors", "must be a list of origins like \"https://game.example\" or \"'self'\"")
    bc_file = pw.get("bitcoin_connect_file", str, None)
    if bc_file is not None:
        path = Path(bc_file).expanduser()
        if not path.is_absolute():
            path = Path(source).parent / path
        if not path.is_file():
            raise pw.fail("bitcoin_connect_file", f"{str(path)!r} is not a file (build it as docs/games.md shows)")
        bc_file = str(path.resolve())
    return GamesConfig(tuple(items), expiry, tuple(hooks), retry, payouts, max_streams, per_credential,
                       tuple(ancestors), bc_file)
