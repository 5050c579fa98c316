"""Wiring the purchases API into the sidecar: services, secrets, background tasks."""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Callable

from ..config import Config
from ..lightning.base import Node
from ..receipts import ReceiptSigner
from ..secretfile import read_secret, write_secret
from ..store import Store
from .api import Games
from .apikeys import ApiKeyVerifier
from .payouts import Payouts
from .purchases import EventHub, Purchases
from .webhooks import WebhookDeliverer

log = logging.getLogger("micropay.games")
EXPIRE_EVERY_S = 5.0


def make_games(config: Config, store: Store, node: Node, signer: ReceiptSigner,
               clock: Callable[[], float]) -> Games:
    key_path = config.data_dir / "client_token_key"
    if not key_path.exists():
        write_secret(key_path, os.urandom(32).hex().encode() + b"\n")
    token_key = bytes.fromhex(read_secret(key_path).decode().strip())
    hub = EventHub()
    gcfg = config.games
    purchases = Purchases(gcfg, store, node, signer, config.service, token_key, hub, clock)
    payouts = Payouts(gcfg.payouts, store, node, endpoints_for=gcfg.endpoints_for, hub=hub, clock=clock)
    deliverer = WebhookDeliverer(gcfg, store, config.data_dir, clock, hub) if gcfg.webhooks else None
    if deliverer is not None:
        deliverer.check_secrets()
    return Games(gcfg, purchases, payouts, ApiKeyVerifier(store), deliverer)


async def expire_loop(games: Games, every_s: float = EXPIRE_EVERY_S) -> None:
    while True:
        try:
            n = await games.purchases.expire_due()
            if n:
                log.info("%d purchases expired unpaid", n)
        except Exception as exc:
            log.warning("expiring purchases failed: %s", exc)
        await asyncio.sleep(every_s)


async def watch_foreign_events(games: Games, every_s: float = 1.0) -> None:
    """Wake this process's listeners when another process sharing the store writes events."""
    from ..store.games import GSQL
    last = None
    while True:
        try:
            (top,), = await games.purchases.store.query(GSQL["last_event_id"])
            if last is not None and int(top) > last:
                games.purchases.hub.notify()
            last = int(top)
        except Exception as exc:
            log.debug("event watch: %s", exc)
        await asyncio.sleep(every_s)


async def _deliver(games: Games) -> None:
    try:
        await games.deliverer.run()   # type: ignore[union-attr]
    finally:
        await games.deliverer.close()  # type: ignore[union-attr]


async def _resume_payouts(games: Games) -> None:
    try:
        n = await games.payouts.resume_sending()
        if n:
            log.info("resumed %d payouts left in flight", n)
    except Exception as exc:
        log.warning("resuming payouts failed: %s", exc)


def background(games: Games) -> list[asyncio.Task]:
    tasks = [asyncio.create_task(expire_loop(games), name="micropay-expire-purchases"),
             asyncio.create_task(_resume_payouts(games), name="micropay-resume-payouts"),
             asyncio.create_task(watch_foreign_events(games), name="micropay-event-watch")]
    if games.deliverer is not None:
        tasks.append(asyncio.create_task(_deliver(games), name="micropay-webhooks"))
    return tasks
