"""micropay: Lightning micropayments (L402) for Core Lightning and aiohttp.

The package is laid out in rooms, one per concern (docs/architecture.md has the map).
Release 0.2 kept its modules side by side; the 35 that moved keep their old import paths:
importing one loads the module in its room under both names (the same module object, so
classes and state are shared), and `python -m micropay.<old name>` runs it where it lives.
docs/changelog.md lists where each went.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.2.0"

# old path (micropay.<key>) -> new path (micropay.<value>)
MOVED = {
    "errors": "core.errors", "params": "core.params", "inputs": "core.inputs", "tasks": "core.tasks",
    "metrics": "core.metrics", "secretfile": "core.secretfile", "ratelimit": "core.ratelimit",
    "receipts": "core.receipts", "canonical": "core.canonical", "patterns": "core.patterns",
    "macaroon": "l402.macaroon", "tokens": "l402.tokens",
    "payment_auth": "payment.scheme", "sessions": "payment.sessions",
    "stream_runner": "streams.runner", "stream_attribution": "streams.attribution", "tlv": "streams.tlv",
    "config": "seller.config", "configfile": "seller.configfile", "config_check": "seller.config_check",
    "tomlpos": "seller.tomlpos", "pricing": "seller.pricing", "challenger": "seller.challenger",
    "settlement": "seller.settlement", "discovery": "seller.discovery",
    "cln_plugin": "plugin.glue", "plugin_runtime": "plugin.runtime", "plugin_options": "plugin.options",
    "plugin_fetch": "plugin.fetch", "sidecar_supervisor": "plugin.supervisor", "invoices": "plugin.invoices",
    "session_client": "client.sessions",
    # l402, streams and client became packages that re-export what their modules offered
}


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self.spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self.spec       # the import system set it to the old name's spec

    def get_code(self, fullname: str):
        # `python -m micropay.<old name>` (runpy asks for code): run the module in its room,
        # so that its relative imports resolve from where it lives.
        return compile(f"import runpy\nrunpy.run_module({self.target!r}, run_name='__main__', alter_sys=True)\n",
                       f"<{fullname} moved to {self.target}>", "exec")

    def is_package(self, fullname: str) -> bool:
        return False


class _MovedFinder(importlib.abc.MetaPathFinder):
    micropay_moved = True               # found again by this mark after importlib.reload

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, rest = fullname.partition(".")
        if prefix != __name__ or rest not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(f"{__name__}.{MOVED[rest]}"))


# First on the path, so that a stale file left at an old path by an earlier install (a
# micropay/tokens.py that pip did not remove) can never shadow the module in its room.
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "micropay_moved", False)]
sys.meta_path.insert(0, _MovedFinder())
