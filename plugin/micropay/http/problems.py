"""Mapping domain errors to HTTP responses, in one place."""
from __future__ import annotations

import json
from http import HTTPStatus

from aiohttp import web

from ..errors import InvalidCredential, MicropayError
from ..l402 import PROBLEM_CONTENT_TYPE, problem_body


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
