"""creators/lnurl.py, the LNURL-pay wire format without I/O: Lightning Addresses (LUD-16),
the payRequest a payer checks (LUD-06), the callback URL (LUD-12 comments), and the
checks of the invoice a callback returns. Checked against the third-party `lnurl`
package (PyPI) where it has an opinion."""
import hashlib
import json
import urllib.parse

import lnurl as third_party
import pytest

from micropay.creators.lnurl import (LnurlError, PayRequest, address_parts, address_url, callback_url,
                                     check_invoice, error, metadata_hash, metadata_text, parse_callback_answer,
                                     parse_pay_request, pay_request)

META = metadata_text("tips for alice", "alice@example.com")
GOOD = pay_request("https://example.com/lnurlp/alice/callback", 1000, 10**9, META, comment_allowed=32)


# -- addresses -----------------------------------------------------------------------------
@pytest.mark.parametrize("address, parts", [
    ("alice@example.com", ("alice", "example.com")),
    ("  Alice@Example.COM ", ("alice", "example.com")),                 # lower-cased, trimmed
    ("_@example.com", ("_", "example.com")),                            # LUD-16's default identifier
    ("bob.smith-1_x+tips@pay.example.org", ("bob.smith-1_x+tips", "pay.example.org")),
    ("alice@127.0.0.1:8080", ("alice", "127.0.0.1:8080")),
    ("alice@[::1]:9000", ("alice", "[::1]:9000")),
    ("alice@abcdefghijklmnop.onion", ("alice", "abcdefghijklmnop.onion")),
])
def test_address_parts(address, parts):
    assert address_parts(address) == parts


@pytest.mark.parametrize("address, why", [
    ("alice", "looks like name@host"),
    ("a@b@c", "looks like name@host"),
    (42, "looks like name@host"),
    ("@example.com", "name of a Lightning Address"),
    ("..@example.com", "name of a Lightning Address"),                 # never a path traversal
    (".alice@example.com", "name of a Lightning Address"),
    ("al ice@example.com", "name of a Lightning Address"),
    ("al/ice@example.com", "name of a Lightning Address"),
    ("a" * 65 + "@example.com", "name of a Lightning Address"),
    ("alice@exa_mple.com", "not a host name"),
    ("alice@example.com/path", "not a host name"),
    ("alice@example.com:0", "bad port"),
    ("alice@example.com:70000", "bad port"),
    ("alice@[nope]:80", "not a host name"),
])
def test_address_parts_refuses(address, why):
    with pytest.raises(LnurlError, match=why):
        address_parts(address)


@pytest.mark.parametrize("address, url", [
    ("alice@example.com", "https://example.com/.well-known/lnurlp/alice"),
    ("alice@abcdefghijklmnop.onion", "http://abcdefghijklmnop.onion/.well-known/lnurlp/alice"),
    ("alice@127.0.0.1:8080", "http://127.0.0.1:8080/.well-known/lnurlp/alice"),
    ("alice@localhost:8080", "http://localhost:8080/.well-known/lnurlp/alice"),
    ("alice@[::1]:8080", "http://[::1]:8080/.well-known/lnurlp/alice"),
    ("alice@10.0.0.1", "https://10.0.0.1/.well-known/lnurlp/alice"),        # not loopback: https
])
def test_address_url(address, url):
    assert address_url(address) == url


@pytest.mark.parametrize("address", ["alice@example.com", "bob.smith-1_x@pay.example.org",
                                     "alice@abcdefghijklmnop.onion", "tips+show@example.com"])
def test_address_urls_agree_with_the_lnurl_package(address):
    assert address_url(address) == str(third_party.LnAddress(address).url)


# -- the payRequest --------------------------------------------------------------------------
def test_parse_pay_request_reads_what_the_server_side_writes():
    req = parse_pay_request(json.loads(json.dumps(GOOD)))
    assert req == PayRequest("https://example.com/lnurlp/alice/callback", 1000, 10**9, META, 32)
    assert req.identifier == "alice@example.com"


def test_our_pay_request_is_valid_for_the_lnurl_package():
    theirs = third_party.LnurlPayResponse(**GOOD)
    assert (theirs.minSendable, theirs.maxSendable, theirs.commentAllowed) == (1000, 10**9, 32)
    assert theirs.metadata.text == "tips for alice"
    assert str(theirs.callback) == GOOD["callback"]


def _with(**changes):
    doc = dict(GOOD)
    for k, v in changes.items():
        if v is None:
            doc.pop(k, None)
        else:
            doc[k] = v
    return doc


@pytest.mark.parametrize("doc, why", [
    (error("no such user"), "the service refused: no such user"),
    ({"status": "error"}, "the service refused: no reason given"),
    ([1, 2], "not an LNURL payRequest"),
    (_with(tag="withdrawRequest"), "not an LNURL payRequest"),
    (_with(callback="http://example.com/cb"), "callback must be an https:// URL"),
    (_with(callback="ftp://example.com/cb"), "callback must be an https:// URL"),
    (_with(callback=None), "callback must be an https:// URL"),
    (_with(minSendable=0), "minSendable must be a positive"),
    (_with(minSendable=1.5), "minSendable must be a positive"),
    (_with(maxSendable=True), "maxSendable must be a positive"),
    (_with(minSendable=5000, maxSendable=4000), "minSendable is above its maxSendable"),
    (_with(metadata=None), "metadata must be a string"),
    (_with(metadata="[[\"text/plain\""), "metadata is not JSON"),
    (_with(metadata='[["image/png;base64", "xx"]]'), "with a text/plain one"),
    (_with(metadata='[["text/plain"]]'), "with a text/plain one"),
])
def test_parse_pay_request_refuses(doc, why):
    with pytest.raises(LnurlError, match=why):
        parse_pay_request(doc)


