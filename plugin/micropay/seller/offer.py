"""What a 402 offers for one resource at one price, written out once.

Every 402 of a route at a fixed price differs from the last only in its invoice, its
token and the time. The rest is the same each time: the problem body around those values,
the token's caveats, the Payment charge's request head and opaque. The gate keeps an
Offer per method and path of a fixed-price route (sidecar/routes.py, bounded with the
route table) and fills it per challenge; a hook-priced route gets one per request.

Filled, an Offer writes the same text as the general functions it stands for:
payment_required_json (l402/wire.py), rule.caveats (seller/pricing.py) and charge_challenge
(payment/scheme.py). tests/seller/test_offer.py checks that for random routes and values.
"""
from __future__ import annotations

from ..core.canonical import query_digest
from ..l402.wire import fill_payment_required, payment_required_frame
from ..payment.scheme import ChargeForm
from .discovery import offers_payment
from .pricing import RouteRule


class Offer:
    """`rule`'s 402 for `method` `path` at `price_msat` (`query`: the request's, for a
    hook-priced route, whose token and charge are bound to it)."""

    __slots__ = ("rule", "price_msat", "description", "resource", "caveats", "pass_s", "_until",
                 "_frame", "charge", "l402")

    def __init__(self, rule: RouteRule, *, service: str, method: str, path: str, price_msat: int,
                 query: str | None = None) -> None:
        self.rule, self.price_msat, self.pass_s = rule, price_msat, rule.pass_s
        self.resource = f"{method} {path}"
        # the invoice's description (and the charge's): the route's own, or what it buys
        self.description = rule.description or f"{service}: {self.resource}"[:200]
        caveats = [c.encode() for c in rule.caveats(service, 0, query)]
        if rule.pass_s is not None:          # the last caveat: valid_until, from the time of each 402
            caveats.pop()
        self.caveats = tuple(caveats)
        self._until = f"{service}_valid_until=".encode()
        self._frame = payment_required_frame(resource=self.resource, price_msat=price_msat, credits=rule.credits,
                                             description=rule.description)
        self.l402 = "l402" in rule.schemes
        self.charge: ChargeForm | None = None        # None: this price's 402 offers L402 only
        if offers_payment(rule, price_msat):
            opaque = {"route": rule.key}
            if rule.price_hook is not None:
                opaque["query"] = query_digest(query or "")
            self.charge = ChargeForm(realm=service, price_msat=price_msat,
                                     description=self.description[:200], opaque=opaque)

    def caveats_at(self, now: int) -> tuple[bytes, ...]:
        """The token's caveats for a 402 made at `now` (rule.caveats, encoded)."""
        if self.pass_s is None:
            return self.caveats
        return (*self.caveats, self._until + str(now + self.pass_s).encode())

    def body(self, bolt11: str, payment_hash: str, expires_at: int, macaroon: str, created_at: int) -> str:
        """The 402's problem body (payment_required_json's text)."""
        return fill_payment_required(self._frame, bolt11, payment_hash, expires_at, macaroon,
                                     created_at + self.pass_s if self.pass_s else None)
