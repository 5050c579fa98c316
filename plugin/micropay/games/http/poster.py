"""Webhooks leave over aiohttp: the Poster adapter of games/webhooks.py."""
from __future__ import annotations

import asyncio

import aiohttp

from ...core.inputs import read_bounded
from ..webhooks import PARALLEL, DeliveryFailed

MAX_RECEIVER_BODY = 64 * 1024     # what is read of a receiver's answer (its status is what counts)


class AiohttpPoster:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def post(self, url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": "micropay-webhooks/1"}, connector=aiohttp.TCPConnector(limit=PARALLEL))
        try:
            async with self._session.post(url, data=body, headers=headers, allow_redirects=False,
                                          timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                await read_bounded(resp.content, MAX_RECEIVER_BODY)   # drained, not kept
                return resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise DeliveryFailed(f"{type(exc).__name__}: {exc}"[:200] or type(exc).__name__) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
