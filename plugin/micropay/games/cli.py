"""`micropay apikey ...` and `micropay webhooks ...`: they work on the sidecar's store
directly (found from --config, --data-dir or --store), so they run beside a live sidecar."""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..seller.config import Config
from ..seller.configfile import demo_config, load_config
from ..core.errors import MicropayError
from ..store import CORE_SCHEMA, Store, open_store_from_url
from .config import API_KEY_SCOPES, DEFAULT_API_KEY_SCOPES

if TYPE_CHECKING:     # the rest of the feature is imported when a command runs, not by `micropay serve`
    from .repository import Delivery


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="the sidecar's TOML config (finds data_dir and store)")
    p.add_argument("--data-dir", help="override the config's data_dir")
    p.add_argument("--store", help="override the store URL")
    p.add_argument("--json", action="store_true", help="print JSON")


def add_parsers(sub: Any) -> None:
    k = sub.add_parser("apikey", help="create, list or revoke API keys for the purchases API")
    ks = k.add_subparsers(dest="action", required=True)
    c = ks.add_parser("create", help="create a key (printed once; only its hash is stored)")
    c.add_argument("--name", required=True, help="what the key is for, e.g. 'game-server'")
    c.add_argument("--scope", action="append", choices=API_KEY_SCOPES,
                   help=f"repeatable (default: {', '.join(DEFAULT_API_KEY_SCOPES)})")
    _store_args(c)
    _store_args(ks.add_parser("list", help="list keys (never their secrets)"))
    r = ks.add_parser("revoke", help="revoke a key by its id (the 12 hex digits after mpk_)")
    r.add_argument("kid")
    _store_args(r)

    w = sub.add_parser("webhooks", help="list, inspect and redeliver webhooks; rotate secrets")
    ws = w.add_subparsers(dest="action", required=True)
    ls = ws.add_parser("list", help="recent deliveries, newest first")
    ls.add_argument("--status", choices=["pending", "delivered", "failed"])
    ls.add_argument("--endpoint", default="")
    ls.add_argument("--purchase", default="", help="only this purchase (or payout) id")
    ls.add_argument("--limit", type=int, default=50)
    _store_args(ls)
    sh = ws.add_parser("show", help="one event: its body and every endpoint's delivery state")
    sh.add_argument("event_id", type=int)
    _store_args(sh)
    rd = ws.add_parser("redeliver", help="queue an event again (all endpoints, or --endpoint)")
    rd.add_argument("event_id", type=int)
    rd.add_argument("--endpoint", default="")
    _store_args(rd)
    ro = ws.add_parser("rotate-secret", help="a new signing secret for an endpoint (the previous one keeps "
                       "signing too); with --drop-old, keep only the newest secret instead")
    ro.add_argument("endpoint")
    ro.add_argument("--drop-old", action="store_true",
                    help="make no new secret: drop every secret but the newest (the one the receiver has now)")
    _store_args(ro)


def _config(args: argparse.Namespace) -> Config:
    cfg = load_config(Path(args.config)) if args.config else demo_config()
    return cfg.with_overrides(data_dir=Path(args.data_dir) if args.data_dir else None, store_url=args.store)


async def _with_store(args: argparse.Namespace, fn) -> int:
    from .schema import GAMES_SCHEMA
    store: Store = open_store_from_url(_config(args).effective_store_url, (CORE_SCHEMA, GAMES_SCHEMA))
    await store.open()
    try:
        return await fn(store)
    finally:
        await store.close()


def _print(args: argparse.Namespace, obj: Any, lines: list[str]) -> None:
    if args.json:
        print(json.dumps(obj, indent=2, sort_keys=True))
    else:
        print("\n".join(lines))


