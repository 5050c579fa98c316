"""L402 tokens: macaroons bound to a payment hash, with first-party caveats.

Identifier (66 bytes, as Aperture lays it out):
    uint16 version=0 (big-endian) || payment_hash[32] || token_id[32]

Per-token root key: HMAC-SHA256(master[kid], token_id). Masters live in one 0600 key
file; `kid` travels in the macaroon location ("micropay:<kid>"). Changing the location
only changes which master is tried, so it cannot forge anything. Tokens under an older
master verify until that master is retired.

Caveats (key=value, every one must hold; repeating a key can only narrow access):
    services=<name>:<tier>[,...]        this service must be listed
    <service>_capabilities=a,b          route's required capabilities must be a subset
    <service>_valid_until=<unix>        not after this time
    expiration=<unix milliseconds>      the same, as lsat-js (boltwall) attenuates tokens
    path=<pattern>                      request path must match (see core/patterns.py)
    method=GET[,POST]                   request method must be listed
    credits=<n>                         n requests, debited in the store
Caveats naming another service's capabilities/valid_until are ignored, as Aperture
does; any other unknown caveat fails verification (fail closed: bLIP-26 lets a
verifier skip caveats it does not know, but a holder-added condition that we silently
ignored would grant more than its author meant).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, NoReturn

from ..core.errors import ConfigError, InvalidCredential, MalformedCredential, TokenExpired
from ..core.inputs import decimal
from .wire import Credential, parse_authorization
from ..core.hmacs import FixedKeyHmac
from .macaroon import Macaroon, minted
from ..core.patterns import method_allowed, path_matches
from ..core.canonical import query_digest
from ..core.secretfile import read_secret, write_secret
from ..core.tasks import every

IDENTIFIER_VERSION = 0
IDENTIFIER_LEN = 66
LOCATION_PREFIX = "micropay:"
Clock = Callable[[], float]


def new_token_id() -> bytes:
    """A new token id: the time in milliseconds (6 bytes, big-endian), then 26 random
    bytes. The random part alone makes ids unique (208 bits); the time in front makes
    recent ids sort together, so the credit ledger keyed by them (micropay_credits, which
    every Payment charge and credit debit writes, once the token is paid and presented)
    takes new rows near its right edge, many to a page, instead of one random page each:
    on SQLite that costs about half as much (bench/bench_ledger.py, docs/performance.md).
    The id is public in the macaroon anyway; the time it tells is when the 402 was made."""
    return (time.time_ns() // 1_000_000).to_bytes(6, "big") + os.urandom(26)


def encode_identifier(payment_hash: bytes, token_id: bytes) -> bytes:
    if len(payment_hash) != 32 or len(token_id) != 32:
        raise ValueError("payment_hash and token_id must be 32 bytes")
    return struct.pack(">H", IDENTIFIER_VERSION) + payment_hash + token_id


def decode_identifier(identifier: bytes) -> tuple[bytes, bytes]:
    """Returns (payment_hash, token_id)."""
    if len(identifier) != IDENTIFIER_LEN:
        raise MalformedCredential("token identifier must be 66 bytes")
    (version,) = struct.unpack_from(">H", identifier)
    if version != IDENTIFIER_VERSION:
        raise MalformedCredential(f"unsupported token identifier version {version}")
    return identifier[2:34], identifier[34:66]


# -- root keys --------------------------------------------------------------

@dataclass
class RootKey:
    kid: str
    secret: bytes
    created_at: int
    retired_at: int | None = None


class RootKeyRing:
    """Master keys by key id, persisted in a 0600 JSON file."""

    def __init__(self, keys: dict[str, RootKey], current: str, path: Path | None = None) -> None:
        if current not in keys:
            raise ConfigError(f"root key file: current key id {current!r} is not in the key list")
        self.keys, self.current, self.path = keys, current, path
        self._macs: dict[str, FixedKeyHmac] = {}
        self._stamp = self._file_stamp()
        self._checked = time.monotonic()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat() if self.path is not None else None
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino) if st is not None else None

    def refresh(self, every_s: float = 1.0) -> bool:
        """Re-read the key file if it changed (`micropay keys rotate|retire` by another
        process); looked at most once per `every_s`. True if the keys changed."""
        now = time.monotonic()
        if self.path is None or now - self._checked < every_s:
            return False
        self._checked = now
        stamp = self._file_stamp()
        if stamp is None or stamp == self._stamp:
            return False
        fresh = RootKeyRing.load_or_create(self.path)
        self.keys, self.current, self._macs, self._stamp = fresh.keys, fresh.current, {}, stamp
        return True

    @classmethod
    def ephemeral(cls) -> "RootKeyRing":
        kid = os.urandom(4).hex()
        return cls({kid: RootKey(kid, os.urandom(32), int(time.time()))}, kid)

    @classmethod
    def load_or_create(cls, path: Path) -> "RootKeyRing":
        if not path.exists():
            ring = cls.ephemeral()
            ring.path = path
            ring.save()
            return ring
        try:
            doc = json.loads(read_secret(path))
            keys = {k["kid"]: RootKey(k["kid"], bytes.fromhex(k["secret"]), int(k["created_at"]),
                                      k.get("retired_at")) for k in doc["keys"]}
            return cls(keys, doc["current"], path)
        except ConfigError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: root key file is corrupt ({type(exc).__name__})") from None

    def save(self) -> None:
        if self.path is None:
            return
        doc = {"current": self.current,
               "keys": [{"kid": k.kid, "secret": k.secret.hex(), "created_at": k.created_at,
                         "retired_at": k.retired_at} for k in self.keys.values()]}
        write_secret(self.path, json.dumps(doc, indent=1).encode())
        self._stamp = self._file_stamp()

    def rotate(self) -> str:
        """New current key; older keys keep verifying until retired."""
        kid = os.urandom(4).hex()
        self.keys[kid] = RootKey(kid, os.urandom(32), int(time.time()))
        self.current = kid
        self.save()
        return kid

    def retire(self, kid: str) -> None:
        if kid not in self.keys:
            raise ConfigError(f"no root key with id {kid!r}")
        if kid == self.current:
            raise ConfigError("cannot retire the current root key; rotate first")
        self.keys[kid].retired_at = int(time.time())
        self.save()

    def token_root_key(self, kid: str, token_id: bytes) -> bytes:
        key = self.keys.get(kid)
        if key is None or key.retired_at is not None:
            raise InvalidCredential("token was signed with an unknown or retired key")
        mac = self._macs.get(kid)
        if mac is None:
            mac = self._macs[kid] = FixedKeyHmac(key.secret)
        return mac(token_id)


# -- caveats ----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Constraints:
    """The conjunction of a token's caveats, pre-parsed for a cheap per-request check."""

    services: frozenset[str] | None = None
    capabilities: frozenset[str] | None = None
    valid_until: int | None = None
    paths: tuple[str, ...] = ()
    methods: frozenset[str] | None = None
    credits: int | None = None
    queries: frozenset[str] | None = None     # query= caveats: the digest the request's query must have

    def check(self, service: str, method: str | None, path: str | None, now: float,
              required_capabilities: frozenset[str] = frozenset(), query: str | None = None) -> None:
        """Raise InvalidCredential unless every condition holds. A None method or path
        skips that condition (for checking a token in general, not for a request)."""
        if self.services is not None and service not in self.services:
            raise InvalidCredential(f"token is not valid for service {service!r}")
        if self.valid_until is not None and now > self.valid_until:
            raise TokenExpired("token has expired", expired_at=self.valid_until)
        if method is not None and not method_allowed(self.methods, method):
            raise InvalidCredential(f"token does not allow method {method}")
        for pattern in self.paths if path is not None else ():
            if not path_matches(pattern, path):
                raise InvalidCredential("token does not cover this path", allowed=pattern)
        if self.queries is not None and query is not None and query_digest(query) not in self.queries:
            raise InvalidCredential("token was bought for another query string of this path")
        if required_capabilities and self.capabilities is not None \
                and not required_capabilities <= self.capabilities:
            raise InvalidCredential("token lacks a required capability",
                                    required=sorted(required_capabilities))


