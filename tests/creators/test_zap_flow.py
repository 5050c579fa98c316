"""Zaps end to end on the sandbox: the payRequest advertises the server's Nostr key, a zap
request built and signed by rust-nostr (not our code) goes to the callback, the invoice
commits to that request, and after payment the receipt is on a real relay on loopback,
where rust-nostr finds it and verifies it."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
import urllib.parse
from datetime import timedelta

import aiohttp
import pytest

from ..conftest import make_config, start_sidecar

n = pytest.importorskip("nostr_sdk", reason="nostr-sdk is not installed (pip install '.[test]')")

TOML = """
service = "creator"
[creators]
zap_private_relays = true
[[addresses]]
name = "alice"
description = "Zap Alice"
comment_allowed = 100
nostr_key_file = "zap.key"
"""


async def get(url: str, **params):
    async with aiohttp.ClientSession() as s:
        async with s.get(url, params=params or None) as r:
            return r.status, json.loads(await r.read())


def zap_request(sender, relay: str, amount: int, recipient: str, content: str = "Great stream!") -> str:
    tags = [["relays", relay], ["amount", str(amount)], ["p", recipient]]
    builder = n.EventBuilder(n.Kind(9734), content).tags([n.Tag.parse(t) for t in tags])
    return builder.finalize(sender).as_json()


async def test_a_zap_is_paid_and_its_receipt_found_on_the_relay(tmp_path, nostr_relay):
    (tmp_path / "cfg").mkdir()
    cfg_text = TOML.replace('"zap.key"', json.dumps(str(tmp_path / "cfg" / "zap.key")))
    sc = await start_sidecar(make_config(tmp_path, cfg_text))
    try:
        key_file = tmp_path / "cfg" / "zap.key"
        assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
        status, pr = await get(f"{sc.url}/.well-known/lnurlp/alice")
        assert status == 200 and pr["allowsNostr"] is True and len(pr["nostrPubkey"]) == 64
        sender, creator = n.Keys.generate(), n.Keys.generate().public_key().to_hex()
        text = zap_request(sender, nostr_relay.url, 21_000, creator)
        # the amount in the request must match the callback's
        status, bad = await get(pr["callback"], amount="20000", nostr=text)
        assert status == 400 and bad["status"] == "ERROR" and "amount" in bad["reason"]
        status, ans = await get(pr["callback"], amount="21000", nostr=text)
        assert status == 200, ans
        dec = await sc.rt.node.decode(ans["pr"])
        assert dec.amount_msat == 21_000
        assert dec.description_hash == hashlib.sha256(text.encode()).hexdigest()   # NIP-57: the request itself
        paid = await sc.payer.pay(ans["pr"])

        client = n.Client()
        await client.add_relay(n.RelayUrl.parse(nostr_relay.url))
        await client.connect()
        try:
            flt = n.Filter().kind(n.Kind(9735)).pubkey(n.PublicKey.parse(creator)) \
                .author(n.PublicKey.parse(pr["nostrPubkey"]))
            found = []
            for _ in range(50):
                found = list(await client.fetch_events(n.ReqTarget.auto([flt]), timedelta(seconds=2)))
                if found:
                    break
                await asyncio.sleep(0.1)
        finally:
            await client.shutdown()
        assert len(found) == 1
        receipt = found[0]
        assert receipt.verify()
        tags = {t[0]: t[1] for t in json.loads(receipt.as_json())["tags"] if len(t) > 1}
        assert tags["bolt11"] == ans["pr"] and tags["description"] == text
        assert tags["p"] == creator and tags["P"] == sender.public_key().to_hex()
        assert tags["preimage"] == paid.preimage
        assert hashlib.sha256(bytes.fromhex(tags["preimage"])).hexdigest() == dec.payment_hash
        # the tip is stored as a zap, with the request's content as its message
        rows = await sc.rt.store.query("SELECT status FROM micropay_zap_receipts")
        assert rows == [("published",)]
        tip = (await sc.rt.creators.service.list())["tips"][0]
        assert tip["zap"]["sender"] == sender.public_key().to_hex() and tip["zap"]["content"] == "Great stream!"
    finally:
        await sc.runner.cleanup()


async def test_a_zap_to_a_relay_that_is_down_is_retried_later(tmp_path, nostr_relay):
    from micropay.creators import zap_outbox
    cfg_text = TOML.replace('"zap.key"', json.dumps(str(tmp_path / "zap.key")))
    sc = await start_sidecar(make_config(tmp_path, cfg_text))
    try:
        _, pr = await get(f"{sc.url}/.well-known/lnurlp/alice")
        text = zap_request(n.Keys.generate(), nostr_relay.url, 5_000, n.Keys.generate().public_key().to_hex())
        nostr_relay.stop()
        _, ans = await get(pr["callback"], amount="5000", nostr=text)
        await sc.payer.pay(ans["pr"])
        for _ in range(200):
            rows = await sc.rt.store.query("SELECT status, attempts, last_error FROM micropay_zap_receipts")
            if rows and int(rows[0][1]) >= 1:
                break
            await asyncio.sleep(0.05)
        status, attempts, error = rows[0]
        assert status == "pending" and int(attempts) == 1 and nostr_relay.url in error
        # the relay comes back; the next attempt (due after the backoff) reaches it
        nostr_relay.start()
        outbox = sc.rt.creators.outbox
        outbox.clock = lambda: 2 ** 40      # past the backoff
        await outbox.publish_due()
        assert await sc.rt.store.query("SELECT status FROM micropay_zap_receipts") == [("published",)]
        assert zap_outbox.MAX_ATTEMPTS > 1
    finally:
        await sc.runner.cleanup()


async def test_zaps_refused_where_no_key_is_configured(tmp_path):
    sc = await start_sidecar(make_config(tmp_path, TOML.replace('nostr_key_file = "zap.key"\n', "")))
    try:
        status, pr = await get(f"{sc.url}/.well-known/lnurlp/alice")
        assert "allowsNostr" not in pr
        text = zap_request(n.Keys.generate(), "wss://relay.example", 5_000, n.Keys.generate().public_key().to_hex())
        status, doc = await get(pr["callback"], amount="5000", nostr=text)
        assert status == 400 and doc == {"status": "ERROR", "reason": "this address does not accept zaps"}
        assert urllib.parse.urlsplit(pr["callback"]).path == "/lnurlp/alice/callback"
    finally:
        await sc.runner.cleanup()

