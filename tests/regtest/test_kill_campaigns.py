"""kill -9 at randomised moments on a real network, then the invariants:

- streams: each recipient received exactly what the payer's records say it was paid,
  no sequence paid twice, paid + fees within the budget, owed + paid exact per interval;
- payouts: every payout the payee was paid for is recorded paid (never failed), the
  caps hold, and none is left 'sending': a payment lightningd recorded and was killed
  before sending (pending, no HTLC) is settled failed after the grace, freeing its caps;
- micropay-fetch: no invoice paid twice, every payment the node made is in the client's
  ledger;
- purchases: every paid purchase is paid and its webhook delivered (a duplicate carries
  the same event id);
- credits: never more requests served than credits bought;
- a killed plugin takes its supervised sidecar with it and comes back with `plugin start`.

Each campaign prints its seed; MICROPAY_KILL_SEED replays one.
"""
import http.server
import json
import os
import random

import signal
import threading
import time
import urllib.error
import urllib.request

import pytest
from pyln.client import LightningRpc, RpcError
from pyln.testing.utils import wait_for

from micropay.games.payouts import LEASE_S
from micropay.lightning.outcome import ORPHAN_GRACE_S

from .test_fetch_and_supervision import _up, alive, free_port, sidecar_pids
from .util import helper_plugin, opts

SEED = int(os.environ.get("MICROPAY_KILL_SEED", str(int(time.time()))))
# a killed lightningd leaves these behind; they are what a kill looks like, not bugs of ours
KILLED = "Killing plugin|connection to lightningd closed"


def rng(name: str) -> random.Random:
    print(f"{name}: seed {SEED} (MICROPAY_KILL_SEED={SEED} replays it)")
    return random.Random(f"{SEED}-{name}")


def kill_and_restart(node, *peers) -> None:
    node.daemon.kill()                  # SIGKILL: no shutdown, no flush beyond what is on disk
    # lightningd (--dev-save-plugin-io) may have been cut off writing its copy of a hook or
    # notification; the harness parses those copies at teardown, so drop the torn ones
    io_dir = os.path.join(node.daemon.lightning_dir, "plugin-io")
    for name in os.listdir(io_dir) if os.path.isdir(io_dir) else ():
        try:
            with open(os.path.join(io_dir, name)) as f:
                json.load(f)
        except ValueError:
            os.unlink(os.path.join(io_dir, name))
    node.start()
    for peer in peers:
        try:
            node.rpc.connect(peer.info["id"], "localhost", peer.port)
        except RpcError:
            pass


def stream_status(node, sid):
    return node.rpc.call("streampay-status", {"id": sid})


def settled(node, sid, timeout=120):
    wait_for(lambda: stream_status(node, sid)["in_flight"] is None, timeout=timeout)
    return stream_status(node, sid)


def received(node, sid):
    got = node.rpc.call("streampay-received", {"stream_id": sid})["sessions"]
    return got[0] if got else {"received_msat": 0, "payments": 0, "distinct_seqs": 0}


def test_kill_the_payers_lightningd_mid_split_stream(node_factory):
    r = rng("split stream")
    l1, l2, l3 = node_factory.line_graph(3, opts=opts(may_reconnect=True, broken_log=KILLED),
                                         wait_for_announce=True)
    sid = l1.rpc.call("streampay-start", {
        "destination": l2.info["id"], "amount_msat": 4000, "interval_s": 1, "max_total_msat": 1_000_000,
        "splits": [{"destination": l2.info["id"], "share": 1}, {"destination": l3.info["id"], "share": 3}]})["id"]
    kills = 0
    for _ in range(3):
        before = stream_status(l1, sid)["payments"]
        wait_for(lambda: stream_status(l1, sid)["payments"] >= before + r.randint(1, 6), timeout=90)
        time.sleep(r.uniform(0, 0.9))            # anywhere in a payment's life
        kill_and_restart(l1, l2)
        kills += 1
        l1.wait_channel_active(l1.get_channel_scid(l2))
    wait_for(lambda: stream_status(l1, sid)["payments"] >= 20, timeout=120)
    l1.rpc.call("streampay-stop", {"id": sid})
    st = settled(l1, sid)
    host, guest = st["recipients"]
    for node, rcpt in ((l2, host), (l3, guest)):
        wait_for(lambda node=node, rcpt=rcpt: received(node, sid)["received_msat"] == rcpt["paid_msat"], timeout=60)
        got = received(node, sid)
        assert got["payments"] == got["distinct_seqs"]                 # no sequence paid twice
    assert host["paid_msat"] + host["owed_msat"] == 1000 * st["intervals"]
    assert guest["paid_msat"] + guest["owed_msat"] == 3000 * st["intervals"]
    assert st["paid_msat"] + st["fees_msat"] <= 1_000_000
    print(f"split stream: {kills} kills, {st['payments']} payments, {st['failures']} failures, "
          f"{st['missed_intervals']} intervals skipped, 0 violations")