def _intersect(old: frozenset[str] | None, new: frozenset[str]) -> frozenset[str]:
    return new if old is None else old & new


@lru_cache(maxsize=4096)   # tokens of one route share their caveats
def parse_caveats(caveats: tuple[bytes, ...], service: str | None, lenient: bool = False) -> Constraints:
    """The one reading of caveats, for the verifier and for the paying client. Repeated
    caveats narrow (intersections, the smallest credits and validity; every path must match).

    The verifier (`service` given, strict) refuses what it cannot read and any unknown
    caveat (fail closed). The client (`service=None`, `lenient`) only learns a token's
    scope: it takes any `<svc>_valid_until`, and skips what it cannot read."""
    services = capabilities = methods = queries = None
    valid_until = credits = None
    paths: list[str] = []
    cap_key, until_key = f"{service}_capabilities", f"{service}_valid_until"
    for raw in caveats:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            if lenient:
                continue
            raise InvalidCredential("caveat is not UTF-8") from None
        key, sep, value = text.partition("=")
        key, value = key.strip(), value.strip()
        try:
            if not sep:
                raise InvalidCredential(f"caveat is not key=value: {text[:64]!r}")
            if key == "services":
                names = frozenset(item.split(":", 1)[0].strip() for item in value.split(","))
                services = _intersect(services, names)
            elif key == cap_key:
                capabilities = _intersect(capabilities, frozenset(c.strip() for c in value.split(",")))
            elif key in (until_key, "expiration") or (service is None and key.endswith("_valid_until")):
                t = _caveat_int(key, value)
                if key == "expiration":
                    t //= 1000          # lsat-js: milliseconds since the epoch
                valid_until = t if valid_until is None else min(valid_until, t)
            elif key == "path":
                paths.append(value)
            elif key == "method":
                methods = _intersect(methods, frozenset(m.strip().upper() for m in value.split(",")))
            elif key == "query":
                queries = _intersect(queries, frozenset({value}))
            elif key == "credits":
                n = _caveat_int(key, value, minimum=1)   # credits=0 opens nothing: refuse it outright
                credits = n if credits is None else min(credits, n)
            elif key.endswith("_capabilities") or key.endswith("_valid_until"):
                continue  # another service's condition
            else:
                raise InvalidCredential(f"unknown caveat {key!r}")
        except InvalidCredential:
            if not lenient:
                raise
    for p in paths:
        if (not p.startswith("/") or "*" in p[:-1]) and not lenient:
            raise InvalidCredential(f"bad path caveat {p!r}")
    return Constraints(services, capabilities, valid_until, tuple(paths), methods, credits, queries)


