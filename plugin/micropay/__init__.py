"""micropay: Lightning micropayments (L402) for Core Lightning and aiohttp.

The package is laid out in rooms, one per concern (docs/architecture.md has the map).
Release 0.2 kept 37 modules side by side; their old import paths still work: importing
one loads the module in its room under both names (the same module object, so classes
and state are shared). docs/changelog.md lists where each went.
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


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        prefix, _, rest = fullname.partition(".")
        if prefix != __name__ or rest not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(f"{__name__}.{MOVED[rest]}"))


if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedFinder())