HOLD_MSAT = 777_777
# A dead payout payment is seen by the resume loop once a lease has run out, and again
# a grace later (each look takes a lease): this long after a restart it is settled.
PAYOUT_SETTLE_S = ORPHAN_GRACE_S + 3 * LEASE_S + 30


def test_kill_the_payers_lightningd_mid_payout(node_factory):
    r = rng("payout")
    cap = 2_400_000                                   # three held payouts fit, a fourth does not
    l1, l2, l3 = node_factory.line_graph(
        3, opts=[{"may_reconnect": True},
                 opts(may_reconnect=True, broken_log=KILLED, **{"micropay-payout-player-day-msat": cap,
                                                                 "micropay-payout-day-msat": 10 * cap}),
                 {"may_reconnect": True, "plugin": helper_plugin("hold")}],
        wait_for_announce=True)
    outcomes, bodies = [], {}
    for i in range(3):
        inv = l3.rpc.invoice(HOLD_MSAT, f"held-{i}", "held payout")["bolt11"]
        key = bodies[f"win-{i}"] = {"player_id": "p1", "destination": inv, "idempotency_key": f"win-{i}"}
        rpc2 = LightningRpc(l2.rpc.socket_path)
        t = threading.Thread(target=lambda key=key: _quietly(rpc2.call, "micropay-payout", key), daemon=True)
        t.start()
        time.sleep(r.uniform(0.05, 3.0))             # before, while or after the HTLC is out
        kill_and_restart(l2, l1, l3)
        t.join(30)
        l2.rpc.call("micropay-payout", key)          # the game server retries with the same key
        wait_for(lambda key=key: l2.rpc.call("micropay-payout", key)["status"] in ("paid", "failed"),
                 timeout=PAYOUT_SETTLE_S)
        final = l2.rpc.call("micropay-payout", key)
        paid_at_payee = l3.rpc.listinvoices(f"held-{i}")["invoices"][0]["status"] == "paid"
        assert final["status"] == ("paid" if paid_at_payee else "failed"), (final, paid_at_payee)
        outcomes.append(final["status"])
    # the cap counts every payout the payee was paid for, and only those: with three paid,
    # a fourth is refused; with fewer (a failed or dead one gave its share back), it fits
    inv = l3.rpc.invoice(HOLD_MSAT, "held-3", "one too many")["bolt11"]
    fourth = bodies["win-3"] = {"player_id": "p1", "destination": inv, "idempotency_key": "win-3"}
    keys = [f"win-{i}" for i in range(3)]
    if outcomes.count("paid") == 3:
        with pytest.raises(RpcError) as refused:
            l2.rpc.call("micropay-payout", fourth)
        assert refused.value.error["code"] == 1414, refused.value.error  # the cap, not a conflict
    else:
        l2.rpc.call("micropay-payout", fourth)       # not refused by the cap
        keys.append("win-3")
    # no payout is left 'sending' (issue 17, section 7): each is paid or failed, and a
    # failed one's payment is failed at l2 or dead there (pending with no HTLC behind it)
    wait_for(lambda: all(_payout(l2, bodies[k])["status"] != "sending" for k in keys), timeout=PAYOUT_SETTLE_S)
    sendpays = l2.rpc.listsendpays()["payments"]
    htlcs = {h["payment_hash"] for c in l2.rpc.listpeerchannels()["channels"] for h in c.get("htlcs", [])}
    dead = 0
    for k in keys:
        p = _payout(l2, bodies[k])
        parts = [x["status"] for x in sendpays if x["payment_hash"] == p["payment_hash"]]
        if p["status"] == "failed":
            assert "complete" not in parts, (p, parts)
            assert p["payment_hash"] not in htlcs, p
            dead += "pending" in parts
        else:
            assert p["status"] == "paid" and "complete" in parts, (p, parts)
    paid = sum(HOLD_MSAT for i in range(4) if l3.rpc.listinvoices(f"held-{i}")["invoices"][0]["status"] == "paid")
    assert paid <= cap
    assert paid == HOLD_MSAT * sum(_payout(l2, bodies[k])["status"] == "paid" for k in keys)
    print(f"payouts: 3 kills, outcomes {outcomes}, {dead} dead payments settled failed, {paid} msat paid "
          f"against a {cap} cap, none left sending, 0 violations")


