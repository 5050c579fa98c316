"""API keys for game servers: shown once, stored as a SHA-256 hash, scoped, revocable.

A key reads `mpk_<kid>_<secret>`: `kid` (12 hex digits) finds the record, the
32-byte secret is checked against the stored hash in constant time. Keys carry
256 bits of entropy, so a plain hash is enough; no slow KDF is needed.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import time
from dataclasses import dataclass
from typing import Callable

from ..core.errors import BadRequest, Forbidden, Unauthorized
from ..store import Store
from .config import API_KEY_SCOPES as SCOPES, DEFAULT_API_KEY_SCOPES as DEFAULT_SCOPES
from .repository import ApiKeyRepository, StoredApiKey

KEY_RE = re.compile(r"mpk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
CACHE_TTL_S = 5.0   # a revoked key stops working within this long in a running sidecar


@dataclass(frozen=True)
class ApiKey:
    kid: str
    name: str
    scopes: frozenset[str]
    created_at: int
    revoked_at: int | None

    def to_json(self) -> dict[str, object]:
        return {"kid": self.kid, "name": self.name, "scopes": sorted(self.scopes),
                "created_at": self.created_at, "revoked_at": self.revoked_at}


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def check_scopes(scopes: list[str]) -> frozenset[str]:
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise BadRequest(f"scopes must be among {', '.join(SCOPES)}; got {', '.join(bad) or 'none'}")
    return frozenset(scopes)


async def create_key(store: Store, name: str, scopes: list[str], now: int | None = None) -> tuple[str, ApiKey]:
    """Returns (the key, shown only now, and its record)."""
    if not name or len(name) > 100 or not name.isprintable():
        raise BadRequest("key name must be 1-100 printable characters")
    scope_set = check_scopes(scopes)
    kid = os.urandom(6).hex()
    secret = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode("ascii")
    created = int(time.time() if now is None else now)
    await ApiKeyRepository(store).add(kid, name, _hash(secret), scope_set, created)
    return f"mpk_{kid}_{secret}", ApiKey(kid, name, scope_set, created, None)


def _public(k: StoredApiKey) -> ApiKey:
    return ApiKey(k.kid, k.name, k.scopes, k.created_at, k.revoked_at)


async def list_keys(store: Store) -> list[ApiKey]:
    return [_public(k) for k in await ApiKeyRepository(store).all()]


async def revoke_key(store: Store, kid: str, now: int | None = None) -> bool:
    return await ApiKeyRepository(store).revoke(kid, int(time.time() if now is None else now))


class ApiKeyVerifier:
    """Checks `Authorization: Bearer mpk_...` against the store, caching briefly."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.monotonic) -> None:
        self.repo, self.clock = ApiKeyRepository(store), clock
        self._cache: dict[str, tuple[float, str, ApiKey]] = {}

    async def verify(self, presented: str, scope: str) -> ApiKey:
        m = KEY_RE.fullmatch(presented)
        if m is None:
            raise Unauthorized("malformed API key")
        kid, secret = m.groups()
        now = self.clock()
        hit = self._cache.get(kid)
        if hit is None or hit[0] < now:
            stored = await self.repo.get(kid)
            if stored is None:
                raise Unauthorized("unknown API key")
            if len(self._cache) > 10_000:
                self._cache.clear()
            hit = self._cache[kid] = (now + CACHE_TTL_S, stored.key_hash, _public(stored))
        _, key_hash, key = hit
        if not hmac.compare_digest(key_hash, _hash(secret)):
            raise Unauthorized("unknown API key")
        if key.revoked_at is not None:
            raise Unauthorized("API key revoked")
        if scope not in key.scopes:
            raise Forbidden(f"this API key lacks the {scope!r} scope (keys get "
                            f"{' '.join(DEFAULT_SCOPES)} unless created with --scope; create one with "
                            f"`micropay apikey create --name NAME --scope {scope}`, repeating --scope for "
                            "each scope it needs)")
        return key
