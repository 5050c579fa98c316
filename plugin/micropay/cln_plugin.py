"""Core Lightning plugin glue (pyln-client): options, RPC methods, hooks, notifications.

    lightningd --plugin=$(command -v micropay-plugin)

Every method parses nothing itself: parameters go to the runtime (plugin_runtime.py),
which validates them and raises typed errors, mapped here to JSON-RPC errors.
"""
from __future__ import annotations

import logging
import os
import traceback
from pathlib import Path
from typing import Any

from pyln.client import Plugin, RpcException
from pyln.client.plugin import MethodType

from .errors import MicropayError

class MicropayPlugin(Plugin):
    """pyln's Plugin, with parameter-binding errors answered as JSON-RPC -32602 and
    expected errors (RpcException) returned without a traceback in the node's log."""

    def _bind_pos(self, func, params, request):
        try:
            return super()._bind_pos(func, params, request)
        except TypeError as exc:
            raise RpcException(f"bad parameters: {exc}", code=-32602) from None

    def _bind_kwargs(self, func, params, request):
        try:
            return super()._bind_kwargs(func, params, request)
        except TypeError as exc:
            raise RpcException(f"bad parameters: {exc}", code=-32602) from None

    def _dispatch_request(self, request) -> None:
        method = self.methods.get(request.method)
        if method is None or method.mtype != MethodType.RPCMETHOD:
            return super()._dispatch_request(request)
        request.background = method.background
        try:
            result = self._exec_func(method.func, request)
            if not method.background:
                request.set_result(result)
        except RpcException as exc:
            request.set_exception(exc)
        except Exception as exc:   # a bug: answer, and log the traceback for us
            request.set_exception(RpcException(f"internal error in {request.method}: {exc}", code=-32603))
            self.log(traceback.format_exc(), level="unusual")


plugin = MicropayPlugin()
TOPICS = ("micropay_invoice_paid", "streampay_payment", "streampay_state", "micropay_payout")
OPTIONS = [
    # name, default, description, type, dynamic
    ("micropay-data-dir", "", "Directory for micropay keys and database (default: <lightning-dir>/micropay)", "string", False),
    ("micropay-service", "micropay", "Service name in the L402 tokens this node issues", "string", False),
    ("micropay-invoice-expiry", 3600, "Default expiry (seconds) of micropay-invoice invoices", "int", True),
    ("micropay-stream-max-total-msat", 0, "If set, every stream needs max_total_msat at most this (msat)", "int", True),
    ("micropay-stream-min-interval", 1, "Smallest stream interval allowed (seconds)", "int", True),
    ("micropay-fetch-max-msat", 100_000, "micropay-fetch: default most paid for one request (msat)", "int", True),
    ("micropay-fetch-day-budget-msat", 1_000_000, "micropay-fetch: most paid per host per day (msat)", "int", True),
    ("micropay-payout-player-day-msat", 0, "micropay-payout: most paid to one player per UTC day (msat; 0 disables payouts)", "int", True),
    ("micropay-payout-day-msat", 0, "micropay-payout: most paid to all players per UTC day (msat; 0 disables payouts)", "int", True),
    ("micropay-payout-max-fee-msat", 5_000, "micropay-payout: routing fee limit per payout (msat)", "int", True),
    ("micropay-listen", "", "If set (host:port), run and supervise the L402 sidecar on this address", "string", False),
    ("micropay-sidecar-config", "", "TOML config for the supervised sidecar (routes, upstream)", "string", False),
]
for _name, _default, _desc, _type, _dynamic in OPTIONS:
    plugin.add_option(_name, _default, _desc, opt_type=_type, dynamic=_dynamic)
for _topic in TOPICS:
    plugin.add_notification_topic(_topic)


class _PluginLogHandler(logging.Handler):
    LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn",
              logging.ERROR: "unusual", logging.CRITICAL: "broken"}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            plugin.log(self.format(record), level=self.LEVELS.get(record.levelno, "info"))
        except Exception:   # never let logging take the plugin down
            pass


def _rt():
    rt = getattr(plugin, "runtime", None)
    if rt is None:
        raise RpcException("micropay is still starting", code=-32600)
    return rt


def _run(coro) -> Any:
    try:
        return _rt().call(coro)
    except MicropayError as err:
        raise RpcException(err.message, code=err.rpc_code) from None


@plugin.init()
def init(options: dict[str, Any], configuration: dict[str, Any], plugin: Plugin, **kwargs: Any) -> Any:
    from .plugin_runtime import PluginRuntime

    handler = _PluginLogHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root = logging.getLogger("micropay")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
    lightning_dir = configuration["lightning-dir"]
    data_dir = Path(options.get("micropay-data-dir") or os.path.join(lightning_dir, "micropay"))
    runtime = PluginRuntime(
        rpc_file=os.path.join(lightning_dir, configuration["rpc-file"]), data_dir=data_dir,
        service=options.get("micropay-service") or "micropay", option=plugin.get_option,
        notify=lambda topic, payload: plugin.notify(topic, payload))
    try:
        runtime.start()
    except (MicropayError, OSError) as exc:
        return {"disable": f"micropay could not start: {getattr(exc, 'message', exc)}"}
    plugin.runtime = runtime
    plugin.log(f"micropay ready (data dir {data_dir})")
    return None


# -- priced invoices ----------------------------------------------------------------------

