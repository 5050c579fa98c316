"""/openapi.json stays true: every route is described, and every response the API
gives in a scripted session is declared and validates against its schema."""
import json

import aiohttp
import pytest
from jsonschema import Draft202012Validator

from micropay.games.http.openapi import document

from ..games_util import start_game_sidecar

API_PREFIXES = ("/v1/", "/paywall/", "/openapi.json")


@pytest.fixture
async def gs(tmp_path):
    g = await start_game_sidecar(tmp_path)
    yield g
    await g.close()


def _pointer(*parts):
    return "#/" + "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in parts)


class Contract:
    def __init__(self, doc):
        self.doc, self.checked = doc, set()

    def check(self, template, method, status, content_type, body):
        op = self.doc["paths"][template][method.lower()]
        assert str(status) in op["responses"], f"{method} {template} answered {status}, not declared"
        self.checked.add((template, method.lower(), str(status)))
        content = op["responses"][str(status)].get("content")
        if not content:
            return
        ctype = content_type.split(";")[0]
        assert ctype in content, f"{method} {template} {status}: {ctype} not declared ({list(content)})"
        if ctype.endswith("json"):
            schema = {"$ref": _pointer("paths", template, method.lower(), "responses", str(status),
                                       "content", ctype, "schema"),
                      "paths": self.doc["paths"], "components": self.doc["components"]}
            errors = sorted(Draft202012Validator(schema).iter_errors(json.loads(body)), key=str)
            assert not errors, f"{method} {template} {status}: {errors[0].message}"


async def test_every_route_is_documented(gs):
    doc = document()
    routes = set()
    for r in gs.sc.runner.app.router.routes():
        path = r.resource.canonical if r.resource else ""
        if path.startswith(API_PREFIXES) and r.method != "HEAD":
            routes.add((path, r.method.lower()))
    documented = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert routes == documented
    status, served, _ = await gs.call("GET", "/openapi.json", headers={})
    assert status == 200 and served == json.loads(json.dumps(document(gs.games.cfg))) and served["openapi"] == "3.1.0"
    # every $ref resolves
    text = json.dumps(doc)
    for name in doc["components"]["schemas"]:
        assert name in doc["components"]["schemas"]
    for ref in {part.split('"')[0] for part in text.split('"$ref": "')[1:]}:
        assert ref.split("/")[-1] in doc["components"]["schemas"], ref


async def test_responses_match_the_contract(gs):
    c = Contract(document(gs.games.cfg))
    gs.rt.node.balance_msat = 10_000_000

    async def call(template, method, path, body=None, headers=None, expect=None):
        hdrs = gs.auth() if headers is None else headers
        async with aiohttp.ClientSession() as s:
            async with s.request(method, gs.url + path, headers=hdrs,
                                 data=json.dumps(body) if body is not None else None) as r:
                raw = await r.read()
                c.check(template, method, r.status, r.headers.get("Content-Type", ""), raw)
                if expect is not None:
                    assert r.status == expect, raw
                return json.loads(raw) if "json" in r.headers.get("Content-Type", "") else raw

    await call("/openapi.json", "GET", "/openapi.json", headers={}, expect=200)
    await call("/v1/catalog", "GET", "/v1/catalog", headers={}, expect=200)
    body = {"sku": "gems-100", "player_id": "p", "idempotency_key": "k", "metadata": {"level": 3}}
    p = await call("/v1/purchases", "POST", "/v1/purchases", body, expect=201)
    await call("/v1/purchases", "POST", "/v1/purchases", body, expect=200)
    await call("/v1/purchases", "POST", "/v1/purchases", dict(body, sku="sword"), expect=409)
    await call("/v1/purchases", "POST", "/v1/purchases", {"sku": 1}, expect=400)
    await call("/v1/purchases", "POST", "/v1/purchases", body, headers={}, expect=401)
    await gs.payer.pay(p["invoice"])
    await call("/v1/purchases", "GET", "/v1/purchases?limit=1", expect=200)
    await call("/v1/purchases", "GET", "/v1/purchases?limit=-1", expect=400)
    await call("/v1/purchases/{id}", "GET", f"/v1/purchases/{p['id']}", expect=200)
    await call("/v1/purchases/{id}", "GET", f"/v1/purchases/{p['id']}?token={p['client_token']}",
               headers={}, expect=200)
    await call("/v1/purchases/{id}", "GET", "/v1/purchases/pur_nope", expect=404)
    await call("/v1/purchases/{id}", "GET", f"/v1/purchases/{p['id']}", headers={}, expect=401)
    await call("/v1/purchases/{id}/events", "GET", "/v1/purchases/pur_nope/events", expect=404)
    await call("/v1/events", "GET", "/v1/events", headers={}, expect=401)
    await call("/v1/ws", "GET", "/v1/ws", headers={}, expect=401)
    inv = await gs.payer.create_invoice(1000, "c", "prize", 600)
    po = await call("/v1/payouts", "POST", "/v1/payouts",
                    {"player_id": "p", "destination": inv.bolt11, "idempotency_key": "po"}, expect=201)
    await call("/v1/payouts", "POST", "/v1/payouts",
               {"player_id": "p", "destination": inv.bolt11, "idempotency_key": "po"}, expect=200)
    await call("/v1/payouts", "POST", "/v1/payouts", {"player_id": "p"}, expect=400)
    big = await gs.payer.create_invoice(2_000_000, "d", "prize", 600)
    await call("/v1/payouts", "POST", "/v1/payouts",
               {"player_id": "p", "destination": big.bolt11, "idempotency_key": "big"}, expect=409)
    await call("/v1/payouts/{id}", "GET", f"/v1/payouts/{po['id']}", expect=200)
    await call("/v1/payouts/{id}", "GET", "/v1/payouts/pay_nope", expect=404)
    await call("/paywall/{sku}", "GET", "/paywall/article-1", headers={}, expect=200)
    await call("/paywall/{sku}", "GET", "/paywall/gems-100", headers={}, expect=404)
    await call("/paywall/{sku}/purchase", "POST", "/paywall/article-1/purchase", {"nonce": "abcdefgh"},
               headers={}, expect=400)    # no reader cookie
    await call("/paywall/{sku}/content", "GET", "/paywall/article-1/content?purchase=x&token=y",
               headers={}, expect=401)
    assert len(c.checked) >= 25