def _payout(node, body):
    """The payout, as micropay-payout answers a retry with the same key (it never pays twice)."""
    return node.rpc.call("micropay-payout", body)


def _quietly(fn, *args):
    try:
        fn(*args)
    except Exception:
        pass


def test_kill_lightningd_mid_micropay_fetch(node_factory, tmp_path):
    r = rng("fetch")
    port = free_port()
    cfg = tmp_path / "sidecar.toml"
    cfg.write_text('service = "k"\ndemo = true\n[[routes]]\nmethod = "GET"\npath = "/api/joke"\nprice_msat = 7000\n')
    l1, l2 = node_factory.line_graph(2, opts=[opts(may_reconnect=True, broken_log=KILLED),
                                              opts(may_reconnect=True, **{"micropay-listen": f"127.0.0.1:{port}",
                                                                          "micropay-sidecar-config": str(cfg)})],
                                     wait_for_announce=True)
    url = f"http://127.0.0.1:{port}/api/joke"
    wait_for(lambda: _up(f"http://127.0.0.1:{port}"))
    for _ in range(3):
        rpc1 = LightningRpc(l1.rpc.socket_path)
        t = threading.Thread(target=lambda: _quietly(rpc1.call, "micropay-fetch", {"url": url}), daemon=True)
        t.start()
        time.sleep(r.uniform(0.0, 0.4))
        kill_and_restart(l1, l2)
        t.join(30)
        l1.wait_channel_active(l1.get_channel_scid(l2))
        answer = _fetch_until_known(l1, url)
        if answer.get("dead"):
            # the same, settled by the rule (lightning/outcome.py): the client found the
            # payment dead after the grace and gave its budget back, and the server
            # offered the same invoice again (it reuses a pending challenge), which this
            # node can no longer pay; the client refuses it rather than wait for ever
            with open(os.path.join(l1.daemon.lightning_dir, "regtest", "micropay", "fetch-client.json")) as f:
                ledger = json.load(f)
            assert not [h for h, s in ledger["spends"].items() if s["status"] == "paying"], ledger["spends"]
            assert ledger["dead"], ledger
            print(f"fetch: a payment lightningd recorded and never sent settled dead ({answer['dead']}); "
                  "stopping the campaign there")
            break
        if answer.get("orphaned"):
            # lightningd recorded the part and was killed before it sent the HTLC: it
            # keeps that part pending with nothing behind it, so the invoice can neither
            # be paid again nor complete (seen with v26.06.6). micropay says "outcome
            # unknown" and pays nothing twice; later fetches would meet the same invoice.
            print(f"fetch: lightningd holds {answer['orphaned']} pending with no HTLC; stopping the campaign there")
            break
        assert answer["status"] == 200
    paid_by_l1 = {p["payment_hash"] for p in l1.rpc.listsendpays()["payments"] if p["status"] == "complete"}
    paid_at_l2 = [i["payment_hash"] for i in l2.rpc.listinvoices()["invoices"] if i["status"] == "paid"]
    assert len(paid_at_l2) == len(set(paid_at_l2)) and set(paid_at_l2) <= paid_by_l1
    with open(os.path.join(l1.daemon.lightning_dir, "regtest", "micropay", "fetch-client.json")) as f:
        ledger = json.load(f)
    recorded = {h for h, s in ledger["spends"].items() if s["status"] == "paid"}
    assert paid_by_l1 <= recorded | {h for h, s in ledger["spends"].items() if s["status"] == "paying"}
    print(f"fetch: 3 kills, {len(paid_by_l1)} payments, every one in the client's ledger, 0 violations")


