"""Parsing untrusted input: JSON documents and decimal integers. No I/O.

Python's own parsers accept more than our outputs and other languages can handle:
`json.loads` takes NaN/Infinity, lone surrogates ("\\ud800") and nesting deep enough to
raise RecursionError; `str.isdigit` accepts '²' and other digits `int()` refuses. Every
HTTP body, query parameter, header value and caveat goes through these instead.
"""
from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from .errors import BadRequest, RequestTimeout

MAX_DEPTH = 32
_DIGITS = re.compile(r"[0-9]+")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def load_json(data: bytes | str, what: str = "body", max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value in `data`, or BadRequest naming `what`: not UTF-8, not JSON,
    NaN/Infinity, a lone surrogate in a string, or nested deeper than `max_depth`."""
    try:
        value = json.loads(data, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequest(f"{what} must be JSON (UTF-8, no NaN or Infinity)") from None
    _check(value, what, max_depth)
    return value


def _check(value: Any, what: str, max_depth: int) -> None:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise BadRequest(f"{what} must not contain unpaired surrogates ('\\ud800')")
        elif isinstance(item, (dict, list)):
            if depth > max_depth:
                raise BadRequest(f"{what} is nested deeper than {max_depth} levels")
            if isinstance(item, dict):
                stack.extend((k, depth) for k in item)
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)


async def read_bounded(stream: Any, limit: int, *, timeout_s: float | None = None) -> tuple[bytes, bool]:
    """Read a body (an aiohttp StreamReader) up to `limit` bytes: (data, complete).
    `complete` is False when more than `limit` bytes were on offer; the rest is left unread.
    With `timeout_s`, a request body not read within it raises RequestTimeout (408)."""
    if timeout_s is None:
        return await _read_bounded(stream, limit)
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_bounded(stream, limit)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout_s:.0f} s (a request body must "
                             "arrive within the server's body deadline)") from None


async def _read_bounded(stream: Any, limit: int) -> tuple[bytes, bool]:
    chunks, size = [], 0
    while size <= limit:
        chunk = await stream.read(limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    data = b"".join(chunks)
    return data[:limit], size <= limit


def is_http_url(url: Any) -> bool:
    """An http:// or https:// URL with a host (and a valid port, if any)."""
    from urllib.parse import urlsplit
    if not isinstance(url, str):
        return False
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 1) > 0
    except ValueError:
        return False


def decimal(text: str, max_digits: int = 18) -> int | None:
    """A non-negative decimal integer written with ASCII digits only, else None."""
    if not isinstance(text, str) or len(text) > max_digits or not _DIGITS.fullmatch(text):
        return None
    return int(text)
