"""What the gate attaches to a request it admitted (paid, or paid for before)."""
from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from ..l402.tokens import VerifiedToken


@dataclass(frozen=True, slots=True)
class Paid:
    """What the gate attaches to an admitted request (request[PAID])."""

    route_key: str
    token: VerifiedToken | None      # None: admitted by a Payment (MPP) credential
    headers: dict[str, str]          # Payment-Receipt (+ Payment-Credits-Remaining)
    valid_until: int | None
    charge: tuple[str, str] | None = None   # a Payment credential's (token id, payment hash)

    @property
    def token_id(self) -> str:
        return self.token.token_id_hex if self.token is not None else (self.charge or ("", ""))[0]

    @property
    def payment_hash(self) -> str:
        return self.token.payment_hash.hex() if self.token is not None else (self.charge or ("", ""))[1]


PAID = web.RequestKey("micropay_paid", Paid) if hasattr(web, "RequestKey") else "micropay_paid"
