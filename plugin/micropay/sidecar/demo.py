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
STORY = ["Once upon a block, a node opened a channel.", "It routed a payment of one satoshi.",
         "The payment found its way through three hops.", "At each hop a preimage waited.",
         "The last hop revealed it, and every hop settled.", "The channel balances shifted a little.",
         "Nobody had to trust anybody.", "The node closed nothing; it kept routing."]
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
        if r.session is not None:
            what = f"per {r.session.unit_type}, from a session deposit of {r.session.deposit_units}"
        lines.append(f"  {methods:<9} {r.path:<22} {price} {what}")
    from ..seller.discovery import pay_commands
    commands = pay_commands(rt.config.routes, host, rt.is_sandbox)
    if commands:
        lines += ["", "Pay automatically with the micropay client:"] + [f"  {c}" for c in commands]
    return "\n".join(lines) + "\n"


async def joke(request: web.Request) -> web.Response:
    return web.json_response({"joke": random.choice(JOKES)})


async def fortune(request: web.Request) -> web.Response:
    return web.json_response({"fortune": random.choice(FORTUNES), "n": request.match_info["n"]})


async def echo(request: web.Request) -> web.Response:
    body = await request.read() if request.body_exists else b""
    return web.json_response({"method": request.method, "query": dict(request.query),
                              "body": body.decode("utf-8", "replace")})


async def story(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events, one sentence each (`?n=` of them, 1-8; default 8). On a session
    route each event is one unit, taken from the deposit before it is written."""
    from ..payment.scheme import sse_event
    from .paid import PAID
    from .session_gate import SESSION_METER, SSE_TYPE
    try:
        n = max(1, min(len(STORY), int(request.query.get("n", len(STORY)))))
    except ValueError:
        n = len(STORY)
    response = web.StreamResponse(headers={"Content-Type": SSE_TYPE, "Cache-Control": "no-cache"})
    paid = request.get(PAID)
    if paid is not None:
        response.headers.update(paid.headers)          # the receipt (streamed: set before prepare)
    await response.prepare(request)
    meter = request.get(SESSION_METER)
    for i, sentence in enumerate(STORY[:n]):
        if meter is not None and not await meter.charge(response):
            return response                            # the session ran dry and was not topped up
        await response.write(sse_event("message", {"n": i + 1, "text": sentence}))
    if meter is not None:
        await response.write(meter.receipt_event())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def add_demo_routes(add, rt) -> None:
    async def index(request: web.Request) -> web.Response:
        host = request.host
        return web.Response(text=front_page(rt, host if _HOST.fullmatch(host) else rt.config.listen))
    add("GET", "/", index)
    add("GET", "/api/joke", joke)
    add("GET", "/api/fortune/{n}", fortune)
    add("GET", "/api/echo", echo)
    add("POST", "/api/echo", echo)
    add("GET", "/api/story", story)
