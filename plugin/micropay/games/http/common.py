"""What the purchases API's handlers share: credentials, bodies, query parameters, and
turning a domain error into a problem response."""
from __future__ import annotations

import functools
import re
from typing import Any, Awaitable, Callable

from aiohttp import web

from ...core.errors import BadRequest, MicropayError
from ...http.problems import problem_response
from ...http.bodies import read_request_body
from ...core.inputs import decimal, load_json
from ..apikeys import Unauthorized
from ..service import Games

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY = 64 * 1024


def bearer(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization")
    if auth is None:
        return None
    scheme, _, value = auth.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("Authorization must be 'Bearer <API key or client token>'")
    return value.strip()


async def require_key(games: Games, request: web.Request, scope: str):
    token = bearer(request)
    if token is None:
        raise Unauthorized("an API key is required: Authorization: Bearer mpk_...")
    return await games.keys.verify(token, scope)


async def authorize_purchase(games: Games, request: web.Request, purchase_id: str, scope: str) -> str:
    """An API key with `scope`, or the client token of this very purchase (header or ?token=).
    Returns which credential it was ('key:<kid>' or 'purchase:<id>')."""
    query_token = request.query.get("token")
    if query_token is not None and not 0 < len(query_token) <= 200:
        raise BadRequest("token must be 1-200 characters")
    token = bearer(request) or query_token
    if token is None:
        raise Unauthorized("an API key or this purchase's client token is required")
    if token.startswith("mpc_"):
        if not games.purchases.check_client_token(purchase_id, token):
            raise Unauthorized("client token is not valid for this purchase")
        return f"purchase:{purchase_id}"
    return f"key:{(await games.keys.verify(token, scope)).kid}"


def api(handler: Callable[[Games, web.Request], Awaitable[web.StreamResponse]], games: Games) -> Handler:
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(games, request)
        except MicropayError as err:
            headers = {"WWW-Authenticate": 'Bearer realm="micropay"'} if err.http_status == 401 else None
            return problem_response(err, headers)
    return wrapped


async def json_body(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise BadRequest(f"body must be at most {MAX_BODY} bytes")
    raw, complete = await read_request_body(request, MAX_BODY)
    if not complete:
        raise BadRequest(f"body must be at most {MAX_BODY} bytes")
    return load_json(raw)


def query_int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    value = decimal(raw)
    if value is None or not lo <= value <= hi:
        raise BadRequest(f"{name} must be an integer in [{lo}, {hi}]")
    return value


def query_str(request: web.Request, name: str, pattern: re.Pattern[str], what: str) -> str:
    raw = request.query.get(name, "")
    if raw and not pattern.fullmatch(raw):
        raise BadRequest(f"{name} must be {what}")
    return raw
