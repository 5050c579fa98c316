"""Where in a TOML file a key is written, so that a config problem can name its line."""
from __future__ import annotations

import re

# A problem's key, as messages start with it: `routes[2].price_msat`, `backend.kind`, `service`.
# Deeper paths (`addresses[1].splits[0].destination`) are placed at their first key's line.
KEY_PATH = re.compile(r"^(?P<key>[A-Za-z_][\w-]*(?:\[\d+\])?(?:\.[A-Za-z_][\w-]*)?)"
                      r"(?:\[\d+\](?:\.[A-Za-z_][\w-]*)*)?(?::|$)")


def with_line(text: str, source: str, message: str) -> str:
    """'<source>: <key>: problem' -> '<source>:<line>: <key>: problem' when the key's line is found."""
    prefix = f"{source}: "
    if not message.startswith(prefix):
        return message
    rest = message[len(prefix):]
    m = KEY_PATH.match(rest)
    line = _line_of(text, m.group("key")) if m else None
    return f"{source}:{line}: {rest}" if line else message


def _line_of(text: str, key: str) -> int | None:
    """The line of `routes[2].price_msat`, `backend.kind`, `service`, `routes[2]`..."""
    table, index, field = key, None, None
    if "." in key:
        table, field = key.split(".", 1)
    m = re.fullmatch(r"(\w[\w-]*)\[(\d+)\]", table)
    if m:
        table, index = m.group(1), int(m.group(2))
    lines = text.splitlines()
    header = None
    if index is not None:
        seen = -1
        for n, line in enumerate(lines):
            if re.match(rf"\s*\[\[\s*{re.escape(table)}\s*\]\]", line):
                seen += 1
                if seen == index:
                    header = n
                    break
    elif field is not None:
        header = next((n for n, line in enumerate(lines) if re.match(rf"\s*\[\s*{re.escape(table)}\s*\]", line)), None)
    else:
        field, header = table, -1
    if header is None:
        return None
    if field is None:
        return header + 1
    for n in range(header + 1, len(lines)):
        if header >= 0 and re.match(r"\s*\[", lines[n]):
            break
        if header < 0 and re.match(r"\s*\[", lines[n]):
            break
        if re.match(rf"\s*{re.escape(field)}\s*=", lines[n]):
            return n + 1
    return header + 1 if header >= 0 else None
