"""The `micropay` command: serve, get, verify-receipt, keys, check-config, apikey, webhooks."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from .config import Config, demo_config, load_config
from .errors import MicropayError

log = logging.getLogger("micropay")
SANDBOX_BANNER = """
==============================================================================
  SANDBOX MODE: an in-process test network. Invoices are real BOLT11 (regtest)
  but no bitcoin moves. Pay them with the sandbox wallet:
      micropay get --wallet sandbox http://{listen}/api/joke
==============================================================================
"""


def rpc_file_from(rpc_file: str | None, lightning_dir: str | None, network: str) -> Path | None:
    """--rpc-file, or the socket Core Lightning puts at <lightning-dir>/<network>/lightning-rpc."""
    if rpc_file:
        return Path(rpc_file).expanduser()
    if lightning_dir:
        return Path(lightning_dir).expanduser() / network / "lightning-rpc"
    return None


def _config_from_args(args: argparse.Namespace) -> Config:
    cfg = load_config(Path(args.config)) if args.config else demo_config()
    return cfg.with_overrides(
        listen=args.listen, data_dir=Path(args.data_dir) if args.data_dir else None,
        store_url=args.store, backend=args.backend,
        rpc_file=rpc_file_from(args.rpc_file, args.lightning_dir, args.network), upstream=args.upstream)


async def _serve(cfg: Config) -> None:
    from aiohttp import web

    from .sidecar.app import build_app, create_runtime, make_runner, settle_heap

    host, port = cfg.host_port()
    rt = await create_runtime(cfg)
    app = build_app(rt)
    runner = make_runner(app, shutdown_timeout=10.0, access_log=logging.getLogger("micropay.access"))
    await runner.setup()
    settle_heap()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    if rt.is_sandbox:
        log.warning(SANDBOX_BANNER.format(listen=cfg.listen))
    log.info("micropay sidecar (%s backend, store %s) listening on http://%s:%d",
             cfg.backend, cfg.effective_store_url.split("?")[0].split("@")[-1], host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: finishing in-flight requests")
    await runner.cleanup()


async def _get(args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit

    from .client import Budget, L402Client, SandboxHttpWallet, TokenCache

    parts = urlsplit(args.url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise MicropayError(f"not an http(s) URL: {args.url!r}")
    node = None
    if args.wallet == "sandbox":
        wallet = SandboxHttpWallet(f"{parts.scheme}://{parts.netloc}/sandbox/wallets/default")
    elif args.wallet.startswith(("http://", "https://")):
        wallet = SandboxHttpWallet(args.wallet)
    elif args.wallet.startswith("cln:"):
        from .client import NodeWallet
        from .lightning.cln import ClnNode
        node = ClnNode(Path(args.wallet[4:]).expanduser())
        await node.connect()
        wallet = NodeWallet(node)
    else:
        raise MicropayError("--wallet must be 'sandbox', a sandbox wallet URL, or cln:<path to lightning-rpc>")
    headers = {}
    for h in args.header or []:
        name, sep, value = h.partition(":")
        if not sep:
            raise MicropayError(f"header must be 'Name: value', got {h!r}")
        headers[name.strip()] = value.strip()
    budget = Budget(args.max_msat, args.day_budget_msat, args.total_budget_msat, args.max_fee_msat)
    cache = TokenCache(Path(args.cache).expanduser() if args.cache else None)
    say = (lambda m: None) if args.quiet else (lambda m: print(f"micropay: {m}", file=sys.stderr))
    client = L402Client(wallet, budget, cache, on_event=say, receipt_pubkey=args.receipt_pubkey)
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
    if res.paid_msat:
        summary += f"; paid {res.paid_msat} msat + {res.fee_msat} msat fee (payment_hash {res.payment_hash})"
    elif res.status < 400:
        summary += "; no payment needed (free route or cached token)"
    say(summary)
    return 0 if res.status < 400 else 1


def _keys(args: argparse.Namespace) -> int:
    from .tokens import RootKeyRing

    ring = RootKeyRing.load_or_create(Path(args.data_dir) / "root_keys.json")
    if args.action == "rotate":
        print(f"new current key: {ring.rotate()}")
    elif args.action == "retire":
        if not args.kid:
            raise MicropayError("keys retire needs a key id")
        ring.retire(args.kid)
        print(f"retired {args.kid}; restart the sidecar to stop accepting its tokens")
    for k in ring.keys.values():
        state = "current" if k.kid == ring.current else ("retired" if k.retired_at else "active")
        print(f"{k.kid}\t{state}\tcreated {k.created_at}")
    return 0


def _verify_receipt(args: argparse.Namespace) -> int:
    from .receipts import verify_receipt

    text = sys.stdin.read().strip() if args.receipt == "-" else args.receipt
    payload = verify_receipt(text, args.pubkey)
    print(json.dumps(payload, indent=2, sort_keys=True))
    if not args.pubkey:
        print("micropay: signature valid under the key the receipt names; pass --pubkey to pin "
              "the server's key", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="micropay", description="Lightning micropayments (L402).")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the L402 sidecar (demo API on the sandbox by default)")
    s.add_argument("--config", help="TOML config file (default: the built-in demo)")
    s.add_argument("--listen", help="host:port (default 127.0.0.1:8402)")
    s.add_argument("--data-dir", help="keys and SQLite database (default ./.micropay)")
    s.add_argument("--store", help="sqlite:///path or postgresql://... URL")
    s.add_argument("--backend", choices=["sandbox", "cln"])
    s.add_argument("--rpc-file", help="Core Lightning lightning-rpc socket (cln backend)")
    s.add_argument("--lightning-dir", help="instead of --rpc-file: lightningd's base directory")
    s.add_argument("--network", default="bitcoin", help="with --lightning-dir (default bitcoin)")
    s.add_argument("--upstream", help="default upstream URL for the reverse proxy")

    g = sub.add_parser("get", help="HTTP request that pays L402 challenges within budgets")
    g.add_argument("url")
    g.add_argument("-X", "--method", default="GET")
    g.add_argument("-H", "--header", action="append", help="'Name: value' (repeatable)")
    g.add_argument("-d", "--data", help="request body")
    g.add_argument("--wallet", default="sandbox",
                   help="'sandbox' (the server's sandbox wallet), a sandbox wallet URL, or cln:<lightning-rpc path>")
    g.add_argument("--max-msat", type=int, default=10_000, help="per-request budget (msat)")
    g.add_argument("--day-budget-msat", type=int, default=100_000, help="per host per day (msat)")
    g.add_argument("--total-budget-msat", type=int, default=1_000_000, help="total, all hosts (msat)")
    g.add_argument("--max-fee-msat", type=int, default=1_000, help="routing fee limit per payment")
    g.add_argument("--cache", default="~/.micropay/client.json", help="token cache and spend ledger ('' for none)")
    g.add_argument("--receipt-pubkey", help="server receipt key to pin (hex)")
    g.add_argument("-q", "--quiet", action="store_true")

    r = sub.add_parser("verify-receipt", help="check a Payment-Receipt offline")
    r.add_argument("receipt", help="the header value, or - for stdin")
    r.add_argument("--pubkey", help="the server's receipt public key (hex) to pin")

    k = sub.add_parser("keys", help="list, rotate or retire token root keys")
    k.add_argument("action", choices=["list", "rotate", "retire"])
    k.add_argument("kid", nargs="?")
    k.add_argument("--data-dir", default=".micropay")

    c = sub.add_parser("check-config", help="validate a config file")
    c.add_argument("config")

    from .games.cli import add_parsers
    add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "serve":
            asyncio.run(_serve(_config_from_args(args)))
            return 0
        if args.cmd == "get":
            return asyncio.run(_get(args))
        if args.cmd == "verify-receipt":
            return _verify_receipt(args)
        if args.cmd == "keys":
            return _keys(args)
        if args.cmd == "check-config":
            cfg = load_config(Path(args.config))
            print(f"{args.config}: ok ({len(cfg.routes)} routes, {len(cfg.games.catalog)} catalog items, "
                  f"{len(cfg.games.webhooks)} webhooks, backend {cfg.backend})")
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
    return 2


if __name__ == "__main__":
    sys.exit(main())
