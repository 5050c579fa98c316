"""Payment sessions on a real network: the sidecar on node B through Core Lightning in
front of an SSE upstream, node A's client opening a session, spending it by a stream,
topping it up twice mid-stream with xpay, and closing it: the refund is paid by node B
with xpay (an amount on A's amountless return invoice) and arrives at A."""
import asyncio
import json

from micropay.payment import scheme as pa
from micropay.client.payer import Budget, L402Client, NodeWallet, TokenCache
from micropay.lightning.cln import ClnNode
from micropay.client.sessions import PaymentSession
from micropay.store.sessions import RefundStatus, SessionStatus

from ..conftest import make_config, start_sidecar
from ..payment.test_sessions import DEPOSIT_UNITS, UNIT_MSAT, routes, start_upstream
from .test_l402_cln import wait_until
from .util import opts


def give_outbound_liquidity(payer, merchant) -> None:
    """A fresh channel is all on the payer's side; a refund needs the merchant to have
    spendable balance above its channel reserve (a real merchant node needs that too)."""
    inv = merchant.rpc.invoice(200_000_000, "liquidity", "liquidity")
    payer.rpc.call("xpay", {"invstring": inv["bolt11"]})


def to_us_msat(node) -> int:
    return sum(c["to_us_msat"] for c in node.rpc.listpeerchannels()["channels"])


async def no_htlcs(node) -> bool:
    return all(not c.get("htlcs") for c in node.rpc.listpeerchannels()["channels"])


async def resume_until_closed(repo, node, sid: str, timeout_s: float):
    """A later sidecar process finishes a close from the node's record (its resume runs
    past RESUME_AFTER_S); returns its ledger once the session is closed, or at the deadline."""
    import time

    from micropay.payment.sessions import RESUME_AFTER_S, SessionLedger
    resumer = SessionLedger(repo, node, clock=lambda: time.time() + RESUME_AFTER_S + 1)
    deadline = time.monotonic() + timeout_s
    while (await repo.get(sid)).status != SessionStatus.CLOSED and time.monotonic() < deadline:
        await resumer.resume()
        await asyncio.sleep(1)
    return resumer


async def assert_refunded_once(repo, sid: str, payer, merchant, refund_msat: int) -> dict:
    """The session closed with its refund succeeded, the payer's return invoice (label
    "ret") paid once with the refund, one attempt on the merchant's node, completed."""
    rec = await repo.get(sid)
    assert rec.status == SessionStatus.CLOSED and rec.refund_status == RefundStatus.SUCCEEDED, rec
    assert rec.refund_msat == refund_msat
    (inv,) = payer.rpc.listinvoices("ret")["invoices"]
    assert inv["status"] == "paid" and inv["amount_received_msat"] == refund_msat
    sent = [p for p in merchant.rpc.listsendpays()["payments"] if p["payment_hash"] == inv["payment_hash"]]
    assert [p["status"] for p in sent] == ["complete"], sent           # one attempt, completed once
    assert await wait_until(lambda: no_htlcs(payer))
    return inv


