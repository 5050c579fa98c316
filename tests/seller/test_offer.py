"""An Offer (a route's 402 written out once, filled per challenge) says exactly what the
general functions say: the same problem body as payment_required_json, the same caveats
as rule.caveats, the same Payment charge header as charge_challenge; and the token it
mints is the token TokenService.mint makes, which verifies."""
import hashlib
import hmac
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from micropay.core.canonical import query_digest
from micropay.core.errors import InvalidCredential
from micropay.core.hmacs import hmac_chain
from micropay.l402.macaroon import Macaroon, minted
from micropay.l402.tokens import RootKeyRing, TokenService, new_token_id
from micropay.l402.wire import format_authorization, payment_required_body, payment_required_json
from micropay.payment.scheme import ChargeForm, binder_for, charge_challenge, content_digest
from micropay.seller.discovery import offers_payment
from micropay.seller.offer import Offer
from micropay.seller.pricing import RouteRule

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
# what a description or service may hold: escapes for JSON and for a quoted-string too
NASTY = st.one_of(TEXT, st.sampled_from(['', 'a "quoted" word', 'back\\slash', 'both \\"', 'é ☃ \u2028', '\x00\x1f']))
SCHEMES = st.sampled_from([frozenset({"l402", "payment"}), frozenset({"l402"}), frozenset({"payment"})])


def _hook(request, rule):            # never called here: its presence makes the price dynamic
    raise AssertionError


@st.composite
def rules(draw):
    pass_s = draw(st.sampled_from([None, None, None, 0, 60, 86_400]))
    return RouteRule(
        path=draw(st.sampled_from(["/api/x", "/api/*", "/items/{id}", "/"])),
        price_msat=draw(st.integers(1, 10 ** 9)),
        methods=draw(st.one_of(st.none(), st.sets(st.sampled_from(["GET", "POST", "PUT"]), min_size=1)
                                .map(frozenset))),
        credits=None if pass_s is not None else draw(st.sampled_from([1, 1, 1, None, 5])),
        pass_s=pass_s,
        capabilities=draw(st.sets(st.sampled_from(["read", "write", "admin"])).map(frozenset)),
        description=draw(NASTY),
        price_hook=draw(st.sampled_from([None, _hook])),
        schemes=draw(SCHEMES))


RING = RootKeyRing.ephemeral()
BINDER = binder_for(RING)


@settings(max_examples=300, deadline=None)
@given(rule=rules(), service=st.sampled_from(["svc", "my shop", 'q"uote', "back\\slash"]),
       method=st.sampled_from(["GET", "POST", "DELETE"]), path=st.sampled_from(["/api/x", "/api/é/%20", "/" + "a" * 300]),
       price=st.integers(1, 10 ** 9) | st.integers(1, 10 ** 6).map(lambda s: s * 1000),
       query=st.one_of(st.none(), TEXT), now=st.integers(0, 2 ** 33), expires_in=st.integers(0, 10 ** 6),
       bolt11=st.sampled_from(["lnbcrt10n1pqq", "lnbc1u1pxyz", "lntb1pabc", "lntbs1pq", "LNBCRT1PQ"]),
       digest=st.sampled_from(["", content_digest(b"{}"), content_digest(os.urandom(64))]))
def test_an_offer_says_what_the_general_functions_say(rule, service, method, path, price, query, now, expires_in,
                                                       bolt11, digest):
    if rule.price_hook is None:
        price = rule.price_msat              # a fixed-price route's Offer is at its own price
    offer = Offer(rule, service=service, method=method, path=path, price_msat=price, query=query)
    assert offer.description == (rule.description or f"{service}: {method} {path}"[:200])
    assert offer.caveats_at(now) == tuple(c.encode() for c in rule.caveats(service, now, query))

    payment_hash, token_id = os.urandom(32).hex(), new_token_id().hex()
    macaroon, expires_at = "AgEE" + os.urandom(30).hex(), now + expires_in
    fields = dict(resource=f"{method} {path}", price_msat=price, invoice=bolt11, payment_hash=payment_hash,
                  expires_at=expires_at, macaroon=macaroon, credits=rule.credits,
                  valid_until=(now + rule.pass_s) if rule.pass_s else None, description=rule.description)
    body = offer.body(bolt11, payment_hash, expires_at, macaroon, now)
    assert body == payment_required_json(**fields) == json.dumps(payment_required_body(**fields))

    assert (offer.charge is not None) == offers_payment(rule, price)
    assert offer.l402 == ("l402" in rule.schemes)
    if offer.charge is not None:
        opaque = {"route": rule.key, "token": token_id}
        if rule.price_hook is not None:
            opaque["query"] = query_digest(query or "")
        expected = charge_challenge(BINDER, realm=service, bolt11=bolt11, payment_hash=payment_hash, price_msat=price,
                                    expires_at=expires_at, description=offer.description[:200], opaque=opaque,
                                    digest=digest).header()
        assert offer.charge.header(BINDER, bolt11, payment_hash, expires_at, token_id, digest) == expected


def test_a_charge_form_keeps_the_challenges_own_values_to_itself():
    for taken in ("hash", "msat", "token"):
        with pytest.raises(ValueError, match="own"):
            ChargeForm(realm="r", price_msat=1000, description="d", opaque={taken: "x"})
    with pytest.raises(ValueError, match="whole number of satoshis"):
        ChargeForm(realm="r", price_msat=1500, description="d", opaque={})


@settings(max_examples=200, deadline=None)
@given(root=st.binary(min_size=0, max_size=100), identifier=st.binary(min_size=1, max_size=200),
       location=st.sampled_from([b"", b"micropay:0a1b2c3d", b"x" * 127, b"y" * 128, "é".encode()]),
       caveats=st.lists(st.binary(max_size=200), max_size=6).map(tuple))
def test_a_minted_token_is_the_macaroon_mint_makes(root, identifier, location, caveats):
    # short fields take the one-join path; a field of 128 bytes or more the general one
    assert minted(root, identifier, location, caveats) == \
        Macaroon.mint(root, identifier, location.decode(), caveats).serialize()


@settings(max_examples=200, deadline=None)
@given(key=st.binary(max_size=130), msgs=st.lists(st.binary(max_size=100), max_size=7).map(tuple))
def test_the_hmac_chain_is_hmac_sha256_step_by_step(key, msgs):
    expected = key
    for msg in msgs:
        expected = hmac.digest(expected, msg, hashlib.sha256)
    assert hmac_chain(key, msgs) == expected


def test_a_token_minted_for_a_402_verifies_and_says_its_caveats():
    tokens = TokenService(RootKeyRing.ephemeral(), "svc")
    rule = RouteRule(path="/api/x", price_msat=1000, methods=frozenset({"GET"}), capabilities=frozenset({"read"}))
    offer = Offer(rule, service="svc", method="GET", path="/api/x", price_msat=1000)
    preimage = os.urandom(32)
    payment_hash, token_id = hashlib.sha256(preimage).digest(), new_token_id()
    text = tokens.mint_serialized(payment_hash, offer.caveats_at(0), token_id)
    assert text == tokens.mint(payment_hash, rule.caveats("svc", 0), token_id).serialize()
    token = tokens.verify_header(format_authorization(text, preimage.hex()), "GET", "/api/x", frozenset({"read"}))
    assert token.token_id == token_id and token.constraints.credits == 1
    with pytest.raises(InvalidCredential):    # another route's path is refused by its caveats
        tokens.verify_header(format_authorization(text, preimage.hex()), "GET", "/api/y", frozenset())
