"""Discovery of priced routes as OpenAPI (draft-payment-discovery): each priced operation
with `x-payment-info` offers for the "Payment" scheme, and a 402 response. No I/O.

The 402 challenge stays authoritative; this only tells agents what to expect. Routes
whose 402 offers L402 only are described too (their 402 carries the L402 challenge;
/.well-known/l402.json describes it), without an `x-payment-info` offer.
"""
from __future__ import annotations

from typing import Any, Iterable

from .payment_auth import whole_sats
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
