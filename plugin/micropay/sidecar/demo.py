"""The built-in demo API that `micropay serve` puts behind the gate."""
from __future__ import annotations

import random

from aiohttp import web

JOKES = [
    "Why did the node refuse the HTLC? It had no channel for that kind of talk.",
    "A satoshi walks into a bar. The bartender says: we only take millisatoshis here.",
    "How many Lightning devs does it take to change a bulb? One, but it routes through three hops.",
]
FORTUNES = ["Your channel will be balanced.", "A preimage is in your future.",
            "Low fees await you.", "Patience: the block will come."]

INDEX = """micropay demo (SANDBOX: play money, nothing here is real bitcoin)

Priced routes (see /.well-known/l402.json):
  GET  /api/joke         1000 msat per request
  GET  /api/fortune/{n}  5000 msat buys 10 requests
  GET|POST /api/echo     2000 msat buys an hour
Pay automatically with the client and the sandbox wallet:
  micropay get http://{host}/api/joke
"""


async def index(request: web.Request) -> web.Response:
    return web.Response(text=INDEX.replace("{host}", request.host))


async def joke(request: web.Request) -> web.Response:
    return web.json_response({"joke": random.choice(JOKES)})


async def fortune(request: web.Request) -> web.Response:
    return web.json_response({"fortune": random.choice(FORTUNES), "n": request.match_info["n"]})


async def echo(request: web.Request) -> web.Response:
    body = await request.read() if request.body_exists else b""
    return web.json_response({"method": request.method, "query": dict(request.query),
                              "body": body.decode("utf-8", "replace")})


def add_demo_routes(add) -> None:
    add("GET", "/", index)
    add("GET", "/api/joke", joke)
    add("GET", "/api/fortune/{n}", fortune)
    add("GET", "/api/echo", echo)
    add("POST", "/api/echo", echo)
