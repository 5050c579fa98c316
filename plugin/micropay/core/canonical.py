"""One canonical form of an HTTP request target, computed from the raw request line.

The gate prices, and the proxy forwards, this one form, so what is paid for and what
the upstream serves can never differ. No I/O.

    raw target        /api/x/..%2Fjoke?n=1
    refused           encoded '/', '?', '#' or '\\'; a raw '\\' or '#'; a control character
                      (raw or encoded); a '%' not followed by two hex digits; percent-escapes
                      that are not UTF-8; anything that is not an absolute path ('*',
                      'http://host/...'); spellings common upstreams read as another path:
                      a ';' in the path (raw or encoded: Tomcat, Jetty and Spring strip
                      ';' path parameters, so '/api;/premium' and '/..;/' would be served as
                      '/api/premium' and '/../'), a segment ending in '.' or whitespace
                      ('/premium.', '/premium%20': Windows servers drop them, Spring's
                      suffix match ignores a trailing '.')
    canonical path    decoded, dot segments resolved (RFC 3986 5.2.4), repeated '/' collapsed;
                      used for pricing and token caveats
    forwarded         the canonical path re-encoded, plus the query exactly as it was sent
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote

from .errors import BadPath

# Characters a path segment may carry unencoded (RFC 3986 pchar minus '%').
_SEGMENT_SAFE = "!$&'()*+,;=:@-._~"
# A target already in canonical form: absolute path of plain segments, none empty, no
# ';', none ending in '.' (so none is '.' or '..'), no escapes. Most requests take this
# path and skip the slow one.
_PLAIN = re.compile(r"(?:/[A-Za-z0-9!$&'()*+,=:@\-._~]*[A-Za-z0-9!$&'()*+,=:@\-_~])*/?")
_REFUSED_BYTES = frozenset(b"/?#\\") | frozenset(range(0x20)) | {0x7F}
_HEX = frozenset("0123456789abcdefABCDEF")


@dataclass(frozen=True, slots=True)
class Target:
    path: str            # decoded canonical path: what pricing and caveats see
    raw_path: str        # the canonical path, percent-encoded: what the upstream receives
    query: str | None    # the query as sent (None: no '?' at all)

    @property
    def path_qs(self) -> str:
        return self.raw_path if self.query is None else f"{self.raw_path}?{self.query}"


def canonical_target(raw: str) -> Target:
    """Canonical form of a raw request target (path and query as on the request line).

    Raises BadPath for a target that could be read two ways."""
    path, sep, query = raw.partition("?")
    if "#" in raw:
        raise BadPath("the request target must not contain '#'")
    if _PLAIN.fullmatch(path) and path:
        return Target(path, path, query if sep else None)
    if not path.startswith("/"):
        raise BadPath("the request target must be an absolute path starting with '/'")
    out: list[str] = []
    text = ""
    for seg in path.split("/")[1:]:
        text = _decode_segment(seg)
        if text == "..":
            if out:
                out.pop()
        elif text not in ("", "."):
            if ";" in text:
                raise BadPath("the path must not contain ';' (path parameters: many servers strip them)")
            if text[-1] == "." or text[-1].isspace():
                raise BadPath("a path segment must not end in '.' or whitespace (many servers drop them)")
            out.append(text)
    trailing = bool(out) and text in ("", ".", "..")   # '/a/b/', '/a/b/.' and '/a/b/c/..' end in '/'
    decoded = "/" + "/".join(out) + ("/" if trailing else "")
    encoded = "/" + "/".join(quote(s, safe=_SEGMENT_SAFE) for s in out) + ("/" if trailing else "")
    return Target(decoded, encoded, query if sep else None)


def _decode_segment(seg: str) -> str:
    if "\\" in seg:
        raise BadPath("the path must not contain '\\'")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in seg):
        raise BadPath("the path must not contain control characters")
    if "%" not in seg:
        if not seg.isascii():
            try:
                seg.encode("utf-8")
            except UnicodeEncodeError:
                raise BadPath("the path must be UTF-8") from None
        return seg
    raw = bytearray()
    i, n = 0, len(seg)
    while i < n:
        c = seg[i]
        if c != "%":
            raw += c.encode("utf-8", "surrogatepass")
            i += 1
            continue
        pair = seg[i + 1:i + 3]
        if len(pair) != 2 or not (pair[0] in _HEX and pair[1] in _HEX):
            raise BadPath("the path has a '%' that is not followed by two hex digits")
        b = int(pair, 16)
        if b in _REFUSED_BYTES:
            raise BadPath("the path must not contain an encoded '/', '?', '#', '\\' or control character")
        raw.append(b)
        i += 3
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadPath("percent-escapes in the path must encode UTF-8") from None


def query_digest(query: str) -> str:
    """What a `query=` caveat holds: the first 128 bits of SHA-256 of the query string as sent."""
    import hashlib
    return hashlib.sha256(query.encode("utf-8", "surrogateescape")).hexdigest()[:32]
