"""The gate's routes: a request's canonical target (computed once per request, kept on
it), and a bounded table of the paths resolved before."""
from __future__ import annotations

from aiohttp import web

from ..core.canonical import Target, canonical_target
from ..seller.offer import Offer
from ..seller.pricing import Pricing, RouteRule

TARGET = web.RequestKey("micropay_target", Target) if hasattr(web, "RequestKey") else "micropay_target"

# The routes a gate has resolved, by (method, path without its query): the canonical path,
# whether aiohttp routed the request on that same path, and the rule that prices it.
# A request on a path seen before skips the canonicalisation, the redirect check (which
# decodes aiohttp's own reading of the path) and the scan of the rules. Bounded: an entry
# whose method and path, or whose canonical path re-encoded, are longer than
# ROUTE_KEY_CHARS is never kept (aiohttp's pure-Python parser takes any method, and a
# path of raw UTF-8 grows when re-encoded), and a full table is emptied, so a client
# varying its requests only makes each cost what it would without the table. The same
# bounds hold for the Offers of fixed-price routes (seller/offer.py), kept by method and
# canonical path beside the table: at most 4,096, none for a method and path, or a
# re-encoded path, over 512 characters (so an Offer's frame is a few kB at most).
ROUTE_CACHE_SIZE = 4096
ROUTE_KEY_CHARS = 512


def request_target(request: web.Request) -> Target:
    """The request's canonical target, computed once (raises BadPath)."""
    target = request.get(TARGET)
    if target is None:
        target = request[TARGET] = canonical_target(request.raw_path)
    return target


class RouteTable:
    """The table of resolved routes (see ROUTE_CACHE_SIZE) in front of `pricing`."""

    def __init__(self, pricing: Pricing) -> None:
        self.pricing = pricing
        self.entries: dict[tuple[str, str], tuple[str, str, bool, RouteRule | None]] = {}
        self.offers: dict[tuple[str, str], Offer] = {}    # by method and canonical path

    def keep_offer(self, method: str, target: Target, offer: Offer) -> Offer:
        """Keep a fixed-price route's Offer for the next 402s on this method and canonical
        path (bounded as the table is)."""
        if len(method) + len(target.path) <= ROUTE_KEY_CHARS and len(target.raw_path) <= ROUTE_KEY_CHARS:
            if len(self.offers) >= ROUTE_CACHE_SIZE:
                self.offers.clear()
            self.offers[(method, target.path)] = offer
        return offer

    def resolve(self, request: web.Request) -> tuple[Target, bool, RouteRule | None]:
        """The request's canonical target (kept on the request: request_target), whether
        aiohttp routed it on that same path, and the config's rule pricing it (None: free).
        Raises BadPath. Answered from the route table for a path seen before (see
        ROUTE_CACHE_SIZE): the same as canonical_target's, which reads the path and query
        apart, and the same rule, since the rules never change."""
        raw = request.raw_path
        path, sep, query = raw.partition("?")
        method = request.method
        hit = self.entries.get((method, path))
        if hit is not None and "#" not in query:
            decoded, encoded, same, rule = hit
            target = Target(decoded, encoded, query if sep else None)
        else:
            target = canonical_target(raw)
            same = target.path == request.path
            rule = self.pricing.match(method, target.path)
            if len(method) + len(path) <= ROUTE_KEY_CHARS and len(target.raw_path) <= ROUTE_KEY_CHARS:
                if len(self.entries) >= ROUTE_CACHE_SIZE:
                    self.entries.clear()
                self.entries[(method, path)] = (target.path, target.raw_path, same, rule)
        request[TARGET] = target
        return target, same, rule
