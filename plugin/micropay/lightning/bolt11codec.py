"""BOLT11 encoding (for the sandbox) and decoding (for clients), via the bolt11 package."""
from __future__ import annotations

import hashlib

import sys

import bolt11
from bitstring import BitArray
from bolt11 import Bolt11, Feature, Features, FeatureState, MilliSatoshi, TagChar, Tags

from ..core.errors import InvalidInvoice
from .base import DecodedInvoice

MAX_BOLT11_LEN = 4096
DEFAULT_MIN_FINAL_CLTV = 18


def _u5_to_bitarray(arr: list[int]) -> BitArray:
    """Same result as bolt11.bit_utils.u5_to_bitarray (which packs one 5-bit value at a
    time and is ~85% of bolt11.decode's time: ~3 ms an invoice), built in one go."""
    n = 0
    for value in arr:
        n = (n << 5) | value
    nbits = 5 * len(arr)
    nbytes = (nbits + 7) // 8
    return BitArray(bytes=(n << (nbytes * 8 - nbits)).to_bytes(nbytes, "big"), length=nbits)


# bolt11.decode looks the helper up in its module's namespace; give it the fast one, but
# only after checking that it still computes what the library's own helper computes. If
# a bolt11 release renames the helper or changes what it returns, the library's code
# stays in place (slower, still correct). tests/lightning/test_bolt11codec.py covers both paths.
_PROBES = ([], [0], [31], [1, 2, 3, 4, 5, 6, 7, 8], [31] * 13, list(range(32)) * 3)


def install_fast_path(module=None) -> bool:
    """Swap in _u5_to_bitarray when the library's helper agrees with it; True if swapped."""
    module = module if module is not None else sys.modules.get("bolt11.decode")
    original = getattr(module, "u5_to_bitarray", None)
    if original is None or original is _u5_to_bitarray:
        return original is _u5_to_bitarray
    try:
        same = all(original(list(p)) == _u5_to_bitarray(list(p)) for p in _PROBES)
    except Exception:
        same = False
    if same:
        module.u5_to_bitarray = _u5_to_bitarray
    return same


FAST_DECODE = install_fast_path()


def encode_invoice(*, currency: str, amount_msat: int | None, payment_hash: bytes, payment_secret: bytes,
                   description: str, created_at: int, expiry_s: int, privkey_hex: str,
                   hash_description: bool = False) -> str:
    tags = Tags()
    tags.add(TagChar.payment_hash, payment_hash.hex())
    tags.add(TagChar.payment_secret, payment_secret.hex())
    if hash_description:
        tags.add(TagChar.description_hash, hashlib.sha256(description.encode("utf-8")).hexdigest())
    else:
        tags.add(TagChar.description, description)
    tags.add(TagChar.expire_time, expiry_s)
    tags.add(TagChar.min_final_cltv_expiry, DEFAULT_MIN_FINAL_CLTV)
    tags.add(TagChar.features, Features.from_feature_list({
        Feature.var_onion_optin: FeatureState.required,
        Feature.payment_secret: FeatureState.required,
    }))
    inv = Bolt11(currency=currency, date=created_at, tags=tags, amount_msat=MilliSatoshi(amount_msat) if amount_msat is not None else None)
    return bolt11.encode(inv, privkey_hex)


def route_hint_fee_msat(text: str, amount_msat: int) -> int:
    """The least fee the invoice's route hints charge to carry `amount_msat` to its payee
    (0 without hints; what a payer pays the hops before the hints is not known here).
    Raises InvalidInvoice."""
    try:
        hints = bolt11.decode(text.strip()).route_hints
    except Exception as exc:  # the library raises many types for bad input
        raise InvalidInvoice(f"not a valid BOLT11 invoice ({type(exc).__name__})") from None
    fees = []
    for hint in (hints or []):
        fee, forward = 0, amount_msat
        for hop in reversed(hint.routes):     # the last hop is next to the payee
            hop_fee = hop.base_fee + forward * hop.ppm_fee // 1_000_000
            fee, forward = fee + hop_fee, forward + hop_fee
        fees.append(fee)
    return min(fees, default=0)


def decode_invoice(text: str) -> DecodedInvoice:
    """Decode and check the signature. Raises InvalidInvoice, never a library error."""
    if not isinstance(text, str) or not text or len(text) > MAX_BOLT11_LEN:
        raise InvalidInvoice("invoice missing or too long")
    s = text.strip()
    if s.lower().startswith("lightning:"):
        s = s[len("lightning:"):]
    try:
        inv = bolt11.decode(s)
    except Exception as exc:  # the library raises many types for bad input
        raise InvalidInvoice(f"not a valid BOLT11 invoice ({type(exc).__name__})") from None
    return DecodedInvoice(
        payment_hash=inv.payment_hash, amount_msat=int(inv.amount_msat) if inv.amount_msat else None,
        payee=inv.payee, created_at=inv.date, expires_at=inv.date + inv.expiry,
        description=inv.description or "", currency=inv.currency, description_hash=inv.description_hash or None)
