"""NIP-57 zaps on the server's side: zap requests that rust-nostr (the nostr-sdk Python
bindings, a code base that is not ours) signs are taken, malformed ones refused with a
reason; our zap receipts verify on rust-nostr's side; and publishing a receipt to a real
relay on loopback, and to relays that are down, silent or refusing."""
from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import time
from datetime import timedelta

import aiohttp
import pytest

from micropay.creators.zap_publish import publish_receipt
from micropay.creators.zaps import (MAX_RELAYS, ZapError, ZapRequest, description_hash, parse_zap_request,
                                    receipt_filter, zap_receipt)
from micropay.nostr.event import parse_event
from micropay.nostr.keys import Keys
from tests.helpers_proc import free_port

n = pytest.importorskip("nostr_sdk", reason="nostr-sdk is not installed (pip install '.[test]')")

SERVER = Keys.generate()                      # the server's receipt key (its nostrPubkey)
CREATOR = Keys.generate().pubkey              # the person being zapped: another key
NOTE = "9ae37aa68f48645127299e9453eb5d908a0cbb6058ff340d528ed4d37c8994fb"
LNURL = "lnurl1dp68gurn8ghj7um5v93kketj9ehx2amn9uh8wetvdskkkmn0wahz7mrww4excup0dajx2mrv92x9xp"
RELAYS = ["wss://relay.damus.io", "wss://nos.lol/"]
BOLT11 = "lnbc210n1pjq9xyzpp5" + "q" * 200
PREIMAGE = "5d006d2cf1e73c7148e7519a4c68adc81642ce0e25a432b2434c99f97344c15f"


def signed(tags: list[list[str]], *, kind: int = 9734, content: str = "Zap!", keys=None) -> str:
    """A zap request as rust-nostr builds and signs it: its JSON text."""
    builder = n.EventBuilder(n.Kind(kind), content).tags([n.Tag.parse(t) for t in tags])
    return builder.finalize(keys or n.Keys.generate()).as_json()


def usual_tags(**change: list[str] | None) -> list[list[str]]:
    tags: dict[str, list[str] | None] = {"relays": ["relays", *RELAYS], "amount": ["amount", "21000"],
                                         "lnurl": ["lnurl", LNURL], "p": ["p", CREATOR], "e": ["e", NOTE],
                                         "k": ["k", "1"]}
    tags.update(change)
    return [t for t in tags.values() if t is not None]


def parse(text: str, amount_msat: int = 21000, **kw) -> ZapRequest:
    return parse_zap_request(text, amount_msat=amount_msat, nostr_pubkey=SERVER.pubkey, **kw)


# -- zap requests -------------------------------------------------------------------------
def test_takes_a_zap_request_rust_nostr_signed():
    sender = n.Keys.generate()
    text = signed([*usual_tags(), ["relays", "https://not-a-relay.example", "wss://relay.damus.io"],
                   ["P", sender.public_key().to_hex()]], keys=sender)
    req = parse(text, lnurl=LNURL.upper())
    assert req.raw == text
    assert req.recipient == CREATOR and req.recipient != SERVER.pubkey
    assert req.sender == sender.public_key().to_hex() == req.event.pubkey
    assert req.event_id == NOTE and req.coordinate is None and req.target_kind == "1"
    assert req.relays == ("wss://relay.damus.io", "wss://nos.lol/")
    assert req.amount_msat == 21000 and req.comment == "Zap!"
    assert req.event.id == json.loads(text)["id"]


def test_the_least_a_zap_request_needs():
    req = parse(signed([["p", CREATOR], ["relays", "wss://relay.example.com"]], content=""), amount_msat=1000)
    assert (req.event_id, req.coordinate, req.relays, req.comment) == (None, None, ("wss://relay.example.com",), "")


def test_a_coordinate_and_a_pinned_recipient():
    coord = f"30023:{CREATOR}:my-article"
    req = parse(signed(usual_tags(e=None, a=["a", coord])), recipient=CREATOR)
    assert req.coordinate == coord and req.event_id is None
    assert parse(signed(usual_tags(a=["a", f"10002:{CREATOR}:"]))).coordinate == f"10002:{CREATOR}:"
    with pytest.raises(ZapError, match="p tag is not"):
        parse(signed(usual_tags()), recipient=Keys.generate().pubkey)


def test_the_P_tag_may_name_the_sender_or_the_receipt_signer():
    sender = n.Keys.generate()
    assert parse(signed(usual_tags(P=["P", SERVER.pubkey]), keys=sender)).sender == sender.public_key().to_hex()
    with pytest.raises(ZapError, match="P tag"):
        parse(signed(usual_tags(P=["P", Keys.generate().pubkey]), keys=sender))


