"""The "Payment" scheme's wire format and checks (micropay/payment/scheme.py), no HTTP."""
import hashlib
import json
import os
import time

import pytest
from hypothesis import given, settings, strategies as st

from micropay.payment import scheme as pa
from micropay.core.errors import (PaymentChallengeExpired, PaymentCredentialMalformed, PaymentInvalidPreimage,
                                  PaymentSchemeError, PaymentUnknownChallenge)

NOW = 1_800_000_000
PREIMAGE = bytes(range(32))
HASH = hashlib.sha256(PREIMAGE).hexdigest()
BINDER = pa.Binder([b"k" * 32])


def challenge(binder=BINDER, **kw):
    args = dict(realm="shop", bolt11="lnbcrt10n1pexample", payment_hash=HASH, price_msat=1000,
                expires_at=NOW + 600, description="GET /api/joke", opaque={"route": "GET /api/joke", "token": "ab" * 32})
    args.update(kw)
    return pa.charge_challenge(binder, **args)


def credential(ch, preimage=PREIMAGE.hex(), **echo_changes):
    echo = dict(ch.echo(), **echo_changes)
    return "Payment " + pa.encode_object({"challenge": echo, "payload": {"preimage": preimage}})


def verify(header, now=NOW, binder=BINDER):
    return pa.verify_charge(binder, pa.parse_credential(header), realm="shop", now=now)


def test_jcs_is_sorted_compact_and_keeps_unicode():
    assert pa.jcs({"b": 1, "a": {"d": "é", "c": "\u0001\"\\"}}) == '{"a":{"c":"\\u0001\\"\\\\","d":"é"},"b":1}'.encode()


@pytest.mark.parametrize("data", [b"", b"\x00", b"\xff\xfe", b"abc", os.urandom(100)])
def test_base64url_round_trips_without_padding_and_accepts_padding(data):
    text = pa.b64url(data)
    assert "=" not in text and "+" not in text and "/" not in text
    assert pa.unb64url(text) == data
    assert pa.unb64url(text + "=" * (-len(text) % 4)) == data


@pytest.mark.parametrize("bad", ["a+b", "a/b", "ab===", "a b", "é", "x" * 20000, "abcde"])
def test_base64url_refuses_other_alphabets_and_impossible_lengths(bad):
    with pytest.raises(ValueError):
        pa.unb64url(bad)


def test_the_request_is_what_the_lightning_charge_draft_says():
    ch = challenge()
    doc = json.loads(pa.unb64url(ch.request))
    assert doc == {"amount": "1", "currency": "sat", "description": "GET /api/joke",
                   "methodDetails": {"invoice": "lnbcrt10n1pexample", "paymentHash": HASH, "network": "regtest"}}
    assert pa.jcs(doc) == pa.unb64url(ch.request)           # canonical on the wire
    assert ch.expires == "2027-01-15T08:10:00Z"              # the invoice's own expiry
    header = ch.header()
    assert header.startswith('Payment id="') and 'method="lightning"' in header and 'intent="charge"' in header


@settings(max_examples=300, deadline=None)
@given(description=st.text(max_size=40), bolt11=st.sampled_from(["lnbc", "lnbcrt", "lntbs", "lntb", "x"]).flatmap(
           lambda p: st.text(max_size=30).map(lambda t: p + t)),
       opaque=st.dictionaries(st.text(max_size=8).filter(lambda k: k not in ("hash", "msat")), st.text(max_size=12),
                              max_size=4),
       sats=st.integers(1, 10**9), expires_at=st.integers(0, 4_000_000_000))
def test_the_challenge_is_canonical_json_for_any_text(description, bolt11, opaque, sats, expires_at):
    """The request and opaque objects are written out by hand (a 402 makes one each):
    for any text they are the same bytes the generic JCS encoder writes."""
    ch = challenge(description=description, bolt11=bolt11, opaque=opaque, price_msat=sats * 1000,
                   expires_at=expires_at)
    details = {"invoice": bolt11, "paymentHash": HASH}
    if pa.network_of(bolt11) is not None:
        details["network"] = pa.network_of(bolt11)
    assert pa.unb64url(ch.request) == pa.jcs({"amount": str(sats), "currency": "sat", "description": description,
                                              "methodDetails": details})
    assert pa.unb64url(ch.opaque) == pa.jcs(dict(opaque, hash=HASH, msat=str(sats * 1000)))
    assert ch.expires == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_at))
    assert pa.parse_challenges([ch.header()]) == [ch]


@pytest.mark.parametrize("bolt11,network", [("lnbc1", "mainnet"), ("lnbcrt1", "regtest"), ("lntbs1", "signet"),
                                            ("LNBCRT1", "regtest"), ("lntb1", None)])
