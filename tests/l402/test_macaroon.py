import base64
import os

import pytest
from hypothesis import given, settings, strategies as st
from pymacaroons import Macaroon as PyMacaroon, MACAROON_V2, Verifier
from pymacaroons.serializers import BinarySerializer

from micropay.core.errors import MalformedCredential
from micropay.l402.macaroon import Macaroon, b64decode_any

ROOT = b"k" * 32


def test_roundtrip_preserves_everything():
    m = Macaroon.mint(ROOT, b"\x00\x00" + os.urandom(64), "micropay:abcd", (b"a=1", b"path=/x"))
    back = Macaroon.deserialize(m.serialize())
    assert back == m
    assert back.verify_signature(ROOT)
    assert not back.verify_signature(b"x" * 32)


def test_pymacaroons_reads_and_verifies_our_tokens():
    ident = b"\x00\x00" + bytes(range(64))
    m = Macaroon.mint(ROOT, ident, "micropay:k1", (b"services=demo:0", b"credits=3"))
    theirs = PyMacaroon.deserialize(m.serialize(), serializer=BinarySerializer())
    assert theirs.identifier_bytes == ident
    assert theirs.location == "micropay:k1"
    assert [c.caveat_id_bytes for c in theirs.caveats] == [b"services=demo:0", b"credits=3"]
    v = Verifier()
    v.satisfy_general(lambda c: True)
    assert v.verify(theirs, ROOT)
    assert theirs.signature == m.signature.hex()  # pymacaroons keeps it hex-encoded


def test_we_read_and_verify_pymacaroons_v2_tokens():
    theirs = PyMacaroon(location="elsewhere", identifier=b"\x00\x00" + b"\x01" * 64, key=ROOT,
                        version=MACAROON_V2)
    theirs.add_first_party_caveat("services=demo:0")
    theirs.add_first_party_caveat("demo_valid_until=99")
    ours = Macaroon.deserialize(theirs.serialize(serializer=BinarySerializer()))
    assert ours.location == "elsewhere"
    assert ours.caveats == (b"services=demo:0", b"demo_valid_until=99")
    assert ours.verify_signature(ROOT)


def test_attenuation_matches_a_fresh_mint_and_cannot_drop_caveats():
    base = Macaroon.mint(ROOT, b"id", caveats=(b"a=1",))
    narrowed = base.add_first_party_caveat(b"b=2")
    assert narrowed.verify_signature(ROOT)
    assert narrowed.signature == Macaroon.mint(ROOT, b"id", caveats=(b"a=1", b"b=2")).signature
    dropped = Macaroon(narrowed.identifier, (b"b=2",), narrowed.signature)
    assert not dropped.verify_signature(ROOT)


def test_urlsafe_and_unpadded_base64_accepted():
    m = Macaroon.mint(ROOT, b"\xff\xfe" * 40, caveats=(b"x=\xfb\xff",))
    raw = m.to_bytes()
    url = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    assert Macaroon.deserialize(url) == m


@pytest.mark.parametrize("blob", [b"", b"\x01abc", b"\x02", b"\x02\x02\x05ab", b"\x02\x09\x01a\x00\x00",
                                  b"\x02\x02\x02id\x00\x00\x06\x05short"])
def test_malformed_binary_is_rejected_cleanly(blob):
    with pytest.raises(MalformedCredential):
        Macaroon.from_bytes(blob)


def test_trailing_bytes_rejected():
    m = Macaroon.mint(ROOT, b"id")
    with pytest.raises(MalformedCredential):
        Macaroon.from_bytes(m.to_bytes() + b"\x00")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_anything_else(blob):
    try:
        Macaroon.from_bytes(b"\x02" + blob)
    except MalformedCredential:
        pass


@settings(max_examples=200, deadline=None)
@given(ident=st.binary(min_size=1, max_size=100), caveats=st.lists(st.binary(min_size=1, max_size=80), max_size=6),
       loc=st.text(max_size=20))
def test_roundtrip_property(ident, caveats, loc):
    m = Macaroon.mint(ROOT, ident, loc, tuple(caveats))
    assert Macaroon.from_bytes(m.to_bytes()) == m


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_b64_decoder_only_raises_malformed(text):
    try:
        b64decode_any(text)
    except MalformedCredential:
        pass


@pytest.mark.parametrize("size", [0, 1, 32, 63, 64, 65, 100, 200])
def test_fast_hmac_matches_the_standard_library_for_every_key_length(size):
    import hashlib
    import hmac
    from micropay.core.hmacs import FixedKeyHmac, hmac_sha256 as _hmac
    key, msg = bytes(range(size % 256)) * (size // 256 + 1), b"caveat = value"
    key = key[:size]
    expected = hmac.digest(key, msg, hashlib.sha256)
    assert _hmac(key, msg) == expected
    assert FixedKeyHmac(key)(msg) == expected


@settings(max_examples=300, deadline=None)
@given(ident=st.binary(min_size=1, max_size=200), caveats=st.lists(st.binary(min_size=1, max_size=200), max_size=6),
       location=st.text(max_size=150))
def test_the_short_field_encoding_is_the_general_one(ident, caveats, location):
    """to_bytes writes macaroons whose fields are all short in one join: the same bytes
    as the field-by-field encoder, whatever the lengths."""
    m = Macaroon.mint(b"k" * 32, ident, location, tuple(caveats))
    assert m.to_bytes() == m._fields_bytes()
    assert Macaroon.from_bytes(m.to_bytes()) == m
