"""The purchases API's request bodies, declared once: each model validates a body (with
the error a client can act on) and describes itself as JSON Schema for /openapi.json.

Written by hand rather than with a schema library (msgspec, pydantic): there are two
bodies of a handful of fields, each error names the field and what it must be in words
a game developer reads, and the schema carries our descriptions; a library would add a
dependency and a layer mapping its errors to ours. Validation costs a few microseconds
of a request whose invoice costs far more (docs/performance.md).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..core.errors import BadRequest
from ..core.params import MAX_MSAT


@dataclass(frozen=True)
class Field:
    name: str
    kind: str                        # JSON Schema type: "string", "integer", "object"
    required: bool = True
    pattern: str | None = None       # a full-match regular expression (strings)
    what: str = ""                   # what the value must be, in words, for errors
    minimum: int | None = None       # integers
    maximum: int | None = None
    max_length: int | None = None    # strings
    nullable: bool = False           # null is accepted and means absent
    description: str = ""

    def check(self, value: Any) -> Any:
        if value is None and self.nullable:
            return None
        ok = {"string": isinstance(value, str), "object": isinstance(value, dict),
              "integer": isinstance(value, int) and not isinstance(value, bool)}[self.kind]
        if ok and self.kind == "string":
            ok = (self.max_length is None or 0 < len(value) <= self.max_length) and \
                 (self.pattern is None or re.fullmatch(self.pattern, value) is not None)
        if ok and self.kind == "integer":
            ok = (self.minimum is None or value >= self.minimum) and (self.maximum is None or value <= self.maximum)
        if not ok:
            raise BadRequest(f"{self.name} must be {self.what}")
        return value

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": [self.kind, "null"] if self.nullable else self.kind}
        for key, value in (("pattern", f"^{self.pattern}$" if self.pattern else None), ("minimum", self.minimum),
                           ("maximum", self.maximum), ("maxLength", self.max_length),
                           ("description", self.description or None)):
            if value is not None:
                out[key] = value
        return out


@dataclass(frozen=True)
class Model:
    name: str
    fields: tuple[Field, ...]

    def parse(self, body: Any) -> dict[str, Any]:
        """The body's fields, checked: unknown fields, missing ones and bad values are a
        400 naming the field. Absent optional fields are None."""
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object")
        known = {f.name for f in self.fields}
        unknown = sorted(set(body) - known)
        if unknown:
            raise BadRequest(f"unknown field {unknown[0]!r}")
        out = {}
        for f in self.fields:
            if f.name not in body or (body[f.name] is None and f.nullable):
                if f.required:
                    raise BadRequest(f"{f.name} must be {f.what}")
                out[f.name] = None
            else:
                out[f.name] = f.check(body[f.name])
        return out

    def schema(self) -> dict[str, Any]:
        return {"type": "object", "additionalProperties": False,
                "required": [f.name for f in self.fields if f.required],
                "properties": {f.name: f.schema() for f in self.fields}}


PLAYER_ID = Field("player_id", "string", pattern=r"[A-Za-z0-9._:@-]{1,128}", what="1-128 of A-Z a-z 0-9 . _ : @ -")
IDEMPOTENCY_KEY = Field("idempotency_key", "string", pattern=r"[A-Za-z0-9._:-]{1,128}",
                        what="1-128 of A-Z a-z 0-9 . _ : -",
                        description="the same key returns the same object: retry with it, never twice the thing")
MAX_METADATA_BYTES = 4096
MAX_DESTINATION = 4096

PURCHASE_CREATE = Model("PurchaseCreate", (
    Field("sku", "string", what="a sku of the catalog", max_length=64),
    PLAYER_ID,
    IDEMPOTENCY_KEY,
    Field("metadata", "object", required=False, nullable=True, what="a JSON object",
          description=f"kept with the purchase; at most {MAX_METADATA_BYTES} bytes as JSON"),
))

PAYOUT_CREATE = Model("PayoutCreate", (
    PLAYER_ID,
    Field("destination", "string", max_length=MAX_DESTINATION,
          pattern=r"\s*([Ll][Ii][Gg][Hh][Tt][Nn][Ii][Nn][Gg]:)?[Ll][Nn][A-Za-z0-9]+\s*",
          what="a BOLT11 invoice or a BOLT12 offer",
          description="BOLT11 invoice or BOLT12 offer (checked by the node)"),
    Field("amount_msat", "integer", required=False, minimum=1, maximum=MAX_MSAT, what="a positive integer",
          description="required for an offer; must match an invoice"),
    IDEMPOTENCY_KEY,
))
