"""The plugin never holds up its node: payments into the plugin's node, and forwarded
through it, take as long while a micropay-fetch or a micropay-payout waits as they do
otherwise. lightningd calls the plugin's htlc_accepted hook for every one of them."""
import http.server
import statistics
import threading
import time

from pyln.client import LightningRpc

from .util import helper_plugin, opts

SLOW_S = 10
HOLD_MSAT = 777_777      # plugins/hold.py holds HTLCs of exactly this amount for 10 s
MARGIN_S = 0.100


def allowed(baseline: list[float]) -> float:
    """The slowest a payment may take while the plugin waits: the slowest idle one plus
    100 ms or half of it, whichever is more. A held-up plugin delays HTLCs by seconds
    (its waits here last 10 s); on a slow host an idle payment alone varies by a few
    hundred ms, which a flat 100 ms mistook for blocking."""
    return max(baseline) + max(MARGIN_S, 0.5 * max(baseline))


class SlowHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(SLOW_S)
        body = b"slow answer"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def paid_in(src, dst, amount=10_000) -> float:
    inv = dst.rpc.invoice(amount, f"lat-{time.monotonic_ns()}", "latency")["bolt11"]
    started = time.monotonic()
    src.rpc.xpay(inv)
    return time.monotonic() - started


def in_background(fn):
    out = {}

    def run():
        started = time.monotonic()
        try:
            out["result"] = fn()
        except Exception as exc:   # reported by the caller
            out["error"] = exc
        out["took"] = time.monotonic() - started
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def check_unaffected(l1, l2, l3, baseline_in, baseline_fwd, what):
    for _ in range(3):
        into, through = paid_in(l1, l2), paid_in(l1, l3)
        assert into <= allowed(baseline_in), f"payment into the plugin's node took {into:.3f}s {what}"
        assert through <= allowed(baseline_fwd), f"forward through it took {through:.3f}s {what}"


def test_payments_in_and_through_are_not_held_up_by_slow_methods(node_factory):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    slow_url = f"http://127.0.0.1:{server.server_address[1]}/slow"
    l1, l2, l3 = node_factory.line_graph(
        3, opts=[{}, opts(**{"micropay-payout-player-day-msat": 10_000_000,
                             "micropay-payout-day-msat": 10_000_000}), {"plugin": helper_plugin("hold")}],
        wait_for_announce=True)
    for _ in range(2):                                  # warm up routes
        paid_in(l1, l2), paid_in(l1, l3)
    baseline_in = [paid_in(l1, l2) for _ in range(5)]
    baseline_fwd = [paid_in(l1, l3) for _ in range(5)]

    # a micropay-fetch waiting 10 s on its upstream
    rpc2 = LightningRpc(l2.rpc.socket_path)
    t, fetched = in_background(lambda: rpc2.call("micropay-fetch", {"url": slow_url}))
    time.sleep(1)
    check_unaffected(l1, l2, l3, baseline_in, baseline_fwd, "while micropay-fetch waited")
    t.join(30)
    assert "error" not in fetched, fetched.get("error")
    assert fetched["result"]["status"] == 200 and fetched["took"] >= SLOW_S

    # a micropay-payout whose HTLC the payee holds for 10 s
    inv = l3.rpc.invoice(HOLD_MSAT, "held", "held payout")["bolt11"]
    t, payout = in_background(lambda: rpc2.call("micropay-payout", {"player_id": "p1", "destination": inv,
                                                                     "idempotency_key": "held-1"}))
    l3.daemon.wait_for_log("holding an HTLC")
    check_unaffected(l1, l2, l3, baseline_in, baseline_fwd, "while micropay-payout waited")
    t.join(30)
    assert "error" not in payout, payout.get("error")
    assert payout["result"]["status"] == "paid" and payout["took"] >= 9
    print(f"baseline into l2: median {statistics.median(baseline_in) * 1000:.0f} ms, "
          f"through l2: median {statistics.median(baseline_fwd) * 1000:.0f} ms")
    server.shutdown()


async def test_payments_are_not_held_up_while_nwc_requests_wait(node_factory, nostr_relay):
    """l2 serves NWC: while a pay_invoice it was asked for is held by the payee for 10 s and
    NWC requests keep arriving, payments into and through l2 take as long as when idle."""
    import asyncio

    from micropay.nwc.uri import parse_uri

    from .test_nwc_cln import Watcher
    l1, l2, l3 = node_factory.line_graph(
        3, opts=[{}, opts(**{"micropay-nwc-relay": nostr_relay.url}), {"plugin": helper_plugin("hold")}],
        wait_for_announce=True)
    for _ in range(2):
        paid_in(l1, l2), paid_in(l1, l3)
    baseline_in = [paid_in(l1, l2) for _ in range(5)]
    baseline_fwd = [paid_in(l1, l3) for _ in range(5)]
    uri = parse_uri(l2.rpc.call("micropay-nwc-create", {"name": "busy", "budget_msat": 10_000_000})["uri"])
    client = Watcher(nostr_relay.url, uri)
    await client.start()
    await asyncio.sleep(0.5)
    held = l3.rpc.invoice(HOLD_MSAT, "held-nwc", "held NWC payment")
    rid = await client.pay(held["bolt11"])
    await asyncio.to_thread(l3.daemon.wait_for_log, "holding an HTLC")
    for _ in range(20):                                  # and a stream of requests meanwhile
        await client.send("get_balance", {})
    await asyncio.to_thread(check_unaffected, l1, l2, l3, baseline_in, baseline_fwd,
                            "while an NWC pay_invoice waited")
    assert await client.wait_answer(rid, 30)
    assert client.for_request(rid)[0]["result"]["preimage"]
    await client.relay.close()
