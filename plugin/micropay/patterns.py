"""Path patterns shared by pricing rules and token path caveats.

    /api/joke        exact
    /api/*           prefix: '*' at the end matches the rest of the path (or nothing)
    /items/{id}      '{name}' matches one non-empty path segment
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
    regex = "".join(out) + (".*" if pattern.endswith("*") else "")
    return re.compile(regex, re.DOTALL)


def path_matches(pattern: str, path: str) -> bool:
    return compile_path(pattern).fullmatch(path) is not None
