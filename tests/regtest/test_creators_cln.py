"""Creators on a real network: node A tips B's Lightning Address (B's sidecar over Core
Lightning), B forwards its collaborators' shares to C and D exactly once, also when B's
lightningd is killed -9 while D's share is held in flight, and an overlay hears each tip
within 50 ms of lightningd's settlement; a stream from A pays B's address every interval,
the stream's metadata arriving as each tip's comment; a zap paid from another node gets
its receipt on a loopback relay.

l1 (A, payer, micropay plugin) -> l2 (B, the creator) -> l3 (C) -> l4 (D, holds HTLCs
of exactly 777,777 msat for 10 s). What each collaborator received is read on its own
node (its keysend invoices), not from B's records."""
import asyncio
import hashlib
import json

import aiohttp
from pyln.testing.utils import wait_for

from micropay.games.apikeys import create_key

from ..conftest import make_config, start_sidecar
from .test_games_cln import TimedClnNode, read_event
from .test_kill_campaigns import KILLED, kill_and_restart
from .test_l402_cln import wait_until
from .util import helper_plugin, opts

HOLD_MSAT = 777_777
CREATOR = """
service = "band"
[backend]
kind = "cln"
rpc_file = "{rpc}"
[[addresses]]
name = "band"
description = "Tips for the band"
comment_allowed = 200
keep_share = 2
split_max_fee_msat = 5000
splits = [{{ destination = "{carol}", share = 1, name = "carol" }},
          {{ destination = "{dave}", share = 1, name = "dave" }}]
"""


async def creator_sidecar(tmp_path, rpc_file, carol, dave):
    node = TimedClnNode(rpc_file)
    await node.connect()
    return await start_sidecar(make_config(tmp_path, CREATOR.format(rpc=rpc_file, carol=carol, dave=dave)),
                               node=node)


async def get_json(url, **params):
    async with aiohttp.ClientSession() as s:
        async with s.get(url, params=params or None) as r:
            return r.status, json.loads(await r.read())


def keysends_received(node) -> list[int]:
    return [inv["amount_received_msat"] for inv in node.rpc.listinvoices()["invoices"]
            if inv["status"] == "paid" and inv["label"].startswith("keysend")]


