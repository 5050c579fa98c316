"""The plugin's working half: an asyncio loop on its own thread, with its own RPC
connection to lightningd, holding the invoice issuer, the stream runner, the store and
the supervised sidecar. pyln-client's Plugin (cln_plugin.py) is synchronous; its
handlers hand work to this loop and wait for the result.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import sys
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

from .errors import BadRequest, NodeError
from .invoices import InvoiceIssuer
from .lightning.cln import ClnNode
from .lightning.datastore import Datastore
from .params import msat_param
from .store.sqlite import SqliteStore
from .stream_runner import StreamRunner
from .streams import TLV_PODCAST
from .tlv import TlvError, onion_payload_records
from .tokens import RootKeyRing, TokenService

log = logging.getLogger("micropay.plugin")
T = TypeVar("T")
MAX_FETCH_BODY = 1024 * 1024


class PluginRuntime:
    def __init__(self, *, rpc_file: str, data_dir: Path, service: str,
                 option: Callable[[str], Any], notify: Callable[[str, dict[str, Any]], None]) -> None:
        self.rpc_file, self.data_dir, self.service = rpc_file, data_dir, service
        self.option, self.notify = option, notify
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="micropay-loop", daemon=True)
        self.supervisor: SidecarSupervisor | None = None

    # -- bridging ----------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        self.call(self._start(), timeout=60)

    def call(self, coro: Awaitable[T], timeout: float | None = 300) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)   # type: ignore[arg-type]
        try:
            return fut.result(timeout)
        except FutureTimeout:
            fut.cancel()
            raise NodeError("the operation timed out") from None

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run in the background; errors are logged, not raised."""
        async def guarded() -> None:
            try:
                await coro
            except Exception as exc:
                log.error("background task failed: %s", exc)
        asyncio.run_coroutine_threadsafe(guarded(), self.loop)

    async def _start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.node = ClnNode(self.rpc_file)
        await self.node.connect()
        self.ds = Datastore(self.node.rpc)
        self.tokens = TokenService(RootKeyRing.load_or_create(self.data_dir / "root_keys.json"), self.service)
        self.store = SqliteStore(self.data_dir / "micropay.sqlite3")
        await self.store.open()
        opt = self.option
        self.issuer = InvoiceIssuer(self.node, self.ds, self.tokens, self.store,
                                    default_expiry_s=lambda: int(opt("micropay-invoice-expiry")))
        self.streams = StreamRunner(
            self.node, self.ds, notify=self.notify,
            min_interval_s=lambda: int(opt("micropay-stream-min-interval")),
            max_total_limit_msat=lambda: int(opt("micropay-stream-max-total-msat")) or None)
        await self.streams.start()
        from .games.payouts import Payouts
        self.payouts = Payouts(None, self.store, self.node)
        await self.payouts.resume_sending()
        listen = self.option("micropay-listen")
        if listen:
            self.supervisor = SidecarSupervisor(self, listen, self.option("micropay-sidecar-config") or None)
            self.supervisor.start()

    def shutdown(self) -> None:
        async def stop() -> None:
            if self.supervisor is not None:
                await self.supervisor.stop()
            await self.streams.stop()
            await self.store.close()
            await self.node.close()
        try:
            self.call(stop(), timeout=20)
        except Exception as exc:
            log.warning("shutdown: %s", exc)
        self.loop.call_soon_threadsafe(self.loop.stop)

    # -- invoice settlement and incoming streams --------------------------------------
    async def invoice_paid(self, label: str, preimage: str, msat: int) -> None:
        found = await self.ds.get(("invoice", label))
        if found is None:
            return
        rec = found[0]
        self.notify("micropay_invoice_paid", {"label": label, "payment_hash": rec["payment_hash"],
                                              "amount_msat": msat, "token_id": rec["token_id"],
                                              "metadata": rec.get("metadata", {})})

    def incoming_htlc(self, onion: dict[str, Any], htlc: dict[str, Any]) -> None:
        """Attribute a keysend carrying a bLIP-10 record to its stream session. Idempotent
        (keyed by payment hash): lightningd replays this hook at start-up."""
        payload = onion.get("payload")
        if not payload or "payment_hash" not in htlc:
            return
        try:
            record = onion_payload_records(payload).get(TLV_PODCAST)
            doc = json.loads(record) if record else None
        except (TlvError, ValueError):
            return
        if not isinstance(doc, dict) or doc.get("action", "stream") not in ("stream", "boost"):
            return
        app = str(doc.get("app_name", ""))[:64]
        sid = doc.get("micropay_stream_id") or f"{app}/{doc.get('feedID') or doc.get('podcast') or 'unknown'}"
        seq = doc.get("micropay_seq") if isinstance(doc.get("micropay_seq"), int) else 0
        amount = htlc.get("amount_msat", 0)
        amount = int(str(amount).removesuffix("msat")) if not isinstance(amount, int) else amount
        new = self.call(self.store.add_stream_payment(htlc["payment_hash"], str(sid)[:128], seq, amount,
                                                      int(time.time()), app), timeout=30)
        if new:
            log.info("stream %s: received %d msat (seq %d)", sid, amount, seq)

    # -- micropay-payout ---------------------------------------------------------------
    async def payout(self, player_id: Any, destination: Any, idempotency_key: Any,
                     amount_msat: Any = None) -> dict[str, Any]:
        from .games.config import PayoutCaps
        per_player = int(self.option("micropay-payout-player-day-msat"))
        per_day = int(self.option("micropay-payout-day-msat"))
        self.payouts.caps = (PayoutCaps(per_player, per_day, int(self.option("micropay-payout-max-fee-msat")))
                             if per_player > 0 and per_day > 0 else None)
        body = {"player_id": player_id, "destination": destination, "idempotency_key": idempotency_key}
        if amount_msat is not None:
            body["amount_msat"] = msat_param(amount_msat, "amount_msat")
        p, created = await self.payouts.create(body)
        if created:
            self.notify("micropay_payout", p)
        return dict(p, created=created)

    # -- micropay-fetch -----------------------------------------------------------------
    async def fetch(self, url: Any, method: Any = "GET", headers: Any = None, body: Any = None,
                    max_msat: Any = None) -> dict[str, Any]:
        from urllib.parse import urlsplit

        from .client import Budget, L402Client, NodeWallet, TokenCache
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
            raise BadRequest("url must be an http:// or https:// URL")
        if not isinstance(method, str) or not method.isalpha():
            raise BadRequest("method must be an HTTP method name")
        hdrs = {} if headers is None else headers
        if not isinstance(hdrs, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in hdrs.items()):
            raise BadRequest("headers must be an object of string values")
        if body is not None and not isinstance(body, str):
            raise BadRequest("body must be a string")
        limit = msat_param(max_msat, "max_msat") if max_msat is not None else int(self.option("micropay-fetch-max-msat"))
        budget = Budget(max_per_request_msat=limit,
                        max_per_host_per_day_msat=int(self.option("micropay-fetch-day-budget-msat")),
                        max_total_msat=None, max_fee_msat=max(1000, limit // 100))
        events: list[str] = []
        client = L402Client(NodeWallet(self.node), budget, TokenCache(self.data_dir / "fetch-client.json"),
                            on_event=events.append)
        res = await client.request(method, url, headers=hdrs, data=body.encode() if body is not None else None)
        if len(res.body) > MAX_FETCH_BODY:
            raise BadRequest(f"response body is larger than {MAX_FETCH_BODY} bytes")
        try:
            text, encoding = res.body.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(res.body).decode(), "base64"
        return {"status": res.status, "headers": res.headers, "body": text, "body_encoding": encoding,
                "amount_msat": res.paid_msat, "fee_msat": res.fee_msat, "payment_hash": res.payment_hash,
                "receipt": res.receipt, "log": events}


class SidecarSupervisor:
    """Runs `micropay serve` against this node as a child process; restarts it with
    backoff when it dies; stops it on shutdown."""

    def __init__(self, rt: PluginRuntime, listen: str, config: str | None) -> None:
        self.rt, self.listen, self.config = rt, listen, config
        self.proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self.restarts = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise())

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "micropay.cli", "serve", "--backend", "cln", "--rpc-file", self.rt.rpc_file,
               "--data-dir", str(self.rt.data_dir), "--listen", self.listen]
        return cmd + (["--config", self.config] if self.config else [])

    async def _supervise(self) -> None:
        backoff = 1.0
        while True:
            started = time.monotonic()
            log_file = open(self.rt.data_dir / "sidecar.log", "ab")
            self.proc = await asyncio.create_subprocess_exec(*self.command(), stdout=log_file,
                                                             stderr=asyncio.subprocess.STDOUT)
            log_file.close()
            log.info("sidecar started (pid %d) on %s", self.proc.pid, self.listen)
            code = await self.proc.wait()
            if time.monotonic() - started > 60:
                backoff = 1.0
            self.restarts += 1
            log.warning("sidecar exited with %s; restarting in %.0fs", code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 60.0)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except asyncio.TimeoutError:
                self.proc.kill()


__all__ = ["PluginRuntime"]
