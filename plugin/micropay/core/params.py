"""Validation of JSON-RPC parameters shared by the plugin's methods."""
from __future__ import annotations

from typing import Any

from .errors import BadRequest
from .inputs import decimal

MAX_MSAT = 21_000_000 * 100_000_000 * 1000   # every bitcoin there will be: the largest amount anywhere


def int_param(value: Any, name: str, lo: int, hi: int) -> int:
    """An integer in [lo, hi]; digit strings are accepted, as lightning-cli sends them."""
    if isinstance(value, str):
        value = decimal(value.strip(), 30)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise BadRequest(f"{name} must be an integer in [{lo}, {hi}]")
    return value


def msat_param(value: Any, name: str) -> int:
    """A positive amount: integer msat, or a string like '1000', '1000msat', '5sat'."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v.endswith("msat"):
            value = decimal(v[:-4], 30)
        elif v.endswith("sat"):
            sats = decimal(v[:-3], 30)
            value = None if sats is None else sats * 1000
        else:
            value = decimal(v, 30)
    return int_param(value, name, 1, MAX_MSAT)