def test_network_from_the_invoice_prefix(bolt11, network):
    assert pa.network_of(bolt11) == network


@pytest.mark.parametrize("price", [1, 999, 1001, 0])
def test_prices_that_are_not_whole_satoshis_have_no_charge(price):
    assert not pa.whole_sats(price)
    with pytest.raises(ValueError):
        challenge(price_msat=price)


def test_a_paid_credential_verifies():
    ch = challenge()
    ok = verify(credential(ch))
    assert (ok.challenge_id, ok.payment_hash, ok.amount_msat) == (ch.id, HASH, 1000)
    assert ok.opaque == {"route": "GET /api/joke", "token": "ab" * 32, "hash": HASH, "msat": "1000"}


def test_the_body_digest_is_rfc_9530s_sha_256_content_digest():
    # RFC 9530's own example: {"hello": "world"} and its sha-256 Content-Digest
    assert pa.content_digest(b'{"hello": "world"}') == "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"


def test_a_charge_bound_to_a_body_is_served_for_that_body_only():
    body = pa.content_digest(b'{"qty": 1}')
    ch = challenge(digest=body)
    assert ch.digest == body and f'digest="{body}"' in ch.header()
    cred = pa.parse_credential(credential(ch))
    assert pa.verify_charge(BINDER, cred, realm="shop", now=NOW, digest=body).challenge_id == ch.id
    for other in (pa.content_digest(b'{"qty": 1000}'), pa.content_digest(b""), ""):
        with pytest.raises(PaymentUnknownChallenge, match="another body"):
            pa.verify_charge(BINDER, cred, realm="shop", now=NOW, digest=other)
    # nor may the client drop or change the digest it echoes: the id binds it
    for echoed in ("", pa.content_digest(b"x")):
        with pytest.raises(PaymentUnknownChallenge):
            pa.verify_charge(BINDER, pa.parse_credential(credential(ch, digest=echoed)), realm="shop", now=NOW,
                             digest=echoed)
    # and a challenge issued without a body buys no request with one
    with pytest.raises(PaymentUnknownChallenge, match="another body"):
        pa.verify_charge(BINDER, pa.parse_credential(credential(challenge())), realm="shop", now=NOW, digest=body)


def test_pympp_binds_the_digest_as_we_do():
    mpp = pytest.importorskip("mpp", reason="pympp is not installed (pip install '.[test]')")
    body = pa.content_digest(b"{}")
    ours = challenge(pa.Binder([b"server-secret"], derive=False), digest=body)
    theirs = mpp.Challenge.create(secret_key="server-secret", realm="shop", method="lightning", intent="charge",
                                  request=json.loads(pa.unb64url(ours.request)), expires=ours.expires,
                                  digest=body, meta=json.loads(pa.unb64url(ours.opaque)))
    assert theirs.id == ours.id


def test_the_binding_matches_the_core_drafts_recipe():
    """HMAC-SHA256 over realm|method|intent|request|expires|digest|opaque, base64url."""
    import hmac
    ch = challenge(binder=pa.Binder([b"secret"], derive=False))
    msg = "|".join([ch.realm, ch.method, ch.intent, ch.request, ch.expires, "", ch.opaque]).encode()
    assert ch.id == pa.b64url(hmac.digest(b"secret", msg, hashlib.sha256))


@pytest.mark.parametrize("field,value", [("request", None), ("expires", "2099-01-01T00:00:00Z"),
                                         ("opaque", None), ("realm", "other"), ("intent", "session"),
                                         ("id", "AAAA")])
def test_any_altered_echo_is_an_unknown_challenge(field, value):
    ch = challenge()
    if value is None:    # another challenge's value for the same field
        value = getattr(challenge(payment_hash="cd" * 32, opaque={"route": "GET /x", "token": "cd" * 32}), field)
    with pytest.raises(PaymentUnknownChallenge):
        verify(credential(ch, **{field: value}))


def test_a_preimage_echoed_with_another_challenge_is_refused():
    other = challenge(payment_hash="cd" * 32)                 # a challenge for another invoice
    with pytest.raises(PaymentInvalidPreimage):
        verify(credential(other))


def test_a_challenge_from_another_server_key_is_unknown():
    with pytest.raises(PaymentUnknownChallenge):
        verify(credential(challenge(binder=pa.Binder([b"x" * 32]))))


def test_a_rotated_key_still_verifies_its_recent_challenges():
    old = challenge()
    assert verify(credential(old), binder=pa.Binder([b"new" * 11, b"k" * 32])).payment_hash == HASH


def test_expired_challenges_are_refused():
    with pytest.raises(PaymentChallengeExpired):
        verify(credential(challenge()), now=NOW + 600)


