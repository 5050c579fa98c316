"""TLV streams (BOLT 1: BigSize type, BigSize length, value), for onion payloads."""
from __future__ import annotations


class TlvError(ValueError):
    pass


def _bigsize(data: bytes, pos: int) -> tuple[int, int]:
    if pos >= len(data):
        raise TlvError("truncated BigSize")
    b = data[pos]
    if b < 0xFD:
        return b, pos + 1
    width = {0xFD: 2, 0xFE: 4, 0xFF: 8}[b]
    if pos + 1 + width > len(data):
        raise TlvError("truncated BigSize")
    return int.from_bytes(data[pos + 1:pos + 1 + width], "big"), pos + 1 + width


def parse_tlv_stream(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        t, pos = _bigsize(data, pos)
        n, pos = _bigsize(data, pos)
        if pos + n > len(data):
            raise TlvError("truncated TLV value")
        out[t] = data[pos:pos + n]
        pos += n
    return out


def onion_payload_records(payload_hex: str) -> dict[int, bytes]:
    """Records of an htlc_accepted `onion.payload`. lightningd gives the TLV payload
    with its BigSize length prefix; accept it with or without."""
    raw = bytes.fromhex(payload_hex)
    try:
        length, start = _bigsize(raw, 0)
        if start + length == len(raw):
            return parse_tlv_stream(raw[start:])
    except TlvError:
        pass
    return parse_tlv_stream(raw)
