"""The NWC service at work: its relays, its subscription (renewed when connections
change), its info events (published on every connection to a relay), the resume loop
for payments left in flight, and the node's settlements (followed from a persisted
cursor by seller/settlement.py) for the invoices connections made. Composed by the
plugin's runtime."""
from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any, Awaitable, Callable

from ..core.secretfile import load_or_create_secret
from ..lightning.base import Node
from ..nostr.relay import RelayPool
from ..store.base import Store
from ..store.cursors import CursorRepository
from .repository import NwcRepository
from ..seller.settlement import SettlementRouter
from .service import LABEL_PREFIX, NwcService

SUB_ID = "micropay-nwc"


class NwcRunner:
    def __init__(self, node: Node, store: Store, secret_file: Path, relays: list[str], *,
                 node_info: Callable[[], Awaitable[dict[str, Any]]], node_started_at: float | None = None) -> None:
        self.node, self.store = node, store
        self.pool = RelayPool(relays, self._on_event, on_connect=self._on_connect)
        self.service = NwcService(node, NwcRepository(store), load_or_create_secret(secret_file, 32), self.pool.urls,
                                  publish=self.pool.publish, node_info=node_info, node_started_at=node_started_at)
        self._tasks: list[asyncio.Task[Any]] = []
        # the node's settlements, from a cursor of the NWC service's own: its invoices' labels
        self._settlements = SettlementRouter(node, CursorRepository(store), cursor=f"nwc:{node.cursor_namespace}")
        self._settlements.register(LABEL_PREFIX, self.service.settled)

    def _on_event(self, sub_id: str, ev: Any) -> None:
        self.service.on_event(sub_id, ev)

    async def _on_connect(self) -> None:
        await self.service.publish_info()

    async def start(self) -> None:
        await self.service.load()
        await self.service.repo.release_all()
        await self.pool.subscribe(SUB_ID, self.service.filters())
        if self.pool.urls:
            self.pool.start()
        self._tasks = [asyncio.create_task(self.service.watch(), name="micropay-nwc-resume"),
                       asyncio.create_task(self._settlements.run(), name="micropay-nwc-settlements")]

    async def changed(self) -> None:
        """After a connection was created or revoked: subscribe to the new set of keys."""
        await self.pool.subscribe(SUB_ID, self.service.filters())

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        await self.service.close()
        await self.pool.close()
