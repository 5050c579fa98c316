import re

import pytest
from hypothesis import given, settings, strategies as st

from micropay.core.errors import MalformedCredential
from micropay.l402.wire import challenge_headers, format_authorization, parse_authorization, parse_challenges

MAC = "AgEEdGVzdAJCAAA="
PRE = "ab" * 32


@pytest.mark.parametrize("header", [f"L402 {MAC}:{PRE}", f"LSAT {MAC}:{PRE}", f"l402 {MAC}:{PRE}",
                                    f"L402 {MAC}:{PRE.upper()}", f"L402  {MAC} : {PRE} "])
def test_credential_variants(header):
    cred = parse_authorization(header)
    assert cred.macaroons == (MAC,)
    assert cred.preimage == bytes.fromhex(PRE)


def test_several_macaroons_before_the_colon():
    cred = parse_authorization(f"L402 {MAC},AgEE_-x:{PRE}")
    assert cred.macaroons == (MAC, "AgEE_-x")


def test_other_schemes_are_not_ours():
    assert parse_authorization("Bearer abc") is None
    assert parse_authorization(None) is None
    assert parse_authorization("") is None


@pytest.mark.parametrize("header", [f"L402 {MAC}", f"L402 {MAC}:abc", f"L402 :{PRE}", f"L402 {MAC},!:{PRE}",
                                    f"L402 {MAC}:{'ab ' * 21}a",
                                    "L402 " + "A" * 9000 + f":{PRE}", f"LSAT {MAC}:{PRE[:-1]}g"])
def test_malformed_credentials(header):
    with pytest.raises(MalformedCredential):
        parse_authorization(header)


def test_bad_base64_in_the_primary_macaroon_is_malformed_when_decoded():
    from micropay.l402.macaroon import Macaroon
    cred = parse_authorization(f"L402 {MAC}!:{PRE}")
    with pytest.raises(MalformedCredential):
        Macaroon.deserialize(cred.macaroons[0])


def test_format_roundtrip():
    assert parse_authorization(format_authorization(MAC, PRE)).preimage.hex() == PRE


def test_challenge_headers_parse_for_every_client_style():
    values = challenge_headers(MAC, "lnbcrt1xyz")
    # bLIP-26 style: token= and version
    assert 'version="0"' in values[0] and f'token="{MAC}"' in values[0]
    # our parser, headers separate or joined into one (as requests joins them)
    for vals in (values, [", ".join(values)]):
        found = parse_challenges(vals)
        assert {c.scheme for c in found} == {"L402", "LSAT"}
        assert all(c.macaroon == MAC and c.invoice == "lnbcrt1xyz" for c in found)
    # Aperture-matching regex clients (l402-requests style) reading the joined header
    joined = ", ".join(values)
    assert re.search(r'macaroon="(.*?)"', joined).group(1) == MAC
    assert re.search(r'invoice="(.*?)"', joined).group(1) == "lnbcrt1xyz"


def test_aperture_style_challenge_is_understood():
    found = parse_challenges([f'LSAT macaroon="{MAC}", invoice="lnbc1"', f'L402 macaroon="{MAC}", invoice="lnbc1"'])
    assert len(found) == 2


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300))
def test_authorization_parser_only_raises_malformed(text):
    for value in (text, "L402 " + text, "LSAT " + text + ":" + PRE):
        try:
            parse_authorization(value)
        except MalformedCredential:
            pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=200), max_size=3))
def test_challenge_parser_never_raises(values):
    parse_challenges(values)


_maybe_int = st.one_of(st.none(), st.integers(0, 2**63), st.booleans(), st.floats(0, 1e9))


@settings(max_examples=300, deadline=None)
@given(resource=st.text(max_size=60), price=st.one_of(st.integers(1, 2**50), st.floats(1, 1e9)), invoice=st.text(max_size=40),
       payment_hash=st.text(max_size=64), expires_at=st.integers(0, 2**40), macaroon=st.text(max_size=40),
       credits=_maybe_int, valid_until=_maybe_int, description=st.text(max_size=60))
def test_the_402_body_written_out_is_json_dumps_of_the_body(resource, price, invoice, payment_hash, expires_at,
                                                            macaroon, credits, valid_until, description):
    """The gate writes the 402's JSON directly (payment_required_json); it is the same
    text json.dumps gives for payment_required_body, for any text in any field."""
    import json

    from micropay.l402.wire import payment_required_body, payment_required_json
    kw = dict(resource=resource, price_msat=price, invoice=invoice, payment_hash=payment_hash, expires_at=expires_at,
              macaroon=macaroon, credits=credits, valid_until=valid_until, description=description)
    assert payment_required_json(**kw) == json.dumps(payment_required_body(**kw))
