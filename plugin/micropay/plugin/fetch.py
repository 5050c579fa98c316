"""micropay-fetch: an HTTP request from the node that pays a 402 (L402 or the Payment
scheme's charge) within budget; with `session`, a streaming endpoint read through a
Payment session (deposit, top-ups when asked, close with the refund to this node)."""
from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..client.payer import Budget, L402Client, NodeWallet, TokenCache
from ..core.errors import BadRequest
from ..lightning.base import Node
from ..core.params import msat_param

MAX_FETCH_BODY = 1024 * 1024


async def fetch(node: Node, data_dir: Path, *, max_msat_default: int, day_budget_msat: int, url: Any,
                method: Any = "GET", headers: Any = None, body: Any = None, max_msat: Any = None,
                prefer: Any = None, session: Any = None) -> dict[str, Any]:
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise BadRequest("url must be an http:// or https:// URL")
    if not isinstance(method, str) or not method.isascii() or not method.isalpha():
        raise BadRequest("method must be an HTTP method name")
    hdrs = {} if headers is None else headers
    if not isinstance(hdrs, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in hdrs.items()):
        raise BadRequest("headers must be an object of string values")
    if isinstance(body, (dict, list)):        # a JSON body, as lightning-cli -k body='{"x":1}' passes it
        data: bytes | None = json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json", **hdrs}
    elif body is None or isinstance(body, str):
        data = body.encode() if body is not None else None
    else:
        raise BadRequest("body must be a string or a JSON object")
    if prefer not in (None, "l402", "payment"):
        raise BadRequest('prefer must be "l402" or "payment"')
    if session not in (None, True, False):
        raise BadRequest("session must be true or false")
    limit = msat_param(max_msat, "max_msat") if max_msat is not None else max_msat_default
    budget = Budget(max_per_request_msat=limit, max_per_host_per_day_msat=day_budget_msat,
                    max_total_msat=None, max_fee_msat=max(1000, limit // 100))
    events: list[str] = []
    client = L402Client(NodeWallet(node), budget, TokenCache(data_dir / "fetch-client.json"),
                        on_event=events.append, max_body_bytes=MAX_FETCH_BODY, prefer_payment=prefer == "payment")
    if session:
        return await _fetch_session(client, NodeWallet(node), method, url, hdrs, data, events)
    res = await client.request(method, url, headers=hdrs, data=data)
    try:
        text, encoding = res.body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(res.body).decode(), "base64"
    return {"status": res.status, "headers": res.headers, "body": text, "body_encoding": encoding,
            "amount_msat": res.paid_msat, "fee_msat": res.fee_msat, "payment_hash": res.payment_hash,
            "receipt": res.receipt, "log": events}


async def _fetch_session(client: L402Client, wallet: NodeWallet, method: str, url: str, headers: dict[str, str],
                         data: bytes | None, log: list[str]) -> dict[str, Any]:
    """The events of a streamed response read on a Payment session: the deposit and every
    top-up the server asks for are paid within the budgets (the per-request one bounds
    the unit price); the session is closed at the end (also on an error) and the unspent
    deposit refunded to an amountless invoice of this node. Reading stops at 1 MiB of
    events (`truncated`). Should the plugin die mid-session, the server closes the
    session when it has been idle for its idle timeout and refunds it the same way."""
    from ..client.sessions import PaymentSession
    got: list[dict[str, str]] = []
    size, truncated = 0, False
    s = PaymentSession(client, wallet, url)
    async with s:
        async with contextlib.aclosing(s.stream(method, url, headers=headers, data=data)) as stream:
            async for ev in stream:
                size += len(ev.event) + len(ev.data)
                if size > MAX_FETCH_BODY:
                    truncated = True
                    break
                got.append({"event": ev.event, "data": ev.data})
    closed = s.closed or {}
    return {"status": 200, "events": got, "truncated": truncated, "session_id": s.session_id,
            "unit_msat": s.unit_msat, "amount_msat": s.deposited_msat, "top_ups": s.top_ups,
            "refund_msat": int(closed.get("refundSats", 0)) * 1000, "refund_status": closed.get("refundStatus"),
            "receipts": s.receipts, "log": log}