def run_apikey(args: argparse.Namespace) -> int:
    from . import apikeys

    async def go(store: Store) -> int:
        if args.action == "create":
            key, rec = await apikeys.create_key(store, args.name, args.scope or list(apikeys.DEFAULT_SCOPES))
            _print(args, dict(rec.to_json(), key=key),
                   [key, f"(id {rec.kid}, scopes {' '.join(sorted(rec.scopes))}; shown only now: store it "
                         "in your game server's secrets)"])
        elif args.action == "list":
            keys = await apikeys.list_keys(store)
            _print(args, [k.to_json() for k in keys],
                   ["id\tstate\tscopes\tname"] + [
                       f"{k.kid}\t{'revoked' if k.revoked_at else 'active'}\t{' '.join(sorted(k.scopes))}\t{k.name}"
                       for k in keys] if keys else ["no API keys"])
        elif args.action == "revoke":
            if not await apikeys.revoke_key(store, args.kid):
                raise MicropayError(f"no active key with id {args.kid!r}")
            print(f"revoked {args.kid} (running sidecars refuse it within {apikeys.CACHE_TTL_S:g} s)")
        return 0
    return asyncio.run(_with_store(args, go))


def _delivery_line(d: Delivery) -> str:
    from .repository import DeliveryStatus
    when = d.delivered_at or d.next_at
    return (f"{d.event_id}\t{d.type}\t{d.subject_id}\t{d.endpoint}\t{d.status}\t"
            f"attempts={d.attempts}\t{'at' if d.delivered_at else 'next'}="
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(when))}"
            + (f"\t{d.last_error}" if d.last_error and d.status != DeliveryStatus.DELIVERED else ""))


def run_webhooks(args: argparse.Namespace) -> int:
    from . import webhooks

    if args.action == "rotate-secret":
        cfg = _config(args)
        ep = next((w for w in cfg.games.webhooks if w.name == args.endpoint), None)
        if ep is None:
            where = "the built-in demo config: pass --config <your sidecar's config>" if not args.config \
                else cfg.source
            raise MicropayError(f"no webhook endpoint named {args.endpoint!r} in {where}")
        f = webhooks.SecretFile(ep.secret_path(cfg.data_dir))
        if args.drop_old:
            dropped = f.drop_old()
            print(f"{f.path}: the sidecar now signs with the newest secret only ({dropped} older dropped; "
                  "no restart needed)")
            return 0
        f.rotate()
        print(f"{f.path}: a new secret is on the first line, the previous one is kept; the sidecar signs with "
              "both (no restart needed). Give the receiver the new secret, then run this again with "
              "--drop-old to sign with it only.")
        return 0

    async def go(store: Store) -> int:
        if args.action == "list":
            rows = await webhooks.list_deliveries(store, args.status or "", args.endpoint, args.purchase,
                                                  max(1, min(args.limit, 1000)))
            _print(args, [d.to_json() for d in rows], [_delivery_line(d) for d in rows] or ["no deliveries"])
        elif args.action == "show":
            rows = await webhooks.get_deliveries(store, args.event_id)
            if not rows:
                raise MicropayError(f"no deliveries for event {args.event_id}")
            body = json.loads(webhooks.event_body(rows[0]))
            _print(args, {"event": body, "deliveries": [d.to_json() for d in rows]},
                   [json.dumps(body, indent=2, sort_keys=True)] + [_delivery_line(d) for d in rows])
        elif args.action == "redeliver":
            eps = await webhooks.redeliver(store, args.event_id, args.endpoint, int(time.time()))
            if not eps:
                raise MicropayError(f"no deliveries for event {args.event_id}"
                                    + (f" to {args.endpoint!r}" if args.endpoint else ""))
            print(f"event {args.event_id} queued again for {', '.join(sorted(eps))}; a running sidecar "
                  "sends it within seconds")
        return 0
    return asyncio.run(_with_store(args, go))


def dispatch(args: argparse.Namespace) -> int | None:
    if args.cmd == "apikey":
        return run_apikey(args)
    if args.cmd == "webhooks":
        return run_webhooks(args)
    return None