def test_relays_are_normalised_deduplicated_and_bounded():
    many = [f"wss://relay{i}.example.com" for i in range(15)]
    req = parse(signed(usual_tags(relays=["relays", "WSS://Relay0.Example.com", *many[:14]]),))
    assert req.relays == tuple(many[:MAX_RELAYS])
    local = ["relays", "ws://127.0.0.1:7777", "ws://localhost:7777", "ws://[::1]:1", "ws://10.0.0.2",
             "wss://relay.example.com"]
    assert parse(signed(usual_tags(relays=local))).relays == ("wss://relay.example.com",)
    assert parse(signed(usual_tags(relays=local)), allow_local_relays=True).relays[:2] == (
        "ws://127.0.0.1:7777", "ws://localhost:7777")
    split = usual_tags(relays=["relays", "wss://a.example.com"]) + [["relays", "wss://b.example.com"]]
    assert parse(signed(split)).relays == ("wss://a.example.com", "wss://b.example.com")


def _tampered(field: str) -> str:
    obj = json.loads(signed(usual_tags()))
    if field == "sig":
        obj["sig"] = json.loads(signed(usual_tags()))["sig"]
    else:
        obj["content"] = "Zap! (edited)"
    return json.dumps(obj)


REFUSED = {
    "a signature from another event": (lambda: _tampered("sig"), "signature"),
    "content changed after signing": (lambda: _tampered("content"), "id does not match"),
    "a text note, not a zap request": (lambda: signed(usual_tags(), kind=1), "kind 9734"),
    "no tags": (lambda: signed([]), "no tags"),
    "no p tag": (lambda: signed(usual_tags(p=None)), "must have a p tag"),
    "two p tags": (lambda: signed([*usual_tags(), ["p", Keys.generate().pubkey]]), "at most one p tag"),
    "a p tag without value": (lambda: signed(usual_tags(p=["p", ""])), "p tag has no value"),
    "a p tag not hex": (lambda: signed(usual_tags(p=["p", "npub1xyz"])), "p tag"),
    "a p tag in capitals": (lambda: signed(usual_tags(p=["p", CREATOR.upper()])), "p tag"),
    "a p tag off the curve": (lambda: signed(usual_tags(p=["p", "00" * 32])), "p tag"),
    "two e tags": (lambda: signed([*usual_tags(), ["e", NOTE[::-1]]]), "at most one e tag"),
    "an e tag not an id": (lambda: signed(usual_tags(e=["e", "note1abc"])), "e tag"),
    "two a tags": (lambda: signed([*usual_tags(a=["a", f"30023:{CREATOR}:x"]), ["a", f"30023:{CREATOR}:y"]]),
                   "at most one a tag"),
    "an a tag not a coordinate": (lambda: signed(usual_tags(a=["a", "30023:nope"])), "coordinate"),
    "an a tag of a regular kind": (lambda: signed(usual_tags(a=["a", f"1:{CREATOR}:x"])), "addressable event"),
    "two P tags": (lambda: signed([*usual_tags(P=["P", CREATOR]), ["P", CREATOR]]), "at most one P tag"),
    "an amount other than asked": (lambda: signed(usual_tags(amount=["amount", "1000"])), "21000"),
    "an amount not a number": (lambda: signed(usual_tags(amount=["amount", "21 sats"])), "whole number"),
    "two amount tags": (lambda: signed([*usual_tags(), ["amount", "21000"]]), "at most one amount"),
    "another lnurl": (lambda: signed(usual_tags(lnurl=["lnurl", "lnurl1other"])), "lnurl tag"),
    "no relays tag": (lambda: signed(usual_tags(relays=None)), "relays tag"),
    "an empty relays tag": (lambda: signed(usual_tags(relays=["relays"])), "no usable relay"),
    "no valid relay": (lambda: signed(usual_tags(relays=["relays", "https://x.example", "relay.damus.io",
                                                         "wss://u:p@x.example", "ws://"])), "no usable relay"),
    "only local relays": (lambda: signed(usual_tags(relays=["relays", "ws://127.0.0.1:1", "ws://localhost"])),
                          "no usable relay"),
    "an odd k tag": (lambda: signed(usual_tags(k=["k", "note"])), "k tag"),
    "oversized": (lambda: signed(usual_tags(), content="x" * 17000), "larger than 16384 bytes"),
    "not JSON": (lambda: "{\"kind\": 9734", "JSON"),
    "NaN": (lambda: signed(usual_tags()).replace('"kind":9734', '"kind":NaN'), "JSON"),
    "a JSON array": (lambda: json.dumps([json.loads(signed(usual_tags()))]), "not a valid Nostr event"),
    "empty": (lambda: "", "nostr parameter"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refuses_with_a_reason(case):
    make, reason = REFUSED[case]
    with pytest.raises(ZapError) as info:
        parse(make(), lnurl=LNURL)
    assert reason in str(info.value)
    assert isinstance(info.value, ValueError) and str(info.value)


def test_refuses_an_amount_that_is_no_amount():
    text = signed(usual_tags(amount=None))
    for bad in (0, -1, True, 1.5, "21000"):
        with pytest.raises(ZapError, match="positive whole number"):
            parse(text, amount_msat=bad)


# -- zap receipts -------------------------------------------------------------------------
def test_a_receipt_verifies_on_rust_nostr_and_carries_the_request():
    sender = n.Keys.generate()
    text = signed(usual_tags(a=["a", f"30023:{CREATOR}:post"]), keys=sender, content="great post ✓")
    req = parse(text)
    receipt = zap_receipt(SERVER, req, BOLT11, PREIMAGE.upper(), paid_at=1_700_000_000)
    theirs = n.Event.from_json(json.dumps(receipt.as_json()))
    assert theirs.verify() and theirs.id().to_hex() == receipt.id
    assert theirs.author().to_hex() == SERVER.pubkey and theirs.kind().as_u16() == 9735
    assert theirs.created_at().as_secs() == 1_700_000_000 and theirs.content() == ""
    tags = [t.to_vec() for t in theirs.tags()]
    assert tags == [["p", CREATOR], ["P", sender.public_key().to_hex()], ["e", NOTE],
                    ["a", f"30023:{CREATOR}:post"], ["k", "1"], ["bolt11", BOLT11], ["description", text],
                    ["preimage", PREIMAGE]]
    described = n.Event.from_json(receipt.first("description"))      # the request, as the payer signed it
    assert described.verify() and described.as_json() == text
    assert description_hash(req) == hashlib.sha256(text.encode()).digest()
    assert parse_event(receipt.as_json()) == receipt


def test_a_receipt_without_preimage_e_or_a():
    req = parse(signed([["p", CREATOR], ["relays", RELAYS[0]]]), amount_msat=5000)
    receipt = zap_receipt(SERVER, req, BOLT11, None, paid_at=1_700_000_001)
    assert [t[0] for t in receipt.tags] == ["p", "P", "bolt11", "description"]
    again = zap_receipt(SERVER, req, BOLT11, None, paid_at=1_700_000_001)
    assert again.id == receipt.id                      # paid_at makes the same payment the same event


@pytest.mark.parametrize("bolt11, preimage, paid_at", [
    ("", None, 1), ("not an invoice", None, 1), ("lnbc1" + "q" * 9000, None, 1), (BOLT11, "ab", 1),
    (BOLT11, "zz" * 32, 1), (BOLT11, None, -1), (BOLT11, None, "1700000000")])
def test_a_receipt_needs_an_invoice_a_preimage_and_a_time(bolt11, preimage, paid_at):
    req = parse(signed(usual_tags()))
    with pytest.raises(ZapError):
        zap_receipt(SERVER, req, bolt11, preimage, paid_at)


def test_receipt_filter():
    assert receipt_filter(recipient=CREATOR, authors=(SERVER.pubkey,), since=5, limit=10) == {
        "kinds": [9735], "#p": [CREATOR], "authors": [SERVER.pubkey], "since": 5, "limit": 10}
    assert receipt_filter(event_id=NOTE) == {"kinds": [9735], "#e": [NOTE]}


# -- publishing ---------------------------------------------------------------------------
def _receipt(relays: list[str]):
    req = parse(signed(usual_tags(relays=["relays", *relays])), allow_local_relays=True)
    return req, zap_receipt(SERVER, req, BOLT11, PREIMAGE, paid_at=int(time.time()))


async def test_publishes_a_receipt_a_real_relay_then_serves(nostr_relay):
    req, receipt = _receipt([nostr_relay.url])
    assert req.relays == (nostr_relay.url,)
    assert await publish_receipt(receipt, req.relays, timeout_s=10, allow_private=True) == {nostr_relay.url: None}
    assert await publish_receipt(receipt, req.relays, timeout_s=10, allow_private=True) == {nostr_relay.url: None}
    client = n.Client()
    try:
        await client.add_relay(n.RelayUrl.parse(nostr_relay.url))
        await client.connect()
        flt = n.Filter().kind(n.Kind(9735)).pubkey(n.PublicKey.parse(CREATOR)).author(n.PublicKey.parse(SERVER.pubkey))
        found = await client.fetch_events(n.ReqTarget.auto([flt]), timedelta(seconds=5))
    finally:
        await client.shutdown()
    assert [e.id().to_hex() for e in found] == [receipt.id]
    assert found[0].verify() and parse_event(json.loads(found[0].as_json())) == receipt


async def test_a_relay_that_is_down_is_an_error_string_in_time(nostr_relay):
    down = f"ws://127.0.0.1:{free_port()}"
    _, receipt = _receipt([nostr_relay.url, down])
    start = time.monotonic()
    result = await publish_receipt(receipt, [nostr_relay.url, down, "https://nope.example", down],
                                   timeout_s=3, allow_private=True)
    assert time.monotonic() - start < 3 + 2.5
    assert result[nostr_relay.url] is None
    assert isinstance(result[down], str) and result[down]
    assert "relay URL" in (result["https://nope.example"] or "")


async def test_a_silent_relay_times_out_and_a_refusing_one_says_why():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()                       # takes the TCP connection, never speaks websocket
    refusing, runner = await _refusing_relay()
    try:
        silent_url = f"ws://127.0.0.1:{silent.getsockname()[1]}"
        _, receipt = _receipt([silent_url])
        start = time.monotonic()
        result = await publish_receipt(receipt, [silent_url, refusing], timeout_s=0.5, allow_private=True)
        assert time.monotonic() - start < 0.5 + 2.5
        assert result == {silent_url: "no answer within 0.5 s", refusing: "refused: blocked: no zaps here"}
    finally:
        silent.close()
        await runner.cleanup()


async def _refusing_relay():
    from aiohttp import web

    async def serve(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            event = json.loads(msg.data)[1]
            await ws.send_str(json.dumps(["NOTICE", "hello"]))
            await ws.send_str(json.dumps(["OK", "0" * 64, True, ""]))       # someone else's event
            await ws.send_str(json.dumps(["OK", event["id"], False, "blocked: no zaps here"]))
        return ws

    app = web.Application()
    app.router.add_get("/", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return f"ws://127.0.0.1:{port}", runner


async def test_private_addresses_are_not_contacted_by_default(nostr_relay):
    _, receipt = _receipt([nostr_relay.url])
    result = await publish_receipt(receipt, [nostr_relay.url, "ws://localhost:1", "ws://[::1]:1", "ws://10.1.2.3"],
                                   timeout_s=2)
    assert all(v and "not a public address" in v for v in result.values()), result


async def test_a_session_passed_in_stays_open(nostr_relay):
    _, receipt = _receipt([nostr_relay.url])
    async with aiohttp.ClientSession() as session:
        assert await publish_receipt(receipt, [nostr_relay.url], session=session, allow_private=True) == {
            nostr_relay.url: None}
        assert not session.closed
    with pytest.raises(ValueError):
        await publish_receipt(receipt, [nostr_relay.url], timeout_s=0)
    assert await publish_receipt(receipt, []) == {}
    await asyncio.sleep(0)


async def test_names_that_resolve_to_private_addresses_are_not_contacted():
    from micropay.creators.zap_publish import _PublicResolver
    resolver = _PublicResolver()
    try:
        with pytest.raises(OSError, match="no public address"):
            await resolver.resolve("localhost", 80)          # /etc/hosts: loopback only
    finally:
        await resolver.close()


async def test_a_relay_redirecting_elsewhere_is_not_followed(nostr_relay):
    """A relay answering with a redirect (say, to an address on the server's own network)
    is refused; the redirect's target never sees a request."""
    from aiohttp import web
    from tests.conftest import serve_app
    hits = []

    async def internal(request):
        hits.append(request.path)
        return web.Response(text="internal")

    async def redirect(request):
        raise web.HTTPFound(f"{target}/internal-admin")
    inner = web.Application()
    inner.router.add_get("/{tail:.*}", internal)
    inner_runner, target = await serve_app(inner)
    outer = web.Application()
    outer.router.add_get("/{tail:.*}", redirect)
    outer_runner, relay = await serve_app(outer)
    try:
        _, receipt = _receipt([nostr_relay.url])
        url = relay.replace("http://", "ws://")
        # allow_private only lets the first hop be on loopback; the redirect is refused anyway
        result = await publish_receipt(receipt, [url], timeout_s=5, allow_private=True)
        assert result[url] is not None and "redirect" in result[url], result
        assert hits == []
    finally:
        await outer_runner.cleanup()
        await inner_runner.cleanup()
