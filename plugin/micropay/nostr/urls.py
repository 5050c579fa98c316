"""Relay addresses as configured or found in a URI: ws:// or wss://, a host, no
credentials, no fragment."""
from __future__ import annotations

from urllib.parse import urlsplit

from .keys import NostrError


def relay_url(text: str) -> str:
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except (ValueError, AttributeError):
        raise NostrError(f"not a relay URL: {text!r}") from None
    if (parts.scheme.lower() not in ("ws", "wss") or not parts.hostname or parts.username or parts.password
            or parts.fragment):
        raise NostrError(f"a relay URL is ws://host or wss://host, got {text!r}")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    return (f"{parts.scheme.lower()}://{host}{f':{port}' if port else ''}{parts.path}"
            f"{'?' + parts.query if parts.query else ''}")
