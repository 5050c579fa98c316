import hashlib
import os
import stat

import pytest
from hypothesis import given, settings, strategies as st

from micropay.core.errors import ConfigError, InvalidCredential, MalformedCredential
from micropay.l402.wire import format_authorization, parse_authorization
from micropay.l402.macaroon import Macaroon
from micropay.l402.tokens import (RootKeyRing, TokenService, decode_identifier, encode_identifier,
                                  new_token_id, parse_caveats)

from ..conftest import FakeClock

PRE = os.urandom(32)
PH = hashlib.sha256(PRE).digest()


def cred(mac: Macaroon, preimage: bytes = PRE):
    return parse_authorization(format_authorization(mac.serialize(), preimage.hex()))


@pytest.fixture
def svc():
    return TokenService(RootKeyRing.ephemeral(), "demo", FakeClock())


def test_identifier_layout_matches_aperture():
    tid = os.urandom(32)
    ident = encode_identifier(PH, tid)
    assert len(ident) == 66 and ident[:2] == b"\x00\x00" and ident[2:34] == PH and ident[34:] == tid
    assert decode_identifier(ident) == (PH, tid)
    with pytest.raises(MalformedCredential):
        decode_identifier(b"\x00\x01" + ident[2:])


def test_token_ids_are_unique_and_minted_ones_sort_by_time(svc, monkeypatch):
    """A token id is 32 bytes: the time in ms, then 26 random bytes. Ids minted in a row
    sort in minting order whenever the millisecond changes between them (so the store's
    indexes on them grow at one edge), and no two are equal, also within a millisecond."""
    from micropay.l402 import tokens
    clock = iter(range(1_700_000_000_000_000_000, 1_700_000_003_001_500_000, 1_500_000))   # ns, 1.5 ms apart
    monkeypatch.setattr(tokens.time, "time_ns", lambda: next(clock))
    ids = [new_token_id() for _ in range(2000)]
    assert len(set(ids)) == 2000 and all(len(i) == 32 for i in ids)
    assert ids == sorted(ids)
    assert int.from_bytes(ids[0][:6], "big") == 1_700_000_000_000
    minted = svc.mint(PH, ["services=demo:0"])
    assert decode_identifier(minted.identifier)[1][:6] == (1_700_000_003_000).to_bytes(6, "big")
    monkeypatch.setattr(tokens.time, "time_ns", lambda: 1_700_000_000_000_000_000)
    assert len({new_token_id() for _ in range(2000)}) == 2000


def test_valid_token_verifies(svc):
    mac = svc.mint(PH, ["services=demo:0", "path=/api/*", "method=GET", "credits=3"])
    tok = svc.verify(cred(mac), "GET", "/api/x")
    assert tok.payment_hash == PH and tok.constraints.credits == 3


def test_wrong_preimage(svc):
    mac = svc.mint(PH, ["services=demo:0"])
    with pytest.raises(InvalidCredential, match="preimage"):
        svc.verify(cred(mac, os.urandom(32)), "GET", "/")


def test_forged_signature_and_foreign_key(svc):
    mac = svc.mint(PH, ["services=demo:0", "credits=1"])
    forged = Macaroon(mac.identifier, (b"services=demo:0", b"credits=1000"), mac.signature, mac.location)
    with pytest.raises(InvalidCredential, match="signature"):
        svc.verify(cred(forged), "GET", "/")
    other = TokenService(RootKeyRing.ephemeral(), "demo")
    with pytest.raises(InvalidCredential):
        other.verify(cred(mac), "GET", "/")


def test_attenuation_only_narrows(svc):
    mac = svc.mint(PH, ["services=demo:0", "path=/api/*", "credits=5"])
    narrowed = mac.add_first_party_caveat(b"path=/api/joke").add_first_party_caveat(b"credits=9")
    tok = svc.verify(cred(narrowed), "GET", "/api/joke")
    assert tok.constraints.credits == 5  # the larger repeat cannot widen
    with pytest.raises(InvalidCredential, match="path"):
        svc.verify(cred(narrowed), "GET", "/api/other")
    expiring = mac.add_first_party_caveat(f"demo_valid_until={int(svc.clock()) - 1}".encode())
    with pytest.raises(InvalidCredential, match="expired"):
        svc.verify(cred(expiring), "GET", "/api/x")


def test_expiry_follows_the_clock(svc):
    mac = svc.mint(PH, ["services=demo:0", f"demo_valid_until={int(svc.clock()) + 10}"])
    svc.verify(cred(mac), "GET", "/")
    svc.clock.advance(11)
    with pytest.raises(InvalidCredential, match="expired"):
        svc.verify(cred(mac), "GET", "/")  # cached verification still checks time


def test_service_method_and_capability_caveats(svc):
    mac = svc.mint(PH, ["services=other:0,demo:1", "method=GET", "demo_capabilities=read",
                        "other_capabilities=write"])
    svc.verify(cred(mac), "GET", "/", frozenset({"read"}))
    with pytest.raises(InvalidCredential, match="method"):
        svc.verify(cred(mac), "POST", "/")
    with pytest.raises(InvalidCredential, match="capability"):
        svc.verify(cred(mac), "GET", "/", frozenset({"write"}))
    not_ours = svc.mint(PH, ["services=other:0"])
    with pytest.raises(InvalidCredential, match="service"):
        svc.verify(cred(not_ours), "GET", "/")


def test_unknown_caveats_fail_closed(svc):
    for caveat in ["nonsense", "ip=1.2.3.4", "credits=-1", "credits=abc", "path=relative"]:
        mac = svc.mint(PH, [caveat])
        with pytest.raises(InvalidCredential):
            svc.verify(cred(mac), "GET", "/")


