"""Discovery of priced routes as OpenAPI (draft-payment-discovery): each priced operation
with `x-payment-info` offers for the "Payment" scheme, and a 402 response. No I/O.

Also /.well-known/l402.json (`well_known`), served by the sidecar and by an embedded gate.
The 402 challenge stays authoritative; this only tells agents what to expect. Routes
whose 402 offers L402 only are described too (their 402 carries the L402 challenge;
/.well-known/l402.json describes it), without an `x-payment-info` offer.
"""
from __future__ import annotations

from typing import Any, Iterable

from ..payment.scheme import whole_sats
from .pricing import METHODS, RouteRule

_DOCUMENTED_METHODS = sorted(m for m in METHODS if m not in ("HEAD", "OPTIONS"))


def offers_payment(rule: RouteRule, price_msat: int | None = None) -> bool:
    """Whether the route's 402 carries a Payment charge: per-request routes (a charge buys
    one request) at a whole number of satoshis. `price_msat`: this request's price; without
    it, the route's (a hook-priced route may offer it, decided per request)."""
    if "payment" not in rule.schemes or rule.pass_s is not None or rule.credits != 1 or rule.session:
        return False
    if price_msat is None:
        return rule.price_hook is not None or whole_sats(rule.price_msat)
    return whole_sats(price_msat)


def openapi_path(pattern: str) -> tuple[str, list[dict[str, Any]]]:
    """A route pattern as an OpenAPI path template and its path parameters:
    `/items/{id}` stays, `/files/*` becomes `/files/{rest}` (the rest of the path)."""
    params: list[dict[str, Any]] = []
    parts = []
    for seg in pattern.split("/"):
        if seg == "*":
            seg = "{rest}"
            params.append({"name": "rest", "in": "path", "required": True, "schema": {"type": "string"},
                           "description": "the rest of the path (may contain '/')"})
        elif seg.startswith("{") and seg.endswith("}"):
            params.append({"name": seg[1:-1], "in": "path", "required": True, "schema": {"type": "string"}})
        parts.append(seg)
    return "/".join(parts), params


def payment_paths(routes: Iterable[RouteRule]) -> dict[str, Any]:
    """OpenAPI path items for the priced routes."""
    paths: dict[str, Any] = {}
    for rule in routes:
        template, params = openapi_path(rule.path)
        item = paths.setdefault(template, {})
        if params:
            item["parameters"] = params
        op: dict[str, Any] = {
            "summary": rule.description or f"priced: {rule.key}",
            "responses": {
                "200": {"description": "the resource, with a Payment-Receipt header"},
                "402": {"description": "Payment Required: a Lightning invoice in each WWW-Authenticate "
                                       "challenge (" + ", ".join(schemes_offered(rule)) + "); the challenge is "
                                       "authoritative",
                        "content": {"application/problem+json": {"schema": {"type": "object"}}}},
            },
        }
        if rule.session is not None:
            op["x-payment-info"] = {"offers": [{
                "intent": "session", "method": "lightning", "currency": "sat",
                "amount": str(rule.price_msat // 1000), "unitType": rule.session.unit_type,
                "depositAmount": str(rule.price_msat * rule.session.deposit_units // 1000),
                "idleTimeout": str(rule.session.idle_timeout_s),
                "description": "a prepaid session: the amount is one unit (a request, or an event of a "
                               "streamed response); the unspent deposit is refunded at close",
            }]}
        elif offers_payment(rule):
            op["x-payment-info"] = {"offers": [{
                "intent": "charge", "method": "lightning", "currency": "sat",
                "amount": None if rule.price_hook is not None else str(rule.price_msat // 1000),
                "description": "one request per payment" + (
                    "; the price depends on the request" if rule.price_hook is not None else ""),
            }]}
        for method in (sorted(rule.methods) if rule.methods else _DOCUMENTED_METHODS):
            if method in ("HEAD", "OPTIONS"):
                continue
            item[method.lower()] = op
    return paths


def schemes_offered(rule: RouteRule) -> list[str]:
    """What a 402 for this route offers (discovery documents name them)."""
    return (["L402"] if "l402" in rule.schemes else []) + (
        ["Payment"] if offers_payment(rule) or rule.session is not None else [])


def document(service: str, version: str, routes: Iterable[RouteRule]) -> dict[str, Any]:
    """The sidecar's /openapi.json when no purchases API is configured."""
    return {
        "openapi": "3.1.0",
        "info": {"title": service, "version": version,
                 "description": "Priced over Lightning by micropay: L402 and the Payment scheme (MPP)."},
        "x-service-info": {"docs": {}},
        "paths": payment_paths(routes),
    }


def well_known(service: str, routes: Iterable[RouteRule], *, network: str, sandbox: bool, receipt_pubkey: str,
               invoice_expiry_s: int) -> dict[str, Any]:
    """/.well-known/l402.json: the service and each priced route, with the schemes its 402
    offers; the top-level `scheme` names every scheme some route offers."""
    rules = list(routes)
    described = []
    for r in rules:
        described.append({
            "method": sorted(r.methods) if r.methods else ["*"], "path": r.path,
            "price_msat": r.price_msat if r.price_hook is None else None,
            "dynamic_price": r.price_hook is not None, "credits": r.credits, "pass_s": r.pass_s,
            "capabilities": sorted(r.capabilities), "free_per_hour": r.free_per_hour,
            "stream_msat": r.stream_msat, "schemes": schemes_offered(r),
            "caveats": [c if not c.startswith("query=") else "query=<first 32 hex of sha256(the query string)>"
                        for c in r.caveats(service, 0)[:-1]] + (
                [f"{service}_valid_until=<issued_at + {r.pass_s}>"] if r.pass_s else [f"credits={r.credits}"]),
            "description": r.description})
    scheme = ["L402", "LSAT"] + (["Payment"] if any("Payment" in schemes_offered(r) for r in rules) else [])
    return {"version": 1, "service": service, "scheme": scheme, "network": network, "sandbox": sandbox,
            "receipt_pubkey": receipt_pubkey, "invoice_expiry_s": invoice_expiry_s, "routes": described}


def _example_path(pattern: str) -> str:
    """A path a route pattern matches, to show in a command: `/files/*` -> `/files/1`."""
    return "/".join("1" if seg == "*" or (seg.startswith("{") and seg.endswith("}")) else seg
                    for seg in pattern.split("/")) or "/"


def pay_commands(routes: Iterable[RouteRule], listen: str, sandbox: bool, prog: str = "micropay") -> list[str]:
    """A `micropay get` command for each kind of priced route (its first route, one
    without placeholders when there is one): a session
    route needs `--session`; a route paid only by an incoming payment stream and a
    catalog-only config (no routes) get none."""
    wallet = "--wallet sandbox" if sandbox else "--wallet cln:<path to your node's lightning-rpc>"
    lines: list[str] = []
    kinds: set[str] = set()
    for r in sorted(routes, key=lambda r: "{" in r.path or "*" in r.path):   # a literal path first
        if r.session is not None:
            kind, flags = "session", "--session "
        elif r.stream_msat is not None and not r.price_msat and r.price_hook is None:
            continue
        else:
            kind, flags = ("pass" if r.pass_s is not None else "credits" if r.credits != 1 else "request"), ""
        if kind in kinds:
            continue
        kinds.add(kind)
        method = "" if not r.methods or "GET" in r.methods else f"-X {sorted(r.methods)[0]} "
        lines.append(f"{prog} get {flags}{method}{wallet} http://{listen}{_example_path(r.path)}")
    return lines
