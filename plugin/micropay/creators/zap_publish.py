"""Publishing a zap receipt (NIP-57 Appendix E) to the relays its zap request named: one
short connection per relay, opened, used for one EVENT, and closed.

Bounded: each relay gets `timeout_s` to connect and answer OK (closing adds at most
CLOSE_TIMEOUT_S), at most `max_parallel` relays are tried at once and at most
MAX_RELAYS in all, frames above MAX_FRAME end that relay's attempt. One relay's failure
is a string in the result, never an exception.

The relays come from a stranger (the payer's zap request), so by default a relay is only
contacted on a globally routable address: IP literals are checked here, and host names
are resolved through a resolver that drops non-public addresses (on the session made
here; a session passed in keeps its own resolver, and only literals are checked).
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
from typing import Any, Sequence
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from ..nostr.event import Event
from ..nostr.keys import NostrError
from ..nostr.urls import relay_url
from .zaps import is_public_host, is_public_ip

__all__ = ["publish_receipt", "MAX_RELAYS", "MAX_FRAME", "CLOSE_TIMEOUT_S"]

MAX_RELAYS = 20
MAX_FRAME = 256 * 1024
CLOSE_TIMEOUT_S = 2.0


async def publish_receipt(event: Event, relays: Sequence[str], *, timeout_s: float = 10.0,
                          session: aiohttp.ClientSession | None = None, max_parallel: int = 5,
                          allow_private: bool = False) -> dict[str, str | None]:
    """Send `event` to every relay and wait for each one's OK. Returns, per relay (the
    normalised URL, or the text given when it is not a relay URL), None when the relay
    took the event (or already had it) and otherwise why not; a reason starting with
    "skipped:" means the relay was not tried and trying again cannot help (not a relay
    URL, not a public address, beyond MAX_RELAYS)."""
    if timeout_s <= 0 or max_parallel < 1:
        raise ValueError("timeout_s must be positive and max_parallel at least 1")
    if isinstance(relays, str):
        relays = [relays]
    results: dict[str, str | None] = {}
    urls: list[str] = []
    for text in relays:
        try:
            url = relay_url(text)
        except (NostrError, TypeError) as exc:
            results[str(text)[:200]] = f"skipped: {exc}"
            continue
        if url in results:
            continue
        if len(urls) >= MAX_RELAYS:
            results[url] = f"skipped: at most {MAX_RELAYS} relays are tried"
            continue
        host = urlsplit(url).hostname or ""
        if not allow_private and not is_public_host(host):
            results[url] = f"skipped: {host} is not a public address"
            continue
        results[url] = None
        urls.append(url)
    if not urls:
        return results
    frame = json.dumps(["EVENT", event.as_json()], ensure_ascii=False)
    gate = asyncio.Semaphore(max_parallel)
    resolver: AbstractResolver | None = None
    if session is None:
        resolver = DefaultResolver() if allow_private else _PublicResolver()
        # A relay's answer may not send us elsewhere: aiohttp resolves no IP literal in a
        # redirect's URL, so a redirect could reach a private address the check above refused.
        no_redirects = aiohttp.TraceConfig()
        no_redirects.on_request_redirect.append(_refuse_redirect)
        live = aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=resolver),
                                     trace_configs=[no_redirects])
    else:
        live = session

    async def one(url: str) -> None:
        async with gate:
            results[url] = await _publish_one(live, url, frame, event.id, timeout_s)

    try:
        await asyncio.gather(*(one(u) for u in urls))
    finally:
        if resolver is not None:                 # ours: the session and its resolver
            await live.close()
            await resolver.close()
    return results


async def _publish_one(session: aiohttp.ClientSession, url: str, frame: str, event_id: str,
                       timeout_s: float) -> str | None:
    ws: aiohttp.ClientWebSocketResponse | None = None
    try:
        async with asyncio.timeout(timeout_s):
            ws = await session.ws_connect(url, max_msg_size=MAX_FRAME, autoping=True,
                                          timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT_S))
            await ws.send_str(frame)
            return await _await_ok(ws, event_id)
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except Exception as exc:                 # refused, reset, TLS, DNS, HTTP instead of a websocket ...
        return f"could not publish: {type(exc).__name__}: {str(exc)[:200]}".rstrip(": ")
    finally:
        if ws is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await ws.close()


async def _await_ok(ws: aiohttp.ClientWebSocketResponse, event_id: str) -> str | None:
    notice = ""
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.TEXT:
            if msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING):
                break
            continue
        answer = _parse(msg.data)
        if answer is None:
            continue
        if answer[0] == "NOTICE" and len(answer) > 1:
            notice = str(answer[1])[:200]
        elif answer[0] == "OK" and len(answer) >= 3 and answer[1] == event_id:
            message = str(answer[3])[:200] if len(answer) > 3 else ""
            if answer[2] is True or message.startswith("duplicate:"):
                return None
            return f"refused: {message or 'no reason given'}"
    closed = "the relay closed the connection before answering"
    return f"{closed} (it said: {notice})" if notice else closed


class RedirectRefused(Exception):
    pass


async def _refuse_redirect(session: Any, ctx: Any, params: Any) -> None:
    raise RedirectRefused(f"the relay redirected to {str(params.response.headers.get('Location', ''))[:100]}; "
                          "redirects are not followed")


def _parse(text: str) -> list[Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, list) and value and isinstance(value[0], str):
        return value
    return None


def _public_address(text: str) -> bool:
    try:
        return is_public_ip(ipaddress.ip_address(text.split("%", 1)[0]))
    except ValueError:
        return False


class _PublicResolver(AbstractResolver):
    """The default resolver, keeping only globally routable addresses."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        public = [r for r in found if _public_address(r["host"])]
        if not public:
            raise OSError(f"{host} resolves to no public address")
        return public

    async def close(self) -> None:
        await self._inner.close()
