"""Cache-Control for paid responses.

A response that carries a `Payment-Receipt` must say `Cache-Control: private`
(draft-httpauth-payment, Security Considerations, "Caching": MUST), so that no shared
cache stores a receipt, or a paid answer, and hands it to someone who did not pay.
"""
from __future__ import annotations

from typing import MutableMapping

CACHE_CONTROL = "Cache-Control"


def make_private(headers: MutableMapping[str, str]) -> None:
    """Make the headers' Cache-Control `private`, keeping every other directive of the
    handler's or upstream's own (`no-store`, `max-age`, ...) but `public` and a
    field-qualified `private="..."` (which lets shared caches keep the rest)."""
    getall = getattr(headers, "getall", None)
    values = getall(CACHE_CONTROL, ()) if getall is not None else (
        [headers[CACHE_CONTROL]] if CACHE_CONTROL in headers else [])
    if not values:
        headers[CACHE_CONTROL] = "private"
        return
    directives = [d.strip() for v in values for d in v.split(",") if d.strip()]
    kept = [d for d in directives if d.split("=", 1)[0].strip().lower() not in ("private", "public")]
    if len(values) == 1 and len(kept) == len(directives) - 1 \
            and any(d.lower() == "private" for d in directives):
        return               # already a bare `private`, and nothing to take out
    headers[CACHE_CONTROL] = ", ".join(["private", *kept])
