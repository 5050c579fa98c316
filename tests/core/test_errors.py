"""The error catalogue (micropay/core/errors.py): every error's code and JSON-RPC code is its own."""
import importlib
import pkgutil

import micropay
from micropay.core.errors import BadRequest, ConfigError, MicropayError

INVALID_PARAMS = -32602


def every_error() -> list[type[MicropayError]]:
    for mod in pkgutil.walk_packages(micropay.__path__, "micropay."):
        if not mod.name.endswith(("__main__", ".micropay")):
            importlib.import_module(mod.name)          # every module, so every subclass is defined
    out, todo = [], [MicropayError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo += cls.__subclasses__()
    return out


def test_codes_and_rpc_codes_are_unique():
    errors = every_error()
    codes = [e.code for e in errors]
    assert len(codes) == len(set(codes)), sorted(c for c in codes if codes.count(c) > 1)
    rpc = [(e.rpc_code, e.__name__) for e in errors if e.rpc_code != INVALID_PARAMS]
    numbers = [n for n, _ in rpc]
    assert len(numbers) == len(set(numbers)), sorted(r for r in rpc if numbers.count(r[0]) > 1)
    # only bad input shares JSON-RPC's "invalid params"
    assert all(issubclass(e, (BadRequest, ConfigError)) for e in errors if e.rpc_code == INVALID_PARAMS)
    assert len(errors) > 30


def test_every_error_has_a_fitting_http_status():
    for e in every_error():
        assert 400 <= e.http_status < 600, e
        if issubclass(e, BadRequest):
            assert e.http_status == 400, e
