"""Mapping domain errors to HTTP responses, in one place."""
from __future__ import annotations

import json
from http import HTTPStatus

from aiohttp import HttpVersion11, hdrs, web
from aiohttp.web_urldispatcher import _default_expect_handler

from ..core.errors import InvalidCredential, MicropayError
from ..l402.wire import PROBLEM_CONTENT_TYPE, problem_body


def problem_response(err: MicropayError, headers: dict[str, str] | None = None) -> web.Response:
    status = err.http_status
    body = problem_body(title=HTTPStatus(status).phrase, status=status, code=err.code,
                        detail=err.message, **err.detail)
    hdrs = {"Cache-Control": "no-store"}
    retry_after = getattr(err, "retry_after_s", None)
    if isinstance(retry_after, (int, float)):
        hdrs["Retry-After"] = str(max(1, int(retry_after + 0.999)))
    if isinstance(err, InvalidCredential):
        # RFC 9110: a 401 names the scheme to use. No invoice here: retrying without
        # the bad credential gets a fresh challenge.
        hdrs["WWW-Authenticate"] = f'L402 error="{err.code}"'
    hdrs.update(headers or {})
    return web.Response(status=status, text=json.dumps(body), content_type=PROBLEM_CONTENT_TYPE,
                        headers=hdrs)


async def expect_handler(request: web.Request) -> web.StreamResponse | None:
    """aiohttp's own handling of `Expect` (100-continue), except for an expectation it
    does not know: aiohttp's 417 echoes the header's value, and a value that is not
    UTF-8 (raw bytes arrive as surrogates) made that a 500. Ours does not echo it."""
    if request.version != HttpVersion11 or request.headers.get(hdrs.EXPECT, "").lower() == "100-continue":
        return await _default_expect_handler(request)
    raise web.HTTPExpectationFailed(text="the only expectation served is 100-continue")