def test_loopback_and_onion_callbacks_may_be_plain_http():
    for cb in ("http://127.0.0.1:9/cb", "http://abcdefghijklmnop.onion/cb", "http://[::1]:80/cb"):
        assert parse_pay_request(_with(callback=cb)).callback == cb


def test_a_bad_comment_allowed_means_no_comment():
    assert parse_pay_request(_with(commentAllowed="lots")).comment_allowed == 0
    assert parse_pay_request(_with(commentAllowed=-1)).comment_allowed == 0
    assert parse_pay_request(_with(commentAllowed=10**6)).comment_allowed == 2000


# -- the callback -------------------------------------------------------------------------
def test_callback_url_asks_for_the_amount_and_cuts_the_comment():
    req = parse_pay_request(_with(callback="https://example.com/cb?user=alice", commentAllowed=5))
    url = urllib.parse.urlsplit(callback_url(req, 21_000, comment="hello world"))
    assert urllib.parse.parse_qs(url.query) == {"user": ["alice"], "amount": ["21000"], "comment": ["hello"]}


def test_callback_url_leaves_out_a_comment_the_service_does_not_take():
    req = parse_pay_request(_with(commentAllowed=None))
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(callback_url(req, 1000, comment="hi")).query)
    assert query == {"amount": ["1000"]}


@pytest.mark.parametrize("amount", [999, 10**9 + 1])
def test_callback_url_refuses_amounts_the_address_does_not_take(amount):
    with pytest.raises(LnurlError, match="outside what the address accepts"):
        callback_url(parse_pay_request(GOOD), amount)


def test_parse_callback_answer():
    assert parse_callback_answer({"pr": "lnbc1x", "routes": []}).bolt11 == "lnbc1x"
    with pytest.raises(LnurlError, match="the service refused: try later"):
        parse_callback_answer(error("try later"))
    with pytest.raises(LnurlError, match="did not answer with an invoice"):
        parse_callback_answer({"routes": []})
    with pytest.raises(LnurlError, match="too long"):
        parse_callback_answer({"pr": "lnbc" + "q" * 9000})


# -- the invoice ------------------------------------------------------------------------------
def test_check_invoice():
    req = parse_pay_request(GOOD)
    good_hash = hashlib.sha256(META.encode()).hexdigest()
    assert metadata_hash(META) == good_hash
    check_invoice(req, 5000, 5000, good_hash)
    check_invoice(req, 5000, 5000, good_hash.upper())
    with pytest.raises(LnurlError, match="is for 5001 msat, not the 5000 msat asked"):
        check_invoice(req, 5000, 5001, good_hash)
    with pytest.raises(LnurlError, match="is for None msat"):
        check_invoice(req, 5000, None, good_hash)
    with pytest.raises(LnurlError, match="description hash is not sha256"):
        check_invoice(req, 5000, 5000, hashlib.sha256(b"something else").hexdigest())
    with pytest.raises(LnurlError, match="description hash is not sha256"):
        check_invoice(req, 5000, 5000, None)


def test_documents_the_lnurl_package_writes_parse_with_ours():
    theirs = third_party.LnurlPayResponse(callback="https://example.com/cb", minSendable=1000, maxSendable=2000,
                                          metadata=META, commentAllowed=10)
    req = parse_pay_request(json.loads(theirs.json()))
    assert (req.callback, req.min_sendable_msat, req.max_sendable_msat, req.comment_allowed) == \
        ("https://example.com/cb", 1000, 2000, 10)
    with pytest.raises(LnurlError, match="the service refused: nope"):
        parse_callback_answer(json.loads(third_party.LnurlErrorResponse(reason="nope").json()))


async def test_our_callback_answer_carries_an_invoice_the_lnurl_package_accepts():
    from micropay.creators.lnurl import callback_answer
    from micropay.lightning.sandbox import SandboxNetwork
    node = SandboxNetwork().add_node("alice")
    inv = await node.create_invoice(21_000, "tip-1", META, 600, hash_description=True)
    theirs = third_party.LnurlPayActionResponse(**callback_answer(inv.bolt11))
    assert str(theirs.pr) == inv.bolt11
    decoded = await node.decode(inv.bolt11)
    check_invoice(parse_pay_request(GOOD), 21_000, decoded.amount_msat, decoded.description_hash)


def test_metadata_entries_a_payer_does_not_use_may_hold_any_json():
    """LUD-06 fixes only the text/plain entry; others (here a number and an object) are
    taken as they are, and the identifier is still found."""
    meta = '[["text/plain", "hi"], ["text/tag", 7], ["x/y", {"a": 1}], ["text/identifier", "a@b.example"]]'
    req = parse_pay_request(_with(metadata=meta))
    assert req.metadata == meta and req.identifier == "a@b.example"
