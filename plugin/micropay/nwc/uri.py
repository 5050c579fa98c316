"""Connection URIs: nostr+walletconnect://<service pubkey>?relay=<ws url>[&relay=...]&secret=<hex>[&lud16=...].

The secret is the client's key: whoever holds the URI can spend what the connection
allows. `NwcUri` never shows it in repr or str."""
from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qs, quote, urlsplit

from ..nostr.keys import Keys, NostrError, parse_pubkey
from ..nostr.urls import relay_url

SCHEMES = ("nostr+walletconnect", "nostrwalletconnect")


@dataclass(frozen=True)
class NwcUri:
    service_pubkey: str
    relays: tuple[str, ...]
    secret: bytes = field(repr=False)
    lud16: str | None = None

    @property
    def client(self) -> Keys:
        return Keys(self.secret)

    def __str__(self) -> str:
        return f"NwcUri({self.service_pubkey[:12]}..., relays={list(self.relays)})"

    def text(self) -> str:
        """The URI itself, secret included: for the one place it is handed over."""
        query = "&".join([*(f"relay={quote(r, safe='')}" for r in self.relays), f"secret={self.secret.hex()}",
                          *([f"lud16={quote(self.lud16, safe='@')}"] if self.lud16 else [])])
        return f"nostr+walletconnect://{self.service_pubkey}?{query}"


def parse_uri(text: str) -> NwcUri:
    """Raises NostrError naming what is wrong, never echoing the secret."""
    if not isinstance(text, str) or len(text) > 4096:
        raise NostrError("an NWC URI is a string of at most 4096 characters")
    parts = urlsplit(text.strip())
    if parts.scheme.lower() not in SCHEMES:
        raise NostrError("an NWC URI starts with nostr+walletconnect://")
    pubkey = (parts.netloc or parts.path.lstrip("/")).lower()
    parse_pubkey(pubkey)
    q = parse_qs(parts.query, keep_blank_values=True)
    relays = tuple(relay_url(r) for r in q.get("relay", []))
    if not relays:
        raise NostrError("an NWC URI names at least one relay")
    secrets = q.get("secret", [])
    if len(secrets) != 1:
        raise NostrError("an NWC URI carries exactly one secret")
    try:
        keys = Keys.from_hex(secrets[0].lower())
    except NostrError:
        raise NostrError("the NWC URI's secret is not a valid 32-byte hex key") from None
    lud16 = q.get("lud16", [None])[0]
    return NwcUri(pubkey, relays, keys.secret, lud16)
