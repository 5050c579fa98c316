"""ClnRpc against a fake lightningd on a unix socket: out-of-order replies, errors,
timeouts, reconnection. (The real thing is exercised by the regtest tier.)"""
import asyncio
import json
import os

import pytest

from micropay.core.errors import DuplicateLabel, NodeError, PaymentFailed
from micropay.lightning.cln import ClnNode, ClnRpc, ClnRpcError


class FakeLightningd:
    """Answers each request after `delay` seconds taken from its params, so replies
    can come back in another order than the calls went out."""

    def __init__(self, path):
        self.path, self.server, self.calls, self.conns = str(path), None, [], []

    async def start(self):
        self.server = await asyncio.start_unix_server(self.handle, self.path)

    async def handle(self, reader, writer):
        self.conns.append(writer)
        dec, buf = json.JSONDecoder(), ""
        while True:
            data = await reader.read(4096)
            if not data:
                return
            buf += data.decode()
            while buf.strip():
                try:
                    msg, end = dec.raw_decode(buf.lstrip())
                except json.JSONDecodeError:
                    break
                buf = buf.lstrip()[end:]
                self.calls.append(msg["method"])
                asyncio.create_task(self.reply(writer, msg))

    async def reply(self, writer, msg):
        params = msg["params"]
        await asyncio.sleep(params.get("delay", 0))
        if msg["method"] == "invoice":
            out = {"error": {"code": 900, "message": "Duplicate label"}}
        elif msg["method"] == "xpay":
            out = {"error": {"code": 205, "message": "no route"}}
        elif msg["method"] == "listsendpays":
            out = {"result": {"payments": []}}
        elif msg["method"] == "listinvoices":
            out = {"result": {"invoices": [{"bolt11": "lnbcrt1x", "payment_hash": "aa", "amount_msat": 5,
                                            "description": "other", "expires_at": 1}]}}
        elif msg["method"] == "decode":
            out = {"result": {"valid": True, "payment_hash": "bb", "created_at": 1, "expiry": 60}}
        else:
            out = {"result": {"echo": params.get("n")}}
        writer.write((json.dumps({"jsonrpc": "2.0", "id": msg["id"], **out}) + "\n\n").encode())
        await writer.drain()

    def drop_connections(self):
        for w in self.conns:
            w.close()
        self.conns.clear()

    async def stop(self):
        self.drop_connections()
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def fake(tmp_path):
    f = FakeLightningd(tmp_path / "lightning-rpc")
    await f.start()
    yield f
    await f.stop()


async def test_concurrent_calls_are_matched_by_id(fake):
    rpc = ClnRpc(fake.path)
    results = await asyncio.gather(*(rpc.call("echo", {"n": i, "delay": (5 - i) * 0.01}) for i in range(5)))
    assert [r["echo"] for r in results] == list(range(5))
    await rpc.close()


async def test_errors_are_typed(fake):
    node = ClnNode(fake.path)
    with pytest.raises(DuplicateLabel):          # 900 with different amount/description
        await node.create_invoice(1000, "taken", "mine", 60)
    with pytest.raises(PaymentFailed) as info:
        await node.pay("lnbcrt1x")
    assert info.value.detail["cln_code"] == 205 and info.value.no_liquidity
    with pytest.raises(ClnRpcError) as err:
        await node.rpc.call("invoice", {})
    assert err.value.cln_code == 900 and "Duplicate label" in err.value.message
    await node.close()


async def test_timeout_and_reconnect(fake):
    rpc = ClnRpc(fake.path, timeout_s=0.05)
    with pytest.raises(NodeError, match="no answer"):
        await rpc.call("echo", {"n": 1, "delay": 1})
    fake.drop_connections()                       # lightningd restarted under us
    await asyncio.sleep(0.05)
    assert (await rpc.call("echo", {"n": 2}))["echo"] == 2
    await rpc.close()


async def test_unreachable_node_is_a_clear_error(tmp_path):
    with pytest.raises(NodeError, match="cannot connect to lightningd"):
        await ClnRpc(tmp_path / "nothing-here").call("getinfo")


async def test_long_socket_paths_are_reached(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    fake = FakeLightningd(deep / "lightning-rpc")
    # binding needs a short path too: bind from inside the directory
    cwd = os.getcwd()
    os.chdir(deep)
    try:
        fake.path = "lightning-rpc"
        await fake.start()
    finally:
        os.chdir(cwd)
    rpc = ClnRpc(deep / "lightning-rpc")
    assert len(str(deep / "lightning-rpc")) > 108
    assert (await rpc.call("echo", {"n": 7}))["echo"] == 7
    await rpc.close()
    await fake.stop()


async def read_requests(reader, n):
    """n JSON-RPC requests as ClnRpc writes them (one JSON object after another)."""
    dec, buf, out = json.JSONDecoder(), "", []
    while len(out) < n:
        buf += (await reader.read(4096)).decode()
        while buf.strip():
            try:
                msg, end = dec.raw_decode(buf.lstrip())
            except json.JSONDecodeError:
                break
            buf = buf.lstrip()[end:]
            out.append(msg)
    return out


async def test_replies_are_framed_on_bytes_not_on_reads(tmp_path):
    """A UTF-8 character split across two socket writes, several replies in one write,
    and replies of several megabytes, all arrive intact."""
    path = str(tmp_path / "rpc")
    big = "é€𝄞" * 300_000                                   # ~2.7 MB of multi-byte text

    async def handle(reader, writer):
        requests = await read_requests(reader, 3)
        replies = b"".join((json.dumps({"jsonrpc": "2.0", "id": r["id"], "result": {"text": big if i == 1 else "é"}},
                                       ensure_ascii=False) + "\n\n").encode() for i, r in enumerate(requests))
        cut = replies.index("é".encode()) + 1                  # inside the first é
        for piece in (replies[:cut], replies[cut:cut + 7], replies[cut + 7:]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)
        await asyncio.sleep(1)
    server = await asyncio.start_unix_server(handle, path)
    rpc = ClnRpc(path)
    try:
        results = await asyncio.gather(*(rpc.call("m", {}) for _ in range(3)))
    finally:
        await rpc.close()
        server.close()
    assert [r["text"] for r in results] == ["é", big, "é"]


async def test_an_8mb_reply_in_small_pieces(tmp_path):
    path = str(tmp_path / "rpc")
    invoices = [{"label": f"l{i}", "bolt11": "lnbcrt" + "x" * 200, "description": "ü" * 50} for i in range(25_000)]

    async def handle(reader, writer):
        req, = await read_requests(reader, 1)
        reply = (json.dumps({"jsonrpc": "2.0", "id": req["id"], "result": {"invoices": invoices}},
                            ensure_ascii=False) + "\n\n").encode()
        assert len(reply) > 8_000_000
        for i in range(0, len(reply), 65_521):                 # odd piece size: characters get split
            writer.write(reply[i:i + 65_521])
            await writer.drain()
    server = await asyncio.start_unix_server(handle, path)
    rpc = ClnRpc(path)
    try:
        got = await rpc.call("listinvoices", {"x": 1})
    finally:
        await rpc.close()
        server.close()
    assert got["invoices"] == invoices
