"""Invoice-spam guard and free tier: per-client counters kept in memory, bounded.

Unauthenticated requests cost the node an invoice each (every 402 is a new one): these
limits, with the per-client and store-wide pending bounds in seller/challenger.py, keep that
finite (429 / 503 with Retry-After past them).
Counters are per process: with N sidecar processes the effective limits are N times.
"""
from __future__ import annotations

import ipaddress
import re
import time
from collections import OrderedDict
from typing import Callable, Iterable

Clock = Callable[[], float]


class TokenBucket:
    """`rate_per_minute` tokens per minute, bursting up to `rate_per_minute`."""

    def __init__(self, rate_per_minute: int, clock: Clock = time.monotonic, max_clients: int = 100_000) -> None:
        self.capacity = float(rate_per_minute)
        self.refill_per_s = rate_per_minute / 60.0
        self.clock, self.max_clients = clock, max_clients
        self._state: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, client: str) -> float:
        """0.0 if allowed (and a token is spent), else the seconds until one is available."""
        now = self.clock()
        tokens, last = self._state.pop(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.refill_per_s)
        if tokens >= 1.0:
            self._state[client] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._state[client] = (tokens, now)
            wait = (1.0 - tokens) / self.refill_per_s
        while len(self._state) > self.max_clients:
            self._state.popitem(last=False)   # forget the least recently seen client
        return wait


class FreeTier:
    """N free requests per client and route in each clock hour."""

    def __init__(self, clock: Clock = time.time, max_entries: int = 100_000) -> None:
        self.clock, self.max_entries = clock, max_entries
        self._used: OrderedDict[tuple[str, str, int], int] = OrderedDict()

    def take(self, client: str, route_key: str, per_hour: int) -> bool:
        if per_hour <= 0:
            return False
        key = (client, route_key, int(self.clock() // 3600))
        used = self._used.pop(key, 0)
        self._used[key] = used + (1 if used < per_hour else 0)
        while len(self._used) > self.max_entries:
            self._used.popitem(last=False)
        return used < per_hour


def client_address(remote: str | None, forwarded_for: Iterable[str], trusted_hops: int) -> str:
    """The address limits are counted against.

    With `trusted_hops` = 0, the peer of the connection. Otherwise the X-Forwarded-For
    entry written by the outermost of the `trusted_hops` proxies in front of us: each
    proxy appends the address it was connected from, so that entry is counted from the
    right; everything to its left was written by the client and is ignored. IPv6
    addresses count per /64, the block one subscriber typically holds."""
    address = remote or "unknown"
    if trusted_hops > 0:
        chain = [a.strip() for value in forwarded_for for a in value.split(",") if a.strip()]
        if chain:
            address = chain[-trusted_hops] if len(chain) >= trusted_hops else chain[0]
    return _group(address[:64])


# A dotted quad as ipaddress accepts it (no leading zeros) is already its canonical
# text: matched here in one regular expression instead of parsed (a third of the CPU a
# 402 spent on the client's address).
_IPV4 = re.compile(r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}")


def _group(address: str) -> str:
    if _IPV4.fullmatch(address):
        return address
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