async def test_a_tip_split_among_collaborators_once_with_lightningd_killed_mid_forward(node_factory, tmp_path):
    l1, l2, l3, l4 = node_factory.line_graph(
        4, opts=[{"may_reconnect": True}, {"may_reconnect": True, "broken_log": KILLED},
                 {"may_reconnect": True}, {"may_reconnect": True, "plugin": helper_plugin("hold")}],
        wait_for_announce=True)
    sc = await creator_sidecar(tmp_path, l2.rpc.socket_path, l3.info["id"], l4.info["id"])
    service = sc.rt.creators.service
    try:
        status, pay_request = await get_json(f"{sc.url}/.well-known/lnurlp/band")
        assert status == 200 and pay_request["tag"] == "payRequest"
        tip_msat = 4 * HOLD_MSAT              # carol and dave 1/4 each: exactly the held amount
        status, answer = await get_json(pay_request["callback"], amount=str(tip_msat), comment="for the band")
        assert status == 200, answer
        # an overlay listens for tips (SSE) while the tip is paid
        key, _ = await create_key(sc.rt.store, "overlay", ["events:read"])
        http = aiohttp.ClientSession()
        events = await http.get(f"{sc.url}/v1/events", headers={"Authorization": f"Bearer {key}"})
        assert events.status == 200
        # lightningd on the payer's side reads our invoice: the amount asked, the metadata's hash
        decoded = l1.rpc.decode(answer["pr"])
        assert decoded["amount_msat"] == tip_msat
        assert decoded["description_hash"] == hashlib.sha256(pay_request["metadata"].encode()).hexdigest()
        heard = asyncio.create_task(read_event(events))      # reading while the tip is paid
        await asyncio.to_thread(l1.rpc.xpay, answer["pr"])
        _, kind, data, heard_at = await heard
        await events.release()
        await http.close()
        assert kind == "tip.received" and data["data"]["tip"]["comment"] == "for the band"
        reported_at = TimedClnNode.reported[data["data"]["tip"]["payment_hash"]]
        latency_ms = (heard_at - reported_at) * 1000
        assert latency_ms < 50, f"{latency_ms:.1f} ms from lightningd's settlement to the overlay's event"

        async def tip_paid():
            page = await service.list()
            return page["tips"] and page["tips"][0]["status"] == "paid"
        assert await wait_until(tip_paid, 30)
        # D holds its share's HTLC for 10 s: kill B's lightningd while it is out
        # (blocking calls run in a thread: the sidecar under test shares this event loop)
        await asyncio.to_thread(l4.daemon.wait_for_log, f"holding an HTLC of {HOLD_MSAT} msat", timeout=60)
        await asyncio.to_thread(kill_and_restart, l2, l1, l3)

        async def shares_done():
            tip = (await service.list())["tips"][0]
            return all(s["status"] in ("paid", "failed") for s in tip["shares"])
        assert await wait_until(shares_done, 240), (await service.list())["tips"][0]["shares"]
        tip = (await service.list())["tips"][0]
        assert tip["received_msat"] == tip_msat and tip["comment"] == "for the band"
        assert [(s["name"], s["amount_msat"], s["status"]) for s in tip["shares"]] == \
            [("carol", HOLD_MSAT, "paid"), ("dave", HOLD_MSAT, "paid")]
        # each collaborator's own node received its share exactly once
        await asyncio.to_thread(wait_for, lambda: keysends_received(l4) == [HOLD_MSAT], timeout=30)
        assert keysends_received(l3) == [HOLD_MSAT]
        assert keysends_received(l4) == [HOLD_MSAT]
        # and what left B for the shares is what the tips API reports: no second payment
        labels = [p for p in l2.rpc.listsendpays()["payments"] if (p.get("label") or "").startswith(
            "micropay-tipshare-") and p["status"] == "complete"]
        assert sorted(p["amount_msat"] for p in labels) == [HOLD_MSAT, HOLD_MSAT]
        dave = tip["shares"][1]
        print(f"tip {tip_msat} msat: event {latency_ms:.1f} ms after settlement; carol {HOLD_MSAT}, dave "
              f"{HOLD_MSAT} (attempts {dave['attempts']}, fee {dave['fee_msat']} msat) after kill -9 of the "
              "creator's lightningd mid-forward")
    finally:
        await sc.runner.cleanup()


async def test_a_stream_pays_a_lightning_address_every_interval(node_factory, tmp_path):
    l1, l2, l3, l4 = node_factory.line_graph(4, opts=[opts(), {}, {}, {}], wait_for_announce=True)
    sc = await creator_sidecar(tmp_path, l2.rpc.socket_path, l3.info["id"], l4.info["id"])
    service = sc.rt.creators.service
    try:
        address = f"band@127.0.0.1:{sc.port}"
        s = l1.rpc.call("streampay-start", {"destination": address, "amount_msat": 20_000, "interval_s": 2,
                                            "max_total_msat": 65_000, "max_fee_msat": 1000,
                                            "metadata": {"podcast": "regtest radio", "sender_name": "ann",
                                                         "message": "love it"}})
        sid = s["id"]
        def status():
            return l1.rpc.call("streampay-status", {"id": sid})
        # (blocking waits run in a thread: the sidecar under test shares this event loop)
        await asyncio.to_thread(wait_for, lambda: status()["state"] == "completed", timeout=90)
        await asyncio.to_thread(wait_for, lambda: status()["in_flight"] is None, timeout=60)
        st = l1.rpc.call("streampay-status", {"id": sid})
        assert st["payments"] >= 3 and st["paid_msat"] <= 65_000

        async def all_recorded():
            tips = [t for t in (await service.list(limit=200))["tips"] if t["status"] == "paid"]
            return len(tips) == st["payments"]
        assert await wait_until(all_recorded, 30)
        tips = [t for t in (await service.list(limit=200))["tips"] if t["status"] == "paid"]
        # each payment is one tip of what the stream paid in it (the last one may be what the
        # budget had left), and together exactly what the stream says it paid
        assert all(0 < t["received_msat"] <= 20_000 for t in tips)
        assert sum(t["received_msat"] for t in tips) == st["paid_msat"]
        assert all(t["comment"].startswith("ann: love it | regtest radio | micropay stream ") for t in tips), \
            [t["comment"] for t in tips]
        seqs = sorted(int(t["comment"].rsplit("#", 1)[1]) for t in tips)
        assert len(set(seqs)) == len(seqs)                     # one tip per stream payment
        # each interval's tip was split too: the collaborators' nodes got their shares
        await asyncio.to_thread(wait_for, lambda: len(keysends_received(l3)) == len(tips), timeout=60)
        # carol's shares add up to exactly a quarter of all tips (remainders carried, none lost)
        assert sum(keysends_received(l3)) == sum(t["received_msat"] for t in tips) // 4
        print(f"stream to {address}: {st['payments']} payments, {st['paid_msat']} msat, "
              f"fees {st['fees_msat']} msat; {len(tips)} tips recorded with the stream's comment")
    finally:
        await sc.runner.cleanup()


