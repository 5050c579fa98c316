"""The client side of NIP-47: requests to a wallet service named by a connection URI,
each answered (or not) within a timeout. Reads the service's info event first, to use
NIP-44 when it offers it (NIP-04 otherwise, as the spec says for a service that does not
say). The URI's secret stays in memory; nothing here logs it."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from ..nostr import nip04, nip44
from ..nostr.event import Event, sign_event
from ..nostr.keys import NostrError
from ..nostr.relay import RelayPool
from .protocol import INFO, NIP04, NIP44, REQUEST, RESPONSE, Code, NwcError
from .uri import NwcUri

log = logging.getLogger("micropay.nwc")
INFO_WAIT_S = 10.0


class NoAnswer(Exception):
    """The request went out and no answer came within the timeout: whether it was
    carried out is not known."""


class NwcClient:
    def __init__(self, uri: NwcUri) -> None:
        self.uri, self.keys = uri, uri.client
        self.pool = RelayPool(list(uri.relays), self._on_event)
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._info: asyncio.Future[Event] | None = None
        self.encryption: str | None = None
        self._started = False

    async def start(self, timeout_s: float = 10.0) -> None:
        if self._started:
            return
        self._started = True
        self._info = asyncio.get_running_loop().create_future()
        await self.pool.subscribe("nwc-info", [{"kinds": [INFO], "authors": [self.uri.service_pubkey], "limit": 1}])
        await self.pool.subscribe("nwc-answers", [{"kinds": [RESPONSE], "authors": [self.uri.service_pubkey],
                                                   "#p": [self.keys.pubkey], "since": int(time.time()) - 60}])
        self.pool.start()
        if not await self.pool.wait_connected(timeout_s):
            raise ConnectionError(f"no relay of the NWC connection answered ({', '.join(self.uri.relays)})")
        try:
            info = await asyncio.wait_for(asyncio.shield(self._info), INFO_WAIT_S)
            offered = (info.first("encryption") or NIP04).split()
        except asyncio.TimeoutError:
            offered = [NIP04]
        self.encryption = NIP44 if NIP44 in offered else NIP04

    async def close(self) -> None:
        await self.pool.close()

    def _on_event(self, sub_id: str, ev: Event) -> None:
        if ev.pubkey != self.uri.service_pubkey:
            return
        if ev.kind == INFO and self._info is not None and not self._info.done():
            self._info.set_result(ev)
        elif ev.kind == RESPONSE:
            fut = self._waiting.get(ev.first("e") or "")
            if fut is None or fut.done():
                return
            try:
                text = (nip44.decrypt(ev.content, nip44.conversation_key(self.keys, ev.pubkey))
                        if "?iv=" not in ev.content else nip04.decrypt(ev.content, self.keys, ev.pubkey))
                body = json.loads(text)
            except (NostrError, ValueError):
                return
            if isinstance(body, dict):
                fut.set_result(body)

    async def request(self, method: str, params: dict[str, Any], timeout_s: float = 60.0) -> dict[str, Any]:
        """The result, or NwcError with the service's code; NoAnswer when none came in
        time; ConnectionError when no relay was connected (then it was not sent)."""
        await self.start()
        text = json.dumps({"method": method, "params": params})
        if self.encryption == NIP44:
            content = nip44.encrypt(text, nip44.conversation_key(self.keys, self.uri.service_pubkey))
        else:
            content = nip04.encrypt(text, self.keys, self.uri.service_pubkey)
        ev = sign_event(self.keys, REQUEST, content, [["p", self.uri.service_pubkey],
                                                      ["encryption", self.encryption or NIP04],
                                                      ["expiration", str(int(time.time() + timeout_s))]])
        if not any(r.connected for r in self.pool.relays):
            raise ConnectionError("no relay of the NWC connection is connected; the request was not sent")
        fut = self._waiting[ev.id] = asyncio.get_running_loop().create_future()
        try:
            # A relay that did not confirm may still have passed the request on: whatever
            # publish says, the answer (or its absence) decides.
            await self.pool.publish(ev)
            body = await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            raise NoAnswer(f"the wallet service did not answer {method} within {timeout_s:.0f}s") from None
        finally:
            self._waiting.pop(ev.id, None)
        error = body.get("error")
        if error:
            code = error.get("code") if isinstance(error, dict) else None
            message = error.get("message") if isinstance(error, dict) else None
            try:
                raise NwcError(Code(code), str(message or code))
            except ValueError:
                raise NwcError(Code.OTHER, f"{code}: {message}") from None
        result = body.get("result")
        if not isinstance(result, dict):
            raise NwcError(Code.OTHER, f"the wallet service answered {method} without a result")
        return result