def _fetch_until_known(node, url, tries=3):
    """micropay-fetch after a restart. A payment from before the kill that lightningd
    still holds pending is waited for (up to a minute); if it is still pending then, the
    answer is 1505 "outcome unknown" and, as documented, the next request finishes it.
    If lightningd keeps it pending with no HTLC behind it (killed between recording the
    part and sending it), the client settles it dead after the grace and asks for a new
    invoice; a server that offers the dead one again is refused: {"dead": message}.
    Still unknown after `tries`: {"orphaned": [hashes]}."""
    for attempt in range(tries):
        try:
            return node.rpc.call("micropay-fetch", {"url": url})
        except RpcError as exc:
            if exc.error["code"] == 1520:          # PaymentNeverLeft: dead at this node
                assert "dead at this node" in exc.error["message"], exc.error
                return {"dead": exc.error["message"]}
            if exc.error["code"] != 1505:
                raise
            if attempt == tries - 1:
                pending = [p["payment_hash"] for p in node.rpc.listsendpays()["payments"] if p["status"] == "pending"]
                htlcs = [h for c in node.rpc.listpeerchannels()["channels"] for h in c.get("htlcs", [])]
                if pending and not htlcs:
                    return {"orphaned": pending}
                raise
            print(f"fetch: outcome unknown after restart ({exc.error['message']}); asking again")