def test_rotation_keeps_old_tokens_until_retired(tmp_path):
    path = tmp_path / "keys.json"
    ring = RootKeyRing.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    svc = TokenService(ring, "demo")
    old_kid = ring.current
    old = svc.mint(PH, ["services=demo:0"])
    ring.rotate()
    new = svc.mint(PH, ["services=demo:0"])
    assert new.location != old.location
    reloaded = TokenService(RootKeyRing.load_or_create(path), "demo")
    reloaded.verify(cred(old), "GET", "/")
    reloaded.verify(cred(new), "GET", "/")
    reloaded.keyring.retire(old_kid)
    reloaded.forget_cached()
    with pytest.raises(InvalidCredential, match="retired"):
        reloaded.verify(cred(old), "GET", "/")
    with pytest.raises(ConfigError):
        reloaded.keyring.retire(reloaded.keyring.current)


def test_world_readable_key_file_is_refused(tmp_path):
    path = tmp_path / "keys.json"
    RootKeyRing.load_or_create(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        RootKeyRing.load_or_create(path)


def test_corrupt_key_file_names_the_file_not_the_secret(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text('{"current": "x", "keys": [{"kid": "x", "secret": "zz"}]}')
    path.chmod(0o600)
    with pytest.raises(ConfigError) as info:
        RootKeyRing.load_or_create(path)
    assert str(path) in str(info.value) and "zz" not in str(info.value)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=60), max_size=8))
def test_caveat_parser_only_raises_invalid(caveats):
    try:
        parse_caveats(tuple(caveats), "demo")
    except InvalidCredential:
        pass


async def test_a_running_sidecar_picks_up_rotation_and_retirement(tmp_path):
    """`micropay keys rotate|retire` in another process reaches a running sidecar within
    a second: new tokens under the new key, a retired key's tokens refused, also the
    pass tokens its gate had already admitted."""
    import asyncio
    import json

    import aiohttp

    from micropay.l402.wire import format_authorization, parse_challenges
    from micropay.l402.macaroon import Macaroon
    from micropay.l402.tokens import RootKeyRing
    from micropay.payment import scheme as pa

    from ..conftest import make_config, start_sidecar
    sc = await start_sidecar(make_config(tmp_path))
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(sc.url + "/api/echo") as r:
                ch = parse_challenges(r.headers.getall("WWW-Authenticate"))[0]
            paid = await sc.payer.pay(ch.invoice)
            auth = format_authorization(ch.macaroon, paid.preimage)
            async with s.get(sc.url + "/api/echo", headers={"Authorization": auth}) as r:
                assert r.status == 200                                    # admitted, now cached
            # a Payment charge bound under the old key, paid, not yet presented
            async with s.get(sc.url + "/api/joke") as r:
                charge = next(c for c in pa.parse_challenges(r.headers.getall("WWW-Authenticate"))
                              if c.intent == "charge")
            charge_paid = await sc.payer.pay(pa.decode_request(charge)["methodDetails"]["invoice"])
            old = Macaroon.deserialize(ch.macaroon).location.split(":")[1]
            ring = RootKeyRing.load_or_create(sc.rt.config.data_dir / "root_keys.json")   # "another process"
            new = ring.rotate()
            ring.retire(old)
            for _ in range(40):
                if sc.rt.tokens.keyring.current == new:
                    break
                await asyncio.sleep(0.1)
            async with s.get(sc.url + "/api/joke") as r:
                fresh = parse_challenges(r.headers.getall("WWW-Authenticate"))[0]
            assert Macaroon.deserialize(fresh.macaroon).location == f"micropay:{new}"
            async with s.get(sc.url + "/api/echo", headers={"Authorization": auth}) as r:
                doc = json.loads(await r.read())       # refused, with a challenge under the new key
                assert r.status == 402 and "retired" in doc["detail"] and doc["error"] == "invalid_credential"
                assert Macaroon.deserialize(doc["macaroon"]).location == f"micropay:{new}"
            # the retired key binds no Payment challenge either: its paid charge is refused
            async with s.get(sc.url + "/api/joke",
                             headers={"Authorization": pa.format_credential(charge, charge_paid.preimage)}) as r:
                doc = json.loads(await r.read())
                assert r.status == 402 and doc["error"] == "payment_unknown_challenge", doc
    finally:
        await sc.runner.cleanup()


def test_the_client_reads_caveats_as_the_server_does():
    """One reading of caveats: the client's cached scope is the verifier's, leniently."""
    from micropay.client.payer import _token_from
    from micropay.l402.macaroon import Macaroon
    from micropay.l402.tokens import parse_caveats
    mac = Macaroon.mint(b"k" * 32, b"\x00" * 66, "micropay:1")
    for c in ("services=svc:0", "path=/api/*", "credits=10", "credits=3", "credits=7", "method=GET,POST",
              "method=GET", "svc_valid_until=2000000000", "expiration=1900000000000", "other_capabilities=x"):
        mac = mac.add_first_party_caveat(c.encode())
    server = parse_caveats(mac.caveats, "svc")
    client = _token_from("http://h", mac, mac.serialize(), "", "00" * 32)
    assert server.credits == client.credits == 3                       # the smallest, on both sides
    assert server.valid_until == client.valid_until == 1_900_000_000
    assert sorted(server.methods) == client.methods == ["GET"] and list(server.paths) == client.paths
    odd = mac.add_first_party_caveat(b"credits=lots").add_first_party_caveat(b"mystery=1")
    assert _token_from("http://h", odd, odd.serialize(), "", "00" * 32).credits == 3   # skipped, not a crash
