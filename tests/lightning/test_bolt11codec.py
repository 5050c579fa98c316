"""The fast 5-bit conversion swapped into the bolt11 package, and its fallback."""
import types

import bolt11
import bolt11.bit_utils
import pytest
from hypothesis import given, settings, strategies as st

from micropay.lightning import bolt11codec
from micropay.lightning.sandbox import SandboxNetwork


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 31), max_size=400))
def test_fast_u5_conversion_matches_the_bolt11_package(values):
    assert bolt11codec._u5_to_bitarray(values) == bolt11.bit_utils.u5_to_bitarray(values)


def test_the_installed_library_gets_the_fast_path():
    import sys
    assert bolt11codec.FAST_DECODE is True
    assert sys.modules["bolt11.decode"].u5_to_bitarray is bolt11codec._u5_to_bitarray


def _module(helper):
    return types.SimpleNamespace(**({"u5_to_bitarray": helper} if helper else {}))


def test_a_helper_that_changed_what_it_returns_is_left_in_place():
    def changed(values):                       # e.g. a release that returns bytes now
        return bytes(values)
    module = _module(changed)
    assert bolt11codec.install_fast_path(module) is False
    assert module.u5_to_bitarray is changed


def test_a_helper_that_raises_is_left_in_place():
    def broken(values):
        raise TypeError("new signature")
    module = _module(broken)
    assert bolt11codec.install_fast_path(module) is False
    assert module.u5_to_bitarray is broken


def test_a_renamed_helper_means_no_swap():
    module = _module(None)
    assert bolt11codec.install_fast_path(module) is False
    assert not hasattr(module, "u5_to_bitarray")


def test_an_equivalent_helper_is_swapped():
    module = _module(bolt11.bit_utils.u5_to_bitarray)
    assert bolt11codec.install_fast_path(module) is True
    assert module.u5_to_bitarray is bolt11codec._u5_to_bitarray


@pytest.mark.parametrize("fast", [True, False])
def test_decoding_gives_the_same_invoice_with_and_without_the_fast_path(monkeypatch, fast):
    import sys
    if not fast:
        monkeypatch.setattr(sys.modules["bolt11.decode"], "u5_to_bitarray", bolt11.bit_utils.u5_to_bitarray)
    node = SandboxNetwork().add_node("payee")
    import asyncio
    inv = asyncio.run(node.create_invoice(12_345, "fallback", "fallback check", 600))
    decoded = bolt11codec.decode_invoice(inv.bolt11)
    assert decoded.amount_msat == 12_345 and decoded.payment_hash == inv.payment_hash
    assert decoded.description == "fallback check"
