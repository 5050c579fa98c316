"""The regtest tier: real bitcoind + lightningd v26.06 through pyln-testing's node_factory.

Every test here is marked `regtest`. When the binaries are missing (or the wrong
version), the whole tier is skipped with the reason printed in pytest's summary.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

REQUIRED_VERSION = "v26.06"


def _why_not() -> str | None:
    for binary in ("bitcoind", "lightningd"):
        if shutil.which(binary) is None:
            return f"regtest tier skipped: {binary} is not on PATH (see docs/operators.md)"
    try:
        version = subprocess.run(["lightningd", "--version"], capture_output=True, text=True,
                                 timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"regtest tier skipped: lightningd --version failed ({exc})"
    if not version.startswith(REQUIRED_VERSION):
        return f"regtest tier skipped: lightningd is {version}, the tier needs {REQUIRED_VERSION}.x"
    return None


SKIP_REASON = _why_not()


def _serialize_ast_parse() -> None:
    """node_factory.get_nodes starts nodes from a thread pool, and each node's bitcoind
    proxy builds a Flask app, whose URL rules werkzeug compiles with ast.parse. CPython
    3.11 keeps the AST builder's recursion depth in state that all threads share, so
    parses running at once can fail ("SystemError: AST constructor recursion depth
    mismatch", seen in a CI run; see python/cpython#106905). One parse at a time here;
    nothing in the tier depends on parsing in parallel."""
    import ast
    import threading
    if getattr(ast.parse, "_one_at_a_time", False):
        return
    lock, parse = threading.Lock(), ast.parse

    def one_at_a_time(*args, **kwargs):
        with lock:
            return parse(*args, **kwargs)
    one_at_a_time._one_at_a_time = True
    ast.parse = one_at_a_time


_serialize_ast_parse()


def _relay_every_lightningd_transaction() -> None:
    """Bitcoin Knots (what ../shared/tools/install-bitcoind installs) refuses by default
    (`-rejectparasites=1`) any transaction whose nLockTime is 21, as a CAT-21 mint.
    lightningd sets a funding transaction's nLockTime to the tip, and one time in ten
    moves it back by up to 99 blocks (chaintopology.c default_locktime), so on
    pyln-testing's chain of ~101-120 blocks a `fundchannel` now and then gets locktime 21
    and fails with "parasite-cat21" (seen in a CI run). That is a relay policy of the
    test's bitcoind, not something a Lightning node can meet, so the tier turns it off.
    Bitcoin Core does not know the option; it is only written for Knots."""
    try:
        version = subprocess.run(["bitcoind", "-version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return
    if "knots" in version.lower():
        from pyln.testing import utils
        utils.BITCOIND_CONFIG["rejectparasites"] = 0


if SKIP_REASON is None:
    os.environ.setdefault("RUST", "0")          # no cln-grpc in a build without Rust
    os.environ.setdefault("VALGRIND", "0")
    os.environ.setdefault("TEST_DEBUG", "0")
    _relay_every_lightningd_transaction()
    from pyln.testing.fixtures import *  # noqa: F401,F403,E402  (node_factory, bitcoind, ...)


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.regtest)
            if SKIP_REASON is not None:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))
