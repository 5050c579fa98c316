"""Following the node's settlements and handing each to the feature that issued the
invoice, recognised by its label prefix (the gate's `micropay-`, the purchases API's
`micropay-purchase-`; the longest registered prefix wins). Features register
themselves; this module knows none of them.

The position is a cursor in the store, advanced after each settlement is handled, so a
restart resumes where it stopped: a settlement may be handed over twice (handlers are
idempotent), never skipped.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, NoReturn

from ..lightning.base import Node, Settlement
from ..store.cursors import CursorRepository
from ..core.tasks import Backoff

log = logging.getLogger("micropay.sidecar")
Handler = Callable[[Settlement], Awaitable[Any]]


def cursor_name(node: Node) -> str:
    return f"settlements:{node.cursor_namespace}"


class SettlementRouter:
    def __init__(self, node: Node, cursors: CursorRepository, cursor: str | None = None) -> None:
        """`cursor`: the position's name in the store (default: the sidecar's, per node)."""
        self.node, self.cursors = node, cursors
        self.cursor = cursor or cursor_name(node)
        self._routes: list[tuple[str, Handler]] = []

    def register(self, label_prefix: str, handler: Handler) -> None:
        if any(p == label_prefix for p, _ in self._routes):
            raise ValueError(f"settlements labelled {label_prefix!r}... already have a handler")
        self._routes.append((label_prefix, handler))
        self._routes.sort(key=lambda route: len(route[0]), reverse=True)

    async def route(self, s: Settlement) -> bool:
        """Hand `s` to its feature; False when no feature claims its label (not ours)."""
        for prefix, handler in self._routes:
            if s.label.startswith(prefix):
                await handler(s)
                return True
        return False

    async def run(self) -> NoReturn:
        """Follow the settlements from the persisted cursor, for the life of the task; the
        node restarting or its socket dropping only pauses it (with backoff)."""
        name, backoff = self.cursor, Backoff(first_s=1.0, max_s=30.0)
        while True:
            try:
                after = await self.cursors.get(name)
                async for s in self.node.settlements(after):
                    await self.route(s)
                    await self.cursors.advance(name, s.pay_index)
                    backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                wait = backoff.next()
                log.warning("settlement stream interrupted (%s); resuming in %.1fs", exc, wait)
                await asyncio.sleep(wait)