@plugin.method("micropay-invoice")
def micropay_invoice(plugin: Plugin, amount_msat: Any, description: Any, label: Any = None,
                     expiry: Any = None, services: Any = None, credits: Any = None,
                     metadata: Any = None) -> dict[str, Any]:
    """Create an invoice and an L402 token bound to its payment hash. The same label
    returns the same invoice and token."""
    rt = _rt()
    return _run(rt.issuer.issue(amount_msat, description, label, expiry, services, credits, metadata))


@plugin.method("micropay-verify")
def micropay_verify(plugin: Plugin, credential: Any, path: Any = None, method: Any = None) -> dict[str, Any]:
    """Check an L402 credential ('<macaroon>:<preimage>'): valid, reason, caveats, credits_left."""
    return _run(_rt().issuer.verify(credential, path, method))


@plugin.method("micropay-list")
def micropay_list(plugin: Plugin, status: Any = None, index: Any = None, start: Any = None,
                  limit: Any = None) -> dict[str, Any]:
    """Invoices issued with micropay-invoice, paid or not, with their tokens."""
    return _run(_rt().issuer.list(status, index, start, limit))


@plugin.method("micropay-fetch")
def micropay_fetch(plugin: Plugin, url: Any, method: Any = "GET", headers: Any = None, body: Any = None,
                   max_msat: Any = None) -> dict[str, Any]:
    """HTTP request that pays an L402 challenge from this node within budget."""
    return _run(_rt().fetch(url, method, headers, body, max_msat))


@plugin.method("micropay-payout")
def micropay_payout(plugin: Plugin, player_id: Any, destination: Any, idempotency_key: Any,
                    amount_msat: Any = None) -> dict[str, Any]:
    """Pay a player's BOLT11 invoice or BOLT12 offer, within the per-player and per-day caps.
    The same idempotency_key returns the same payout and never pays twice."""
    return _run(_rt().payout(player_id, destination, idempotency_key, amount_msat))


# -- streaming payments ---------------------------------------------------------------------

@plugin.method("streampay-start")
def streampay_start(plugin: Plugin, destination: Any = None, amount_msat: Any = None, interval_s: Any = None,
                    max_total_msat: Any = None, max_fee_msat: Any = None, splits: Any = None,
                    metadata: Any = None, label: Any = None) -> dict[str, Any]:
    """Pay amount_msat every interval_s to a node, an offer, or split recipients."""
    if amount_msat is None or interval_s is None:
        raise RpcException("amount_msat and interval_s are required", code=-32602)
    return _run(_rt().streams.create(destination, amount_msat, interval_s, max_total_msat, max_fee_msat,
                                     splits, metadata, label))


@plugin.method("streampay-list")
def streampay_list(plugin: Plugin, state: Any = None) -> dict[str, Any]:
    """All streams, optionally only those in one state."""
    rt = _rt()

    async def run() -> dict[str, Any]:
        now = rt.streams.clock()
        return {"streams": [s.status(now) for s in rt.streams.streams.values()
                            if state is None or s.state == state]}
    return _run(run())


@plugin.method("streampay-status")
def streampay_status(plugin: Plugin, id: Any) -> dict[str, Any]:
    """Paid so far, fees, failures, next due time, per-recipient totals."""
    rt = _rt()

    async def run() -> dict[str, Any]:
        return rt.streams.get(id).status(rt.streams.clock())
    return _run(run())


def _change(action: str):
    def handler(plugin: Plugin, id: Any) -> dict[str, Any]:
        return _run(_rt().streams.change(id, action))
    handler.__doc__ = f"{action.capitalize()} a stream."
    handler.__name__ = f"streampay_{action}"
    return handler


for _action in ("pause", "resume", "stop"):
    plugin.add_method(f"streampay-{_action}", _change(_action))


@plugin.method("streampay-received")
def streampay_received(plugin: Plugin, stream_id: Any = None) -> dict[str, Any]:
    """Incoming streamed payments (bLIP-10 keysends), grouped by stream session."""
    if stream_id is not None and not isinstance(stream_id, str):
        raise RpcException("stream_id must be a string", code=-32602)
    rt = _rt()
    return _run(_sessions(rt, stream_id))


async def _sessions(rt, stream_id):
    return {"sessions": await rt.store.stream_sessions(stream_id)}


# -- hooks and subscriptions ----------------------------------------------------------------

@plugin.hook("htlc_accepted")
def on_htlc_accepted(onion: dict[str, Any], htlc: dict[str, Any], plugin: Plugin, **kwargs: Any) -> dict[str, str]:
    try:
        rt = getattr(plugin, "runtime", None)
        if rt is not None:
            rt.incoming_htlc(onion, htlc)
    except Exception as exc:   # observing only: never block an HTLC on our failure
        plugin.log(f"micropay: could not attribute incoming HTLC: {exc}", level="warn")
    return {"result": "continue"}


@plugin.subscribe("invoice_payment")
def on_invoice_payment(plugin: Plugin, **params: Any) -> None:
    payment = params.get("invoice_payment") or params.get("payload") or {}
    rt = getattr(plugin, "runtime", None)
    if rt is None or not payment.get("label"):
        return
    msat = payment.get("msat", 0)
    msat = int(str(msat).removesuffix("msat")) if not isinstance(msat, int) else msat
    rt.spawn(rt.invoice_paid(payment["label"], payment.get("preimage", ""), msat))


@plugin.subscribe("shutdown")
def on_shutdown(plugin: Plugin, **kwargs: Any) -> None:
    rt = getattr(plugin, "runtime", None)
    if rt is not None:
        rt.shutdown()
    os._exit(0)


def main() -> None:
    plugin.run()


if __name__ == "__main__":
    main()
