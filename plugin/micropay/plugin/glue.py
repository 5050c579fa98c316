"""Core Lightning plugin glue (pyln-client): options, RPC methods, hooks, notifications.

    lightningd --plugin=$(command -v micropay-plugin)

Nothing here waits. lightningd sends the plugin one message at a time (pyln reads them
on its main thread), and among them the htlc_accepted hook for every HTLC the node
receives or forwards: a handler that waited would hold up the node's payments. So every
RPC method hands its work to the runtime's event loop (runtime.py) and returns;
the answer is written when the work is done. The hook answers `continue` at once and
records what it saw in the background.
"""
from __future__ import annotations

import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any, Awaitable, Callable

from pyln.client import Plugin, RpcException
from pyln.client.plugin import MethodType, Request, RequestState

from ..core.errors import MicropayError, PaymentFailed
from .options import OPTIONS, SPECS, Settings
from ..streams.attribution import attribute


class QuietRequest(Request):
    """A request whose errors go back without pyln's `traceback` field: an expected
    failure is not a bug, and file paths are no business of the caller's."""

    def set_exception(self, exc: Exception) -> None:
        if self.state != RequestState.PENDING:
            raise ValueError(f"request {self.id} was already answered")
        if isinstance(exc, RpcException):
            code, message = exc.code, exc.message
        else:
            code, message = -32603, f"internal error in {self.method}"
        self._write_result({"jsonrpc": "2.0", "id": self.id, "error": {"code": code, "message": message}})
        self.state = RequestState.FAILED
        self.termination_tb = ""


class MicropayPlugin(Plugin):
    """pyln's Plugin, with parameter-binding errors answered as JSON-RPC -32602 and no
    tracebacks in answers; a bug's traceback goes to the node's log instead."""

    def _parse_request(self, jsrequest: dict[str, Any]) -> Request:
        return QuietRequest(plugin=self, req_id=jsrequest.get("id"), method=str(jsrequest["method"]),
                            params=jsrequest["params"], origin=jsrequest.get("origin"), background=False)

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

    def _getmanifest(self, **kwargs: Any) -> Any:
        manifest = super()._getmanifest(**kwargs)
        manifest["cancheck"] = True        # lightningd forwards `check <our method>` and `check setconfig`
        # `check` answers lightningd's forwarded checks; it is not a command of ours
        manifest["rpcmethods"] = [m for m in manifest["rpcmethods"] if m["name"] != "check"]
        return manifest

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
settings = Settings()


def _on_change(plugin: Plugin, name: str, value: Any) -> None:
    """setconfig of a dynamic option: refused (not stored by lightningd) unless valid."""
    try:
        settings.set(name, value)
    except MicropayError as err:
        raise RpcException(err.message, code=-32602) from None


for _spec in OPTIONS:
    plugin.add_option(_spec.name, _spec.default, _spec.description, opt_type=_spec.opt_type,
                      dynamic=_spec.dynamic, on_change=_on_change if _spec.dynamic else None)
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


def _answer(request: Request, work: Callable[[Any], Awaitable[Any]]) -> None:
    """Run `work(runtime)` on the runtime's loop; answer `request` when it is done."""
    rt = getattr(plugin, "runtime", None)
    if rt is None:
        request.set_exception(RpcException("micropay is still starting", code=-32600))
        return

    def done(fut) -> None:
        try:
            result = fut.result()
        except MicropayError as err:
            # a payment lightningd refused keeps lightningd's own code (xpay's 205, ...)
            code = err.detail.get("cln_code") if isinstance(err, PaymentFailed) else None
            request.set_exception(RpcException(err.message, code=code if isinstance(code, int) else err.rpc_code))
        except Exception as exc:   # a bug: answer, and log the traceback for us
            plugin.log("".join(traceback.format_exception(exc)), level="unusual")
            request.set_exception(RpcException(f"internal error in {request.method}: {exc}", code=-32603))
        else:
            request.set_result(result)
    try:
        rt.submit(work(rt), done)
    except MicropayError as err:     # raised while building the work: bad parameters
        request.set_exception(RpcException(err.message, code=err.rpc_code))