class Receiver(http.server.BaseHTTPRequestHandler):
    got: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.got.append((self.headers["Micropay-Event-Id"], json.loads(body)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


def test_kill_the_sidecar_mid_purchase_and_mid_credits(node_factory, tmp_path):
    r = rng("sidecar")
    Receiver.got = []
    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    port = free_port()
    cfg = tmp_path / "sidecar.toml"
    cfg.write_text(f'''service = "k"
demo = true
[[routes]]
method = "GET"
path = "/api/fortune/*"
price_msat = 9000
credits = 5
[[catalog]]
sku = "gem"
price_msat = 5000
[[webhooks]]
name = "game"
url = "http://127.0.0.1:{hook.server_address[1]}/hook"
''')
    l1, l2 = node_factory.line_graph(2, opts=[{"may_reconnect": True},
                                              opts(may_reconnect=True, **{"micropay-listen": f"127.0.0.1:{port}",
                                                                          "micropay-sidecar-config": str(cfg)})],
                                     wait_for_announce=True)
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: _up(base))
    key = _api_key(l2, cfg)
    paid_purchases = []
    for i in range(3):                             # kill -9 between settlement and webhook delivery
        p = _post(f"{base}/v1/purchases", {"sku": "gem", "player_id": f"p{i}", "idempotency_key": f"k{i}"}, key)
        pid = sidecar_pids(l2)[-1]
        threading.Thread(target=lambda p=p: l1.rpc.xpay(p["invoice"]), daemon=True).start()
        time.sleep(r.uniform(0.0, 0.3))
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda pid=pid: sidecar_pids(l2)[-1] != pid)
        wait_for(lambda: _up(base))
        paid_purchases.append(p["id"])
    for pid in paid_purchases:
        wait_for(lambda pid=pid: _get(f"{base}/v1/purchases/{pid}", key)["status"] == "paid", timeout=60)
        wait_for(lambda pid=pid: any(e["data"]["purchase"]["id"] == pid for _, e in Receiver.got), timeout=60)
    ids = {}
    for event_id, event in Receiver.got:           # duplicates carry the same event id
        assert ids.setdefault(event["data"]["purchase"]["id"], event_id) == event_id
    # credits: 5 bought, concurrent requests, the sidecar killed mid-way
    auth = _buy_fortune(l1, base)
    served, lock = [], threading.Lock()

    def spend():
        for _ in range(4):
            try:
                with urllib.request.urlopen(urllib.request.Request(f"{base}/api/fortune/1",
                                                                   headers={"Authorization": auth}), timeout=5):
                    with lock:
                        served.append(1)
            except (urllib.error.HTTPError, OSError):
                pass
    threads = [threading.Thread(target=spend) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(r.uniform(0.0, 0.2))
    os.kill(sidecar_pids(l2)[-1], signal.SIGKILL)
    for t in threads:
        t.join(60)
    wait_for(lambda: _up(base))
    spend()
    assert len(served) <= 5                        # never more served than bought
    hook.shutdown()
    print(f"sidecar: 4 kills, {len(paid_purchases)} purchases paid with webhooks, {len(served)} of 5 credits "
          "served, 0 violations")


def _api_key(node, cfg) -> str:
    import subprocess
    import sys
    data = os.path.join(node.daemon.lightning_dir, "regtest", "micropay")
    out = subprocess.run([sys.executable, "-m", "micropay.cli", "apikey", "create", "--name", "kill",
                          "--scope", "purchases:write", "--scope", "purchases:read", "--config", str(cfg),
                          "--data-dir", data, "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["key"]


def _post(url, body, key):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _get(url, key):
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"}),
                                timeout=10) as resp:
        return json.loads(resp.read())


def _buy_fortune(l1, base) -> str:
    try:
        urllib.request.urlopen(f"{base}/api/fortune/1", timeout=10)
    except urllib.error.HTTPError as e:
        doc = json.loads(e.read())
    paid = l1.rpc.xpay(doc["invoice"])
    return f"L402 {doc['macaroon']}:{paid['payment_preimage']}"


def _child(parent: int, name: bytes) -> int:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().split(")")[-1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if ppid == parent and name in cmdline:
            return int(entry)
    raise AssertionError(f"no child {name!r} of {parent}")


def test_a_killed_plugin_takes_its_sidecar_along_and_comes_back(node_factory, tmp_path):
    port = free_port()
    cfg = tmp_path / "sidecar.toml"
    cfg.write_text('service = "k"\ndemo = true\n')
    l1, l2 = node_factory.line_graph(2, opts=[opts(broken_log=KILLED,
                                                   **{"micropay-listen": f"127.0.0.1:{port}",
                                                      "micropay-sidecar-config": str(cfg)}), opts()],
                                     wait_for_announce=True)
    sid = l1.rpc.call("streampay-start", [l2.info["id"], 1000, 1, 200_000])["id"]
    wait_for(lambda: stream_status(l1, sid)["payments"] >= 3, timeout=60)
    wait_for(lambda: _up(f"http://127.0.0.1:{port}"))
    sidecar = sidecar_pids(l1)[-1]
    plugin_pid = _child(l1.daemon.proc.pid, b"micropay-plugin")
    os.kill(plugin_pid, signal.SIGKILL)
    l1.daemon.wait_for_log("micropay-plugin: Killing plugin: exited during normal operation")
    with pytest.raises(RpcError, match="Unknown command"):
        l1.rpc.call("streampay-status", {"id": sid})
    wait_for(lambda: not alive(sidecar), timeout=15)             # the sidecar went with it
    before = received(l2, sid)["received_msat"]
    time.sleep(3)
    assert received(l2, sid)["received_msat"] == before          # nothing paid while it is down
    from .util import plugin_path
    l1.rpc.plugin_start(plugin_path())                            # what an operator does
    wait_for(lambda: _up(f"http://127.0.0.1:{port}"), timeout=60)  # the sidecar is back on its port
    wait_for(lambda: stream_status(l1, sid)["payments"] >= 6, timeout=60)
    st = stream_status(l1, sid)
    assert st["missed_intervals"] >= 2                            # skipped, not paid in a burst
    l1.rpc.call("streampay-stop", {"id": sid})
    st = settled(l1, sid)
    wait_for(lambda: received(l2, sid)["received_msat"] == st["paid_msat"], timeout=60)
    print(f"plugin kill: sidecar stopped with it, back after plugin start; {st['missed_intervals']} intervals "
          "skipped, 0 violations")