def _caveat_int(key: str, value: str, minimum: int = 0) -> int:
    n = decimal(value)
    if n is None or n < minimum:
        raise InvalidCredential(f"caveat {key} must be an integer of at least {minimum}")
    return n


# -- minting and verification -----------------------------------------------

@dataclass(frozen=True, slots=True)
class VerifiedToken:
    token_id: bytes
    payment_hash: bytes
    constraints: Constraints
    macaroon: Macaroon = field(compare=False)

    @property
    def token_id_hex(self) -> str:
        return self.token_id.hex()


CACHE_MAX_BYTES = 32 * 1024 ** 2


def _cached_bytes(raw: str) -> int:
    """What a cached verification holds: the credential, its decoded macaroon and caveats."""
    return 3 * len(raw) + 1024


class TokenService:
    """Mints tokens and verifies credentials without touching the node or the store.

    Successful verifications are cached by the exact credential string (bounded, LRU),
    so a repeated credential costs a dict lookup plus the per-request caveat check.
    """

    def __init__(self, keyring: RootKeyRing, service: str, clock: Clock = time.time,
                 cache_size: int = 50_000) -> None:
        self.keyring, self.service, self.clock = keyring, service, clock
        self.on_keys_changed: list[Callable[[], None]] = []
        self._cache: OrderedDict[str, VerifiedToken] = OrderedDict()
        self._cache_size = cache_size
        # Bounded in bytes too: a holder can attenuate one paid token into any number of
        # distinct valid credentials, each up to a header's size.
        self._cache_bytes, self._cache_max_bytes = 0, CACHE_MAX_BYTES

    def mint(self, payment_hash: bytes, caveats: list[str], token_id: bytes | None = None) -> Macaroon:
        token_id = token_id or new_token_id()
        kid = self.keyring.current
        root = self.keyring.token_root_key(kid, token_id)
        return Macaroon.mint(root, encode_identifier(payment_hash, token_id), LOCATION_PREFIX + kid,
                             tuple(map(str.encode, caveats)))

    def mint_serialized(self, payment_hash: bytes, caveats: tuple[bytes, ...], token_id: bytes) -> str:
        """mint(...).serialize() with the caveats already encoded: the token a 402 hands out."""
        kid = self.keyring.current
        return minted(self.keyring.token_root_key(kid, token_id), encode_identifier(payment_hash, token_id),
                      (LOCATION_PREFIX + kid).encode(), caveats)

    def verify_credential(self, cred: Credential) -> VerifiedToken:
        """Signature, caveat syntax and preimage; not the request-specific conditions."""
        hit = self._cache.get(cred.raw)
        if hit is not None:
            return hit
        mac = Macaroon.deserialize(cred.macaroons[0])
        payment_hash, token_id = decode_identifier(mac.identifier)
        if not mac.location.startswith(LOCATION_PREFIX):
            raise InvalidCredential("token was not issued by this service")
        root = self.keyring.token_root_key(mac.location[len(LOCATION_PREFIX):], token_id)
        if not mac.verify_signature(root):
            raise InvalidCredential("token signature does not verify")
        if not hmac.compare_digest(hashlib.sha256(cred.preimage).digest(), payment_hash):
            raise InvalidCredential("preimage does not match the token's payment hash")
        token = VerifiedToken(token_id, payment_hash, parse_caveats(mac.caveats, self.service), mac)
        self._cache[cred.raw] = token
        self._cache_bytes += _cached_bytes(cred.raw)
        while len(self._cache) > self._cache_size or self._cache_bytes > self._cache_max_bytes:
            self._cache_bytes -= _cached_bytes(self._cache.popitem(last=False)[0])
        return token

    def verify_header(self, value: str | None, method: str, path: str,
                      required_capabilities: frozenset[str] = frozenset(),
                      query: str | None = None) -> VerifiedToken | None:
        """Verify an Authorization header value; None if it carries no L402/LSAT credential.
        A header verified before skips parsing as well as the cryptography."""
        token = self._cache.get(value) if value else None
        if token is None:
            cred = parse_authorization(value)
            if cred is None:
                return None
            token = self.verify_credential(cred)
        token.constraints.check(self.service, method, path, self.clock(), required_capabilities, query)
        return token

    def verify(self, cred: Credential, method: str, path: str,
               required_capabilities: frozenset[str] = frozenset()) -> VerifiedToken:
        token = self.verify_credential(cred)
        token.constraints.check(self.service, method, path, self.clock(), required_capabilities)
        return token

    def refresh_keys(self) -> bool:
        """Pick up a rotation or retirement made by `micropay keys` (call it about once a
        second, e.g. from a background task: the request path never waits for it)."""
        if not self.keyring.refresh():
            return False
        self._cache.clear()       # a retired key's tokens must not stay admitted from the cache
        self._cache_bytes = 0
        for listener in self.on_keys_changed:
            listener()
        return True

    def forget_cached(self) -> None:
        """Drop cached verifications, e.g. after a key was retired."""
        self._cache.clear()
        self._cache_bytes = 0


async def follow_key_file(tokens: TokenService, every_s: float = 1.0) -> NoReturn:
    """Pick up `micropay keys rotate|retire` run beside this process, for its whole life."""
    log = logging.getLogger("micropay.tokens")

    async def look() -> None:
        if tokens.refresh_keys():
            log.info("token root keys changed on disk: now issuing under %s", tokens.keyring.current)
    await every(every_s, look, what="reading the root key file", log=log)