async def test_a_session_streamed_topped_up_and_closed_refunds_the_payer(node_factory, tmp_path):
    l1, l2 = node_factory.line_graph(2, wait_for_announce=True)
    up_runner, up_url, seen = await start_upstream()
    node = ClnNode(l2.rpc.socket_path)
    await node.connect()
    sc = await start_sidecar(make_config(tmp_path, routes(up_url)), node=node)
    payer = ClnNode(l1.rpc.socket_path)
    await payer.connect()
    try:
        give_outbound_liquidity(l1, l2)
        assert await wait_until(lambda: no_htlcs(l1))
        start = to_us_msat(l1)
        client = L402Client(NodeWallet(payer), Budget(max_per_request_msat=10_000, max_per_host_per_day_msat=500_000),
                            TokenCache(tmp_path / "client.json"))
        events = []
        session = PaymentSession(client, NodeWallet(payer), sc.url + "/gen?n=12")
        async with session as s:
            async for ev in s.stream():
                events.append(ev.json()["i"])
            assert s.top_ups == 2
            assert await wait_until(lambda: no_htlcs(l1))
            before_close = to_us_msat(l1)
        assert events == list(range(12)) and seen["gen"] == list(range(12))
        closed = session.closed
        refund_msat = 3 * DEPOSIT_UNITS * UNIT_MSAT - 12 * UNIT_MSAT
        assert closed == {"status": "closed", "refundSats": refund_msat // 1000, "refundStatus": "succeeded"}

        # the refund arrived at A: its balance moved by exactly the refund
        assert await wait_until(lambda: no_htlcs(l1))
        assert to_us_msat(l1) - before_close == refund_msat
        # and over the whole session A paid exactly the 12 units (one channel: no routing fees)
        assert start - to_us_msat(l1) == 12 * UNIT_MSAT
        # A's return invoice was paid once, with the refund as its amount
        (ret,) = [i for i in l1.rpc.listinvoices()["invoices"] if i["label"].startswith("micropay-return-")]
        assert ret["status"] == "paid" and ret["amount_received_msat"] == refund_msat
        # B's refund went out once, with xpay
        sent = [p for p in l2.rpc.listsendpays()["payments"] if p["payment_hash"] == ret["payment_hash"]]
        assert [p["status"] for p in sent if p["status"] == "complete"] == ["complete"]
        rec = await sc.rt.gate.sessions.repo.get(session.session_id)
        assert rec.status == SessionStatus.CLOSED and rec.refund_status == RefundStatus.SUCCEEDED
        assert rec.refund_msat == refund_msat and rec.spent_msat == 12 * UNIT_MSAT
        # three deposits paid on B's invoices, each once
        deposits = [i for i in l2.rpc.listinvoices()["invoices"] if i["status"] == "paid"
                    and i["label"] != "liquidity"]
        assert sorted(i["amount_received_msat"] for i in deposits) == [DEPOSIT_UNITS * UNIT_MSAT] * 3
    finally:
        await sc.runner.cleanup()
        await payer.close()
        await up_runner.cleanup()


async def test_micropay_fetch_reads_a_stream_on_a_session_from_the_node(node_factory, tmp_path):
    """The plugin's micropay-fetch with session=true, on node A (micropay loaded): it pays
    the deposit and two top-ups with A's xpay, closes the session, and B's refund reaches
    an amountless invoice of A."""
    l1, l2 = node_factory.line_graph(2, opts=[opts(), {}], wait_for_announce=True)
    up_runner, up_url, seen = await start_upstream()
    node = ClnNode(l2.rpc.socket_path)
    await node.connect()
    sc = await start_sidecar(make_config(tmp_path, routes(up_url)), node=node)
    try:
        give_outbound_liquidity(l1, l2)
        assert await wait_until(lambda: no_htlcs(l1))
        start = to_us_msat(l1)
        # the RPC waits on this process's sidecar and upstream: call it from a thread
        got = await asyncio.to_thread(l1.rpc.call, "micropay-fetch",
                                      {"url": sc.url + "/gen?n=12", "session": True, "max_msat": 10_000})
        assert [json.loads(e["data"])["i"] for e in got["events"]] == list(range(12)), got["events"]
        deposited, refund_msat = 3 * DEPOSIT_UNITS * UNIT_MSAT, 3 * DEPOSIT_UNITS * UNIT_MSAT - 12 * UNIT_MSAT
        assert (got["top_ups"], got["amount_msat"]) == (2, deposited)
        assert (got["refund_status"], got["refund_msat"]) == ("succeeded", refund_msat)
        assert seen["gen"] == list(range(12))
        assert await wait_until(lambda: no_htlcs(l1))
        assert start - to_us_msat(l1) == 12 * UNIT_MSAT        # the units, and nothing more
        (ret,) = [i for i in l1.rpc.listinvoices()["invoices"] if i["label"].startswith("micropay-return-")]
        assert ret["status"] == "paid" and ret["amount_received_msat"] == refund_msat
        rec = await sc.rt.gate.sessions.repo.get(got["session_id"])
        assert rec.status == SessionStatus.CLOSED and rec.spent_msat == 12 * UNIT_MSAT
    finally:
        await sc.runner.cleanup()
        await up_runner.cleanup()


async def test_an_idle_session_is_refunded_by_the_server(node_factory, tmp_path):
    l1, l2 = node_factory.line_graph(2, wait_for_announce=True)
    up_runner, up_url, seen = await start_upstream()
    node = ClnNode(l2.rpc.socket_path)
    await node.connect()
    sc = await start_sidecar(make_config(tmp_path, routes(up_url, idle_s=1)), node=node)
    try:
        give_outbound_liquidity(l1, l2)
        import aiohttp
        async with aiohttp.ClientSession() as http:
            async with http.get(sc.url + "/gen?n=1") as r:
                (ch,) = [c for c in pa.parse_challenges(r.headers.getall("WWW-Authenticate")) if c.intent == "session"]
            req = pa.decode_request(ch)
            paid = l1.rpc.call("xpay", {"invstring": req["depositInvoice"]})
            ret = l1.rpc.call("invoice", {"amount_msat": "any", "label": "ret", "description": "refund"})
            auth = pa.format_session_credential(ch, {"action": "open", "preimage": paid["payment_preimage"],
                                                     "returnInvoice": ret["bolt11"]})
            async with http.get(sc.url + "/gen?n=1", headers={"Authorization": auth}) as r:
                assert r.status == 200 and b'data: {"i": 0}' in await r.read()
        await asyncio.sleep(2.1)
        assert await sc.rt.gate.sessions.close_idle() == 1
        (inv,) = l1.rpc.listinvoices("ret")["invoices"]
        assert inv["status"] == "paid" and inv["amount_received_msat"] == (DEPOSIT_UNITS - 1) * UNIT_MSAT
    finally:
        await sc.runner.cleanup()
        await up_runner.cleanup()


SLOW_ROUTES = """
service = "llm"
upstream = "{up}"
[[routes]]
method = "GET"
path = "/slow"
price_msat = 2000
[routes.session]
deposit_units = 100
idle_timeout_s = 1
"""


async def test_a_payer_killed_mid_session_is_refunded_by_the_servers_idle_close(node_factory, tmp_path):
    """kill -9 of the paying lightningd while its micropay-fetch reads a session stream:
    nothing is paid twice, and the server's idle close refunds exactly what was not
    served to the payer's return invoice, which the restarted node receives."""
    from aiohttp import web
    from pyln.client import LightningRpc

    from ..conftest import serve_app
    from .test_kill_campaigns import KILLED, _quietly, kill_and_restart
    l1, l2 = node_factory.line_graph(2, opts=[opts(may_reconnect=True, broken_log=KILLED), {"may_reconnect": True}],
                                     wait_for_announce=True)
    written = []

    async def slow(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(80):
            await resp.write(f"data: {json.dumps({'i': i})}\n\n".encode())
            written.append(i)
            await asyncio.sleep(0.1)
        await resp.write(b"data: [DONE]\n\n")
        return resp
    up = web.Application()
    up.router.add_get("/slow", slow)
    up_runner, up_url = await serve_app(up)
    node = ClnNode(l2.rpc.socket_path)
    await node.connect()
    sc = await start_sidecar(make_config(tmp_path, SLOW_ROUTES.format(up=up_url)), node=node)
    ledger = sc.rt.gate.sessions
    try:
        give_outbound_liquidity(l1, l2)
        assert await wait_until(lambda: no_htlcs(l1))
        start = to_us_msat(l1)
        rpc1 = LightningRpc(l1.rpc.socket_path)
        fetching = asyncio.ensure_future(asyncio.to_thread(
            _quietly, rpc1.call, "micropay-fetch", {"url": sc.url + "/slow", "session": True, "max_msat": 10_000}))
        for _ in range(300):
            if len(written) >= 10:
                break
            await asyncio.sleep(0.05)
        assert len(written) >= 10, "the stream never started"
        await asyncio.to_thread(kill_and_restart, l1, l2)
        await fetching                               # the RPC's connection died with lightningd
        await asyncio.to_thread(l1.wait_channel_active, l1.get_channel_scid(l2))

        (deposit,) = [i for i in l2.rpc.listinvoices()["invoices"] if i["status"] == "paid" and i["label"] != "liquidity"]
        sid = deposit["payment_hash"]
        await asyncio.sleep(ledger.lease_s + 1.1)    # past the lease and the 1 s idle timeout
        await ledger.flush_leases()
        assert await ledger.close_idle() == 1
        rec = await ledger.repo.get(sid)
        assert rec.status == SessionStatus.CLOSED and rec.refund_status == RefundStatus.SUCCEEDED
        assert rec.deposit_msat == 100 * 2000 and 0 < rec.spent_msat < rec.deposit_msat
        assert rec.refund_msat == rec.deposit_msat - rec.spent_msat
        # the restarted payer got the refund on its return invoice, once
        (ret,) = [i for i in l1.rpc.listinvoices()["invoices"] if i["label"].startswith("micropay-return-")]
        assert ret["status"] == "paid" and ret["amount_received_msat"] == rec.refund_msat
        # one deposit paid, once; over the session the payer lost exactly the units spent
        assert [p["status"] for p in l1.rpc.listsendpays()["payments"] if p["payment_hash"] == sid] == ["complete"]
        assert await wait_until(lambda: no_htlcs(l1))
        assert start - to_us_msat(l1) == rec.spent_msat
        assert await ledger.close_idle() == 0                    # closed once, refunded once
        print(f"killed after {len(written)} events written; {rec.spent_msat // 2000} units spent, "
              f"{rec.refund_msat} msat refunded")
    finally:
        await sc.runner.cleanup()
        await up_runner.cleanup()


async def test_the_merchants_lightningd_killed_mid_refund_pays_it_exactly_once(node_factory, tmp_path):
    """kill -9 of the merchant's lightningd while a close's refund is in flight (its HTLC
    held by the payer's node): the close does not guess; after the restart the node's
    record settles it, the refund is paid exactly once, and the store agrees with what
    the payer's node received."""
    from micropay.core.errors import PaymentUnknown

    from .test_kill_campaigns import KILLED, kill_and_restart
    from .util import helper_plugin
    refund_msat = (DEPOSIT_UNITS - 1) * UNIT_MSAT          # the open's event spends one unit
    l1, l2 = node_factory.line_graph(
        2, opts=[{"may_reconnect": True, "plugin": helper_plugin("hold"), "hold-msat": refund_msat},
                 {"may_reconnect": True, "broken_log": KILLED}], wait_for_announce=True)
    up_runner, up_url, seen = await start_upstream()
    node = ClnNode(l2.rpc.socket_path)
    await node.connect()
    sc = await start_sidecar(make_config(tmp_path, routes(up_url)), node=node)
    ledger = sc.rt.gate.sessions
    try:
        give_outbound_liquidity(l1, l2)
        assert await wait_until(lambda: no_htlcs(l1))
        import aiohttp
        async with aiohttp.ClientSession() as http:
            async with http.get(sc.url + "/gen?n=1") as r:
                (ch,) = [c for c in pa.parse_challenges(r.headers.getall("WWW-Authenticate")) if c.intent == "session"]
            paid = l1.rpc.call("xpay", {"invstring": pa.decode_request(ch)["depositInvoice"]})
            ret = l1.rpc.call("invoice", {"amount_msat": "any", "label": "ret", "description": "refund"})
            auth = pa.format_session_credential(ch, {"action": "open", "preimage": paid["payment_preimage"],
                                                     "returnInvoice": ret["bolt11"]})
            async with http.get(sc.url + "/gen?n=1", headers={"Authorization": auth}) as r:
                assert r.status == 200
        sid = pa.decode_request(ch)["paymentHash"]
        await asyncio.sleep(ledger.lease_s + 0.1)
        await ledger.flush_leases()
        assert await wait_until(lambda: no_htlcs(l1))
        before = to_us_msat(l1)
        closing = asyncio.ensure_future(ledger.close(sid))
        await asyncio.to_thread(l1.daemon.wait_for_log, "holding an HTLC")     # the refund is out
        await asyncio.to_thread(kill_and_restart, l2, l1)
        try:
            await closing
            raise AssertionError("the close reported an outcome it could not know")
        except PaymentUnknown:
            pass
        assert (await ledger.repo.get(sid)).status == SessionStatus.REFUNDING
        await asyncio.to_thread(l2.wait_channel_active, l2.get_channel_scid(l1))

        # another sidecar process, later: it finishes the close from the node's record
        later = ClnNode(l2.rpc.socket_path)
        await later.connect()
        resumer = await resume_until_closed(ledger.repo, later, sid, 60)
        await assert_refunded_once(ledger.repo, sid, l1, l2, refund_msat)
        assert to_us_msat(l1) - before == refund_msat
        assert await resumer.resume() == 0
        await later.close()
    finally:
        await sc.runner.cleanup()
        await up_runner.cleanup()
