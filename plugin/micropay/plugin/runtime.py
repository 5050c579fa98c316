"""The plugin's working half: an asyncio loop on its own thread, with its own RPC
connection to lightningd, holding the invoice issuer, the stream runner, the store, the
payouts and the supervised sidecar.

pyln-client's Plugin (glue.py) reads lightningd's requests on its main thread,
one at a time; while a handler runs, nothing else the node sends (the htlc_accepted
hook for every HTLC, other calls) is handled. So handlers never wait here: they
`submit` a coroutine and return, and its outcome answers the request later from this
loop's thread (pyln serialises writes to lightningd with a lock).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from ..core.errors import BadRequest, NodeError, NotFound
from .invoices import InvoiceIssuer
from ..lightning.cln import ClnNode
from ..lightning.datastore import Datastore
from ..core.params import int_param, msat_param
from ..core.tasks import Backoff
from .options import Settings
from ..core.secretfile import private_dir
from .supervisor import SidecarSupervisor
from ..store.core import CORE_SCHEMA
from ..store.sqlite import SqliteStore
from ..store.stream_usage import StreamUsageRepository
from ..streams.attribution import IncomingStreamPayment
from ..streams.runner import StreamRunner
from ..l402.tokens import RootKeyRing, TokenService, follow_key_file

if TYPE_CHECKING:
    from .agent import AgentSettings, FleetAgent

REFILL_SLICE = 20
log = logging.getLogger("micropay.plugin")
Done = Callable[["concurrent.futures.Future[Any]"], None]


class PluginRuntime:
    def __init__(self, *, rpc_file: str, data_dir: Path, settings: Settings,
                 notify: Callable[[str, dict[str, Any]], None], node_started_at: float | None = None) -> None:
        """`node_started_at`: when lightningd started, if the plugin started with it."""
        self.rpc_file, self.data_dir, self.settings, self.notify = rpc_file, data_dir, settings, notify
        self.node_started_at = node_started_at
        self.service = settings["micropay-service"]
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="micropay-loop", daemon=True)
        self.supervisor: SidecarSupervisor | None = None
        self._background: set[concurrent.futures.Future[Any]] = set()

    # -- bridging ----------------------------------------------------------------
    def start(self, timeout: float = 60) -> None:
        """Start the loop and the services (from the plugin's init, which may wait)."""
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self.loop)
        try:
            fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise NodeError(f"starting took longer than {timeout:.0f}s") from None

    def submit(self, coro: Awaitable[Any], done: Done) -> None:
        """Run `coro` on the loop; `done(future)` is called on the loop's thread when it
        has finished. Never waits."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)   # type: ignore[arg-type]
        fut.add_done_callback(done)

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run in the background; errors are logged, not raised. Never waits."""
        async def guarded() -> None:
            try:
                await coro
            except Exception as exc:
                log.error("background task failed: %s", exc)
        fut = asyncio.run_coroutine_threadsafe(guarded(), self.loop)
        self._background.add(fut)
        fut.add_done_callback(self._background.discard)

    async def _start(self) -> None:
        private_dir(self.data_dir)
        self.node = ClnNode(self.rpc_file)
        await self.node.connect()
        self.ds = Datastore(self.node.rpc)
        self.tokens = TokenService(RootKeyRing.load_or_create(self.data_dir / "root_keys.json"), self.service)
        from ..games.schema import GAMES_SCHEMA
        from ..nwc.schema import NWC_SCHEMA
        self.store = SqliteStore(self.data_dir / "micropay.sqlite3", (CORE_SCHEMA, GAMES_SCHEMA, NWC_SCHEMA))
        await self.store.open()
        self.stream_usage = StreamUsageRepository(self.store)
        s = self.settings
        self.issuer = InvoiceIssuer(self.node, self.ds, self.tokens, self.store,
                                    default_expiry_s=lambda: s["micropay-invoice-expiry"])
        await self.issuer.mirror()
        from ..creators.lnurl_client import AddressPayer      # streams to Lightning Addresses
        self.address_payer = AddressPayer(self.node.decode)
        self.streams = StreamRunner(
            self.node, self.ds, notify=self.notify,
            min_interval_s=lambda: s["micropay-stream-min-interval"],
            max_total_limit_msat=lambda: s["micropay-stream-max-total-msat"] or None,
            node_started_at=self.node_started_at, address_invoices=self.address_payer.invoice)
        await self.streams.start()
        from ..games.payouts import Payouts
        self.payouts = Payouts(None, self.store, self.node)
        self._payout_watch = asyncio.create_task(self.payouts.watch(), name="micropay-payouts")
        self._keys_watch = asyncio.create_task(follow_key_file(self.tokens), name="micropay-keys")
        self._agent_task: asyncio.Task[None] | None = None
        if s["micropay-fleet-store"]:
            self._agent_task = asyncio.create_task(self._run_agent(s["micropay-fleet-store"]), name="micropay-agent")
        self.nwc: Any = None
        if s["micropay-nwc-relay"]:
            from ..nwc.runner import NwcRunner
            self.nwc = NwcRunner(self.node, self.store, self.data_dir / "nwc_secret",
                                 s["micropay-nwc-relay"].split(","), node_info=self._node_info,
                                 node_started_at=self.node_started_at)
            await self.nwc.start()
        listen = s["micropay-listen"]
        if listen:
            self.supervisor = SidecarSupervisor(self.rpc_file, self.data_dir, listen,
                                                s["micropay-sidecar-config"] or None)
            self.supervisor.start()

    def shutdown(self) -> None:
        async def stop() -> None:
            if self.supervisor is not None:
                await self.supervisor.stop()
            self._payout_watch.cancel()
            self._keys_watch.cancel()
            if self.nwc is not None:
                await self.nwc.close()
            if self._agent_task is not None:
                self._agent_task.cancel()
                with contextlib.suppress(BaseException):
                    await self._agent_task
            await self.streams.stop()
            await self.address_payer.close()
            await self.store.close()
            await self.node.close()
        try:
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(20)
        except Exception as exc:
            log.warning("shutdown: %s", exc)
        self.loop.call_soon_threadsafe(self.loop.stop)

    # -- fleet mode: the node agent ---------------------------------------------------------
    # (REFILL_SLICE: invoices made for the pools between two looks at asks and the queue)
    def _agent_settings(self) -> AgentSettings:
        from .agent import AgentSettings
        s = self.settings
        return AgentSettings(per_round=s["micropay-fleet-pool-per-round"],
                             max_payment_msat=s["micropay-fleet-pay-max-msat"],
                             per_subject_day_msat=s["micropay-fleet-pay-subject-day-msat"],
                             per_day_msat=s["micropay-fleet-pay-day-msat"],
                             max_fee_msat=s["micropay-fleet-pay-max-fee-msat"])

    async def _run_agent(self, url: str) -> None:
        """The fleet agent's loop (lightning/fleet.py has the sidecar's half): a round a
        second (heartbeat, prune, refill); asks and queued payments as soon as they are
        announced (PostgreSQL NOTIFY), else within `poll_s`; the node's settlements
        followed from the cursor kept in the shared store. A store outage is waited out
        with backoff; nothing here ever holds up lightningd's hooks."""
        from ..store import open_store_from_url
        from ..store.fleet import ASKS_CHANNEL, FLEET_SCHEMA, QUEUED_CHANNEL, FleetRepository
        from .agent import FleetAgent
        backoff = Backoff(first_s=1.0, max_s=30.0)
        poll_s = 0.05 if url.startswith("sqlite") else 0.5
        while True:
            store = open_store_from_url(url, (FLEET_SCHEMA,))
            stops: list[Callable[[], Awaitable[None]]] = []
            helpers: list[asyncio.Task[None]] = []
            try:
                await store.open()
                agent = FleetAgent(self.node, FleetRepository(store), self._agent_settings(), records=self.ds)
                self.agent = agent
                asked, queued = asyncio.Event(), asyncio.Event()
                stops = [await store.listen(ASKS_CHANNEL, asked.set), await store.listen(QUEUED_CHANNEL, queued.set)]
                await agent.beat()
                # Three loops of their own, so that none waits on another: the heartbeat
                # (a payment can take a minute; a node must not look dead meanwhile), the
                # payment queue, and the node's settlements. This loop makes pools and
                # answers asks.
                helpers = [asyncio.create_task(agent.follow_settlements(), name="micropay-agent-settlements"),
                           asyncio.create_task(self._agent_beats(agent), name="micropay-agent-beat"),
                           asyncio.create_task(self._agent_pays(agent, queued, poll_s), name="micropay-agent-pay")]
                log.info("fleet agent: node %s in %s", await agent.node_id(), url.split("@")[-1].split("?")[0])
                last_round, refill_left = 0.0, 0
                while True:
                    agent.settings = self._agent_settings()
                    if time.monotonic() - last_round >= 1.0:
                        last_round = time.monotonic()
                        refill_left = agent.settings.per_round      # this second's invoices for the pools
                        await agent.prune_once()
                    if refill_left > 0:
                        # the pools are refilled in slices, so asks are answered between them
                        # instead of after a whole second's invoices
                        added = await agent.refill_once(min(REFILL_SLICE, refill_left))
                        refill_left = refill_left - added if added else 0
                    await agent.answer_asks()
                    for task in helpers:
                        if task.done():
                            task.result()           # raises what stopped it: everything restarts
                    backoff.reset()
                    asked.clear()
                    if refill_left <= 0:
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(asked.wait(), poll_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = backoff.next()
                log.warning("fleet agent: %s; again in %.0f s", exc, delay)
                await asyncio.sleep(delay)
            finally:
                for task in helpers:
                    task.cancel()
                for task in helpers:
                    with contextlib.suppress(BaseException):
                        await task
                for stop in stops:
                    await stop()
                await store.close()

    @staticmethod
    async def _agent_beats(agent: FleetAgent) -> None:
        while True:
            await asyncio.sleep(1.0)
            await agent.beat()

    async def _agent_pays(self, agent: FleetAgent, queued: asyncio.Event, poll_s: float) -> None:
        """The payment queue, one payment at a time, woken by NOTIFY or polling."""
        while True:
            agent.settings = self._agent_settings()
            queued.clear()
            if not await agent.pay_once():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(queued.wait(), max(poll_s, 0.25))

    # -- invoice settlement and incoming streams --------------------------------------
    async def invoice_paid(self, label: str, preimage: str, msat: int) -> None:
        found = await self.ds.get(("invoice", label))
        if found is None:
            return
        rec = found[0]
        self.notify("micropay_invoice_paid", {"label": label, "payment_hash": rec["payment_hash"],
                                              "amount_msat": msat, "token_id": rec["token_id"],
                                              "metadata": rec.get("metadata", {})})

    async def record_stream_payment(self, p: IncomingStreamPayment) -> None:
        """Idempotent (keyed by payment hash): lightningd replays htlc_accepted at start-up."""
        if await self.stream_usage.add_payment(p.payment_hash, p.stream_id, p.seq, p.amount_msat,
                                               int(time.time()), p.app_name):
            log.info("stream %s: received %d msat (seq %d)", p.shown_id, p.amount_msat, p.seq)

    # -- micropay-payout ---------------------------------------------------------------
    async def payout(self, player_id: Any, destination: Any, idempotency_key: Any,
                     amount_msat: Any = None) -> dict[str, Any]:
        from ..games.config import PayoutCaps
        s = self.settings
        per_player, per_day = s["micropay-payout-player-day-msat"], s["micropay-payout-day-msat"]
        self.payouts.caps = (PayoutCaps(per_player, per_day, s["micropay-payout-max-fee-msat"])
                             if per_player > 0 and per_day > 0 else None)
        body = {"player_id": player_id, "destination": destination, "idempotency_key": idempotency_key}
        if amount_msat is not None:
            body["amount_msat"] = msat_param(amount_msat, "amount_msat")
        p, created = await self.payouts.create(body)
        if created:
            self.notify("micropay_payout", p)
        return dict(p, created=created)

    # -- Nostr Wallet Connect ---------------------------------------------------------------
    async def _node_info(self) -> dict[str, Any]:
        info = await self.node.rpc.call("getinfo", {})
        return {"alias": info.get("alias", ""), "color": info.get("color", ""), "pubkey": info["id"],
                "network": {"bitcoin": "mainnet"}.get(info.get("network", ""), info.get("network", "")),
                "block_height": info.get("blockheight", 0)}

    def _nwc_service(self) -> Any:
        if self.nwc is None:
            raise BadRequest("NWC is not enabled on this node: set micropay-nwc-relay to the relays to serve on")
        return self.nwc.service

    async def nwc_create(self, name: Any, budget_msat: Any, budget_period: Any = "daily", methods: Any = None,
                         max_fee_msat: Any = None, expires_at: Any = None) -> dict[str, Any]:
        from ..nwc.protocol import Method
        from ..nwc.service import PERIODS
        service = self._nwc_service()
        if not isinstance(name, str) or not 1 <= len(name.strip()) <= 64:
            raise BadRequest("name: a string of 1 to 64 characters")
        budget = msat_param(budget_msat, "budget_msat")
        if budget_period not in PERIODS:
            raise BadRequest(f"budget_period: one of {', '.join(PERIODS)}")
        if methods is None:
            chosen = tuple(str(m) for m in Method)
        elif isinstance(methods, str):
            chosen = tuple(m for m in methods.replace(",", " ").split() if m)
        elif isinstance(methods, list) and all(isinstance(m, str) for m in methods):
            chosen = tuple(methods)
        else:
            raise BadRequest("methods: a list of NIP-47 method names")
        bad = [m for m in chosen if m not in {str(x) for x in Method}]
        if bad or not chosen:
            raise BadRequest(f"methods: unknown {', '.join(bad) or '(none given)'}; known: {', '.join(Method)}")
        fee = 5_000 if max_fee_msat is None else msat_param(max_fee_msat, "max_fee_msat")
        expires = None if expires_at is None else int_param(expires_at, "expires_at", int(time.time()) + 1, 2**40)
        if await service.repo.connection("name", name.strip()) is not None:
            raise BadRequest(f"name: a connection called {name.strip()!r} exists already")
        created = await service.create(name.strip(), budget_msat=budget, budget_period=budget_period, methods=chosen,
                                       max_fee_msat=fee, expires_at=expires)
        await self.nwc.changed()
        return created

    async def nwc_list(self) -> dict[str, Any]:
        return {"connections": await self._nwc_service().list()}

    async def nwc_revoke(self, id: Any) -> dict[str, Any]:
        if not isinstance(id, str) or not id:
            raise BadRequest("id: the connection's id or name")
        revoked = await self._nwc_service().revoke(id)
        if revoked is None:
            raise NotFound(f"no live connection has the id or name {id!r}")
        await self.nwc.changed()
        return revoked

    # -- micropay-fetch -----------------------------------------------------------------
    async def fetch(self, **params: Any) -> dict[str, Any]:
        from .fetch import fetch
        return await fetch(self.node, self.data_dir, max_msat_default=self.settings["micropay-fetch-max-msat"],
                           day_budget_msat=self.settings["micropay-fetch-day-budget-msat"], **params)


__all__ = ["PluginRuntime"]
