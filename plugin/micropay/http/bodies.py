"""Reading a request body on micropay's own endpoints (the sandbox wallets, the purchases
API): at most a size, within the server's body deadline (`body_timeout_s`, the same as
the gate's and the proxy's), so that a client trickling a body holds a connection for a
bounded time only. Past the deadline: RequestTimeout (408); a client gone mid-body:
ClientGoneMidBody, answered by nobody."""
from __future__ import annotations

import logging

from aiohttp import web

from ..core.errors import MicropayError
from ..core.inputs import read_bounded

log = logging.getLogger("micropay.http")

# Set by the sidecar's app (build_app) from the config; the default is the config's.
BODY_TIMEOUT = web.AppKey("micropay_body_timeout_s", float)
DEFAULT_BODY_TIMEOUT_S = 30.0


def body_deadline(request: web.Request) -> float:
    return request.config_dict.get(BODY_TIMEOUT, DEFAULT_BODY_TIMEOUT_S)


async def read_request_body(request: web.Request, limit: int) -> tuple[bytes, bool]:
    """(at most `limit` bytes of the body, True if that is all of it), read within the
    server's body deadline."""
    try:
        return await read_bounded(request.content, limit, timeout_s=body_deadline(request))
    except ConnectionResetError:
        log.debug("%s %s: the client closed the connection mid-body", request.method, request.rel_url.raw_path)
        raise ClientGoneMidBody() from None


class ClientGoneMidBody(MicropayError):
    """The client closed its connection in the middle of its request body: nothing to
    do, nobody to answer (the response is written to a closed connection, quietly), and
    no traceback to log (aiohttp logs one for an exception out of a handler)."""

    code = "client_gone"
    http_status = 400
    rpc_code = 1434

    def __init__(self, message: str = "the client closed the connection in the middle of its request body") -> None:
        super().__init__(message)