ZAPPED = """
service = "zaps"
[backend]
kind = "cln"
rpc_file = "{rpc}"
[creators]
zap_private_relays = true
[[addresses]]
name = "zapme"
description = "Zap me"
nostr_key_file = "{key}"
"""


async def test_a_zap_paid_from_another_node_gets_its_receipt_on_the_relay(node_factory, tmp_path, nostr_relay):
    """A zap request signed by rust-nostr, paid by lightningd on another node: the receipt
    on the loopback relay verifies, carries the preimage of the invoice l1 paid, and its
    description is the zap request the invoice committed to."""
    from datetime import timedelta
    import nostr_sdk as n
    l1, l2 = node_factory.line_graph(2, wait_for_announce=True)
    node = TimedClnNode(l2.rpc.socket_path)
    await node.connect()
    sc = await start_sidecar(make_config(tmp_path, ZAPPED.format(rpc=l2.rpc.socket_path,
                                                                 key=tmp_path / "zap.key")), node=node)
    try:
        _, pr = await get_json(f"{sc.url}/.well-known/lnurlp/zapme")
        sender, zapped = n.Keys.generate(), n.Keys.generate().public_key().to_hex()
        tags = [["relays", nostr_relay.url], ["amount", "21000"], ["p", zapped]]
        request = n.EventBuilder(n.Kind(9734), "from a real node").tags(
            [n.Tag.parse(t) for t in tags]).finalize(sender).as_json()
        status, answer = await get_json(pr["callback"], amount="21000", nostr=request)
        assert status == 200, answer
        decoded = l1.rpc.decode(answer["pr"])
        assert decoded["description_hash"] == hashlib.sha256(request.encode()).hexdigest()
        paid = await asyncio.to_thread(l1.rpc.xpay, answer["pr"])
        client = n.Client()
        await client.add_relay(n.RelayUrl.parse(nostr_relay.url))
        await client.connect()
        try:
            flt = n.Filter().kind(n.Kind(9735)).author(n.PublicKey.parse(pr["nostrPubkey"]))
            found = []
            for _ in range(100):
                found = list(await client.fetch_events(n.ReqTarget.auto([flt]), timedelta(seconds=2)))
                if found:
                    break
                await asyncio.sleep(0.1)
        finally:
            await client.shutdown()
        assert len(found) == 1 and found[0].verify()
        tags = {t[0]: t[1] for t in json.loads(found[0].as_json())["tags"] if len(t) > 1}
        assert tags["description"] == request and tags["bolt11"] == answer["pr"] and tags["p"] == zapped
        assert tags["preimage"] == paid["payment_preimage"]
        print(f"zap of 21000 msat from l1: receipt {found[0].id().to_hex()[:16]}... on {nostr_relay.url}, verified")
    finally:
        await sc.runner.cleanup()
