"""Lightning Addresses as one object for the sidecar: the service, the share forwarder,
the zap receipt outbox, wired from the config, and their background tasks. Nothing
here knows HTTP."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, NoReturn

from ..core.tasks import every
from ..games.events import EventHub
from ..lightning.base import Node
from ..seller.settlement import SettlementRouter
from ..store import Store
from .config import CreatorsConfig
from .service import LABEL_PREFIX, Creators, Limits
from .shares import AddressInvoices, ShareForwarder
from .zap_outbox import Publish, ZapOutbox

log = logging.getLogger("micropay.creators")


@dataclass
class CreatorsFeature:
    service: Creators
    forwarder: ShareForwarder
    outbox: ZapOutbox
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def close(self) -> None:
        for close in self.closers:
            try:
                await close()
            except Exception as exc:
                log.warning("closing the creators feature: %s", exc)

    def register_settlements(self, router: SettlementRouter) -> None:
        """Tips are paid through invoices labelled micropay-tip-<id>."""
        router.register(LABEL_PREFIX, self.service.on_settlement)

    def background(self) -> list[asyncio.Task]:
        return [asyncio.create_task(self.forwarder.run(), name="micropay-tip-shares"),
                asyncio.create_task(self.outbox.run(), name="micropay-zap-receipts"),
                asyncio.create_task(_expire(self.service), name="micropay-expire-tips")]


def make_creators(cfg: CreatorsConfig, store: Store, node: Node, hub: EventHub, *, publish: Publish,
                  address_invoices: AddressInvoices | None, endpoints_for: Callable[[str], list[str]],
                  limits: Limits, clock: Callable[[], float] = time.time) -> CreatorsFeature:
    forwarder = ShareForwarder(store, node, address_invoices=address_invoices, clock=clock)
    outbox = ZapOutbox(store, publish, allow_private=cfg.private_relays, clock=clock)
    service = Creators(cfg, store, node, hub, endpoints_for=endpoints_for, limits=limits, clock=clock,
                       on_shares=forwarder.wake, on_zaps=outbox.wake)
    return CreatorsFeature(service, forwarder, outbox)


async def _expire(service: Creators) -> NoReturn:
    async def step() -> None:
        n = await service.expire_due()
        if n:
            log.info("%d tip invoices expired unpaid", n)
    await every(30.0, step, what="expiring tip invoices", log=log)