@pytest.mark.parametrize("preimage", ["", "AB" * 32, "ab" * 31, "zz" * 32, 7, None])
def test_a_malformed_preimage_is_malformed(preimage):
    with pytest.raises(PaymentCredentialMalformed):
        verify(credential(challenge(), preimage=preimage))


@pytest.mark.parametrize("header", ["Payment", "Payment ", "Payment !!!", "Payment " + pa.b64url(b"[]"),
                                    "Payment " + pa.b64url(b'{"challenge":{},"payload":{}}'),
                                    "Payment " + pa.b64url(b'{"challenge":{"id":"a","realm":"b","method":"c",'
                                                           b'"intent":"d","request":"e"},"payload":[]}'),
                                    "Payment " + pa.b64url(b"\xff\xfe"), "Payment " + pa.b64url(b"[" * 100000)])
def test_malformed_credentials_are_refused_as_such(header):
    with pytest.raises(PaymentCredentialMalformed):
        pa.parse_credential(header)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: "Payment " + pa.b64url(b)),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                              lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                              max_leaves=20).map(lambda o: "Payment " + pa.b64url(json.dumps(o).encode()))))
def test_any_input_is_accepted_or_refused_with_a_payment_error(header):
    try:
        verify(header if pa.is_payment(header) else "Payment " + header)
    except PaymentSchemeError:
        pass


def test_the_receipt_is_what_the_draft_says():
    doc = json.loads(pa.unb64url(pa.receipt("cid", HASH, NOW)))
    assert doc == {"method": "lightning", "challengeId": "cid", "reference": HASH, "status": "success",
                   "timestamp": "2027-01-15T08:00:00Z"}


@settings(max_examples=300, deadline=None)
@given(challenge_id=st.text(max_size=50), payment_hash=st.text(max_size=70), now=st.integers(0, 4_000_000_000))
def test_the_receipt_is_canonical_json_for_any_text(challenge_id, payment_hash, now):
    """The receipt is written out by hand (one per served charge): for any text it is the
    same bytes the generic JCS encoder writes."""
    assert pa.receipt(challenge_id, payment_hash, now) == pa.encode_object(
        {"method": "lightning", "challengeId": challenge_id, "reference": payment_hash, "status": "success",
         "timestamp": pa.rfc3339(now)})


def test_a_retired_root_key_verifies_no_challenge(tmp_path):
    """Rotation keeps the old key's challenges valid until the key is retired; from then
    on a challenge bound under it (one of ours, or one bound by whoever leaked the key)
    is refused, as its L402 tokens are."""
    from micropay.l402.tokens import RootKeyRing
    ring = RootKeyRing.load_or_create(tmp_path / "root_keys.json")
    ch = challenge(binder=pa.binder_for(ring))
    assert verify(credential(ch), binder=pa.binder_for(ring)).payment_hash == HASH
    old = ring.current
    ring.rotate()
    assert verify(credential(ch), binder=pa.binder_for(ring)).payment_hash == HASH
    ring.retire(old)
    with pytest.raises(PaymentUnknownChallenge):
        verify(credential(ch), binder=pa.binder_for(ring))
    fresh = challenge(binder=pa.binder_for(ring))
    assert verify(credential(fresh), binder=pa.binder_for(ring)).payment_hash == HASH


@settings(max_examples=200, deadline=None)
@given(secrets=st.lists(st.binary(max_size=150), min_size=1, max_size=3), derive=st.booleans(),
       fields=st.lists(st.text(max_size=30), min_size=7, max_size=7))
def test_challenge_ids_are_hmac_sha256_of_the_parameters_under_any_key(secrets, derive, fields):
    """The binder hashes each key's padded blocks once: its ids are still HMAC-SHA256 (RFC
    2104, keys longer than a block hashed first), and verify accepts an id under any key
    of the ring and nothing else."""
    import hmac as std_hmac
    binder = pa.Binder(secrets, derive=derive)
    keys = [std_hmac.digest(k, b"micropay payment-auth challenge binding v1", hashlib.sha256) if derive else k
            for k in secrets]
    msg = "|".join(fields).encode("utf-8", "surrogatepass")
    cid = binder.bind(*fields)
    assert cid == pa.b64url(std_hmac.digest(keys[0], msg, hashlib.sha256))
    echo = dict(zip(("realm", "method", "intent", "request", "expires", "digest", "opaque"), fields))
    for key in keys:
        assert binder.verify(dict(echo, id=pa.b64url(std_hmac.digest(key, msg, hashlib.sha256))))
    assert not binder.verify(dict(echo, id=pa.b64url(std_hmac.digest(b"not ours" * 9, msg, hashlib.sha256))))


# -- the session intent -------------------------------------------------------------------

