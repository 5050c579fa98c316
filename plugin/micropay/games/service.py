"""The purchases feature as one object: its services, wired from the config, and the
background tasks that keep it going. Nothing here knows HTTP."""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Callable, NoReturn

from ..seller.config import Config
from ..lightning.base import Node
from ..core.ratelimit import TokenBucket
from ..core.receipts import ReceiptSigner
from ..core.secretfile import read_secret, write_secret
from ..seller.settlement import SettlementRouter
from ..store import Store
from ..core.tasks import every
from .apikeys import ApiKeyVerifier
from .config import GamesConfig
from .events import EventFeed, EventHub, StreamSlots
from .payouts import Payouts
from .purchases import LABEL_PREFIX as PURCHASE_LABEL_PREFIX, Purchases
from .webhooks import Poster, WebhookDeliverer

log = logging.getLogger("micropay.games")
EXPIRE_EVERY_S = 5.0


class Games:
    """Everything the purchases API needs, held by the sidecar's runtime."""

    def __init__(self, cfg: GamesConfig, purchases: Purchases, payouts: Payouts, keys: ApiKeyVerifier,
                 deliverer: WebhookDeliverer | None = None) -> None:
        self.cfg, self.purchases, self.payouts, self.keys = cfg, purchases, payouts, keys
        self.deliverer = deliverer
        self.feed = EventFeed(purchases.events_after, purchases.last_event_id, purchases.hub)
        self.streams = StreamSlots(cfg.max_streams, cfg.max_streams_per_credential)
        self.paywall_limit: TokenBucket | None = None    # made on first use
        self.closing = False         # set at shutdown: event streams end
        self.openapi: dict[str, Any] | None = None   # built on first request; the config is fixed
        self.openapi_extra_paths: dict[str, Any] = {}   # the sidecar's priced routes (seller/discovery.py)

    def register_settlements(self, router: SettlementRouter) -> None:
        """Purchases are paid through invoices labelled micropay-purchase-<id>."""
        router.register(PURCHASE_LABEL_PREFIX, self.purchases.on_settlement)



def make_games(config: Config, store: Store, node: Node, signer: ReceiptSigner,
               clock: Callable[[], float], poster: Poster | None = None) -> Games:
    """`poster`: how webhooks are sent (needed when the config has webhooks)."""
    key_path = config.data_dir / "client_token_key"
    if not key_path.exists():
        write_secret(key_path, os.urandom(32).hex().encode() + b"\n")
    token_key = bytes.fromhex(read_secret(key_path).decode().strip())
    hub = EventHub()
    gcfg = config.games or GamesConfig()
    purchases = Purchases(gcfg, store, node, signer, config.service, token_key, hub, clock)
    payouts = Payouts(gcfg.payouts, store, node, endpoints_for=gcfg.endpoints_for, hub=hub, clock=clock)
    deliverer = None
    if gcfg.webhooks:
        if poster is None:
            raise ValueError("make_games: the config has webhooks, and no poster was given to send them")
        deliverer = WebhookDeliverer(gcfg, store, config.data_dir, poster, clock, hub)
    if deliverer is not None:
        deliverer.check_secrets()
    return Games(gcfg, purchases, payouts, ApiKeyVerifier(store), deliverer)


async def expire_loop(games: Games, every_s: float = EXPIRE_EVERY_S) -> NoReturn:
    async def expire() -> None:
        n = await games.purchases.expire_due()
        if n:
            log.info("%d purchases expired unpaid", n)
    await every(every_s, expire, what="expiring purchases", log=log)


async def watch_foreign_events(games: Games, every_s: float = 1.0) -> NoReturn:
    """Wake this process's listeners when another process sharing the store writes events."""
    last: list[int] = []

    async def look() -> None:
        top = await games.purchases.last_event_id()
        if last and top > last[0]:
            games.purchases.hub.notify()
        last[:] = [top]
    await every(every_s, look, what="watching for other processes' events", log=log)


async def _deliver(games: Games) -> None:
    try:
        await games.deliverer.run()   # type: ignore[union-attr]
    finally:
        await games.deliverer.close()  # type: ignore[union-attr]


def background(games: Games) -> list[asyncio.Task]:
    tasks = [asyncio.create_task(games.feed.run(), name="micropay-event-feed"),
             asyncio.create_task(expire_loop(games), name="micropay-expire-purchases"),
             asyncio.create_task(games.payouts.watch(), name="micropay-payouts"),
             asyncio.create_task(watch_foreign_events(games), name="micropay-event-watch")]
    if games.deliverer is not None:
        tasks.append(asyncio.create_task(_deliver(games), name="micropay-webhooks"))
    return tasks
