"""Our Nostr primitives against rust-nostr's (the nostr-sdk Python bindings), a code base
that is not ours: events either side signs verify on the other, and NIP-44 / NIP-04
payloads either side encrypts decrypt on the other."""
from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings, strategies as st

from micropay.nostr import nip04, nip44
from micropay.nostr.event import parse_event, sign_event
from micropay.nostr.keys import Keys, NostrError

n = pytest.importorskip("nostr_sdk", reason="nostr-sdk is not installed (pip install '.[test]')")

TEXT = st.text(min_size=1, max_size=3000).filter(lambda s: 1 <= len(s.encode("utf-8", "surrogatepass")) <= 65535
                                                 and s.encode("utf-8", "ignore") == s.encode("utf-8", "surrogatepass"))


def theirs(keys: Keys):
    return n.Keys.parse(keys.secret.hex())


def their_pub(keys: Keys):
    return n.PublicKey.parse(keys.pubkey)


@settings(max_examples=60, deadline=None)
@given(TEXT)
def test_nip44_both_directions(text):
    a, b = Keys.generate(), Keys.generate()
    ours = nip44.encrypt(text, nip44.conversation_key(a, b.pubkey))
    assert n.nip44_decrypt(theirs(b).secret_key(), their_pub(a), ours) == text
    sealed = n.nip44_encrypt(theirs(a).secret_key(), their_pub(b), text, n.Nip44Version.V2)
    assert nip44.decrypt(sealed, nip44.conversation_key(b, a.pubkey)) == text


@pytest.mark.parametrize("size", [1, 31, 32, 33, 64, 65, 100, 255, 256, 257, 1000, 4097, 65000])
def test_padding_matches_theirs(size):
    """rust-nostr's payload for a message of `size` bytes has exactly our padded length
    (rust-nostr 0.45 refuses to encrypt above about 65,000 bytes, below NIP-44's 65,535)."""
    a, b = Keys.generate(), Keys.generate()
    sealed = n.nip44_encrypt(theirs(a).secret_key(), their_pub(b), "x" * size, n.Nip44Version.V2)
    assert len(base64.b64decode(sealed)) == 1 + 32 + 2 + nip44.padded_len(size) + 32
    assert nip44.padded_len(size) >= size


def test_nip44_refuses_tampering_and_other_keys():
    a, b, c = Keys.generate(), Keys.generate(), Keys.generate()
    conv = nip44.conversation_key(a, b.pubkey)
    raw = bytearray(base64.b64decode(nip44.encrypt("pay 1000 msat", conv)))
    for i in (0, 5, 40, len(raw) - 1):            # version, nonce, ciphertext, MAC
        bad = bytearray(raw)
        bad[i] ^= 1
        with pytest.raises(NostrError):
            nip44.decrypt(base64.b64encode(bytes(bad)).decode(), conv)
    with pytest.raises(NostrError):
        nip44.decrypt(base64.b64encode(bytes(raw)).decode(), nip44.conversation_key(c, b.pubkey))
    for junk in ("", "#future", "x" * 200, "!" * 140, base64.b64encode(b"\x02" * 98).decode() + "==", None):
        with pytest.raises(NostrError):
            nip44.decrypt(junk, conv)  # type: ignore[arg-type]
    with pytest.raises(NostrError):
        nip44.encrypt("", conv)
    with pytest.raises(NostrError):
        nip44.encrypt("x" * 65536, conv)
    assert nip44.decrypt(nip44.encrypt("x" * 65535, conv), conv) == "x" * 65535


def test_nip04_both_directions():
    a, b = Keys.generate(), Keys.generate()
    text = '{"method":"get_info","params":{}} é'
    assert n.nip04_decrypt(theirs(b).secret_key(), their_pub(a), nip04.encrypt(text, a, b.pubkey)) == text
    assert nip04.decrypt(n.nip04_encrypt(theirs(a).secret_key(), their_pub(b), text), b, a.pubkey) == text
    for junk in ("abc", "abc?iv=def", "?iv=" + base64.b64encode(bytes(16)).decode(), "a?iv=b?iv=c"):
        with pytest.raises(NostrError):
            nip04.decrypt(junk, b, a.pubkey)


@pytest.mark.parametrize("content", ["", "plain", 'quote " backslash \\ newline \n tab \t', "é ✓ \u2028 \x01 \x7f"])
def test_events_verify_on_both_sides(content):
    ours_keys = Keys.generate()
    ours = sign_event(ours_keys, 23194, content, [["p", Keys.generate().pubkey], ["expiration", "1800000000"]])
    parsed = n.Event.from_json(json.dumps(ours.as_json()))
    assert parsed.verify() and parsed.id().to_hex() == ours.id
    built = (n.EventBuilder(n.Kind(23195), content)
             .tags([n.Tag.parse(["e", ours.id]), n.Tag.parse(["p", ours_keys.pubkey])])
             .finalize(n.Keys.generate()))
    event = parse_event(json.loads(built.as_json()))
    assert event.id == built.id().to_hex() and event.first("e") == ours.id and event.content == content


def test_parse_event_refuses_forgeries_and_junk():
    keys = Keys.generate()
    good = sign_event(keys, 1, "hello").as_json()
    assert parse_event(good).content == "hello"
    other = sign_event(Keys.generate(), 1, "hello").as_json()
    forged = [
        {**good, "content": "hellO"},                           # id no longer matches
        {**good, "sig": other["sig"]},                          # someone else's signature
        {**good, "pubkey": other["pubkey"]},                    # claims another author
        {**good, "kind": True}, {**good, "kind": 70000}, {**good, "created_at": "1"},
        {**good, "tags": [[]]}, {**good, "tags": [["p", 1]]}, {**good, "tags": "p"},
        {**good, "id": good["id"].upper()}, {**good, "pubkey": "00" * 32},
        {k: v for k, v in good.items() if k != "sig"}, [good], "event",
    ]
    for bad in forged:
        with pytest.raises(NostrError):
            parse_event(bad)


def test_keys_never_show_the_secret():
    keys = Keys.generate()
    assert keys.secret.hex() not in repr(keys) and keys.pubkey in repr(keys)
    for bad in (b"\x00" * 32, b"\xff" * 32, b"\x01" * 31):
        with pytest.raises(NostrError):
            Keys(bad)
