"""The `micropay` command: serve, get, verify-receipt, keys, check-config, apikey, webhooks."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import sys
from pathlib import Path

from .seller.config import FLEET_NETWORKS, Config
from .seller.configfile import demo_config, load_config
from .core.errors import ConfigError, MicropayError

log = logging.getLogger("micropay")
RULE = "=" * 78
SANDBOX_BANNER = """
{rule}
  SANDBOX MODE: an in-process test network. Invoices are real BOLT11 (regtest)
  but no bitcoin moves.{pay}
{rule}
"""


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _program() -> str:
    """How to run this `micropay` again: the bare name when the shell finds this one on
    PATH, else the path it was started by (`.venv/bin/micropay` after the README's set-up)."""
    import os
    import shutil
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "micropay"
    if os.path.basename(argv0) != "micropay":
        return "micropay"
    found = shutil.which("micropay")
    if found and os.path.realpath(found) == os.path.realpath(argv0):
        return "micropay"
    rel = os.path.relpath(argv0)
    return rel if not rel.startswith("..") and os.sep in rel else argv0


def sandbox_banner(cfg: Config) -> str:
    from .seller.discovery import pay_commands
    commands = pay_commands(cfg.routes, cfg.listen, True, _program())
    pay = "" if not commands else " Pay them with the sandbox wallet:\n" + "\n".join(
        f"      {c}" for c in commands)
    return SANDBOX_BANNER.format(rule=RULE, pay=pay)


def rpc_file_from(rpc_file: str | None, lightning_dir: str | None, network: str) -> Path | None:
    """--rpc-file, or the socket Core Lightning puts at <lightning-dir>/<network>/lightning-rpc."""
    if rpc_file:
        return Path(rpc_file).expanduser()
    if lightning_dir:
        return Path(lightning_dir).expanduser() / network / "lightning-rpc"
    return None


def _config_from_args(args: argparse.Namespace) -> Config:
    cfg = load_config(Path(args.config)) if args.config else demo_config()
    names_a_node = bool(getattr(args, "rpc_file", None) or getattr(args, "lightning_dir", None))
    if names_a_node and args.backend in ("sandbox", "fleet"):
        raise ConfigError("--rpc-file/--lightning-dir name a Core Lightning node; they do not go with "
                          f"--backend {args.backend}")
    if names_a_node and args.backend is None:
        args.backend = "cln"       # naming a node means using it, never the sandbox
    out = cfg.with_overrides(
        listen=args.listen, data_dir=Path(args.data_dir) if args.data_dir else None,
        store_url=args.store, backend=args.backend,
        rpc_file=rpc_file_from(args.rpc_file, args.lightning_dir, args.network or "bitcoin"), upstream=args.upstream)
    if out.backend == "fleet" and args.network:
        if args.network not in FLEET_NETWORKS:
            raise ConfigError(f"--network: a fleet's network is one of {', '.join(FLEET_NETWORKS)}, "
                              f"got {args.network!r}")
        out = dataclasses.replace(out, fleet=dataclasses.replace(out.fleet, network=args.network))
    return out


def _stdin_closed(stop: asyncio.Event) -> None:
    import os
    try:
        data = os.read(sys.stdin.fileno(), 4096)
    except OSError:
        data = b""
    if not data:
        asyncio.get_running_loop().remove_reader(sys.stdin.fileno())
        log.warning("the supervising process is gone: shutting down")
        stop.set()


async def _serve(cfg: Config, exit_with_stdin: bool = False) -> None:
    from aiohttp import web

    unserved = cfg.unserved_routes()
    if unserved:
        raise ConfigError(unserved[0])

    from .sidecar.app import build_app, create_runtime, make_runner
    from .sidecar.server import settle_heap

    host, port = cfg.host_port()
    rt = await create_runtime(cfg)
    app = build_app(rt)
    runner = make_runner(app, shutdown_timeout=10.0, access_log=logging.getLogger("micropay.access"))
    await runner.setup()
    settle_heap()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    if rt.is_sandbox:
        log.warning(sandbox_banner(cfg))
    log.info("micropay sidecar (%s backend, store %s) listening on http://%s:%d",
             cfg.backend, cfg.effective_store_url.split("?")[0].split("@")[-1], host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if exit_with_stdin:            # the supervisor holds the other end: when it is gone, so are we
        loop.add_reader(sys.stdin.fileno(), lambda: _stdin_closed(stop))
    await stop.wait()
    log.info("shutting down: finishing in-flight requests")
    await runner.cleanup()


def _nwc_uri(text: str) -> str:
    """The URI itself, or `@path` of a file holding it (kept 0600: the URI's secret spends)."""
    if not text.startswith("@"):
        return text
    from .core.secretfile import read_secret
    return read_secret(Path(text[1:]).expanduser()).decode("utf-8", "replace").strip()


async def _get(args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit

    from .client.payer import Budget, L402Client, SandboxHttpWallet, TokenCache

    parts = urlsplit(args.url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise MicropayError(f"not an http(s) URL: {args.url!r}")
    node = None
    if args.wallet == "sandbox":
        wallet = SandboxHttpWallet(f"{parts.scheme}://{parts.netloc}/sandbox/wallets/default")
    elif args.wallet.startswith(("http://", "https://")):
        wallet = SandboxHttpWallet(args.wallet)
    elif args.wallet.startswith("cln:"):
        from .client.payer import NodeWallet
        from .lightning.cln import ClnNode
        node = ClnNode(Path(args.wallet[4:]).expanduser())
        await node.connect()
        wallet = NodeWallet(node)
    elif args.wallet.startswith("nwc:"):
        from .client.nwc_wallet import NwcWallet
        wallet = node = NwcWallet(_nwc_uri(args.wallet[4:]))       # closed like a node when done
    else:
        raise MicropayError("--wallet must be 'sandbox', a sandbox wallet URL, cln:<path to lightning-rpc>, "
                            "or nwc:<nostr+walletconnect URI, or @file holding it>")
    headers = {}
    for h in args.header or []:
        name, sep, value = h.partition(":")
        if not sep:
            raise MicropayError(f"header must be 'Name: value', got {h!r}")
        headers[name.strip()] = value.strip()
    budget = Budget(args.max_msat, args.day_budget_msat, args.total_budget_msat, args.max_fee_msat)
    cache = TokenCache(Path(args.cache).expanduser() if args.cache else None)
    say = (lambda m: None) if args.quiet else (lambda m: print(f"micropay: {m}", file=sys.stderr))
    client = L402Client(wallet, budget, cache, on_event=say, receipt_pubkey=args.receipt_pubkey,
                        prefer_payment=args.prefer == "payment")
    if args.session:
        try:
            return await _session_get(args, client, wallet, headers, say)
        finally:
            if node is not None:
                await node.close()
    try:
        res = await client.request(args.method, args.url, headers=headers,
                                   data=args.data.encode() if args.data is not None else None)
    finally:
        if node is not None:
            await node.close()
    sys.stdout.buffer.write(res.body)
    if res.body and not res.body.endswith(b"\n"):
        sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()
    summary = f"HTTP {res.status}"
    credits_left = res.headers.get("Payment-Credits-Remaining")
    if res.paid_msat:
        summary += f"; paid {res.paid_msat} msat + {res.fee_msat} msat fee (payment_hash {res.payment_hash})"
        if credits_left is not None and credits_left.isdigit() and credits_left != "0":
            summary += f"; {_plural(int(credits_left), 'credit')} left on its token"
    elif res.status < 400 and res.used_token:
        summary += "; paid with a cached token" + (
            f", {_plural(int(credits_left), 'credit')} left" if credits_left is not None and credits_left.isdigit()
            else "")
    elif res.status < 400:
        summary += "; no payment needed (a free route)"
    elif res.status == 402 and _offers_session(res.headers):
        summary += ("; this route sells a Payment session (a deposit spent per unit, the rest refunded): "
                    "run again with --session")
    say(summary)
    if args.receipt_pubkey and res.receipt_error is not None:
        print(f"micropay: error: the receipt does not verify under --receipt-pubkey: {res.receipt_error}",
              file=sys.stderr)
        return 3
    return 0 if res.status < 400 else 1


def _offers_session(headers: dict[str, str]) -> bool:
    from .payment.scheme import SESSION, parse_challenges
    return any(c.intent == SESSION for c in parse_challenges([v for k, v in headers.items()
                                                              if k.lower() == "www-authenticate"]))


async def _session_get(args: argparse.Namespace, client, wallet, headers: dict[str, str], say) -> int:
    """`micropay get --session`: open a Payment session, print the stream's events as
    they come (topping up within the budgets when asked), close it, report the refund."""
    from .client.sessions import PaymentSession

    async with PaymentSession(client, wallet, args.url) as s:
        async for ev in s.stream(args.method, headers=headers,
                                 data=args.data.encode() if args.data is not None else None):
            sys.stdout.write(ev.data if ev.data.endswith("\n") else ev.data + "\n")
            sys.stdout.flush()
    closed = s.closed or {}
    say(f"session {s.session_id}: deposited {s.deposited_msat} msat in {1 + s.top_ups} payment(s); "
        f"closed, refund {closed.get('refundSats')} sat {closed.get('refundStatus')}")
    return 0 if closed.get("refundStatus") in ("succeeded", "skipped") else 1


def _keys(args: argparse.Namespace) -> int:
    from .l402.tokens import RootKeyRing

    import datetime as dt
    data_dir = Path(args.data_dir) if args.data_dir else (
        load_config(Path(args.config)).data_dir if args.config else Path(".micropay"))
    path = data_dir / "root_keys.json"
    if args.action == "list" and not path.exists():
        raise MicropayError(f"no root key file at {path} (a sidecar or the plugin creates one when it starts; "
                            "give --data-dir or --config)")
    ring = RootKeyRing.load_or_create(path)
    if args.action == "rotate":
        print(f"new current key: {ring.rotate()} (running sidecars and the plugin using {data_dir} issue "
              "tokens under it within a second; tokens under older keys keep verifying)")
    elif args.action == "retire":
        if not args.kid:
            raise MicropayError("keys retire needs a key id")
        ring.retire(args.kid)
        print(f"retired {args.kid}: running sidecars and the plugin using {data_dir} refuse its tokens "
              "within a second")
    for k in ring.keys.values():
        state = "current" if k.kid == ring.current else ("retired" if k.retired_at else "active")
        created = dt.datetime.fromtimestamp(k.created_at, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        print(f"{k.kid}\t{state}\tcreated {created}")
    return 0


def _budget(args: argparse.Namespace) -> int:
    import time
    from collections import Counter

    from .client.payer import DAY_S, TokenCache
    cache = TokenCache(Path(args.cache).expanduser())
    if args.action == "reset":
        n = cache.forget_spends()
        print(f"{cache.path}: forgot {n} completed payments; the total and daily budgets start over "
              "(cached tokens are kept)")
        return 0
    spends = cache.state.spends.values()
    today = Counter()
    for s in spends:
        if s.ts >= time.time() - DAY_S:
            today[s.host] += s.amount_msat + s.fee_msat
    print(f"total (counted against --total-budget-msat): {cache.spent(None, 0)} msat in {len(spends)} payments")
    for host, msat in sorted(today.items()):
        print(f"  {host}: {msat} msat in the last 24 hours (--day-budget-msat)")
    return 0


async def _sandbox_invoice(args: argparse.Namespace) -> int:
    import aiohttp

    from .core.inputs import load_json
    url = f"{args.server.rstrip('/')}/sandbox/wallets/{args.wallet}/invoice"
    try:
        async with aiohttp.ClientSession() as s, s.post(url, json={
                "description": args.description,
                **({"amount_msat": args.amount_msat} if args.amount_msat is not None else {})}) as r:
            body = load_json(await r.read(), "the sidecar's answer")
    except (aiohttp.ClientError, ValueError) as exc:
        raise MicropayError(f"{url}: {exc or type(exc).__name__} (is a sandbox sidecar running there?)") from None
    if not isinstance(body, dict) or "bolt11" not in body:
        raise MicropayError(f"{url}: {body.get('detail') if isinstance(body, dict) else body}")
    print(body["bolt11"])
    return 0


def _verify_receipt(args: argparse.Namespace) -> int:
    from .core.receipts import verify_receipt

    text = sys.stdin.read().strip() if args.receipt == "-" else args.receipt
    payload = verify_receipt(text, args.pubkey)
    print(json.dumps(payload, indent=2, sort_keys=True))
    if not args.pubkey:
        print("micropay: signature valid under the key the receipt names; pass --pubkey to pin "
              "the server's key", file=sys.stderr)
    return 0


def _msat_arg(text: str) -> int:
    from .core.inputs import decimal
    value = decimal(text, 20)
    if value is None:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer (msat), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="micropay", description="Lightning micropayments (L402).")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    from . import __version__
    p.add_argument("--version", action="version", version=f"micropay {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the L402 sidecar (demo API on the sandbox by default)")
    s.add_argument("--config", help="TOML config file (default: the built-in demo)")
    s.add_argument("--listen", help="host:port (default 127.0.0.1:8402)")
    s.add_argument("--data-dir", help="keys and SQLite database (default ./.micropay)")
    s.add_argument("--store", help="sqlite:///path or postgresql://... URL")
    s.add_argument("--backend", choices=["sandbox", "cln", "fleet"])
    s.add_argument("--rpc-file", help="Core Lightning lightning-rpc socket (cln backend)")
    s.add_argument("--lightning-dir", help="instead of --rpc-file: lightningd's base directory")
    s.add_argument("--network", help="the node's network: with --lightning-dir, where its socket is (default "
                   "bitcoin); in fleet mode, the network the fleet's nodes are on (overrides [backend] network)")
    s.add_argument("--upstream", help="default upstream URL for the reverse proxy")
    s.add_argument("--exit-with-stdin", action="store_true",
                   help="shut down when stdin closes (for a supervising process that holds the other end)")

    g = sub.add_parser("get", help="HTTP request that pays L402 challenges within budgets")
    g.add_argument("url", help="the http(s) URL to request")
    g.add_argument("-X", "--method", default="GET", help="HTTP method (default %(default)s)")
    g.add_argument("-H", "--header", action="append", help="'Name: value' (repeatable)")
    g.add_argument("-d", "--data", help="request body")
    g.add_argument("--wallet", default="sandbox",
                   help="what pays: 'sandbox' (the default: the URL's server's sandbox wallet named default, "
                        "<origin>/sandbox/wallets/default), a sandbox wallet URL, cln:<lightning-rpc path>, "
                        "or nwc:<nostr+walletconnect URI> (nwc:@FILE reads it from a 0600 file)")
    g.add_argument("--max-msat", type=_msat_arg, default=10_000,
                   help="most paid for one request (msat; default %(default)s)")
    g.add_argument("--day-budget-msat", type=_msat_arg, default=100_000,
                   help="most paid to one host in 24 hours (msat; default %(default)s)")
    g.add_argument("--total-budget-msat", type=_msat_arg, default=1_000_000,
                   help="most paid in total, all hosts, ever, as recorded in --cache (msat; default %(default)s)")
    g.add_argument("--max-fee-msat", type=_msat_arg, default=1_000,
                   help="routing fee limit per payment (msat; default %(default)s)")
    g.add_argument("--cache", default="~/.micropay/client.json",
                   help="token cache and spend ledger, 0600 (default %(default)s; '' for none)")
    g.add_argument("--prefer", choices=["l402", "payment"], default="l402",
                   help="when a 402 offers both L402 and the Payment scheme (MPP) on one invoice, answer "
                        "with this one (default l402: its token is reusable); a 402 offering only one is paid "
                        "with that one")
    g.add_argument("--session", action="store_true",
                   help="open a Payment session (draft-lightning-session) for a streaming endpoint: print its "
                        "events, top it up within the budgets when the server asks, close it and get the "
                        "unspent deposit refunded to the wallet (--max-msat applies to the unit price)")
    g.add_argument("--receipt-pubkey", help="server receipt key to pin (hex); exit 3 if a receipt does not verify")
    g.add_argument("-q", "--quiet", action="store_true",
                   help="print only the body: nothing on stderr about what was paid and why")
    g.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="also log each request the client sends and each answer (as `micropay -v get`)")

    b = sub.add_parser("budget", help="what `micropay get` has spent, as its budgets count it; start them over")
    b.add_argument("action", choices=["show", "reset"])
    b.add_argument("--cache", default="~/.micropay/client.json", help="the token cache (default %(default)s)")

    w = sub.add_parser("sandbox-invoice", help="an invoice a sandbox wallet is paid on (to try payouts)")
    w.add_argument("amount_msat", type=_msat_arg, nargs="?",
                   help="the invoice's amount (left out: an amountless invoice, as a session's refund needs)")
    w.add_argument("--server", default="http://127.0.0.1:8402", help="the sandbox sidecar (default %(default)s)")
    w.add_argument("--wallet", default="default", help="the wallet's name (default %(default)s)")
    w.add_argument("--description", default="sandbox wallet")

    r = sub.add_parser("verify-receipt", help="check a Payment-Receipt offline")
    r.add_argument("receipt", help="the header value, or - for stdin")
    r.add_argument("--pubkey", help="the server's receipt public key (hex) to pin")

    k = sub.add_parser("keys", help="list, rotate or retire token root keys")
    k.add_argument("action", choices=["list", "rotate", "retire"])
    k.add_argument("kid", nargs="?")
    k.add_argument("--data-dir", help="the sidecar's or the plugin's data dir (default: the config's, or ./.micropay)")
    k.add_argument("--config", help="take the data dir from this config file")

    c = sub.add_parser("check-config", help="validate a config file")
    c.add_argument("config")

    from .games.cli import add_parsers
    add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd in ("webhooks", "apikey", "keys", "budget", "check-config", "verify-receipt"):
        # `micropay webhooks list | head`: end quietly when the reader does. Not for the
        # commands that talk over sockets, where SIGPIPE would kill on a closed connection.
        import signal as _signal
        _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncio").setLevel(logging.INFO)    # its selector line says nothing about micropay
    try:
        if args.cmd == "serve":
            asyncio.run(_serve(_config_from_args(args), args.exit_with_stdin))
            return 0
        if args.cmd == "get":
            return asyncio.run(_get(args))
        if args.cmd == "budget":
            return _budget(args)
        if args.cmd == "sandbox-invoice":
            return asyncio.run(_sandbox_invoice(args))
        if args.cmd == "verify-receipt":
            return _verify_receipt(args)
        if args.cmd == "keys":
            return _keys(args)
        if args.cmd == "check-config":
            from .seller.config_check import check_file
            problems, notes, cfg = check_file(Path(args.config))
            for line in problems:
                print(line, file=sys.stderr)
            for line in notes:
                print(f"note: {line}", file=sys.stderr)
            if problems or cfg is None:
                print(f"micropay: {len(problems)} problem{'s' if len(problems) != 1 else ''} in {args.config}",
                      file=sys.stderr)
                return 2
            print(f"{args.config}: ok ({_plural(len(cfg.routes), 'route')}, "
                  f"{_plural(len(cfg.games.catalog), 'catalog item')}, {_plural(len(cfg.games.webhooks), 'webhook')}, "
                  f"backend {cfg.backend})")
            return 0
        if args.cmd in ("apikey", "webhooks"):
            from .games.cli import dispatch
            return dispatch(args) or 0
    except MicropayError as err:
        print(f"micropay: error: {err.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as err:
        print(f"micropay: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:   # a bug or an input we did not foresee: one line, not a traceback
        log.debug("unexpected error", exc_info=True)
        print(f"micropay: error: unexpected {type(err).__name__}: {err} (run with -v for details)",
              file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
