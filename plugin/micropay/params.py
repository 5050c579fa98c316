"""Validation of JSON-RPC parameters shared by the plugin's methods."""
from __future__ import annotations

from typing import Any

from .errors import BadRequest

MAX_MSAT = 21_000_000 * 10**11


def int_param(value: Any, name: str, lo: int, hi: int) -> int:
    """An integer in [lo, hi]; digit strings are accepted, as lightning-cli sends them."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise BadRequest(f"{name} must be an integer in [{lo}, {hi}]")
    return value


def msat_param(value: Any, name: str) -> int:
    """A positive amount: integer msat, or a string like '1000', '1000msat', '5sat'."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v.endswith("msat") and v[:-4].isdigit():
            value = int(v[:-4])
        elif v.endswith("sat") and v[:-3].isdigit():
            value = int(v[:-3]) * 1000
        elif v.isdigit():
            value = int(v)
    return int_param(value, name, 1, MAX_MSAT)
