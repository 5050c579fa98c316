"""TLV streams (micropay/streams/tlv.py): the onion payload records of incoming keysends."""
import pytest
from hypothesis import given, settings, strategies as st

from micropay.streams.tlv import TlvError, onion_payload_records, parse_tlv_stream


def test_tlv_stream_parsing():
    record = b'{"action":"stream"}'
    stream = bytes([2, 1, 7]) + b"\xfe" + (7629169).to_bytes(4, "big") + bytes([len(record)]) + record
    assert parse_tlv_stream(stream)[7629169] == record
    with_length = bytes([len(stream)]) + stream
    assert onion_payload_records(with_length.hex())[2] == b"\x07"
    with pytest.raises(TlvError):
        parse_tlv_stream(b"\x02\x05ab")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_tlv_parser_only_raises_tlv_error(data):
    try:
        parse_tlv_stream(data)
    except TlvError:
        pass
