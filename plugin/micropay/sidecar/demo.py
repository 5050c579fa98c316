"""The built-in demo API that `micropay serve` puts behind the gate."""
from __future__ import annotations

import random
import re

from aiohttp import web

# What a Host header may hold to be shown back (a name or address and a port); anything
# else (raw bytes that are not UTF-8 arrive as surrogates) shows the listen address.
_HOST = re.compile(r"[A-Za-z0-9.\-]{1,253}(?::[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](?::[0-9]{1,5})?")

JOKES = [
    "Why did the node refuse the HTLC? It had no channel for that kind of talk.",
    "A satoshi walks into a bar. The bartender says: we only take millisatoshis here.",
    "How many Lightning devs does it take to change a bulb? One, but it routes through three hops.",
]
FORTUNES = ["Your channel will be balanced.", "A preimage is in your future.",
            "Low fees await you.", "Patience: the block will come."]

def front_page(rt, host: str) -> str:
    """What this sidecar sells and how to pay for it, from the running configuration."""
    lines = [f"micropay: {rt.config.service}"]
    if rt.is_sandbox:
        lines[0] += " (SANDBOX: play money, nothing here is real bitcoin)"
    else:
        lines[0] += f" (Lightning, {rt.node.network})"
    lines += ["", "Priced routes (details at /.well-known/l402.json):"]
    for r in rt.config.routes:
        methods = "|".join(sorted(r.methods)) if r.methods else "*"
        price = "dynamic price" if r.price_hook else f"{r.price_msat} msat"
        what = f"buys {r.pass_s} s" if r.pass_s else ("per request" if r.credits == 1 else f"buys {r.credits} requests")
        lines.append(f"  {methods:<9} {r.path:<22} {price} {what}")
    example = next((r.path for r in rt.config.routes if "{" not in r.path and "*" not in r.path), None)
    if example is not None:
        wallet = "--wallet sandbox" if rt.is_sandbox else "--wallet cln:<path to your node's lightning-rpc>"
        lines += ["", "Pay automatically with the micropay client:", f"  micropay get {wallet} http://{host}{example}"]
    return "\n".join(lines) + "\n"


async def joke(request: web.Request) -> web.Response:
    return web.json_response({"joke": random.choice(JOKES)})


async def fortune(request: web.Request) -> web.Response:
    return web.json_response({"fortune": random.choice(FORTUNES), "n": request.match_info["n"]})


async def echo(request: web.Request) -> web.Response:
    body = await request.read() if request.body_exists else b""
    return web.json_response({"method": request.method, "query": dict(request.query),
                              "body": body.decode("utf-8", "replace")})


def add_demo_routes(add, rt) -> None:
    async def index(request: web.Request) -> web.Response:
        host = request.host
        return web.Response(text=front_page(rt, host if _HOST.fullmatch(host) else rt.config.listen))
    add("GET", "/", index)
    add("GET", "/api/joke", joke)
    add("GET", "/api/fortune/{n}", fortune)
    add("GET", "/api/echo", echo)
    add("POST", "/api/echo", echo)
