"""Domain errors. Each carries a stable machine code, an HTTP status and a JSON-RPC
code; the edges (sidecar, plugin, CLI) map them once and never leak tracebacks."""
from __future__ import annotations


class MicropayError(Exception):
    """Base class. `code` is a stable snake_case identifier clients can switch on."""

    code = "micropay_error"
    http_status = 500
    rpc_code = -32603  # JSON-RPC internal error

    def __init__(self, message: str, **detail: object) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"error": self.code, "message": self.message}
        body.update(self.detail)
        return body


class ConfigError(MicropayError):
    code = "config_error"
    rpc_code = -32602


class BadRequest(MicropayError):
    code = "bad_request"
    http_status = 400
    rpc_code = -32602  # invalid params


class MalformedCredential(BadRequest):
    code = "malformed_credential"


class InvalidCredential(MicropayError):
    """Well-formed but not acceptable: forged, wrong preimage, caveat not met."""

    code = "invalid_credential"
    http_status = 401
    rpc_code = 1401


class CreditsExhausted(MicropayError):
    code = "credits_exhausted"
    http_status = 402
    rpc_code = 1402


class RateLimited(MicropayError):
    code = "rate_limited"
    http_status = 429
    rpc_code = 1429

    def __init__(self, message: str, retry_after_s: int = 1, **detail: object) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **detail)
        self.retry_after_s = retry_after_s


class Overloaded(RateLimited):
    code = "too_many_pending_challenges"
    http_status = 503
    rpc_code = 1503


class BudgetExceeded(MicropayError):
    code = "budget_exceeded"
    http_status = 402
    rpc_code = 1410


class InvoiceMismatch(MicropayError):
    """A 402 whose invoice does not agree with its token or advertised price."""

    code = "invoice_mismatch"
    http_status = 502
    rpc_code = 1411


class NodeError(MicropayError):
    """The Lightning backend refused or failed an operation."""

    code = "node_error"
    http_status = 502
    rpc_code = 1500


class PaymentFailed(NodeError):
    code = "payment_failed"


class DuplicateLabel(NodeError):
    code = "duplicate_label"
    http_status = 409


class UpstreamError(MicropayError):
    code = "upstream_unavailable"
    http_status = 502
    rpc_code = 1502
