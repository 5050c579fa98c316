"""ClnRpc against a fake lightningd on a unix socket: out-of-order replies, errors,
timeouts, reconnection. (The real thing is exercised by the regtest tier.)"""
import asyncio
import json
import os

import pytest

from micropay.errors import DuplicateLabel, NodeError, PaymentFailed
from micropay.lightning.cln import ClnNode, ClnRpc, ClnRpcError, liquidity_failure
from micropay.tlv import TlvError, onion_payload_records, parse_tlv_stream


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
    assert info.value.detail["cln_code"] == 205 and liquidity_failure(info.value)
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


def test_tlv_stream_parsing():
    record = b'{"action":"stream"}'
    stream = bytes([2, 1, 7]) + b"\xfe" + (7629169).to_bytes(4, "big") + bytes([len(record)]) + record
    assert parse_tlv_stream(stream)[7629169] == record
    with_length = bytes([len(stream)]) + stream
    assert onion_payload_records(with_length.hex())[2] == b"\x07"
    with pytest.raises(TlvError):
        parse_tlv_stream(b"\x02\x05ab")


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_tlv_parser_only_raises_tlv_error(data):
    try:
        parse_tlv_stream(data)
    except TlvError:
        pass