def rpc_method(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """An RPC method answered later (pyln's background method), described by its docstring.
    `request` comes first in its signature: pyln inserts it at its index among
    positional parameters, so anywhere later it would take a parameter's place when a
    caller passes fewer."""
    def register(fn: Callable[..., None]) -> Callable[..., None]:
        plugin.add_method(name, fn, background=True, description=fn.__doc__)
        return fn
    return register


@plugin.init()
def init(options: dict[str, Any], configuration: dict[str, Any], plugin: Plugin, **kwargs: Any) -> Any:
    from .runtime import PluginRuntime

    handler = _PluginLogHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root = logging.getLogger("micropay")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
    global settings
    try:
        settings = Settings(options)   # every option checked before anything starts
        if settings["micropay-sidecar-config"]:   # found now, not by a sidecar restarting forever
            from ..seller.configfile import load_config
            load_config(Path(settings["micropay-sidecar-config"]))
    except MicropayError as err:
        plugin.log(f"micropay cannot start: {err.message}", level="unusual")
        return {"disable": f"micropay cannot start: {err.message}"}
    lightning_dir = configuration["lightning-dir"]
    data_dir = Path(settings["micropay-data-dir"] or os.path.join(lightning_dir, "micropay"))
    runtime = PluginRuntime(rpc_file=os.path.join(lightning_dir, configuration["rpc-file"]), data_dir=data_dir,
                            settings=settings, notify=lambda topic, payload: plugin.notify(topic, payload),
                            node_started_at=time.time() if configuration.get("startup") else None)
    try:
        runtime.start()
    except (MicropayError, OSError) as exc:
        reason = f"micropay could not start: {getattr(exc, 'message', exc)}"
        plugin.log(reason, level="unusual")
        return {"disable": reason}
    plugin.runtime = runtime
    plugin.log(f"micropay ready (data dir {data_dir})")
    return None


# -- priced invoices ----------------------------------------------------------------------

@rpc_method("micropay-invoice")
def micropay_invoice(request: Request, amount_msat: Any, description: Any, label: Any = None, expiry: Any = None,
                     services: Any = None, credits: Any = None, metadata: Any = None) -> None:
    """Create an invoice and an L402 token bound to its payment hash. The same label
    returns the same invoice and token."""
    _answer(request, lambda rt: rt.issuer.issue(amount_msat, description, label, expiry, services, credits,
                                                metadata))


@rpc_method("micropay-verify")
def micropay_verify(request: Request, credential: Any = None, path: Any = None, method: Any = None,
                    **misread: Any) -> None:
    """Check an L402 credential ('<macaroon>:<preimage>': valid, reason, caveats, credits_left), or use a
    Payment (MPP charge) credential ('Payment <base64url>', single use: valid once, with its receipt)."""
    if credential is None and len(misread) == 1:
        # `lightning-cli micropay-verify <token>=:<preimage>`: the base64 padding made
        # lightning-cli send it as name=value; put the credential back together.
        name, value = next(iter(misread.items()))
        if isinstance(value, str) and ":" in value:
            credential, misread = f"{name}={value}", {}
    if misread or credential is None:
        raise RpcException("micropay-verify takes credential [path] [method]; with lightning-cli, pass it "
                           "as -k credential='<macaroon>:<preimage>' if its base64 ends in '='", code=-32602)
    _answer(request, lambda rt: rt.issuer.verify(credential, path, method))


@rpc_method("micropay-list")
def micropay_list(request: Request, status: Any = None, index: Any = None, start: Any = None,
                  limit: Any = None) -> None:
    """Invoices issued with micropay-invoice, paid or not, with their tokens."""
    _answer(request, lambda rt: rt.issuer.list(status, index, start, limit))


@rpc_method("micropay-fetch")
def micropay_fetch(request: Request, url: Any, method: Any = "GET", headers: Any = None, body: Any = None,
                   max_msat: Any = None, prefer: Any = None, session: Any = None) -> None:
    """HTTP request that pays a 402 (L402, or the Payment scheme when prefer=payment or
    offered alone) from this node within budget; session=true reads a streaming endpoint
    through a Payment session, closed (and the rest refunded) at the end."""
    _answer(request, lambda rt: rt.fetch(url=url, method=method, headers=headers, body=body, max_msat=max_msat,
                                         prefer=prefer, session=session))


@rpc_method("micropay-nwc-create")
def micropay_nwc_create(request: Request, name: Any, budget_msat: Any, budget_period: Any = "daily",
                        methods: Any = None, max_fee_msat: Any = None, expires_at: Any = None) -> None:
    """Create a Nostr Wallet Connect connection: an app or agent may spend up to budget_msat
    per budget_period (daily, weekly, monthly, yearly, never) with the methods given (all
    by default). Returns its nostr+walletconnect:// URI, whose secret is shown only now."""
    _answer(request, lambda rt: rt.nwc_create(name, budget_msat, budget_period, methods, max_fee_msat, expires_at))


@rpc_method("micropay-nwc-list")
def micropay_nwc_list(request: Request) -> None:
    """The NWC connections: budget, what is used in the current period, state (no secrets)."""
    _answer(request, lambda rt: rt.nwc_list())


@rpc_method("micropay-nwc-revoke")
def micropay_nwc_revoke(request: Request, id: Any) -> None:
    """Revoke an NWC connection (by id or name): its requests are refused from now on."""
    _answer(request, lambda rt: rt.nwc_revoke(id))


@rpc_method("micropay-payout")
def micropay_payout(request: Request, player_id: Any, destination: Any, idempotency_key: Any,
                    amount_msat: Any = None) -> None:
    """Pay a player's BOLT11 invoice or BOLT12 offer, within the per-player and per-day caps.
    The same idempotency_key returns the same payout and never pays twice."""
    _answer(request, lambda rt: rt.payout(player_id, destination, idempotency_key, amount_msat))


# -- streaming payments ---------------------------------------------------------------------

@rpc_method("streampay-start")
def streampay_start(request: Request, destination: Any, amount_msat: Any, interval_s: Any, max_total_msat: Any,
                    max_fee_msat: Any = None, splits: Any = None, metadata: Any = None, label: Any = None) -> None:
    """Pay amount_msat every interval_s to a node (keysend), a BOLT12 offer or a Lightning Address
    (name@host, LNURL-pay), or to split recipients (destination then names one of them), never
    more than max_total_msat in all."""
    _answer(request, lambda rt: rt.streams.create(destination, amount_msat, interval_s, max_total_msat,
                                                  max_fee_msat, splits, metadata, label))


@rpc_method("streampay-list")
def streampay_list(request: Request, state: Any = None, label_prefix: Any = None) -> None:
    """All streams, optionally only those in one state or whose label starts with label_prefix."""
    _answer(request, lambda rt: rt.streams.list(state, label_prefix))


@rpc_method("streampay-status")
def streampay_status(request: Request, id: Any = None, label: Any = None) -> None:
    """A stream (by id or label): paid so far, fees, failures, next due time, per-recipient totals."""
    _answer(request, lambda rt: rt.streams.status(id, label))


def _change(action: str, doc: str) -> Callable[..., None]:
    def handler(request: Request, id: Any = None, label: Any = None) -> None:
        _answer(request, lambda rt: rt.streams.change(id, action, label))
    handler.__doc__ = doc
    handler.__name__ = f"streampay_{action}"
    return handler


rpc_method("streampay-pause")(_change("pause", "Pause an active stream: nothing is paid until it is resumed."))
rpc_method("streampay-resume")(_change("resume", "Resume a paused stream from the next interval; missed "
                                                 "intervals are not paid in a burst."))
rpc_method("streampay-stop")(_change("stop", "Stop a stream for good; a payment already in flight is still "
                                             "settled and counted."))


@rpc_method("streampay-received")
def streampay_received(request: Request, stream_id: Any = None) -> None:
    """Incoming streamed payments (bLIP-10 keysends), grouped by stream session."""
    if stream_id is not None and not isinstance(stream_id, str):
        raise RpcException("stream_id must be a string", code=-32602)
    _answer(request, lambda rt: _sessions(rt, stream_id))


async def _sessions(rt, stream_id):
    return {"sessions": [s.to_json() for s in await rt.stream_usage.sessions(stream_id)]}


# -- `lightning-cli check` ---------------------------------------------------------------------

def check(request: Request, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """lightningd asks before running one of our commands under `check`: the parameters
    are bound as the command would bind them (so a missing one is -32602), and a
    setconfig value of one of our options is checked like setconfig checks it."""
    params = list(args)
    name = params.pop(0) if params else kwargs.pop("command_to_check", None)
    if name == "setconfig":
        config = params[0] if params else kwargs.get("config")
        value = params[1] if len(params) > 1 else kwargs.get("val")
        spec = SPECS.get(config) if isinstance(config, str) else None
        if spec is not None:
            if not spec.dynamic:
                raise RpcException(f"{config} cannot be changed while the plugin runs", code=-32602)
            try:
                spec.parse(spec.default if value is None else value)
            except MicropayError as err:
                raise RpcException(err.message, code=-32602) from None
        return {"command_to_check": name}
    method = plugin.methods.get(name) if isinstance(name, str) else None
    if method is None or method.mtype != MethodType.RPCMETHOD:
        raise RpcException(f"unknown command {name!r}", code=-32601)
    import inspect
    try:
        inspect.signature(method.func).bind(request, *params, **kwargs)
    except TypeError as exc:
        raise RpcException(f"bad parameters: {exc}", code=-32602) from None
    return {"command_to_check": name}


plugin.add_method("check", check, background=False)


# -- hooks and subscriptions ----------------------------------------------------------------

CONTINUE = {"result": "continue"}


@plugin.hook("htlc_accepted")
def on_htlc_accepted(onion: dict[str, Any], htlc: dict[str, Any], plugin: Plugin, **kwargs: Any) -> dict[str, str]:
    """Every HTLC the node receives or forwards passes here: answer at once, and record a
    streamed payment in the background."""
    try:
        rt = getattr(plugin, "runtime", None)
        payment = attribute(onion, htlc) if rt is not None else None
        if payment is not None:
            rt.spawn(rt.record_stream_payment(payment))
    except Exception as exc:   # observing only: never hold an HTLC on our failure
        plugin.log(f"micropay: could not attribute incoming HTLC: {exc}", level="warn")
    return CONTINUE


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