def session_challenge(**kw):
    args = dict(realm="shop", bolt11="lnbcrt100n1pexample", payment_hash=HASH, unit_msat=2000, deposit_msat=40000,
                expires_at=NOW + 600, idle_timeout_s=300, description="GET /gen", unit_type="chunk",
                opaque={"route": "GET /gen", "token": "cd" * 32})
    args.update(kw)
    return pa.session_challenge(BINDER, **args)


def verify_session(ch, payload, now=NOW):
    return pa.verify_session(BINDER, pa.parse_credential(pa.format_session_credential(ch, payload)),
                             realm="shop", now=now)


def test_a_session_challenge_carries_the_unit_price_and_the_deposit():
    ch = session_challenge()
    assert ch.intent == "session" and pa.unb64url(ch.request) == pa.jcs(pa.decode_request(ch))
    assert pa.decode_request(ch) == {"amount": "2", "currency": "sat", "description": "GET /gen",
                                     "depositInvoice": "lnbcrt100n1pexample", "paymentHash": HASH,
                                     "depositAmount": "40", "idleTimeout": "300", "unitType": "chunk"}
    with pytest.raises(ValueError):
        session_challenge(unit_msat=1500)


def test_each_session_action_is_verified_against_its_own_secret():
    ch = session_challenge()
    opened = verify_session(ch, {"action": "open", "preimage": PREIMAGE.hex(), "returnInvoice": "lnbcrt1pret"})
    assert (opened.action, opened.session_id, opened.deposit_msat, opened.unit_msat) == ("open", HASH, 40000, 2000)
    assert opened.return_invoice == "lnbcrt1pret" and opened.deposit_invoice == "lnbcrt100n1pexample"
    top = verify_session(ch, {"action": "topUp", "sessionId": "ee" * 32, "topUpPreimage": PREIMAGE.hex()})
    assert (top.action, top.session_id, top.deposit_msat) == ("topUp", "ee" * 32, 40000)
    bearer = verify_session(ch, {"action": "bearer", "sessionId": HASH, "preimage": PREIMAGE.hex()},
                            now=NOW + 10_000)      # bearer and close may echo an expired challenge
    assert bearer.action == "bearer" and bearer.deposit_msat == 0
    with pytest.raises(PaymentChallengeExpired):     # a deposit's challenge may not be expired
        verify_session(ch, {"action": "topUp", "sessionId": HASH, "topUpPreimage": PREIMAGE.hex()}, now=NOW + 600)
    with pytest.raises(PaymentInvalidPreimage):
        verify_session(ch, {"action": "bearer", "sessionId": "ee" * 32, "preimage": PREIMAGE.hex()})
    with pytest.raises(PaymentInvalidPreimage):
        verify_session(ch, {"action": "open", "preimage": "11" * 32, "returnInvoice": "lnbcrt1pret"})
    with pytest.raises(PaymentUnknownChallenge):     # a charge challenge is not a session's
        verify_session(challenge(), {"action": "bearer", "sessionId": HASH, "preimage": PREIMAGE.hex()})
    with pytest.raises(PaymentCredentialMalformed):
        verify_session(ch, {"action": "open", "preimage": PREIMAGE.hex()})


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["action", "preimage", "sessionId", "topUpPreimage", "returnInvoice", "x"]),
                       st.one_of(st.sampled_from(["open", "bearer", "topUp", "close", PREIMAGE.hex(), HASH]),
                                 st.none(), st.integers(), st.text(max_size=70), st.lists(st.integers(), max_size=2)),
                       max_size=5))
def test_any_session_payload_is_accepted_or_refused_with_a_payment_error(payload):
    try:
        verify_session(session_challenge(), payload)
    except PaymentSchemeError:
        pass


# values with nothing to escape, a backslash only, a quote only, or both
FIELDS = st.sampled_from(['ab1=,; é', 'ab\\', 'a"b', 'ab1=,; "\\é']).flatmap(
    lambda alphabet: st.lists(st.text(alphabet=alphabet, max_size=8), min_size=9, max_size=9))


@given(FIELDS)
def test_a_challenge_header_quotes_and_escapes_every_value(values):
    """Challenge.header writes values with nothing to escape directly (every challenge we
    make); the result is the same as quoting each one (RFC 9110 quoted-string: '"' and '\\'
    escaped), with the optional parameters only when set."""
    def quote(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    ch = pa.Challenge(*values)
    expected = (f"Payment id={quote(ch.id)}, realm={quote(ch.realm)}, method={quote(ch.method)}, "
                f"intent={quote(ch.intent)}, request={quote(ch.request)}")
    for name in ("expires", "digest", "opaque", "description"):
        if getattr(ch, name):
            expected += f", {name}={quote(getattr(ch, name))}"
    assert ch.header() == expected
