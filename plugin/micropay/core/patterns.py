"""Path patterns shared by pricing rules and token path caveats.

    /api/joke        exact
    /api/*           prefix: '*' at the end matches the rest of the path (or nothing)
    /items/{id}      '{name}' matches one non-empty path segment

Paths are canonical (canonical.py) before they are matched. A pattern that does not
end in '/' or '*' also matches the path with one trailing '/' ('/api/joke/'), since
many upstreams serve both alike: what they serve alike is priced alike. For the same
reason letters match in either case: Express, ASP.NET and IIS route `/API/Joke` to
`/api/joke`, so an upstream of theirs would serve a priced resource unpaid under another
case (an outside review did just that to Express). Pricing more spellings than an
upstream serves alike costs nothing; pricing fewer gives its content away.
"""
from __future__ import annotations

import re
from functools import lru_cache

_SEGMENT = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@lru_cache(maxsize=1024)
def compile_path(pattern: str) -> re.Pattern[str]:
    if not pattern.startswith("/"):
        raise ValueError(f"path pattern must start with '/': {pattern!r}")
    if "*" in pattern[:-1]:
        raise ValueError(f"'*' is only allowed at the end of a path pattern: {pattern!r}")
    body = pattern[:-1] if pattern.endswith("*") else pattern
    out, pos = [], 0
    for m in _SEGMENT.finditer(body):
        out.append(re.escape(body[pos:m.start()]))
        out.append(r"[^/]+")
        pos = m.end()
    out.append(re.escape(body[pos:]))
    if "{" in _SEGMENT.sub("", body) or "}" in _SEGMENT.sub("", body):
        raise ValueError(f"'{{' and '}}' only make '{{name}}' segments (letters, digits, '_'): {pattern!r}")
    tail = ".*" if pattern.endswith("*") else ("" if pattern.endswith("/") else "/?")
    regex = "".join(out) + tail
    return re.compile(regex, re.DOTALL | re.IGNORECASE)


def path_matches(pattern: str, path: str) -> bool:
    return compile_path(pattern).fullmatch(path) is not None


def method_allowed(allowed: frozenset[str] | None, method: str) -> bool:
    """A rule or caveat that allows GET also allows HEAD (the same resource, without its body)."""
    return allowed is None or method in allowed or (method == "HEAD" and "GET" in allowed)
