"""The error catalogue: every error micropay raises on purpose. Each carries a stable
machine `code` (what clients switch on, in problem bodies and in RPC error data), an HTTP
status, and a JSON-RPC code for the plugin; the edges (sidecar, plugin, CLI) map them
once and never leak tracebacks.

Every `code` is unique, and so is every `rpc_code` but one: -32602, JSON-RPC's "invalid
params", is the code of every bad-input error (BadRequest and its kinds, ConfigError),
as lightningd's own commands use it; their `code` says which (tests/core/test_errors.py). A
payment lightningd refused keeps lightningd's own code (see plugin/glue.py).
"""
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


class BadPath(BadRequest):
    """A request target that could be read two ways (see canonical.py)."""

    code = "bad_path"


class InvalidInvoice(BadRequest):
    code = "invalid_invoice"


class InvalidReceipt(BadRequest):
    code = "invalid_receipt"


class InvalidCredential(MicropayError):
    """Well-formed but not acceptable: forged, wrong preimage, caveat not met."""

    code = "invalid_credential"
    http_status = 401
    rpc_code = 1401


class TokenExpired(InvalidCredential):
    """A credential that was valid and is no longer: a fresh challenge is the answer."""

    code = "token_expired"
    rpc_code = 1405


class Unauthorized(MicropayError):
    """A request that needs a bearer token (API key, metrics token) came without a valid one."""

    code = "unauthorized"
    http_status = 401
    rpc_code = 1406


class CreditsExhausted(MicropayError):
    code = "credits_exhausted"
    http_status = 402
    rpc_code = 1402


class PaymentSchemeError(MicropayError):
    """A "Payment" (MPP) credential that was not accepted. Answered with 402, a fresh
    challenge and the problem type the Lightning charge draft defines for the case."""

    code = "payment_credential_refused"
    http_status = 402
    rpc_code = 1420
    problem_type = "https://paymentauth.org/problems/payment-required"


class PaymentCredentialMalformed(PaymentSchemeError):
    code = "payment_credential_malformed"
    rpc_code = 1416
    problem_type = "https://paymentauth.org/problems/lightning/malformed-credential"


class PaymentUnknownChallenge(PaymentSchemeError):
    """Not a challenge this server issued, altered, for another route, or already used."""

    code = "payment_unknown_challenge"
    rpc_code = 1417
    problem_type = "https://paymentauth.org/problems/lightning/unknown-challenge"


class PaymentInvalidPreimage(PaymentSchemeError):
    code = "payment_invalid_preimage"
    rpc_code = 1418
    problem_type = "https://paymentauth.org/problems/lightning/invalid-preimage"


class PaymentChallengeExpired(PaymentSchemeError):
    code = "payment_challenge_expired"
    rpc_code = 1419
    problem_type = "https://paymentauth.org/problems/lightning/expired-invoice"


class PaymentSessionNotFound(PaymentSchemeError):
    """A session action naming a session this server does not hold."""

    code = "payment_session_not_found"
    rpc_code = 1421
    problem_type = "https://paymentauth.org/problems/lightning/session-not-found"


class PaymentSessionClosed(PaymentSchemeError):
    """An action on a session that was closed (by its client, or idle on the server)."""

    code = "payment_session_closed"
    rpc_code = 1422
    problem_type = "https://paymentauth.org/problems/lightning/session-closed"


class PaymentInsufficientBalance(PaymentSchemeError):
    """The session's balance does not cover the next unit: top it up."""

    code = "payment_insufficient_balance"
    rpc_code = 1423
    problem_type = "https://paymentauth.org/problems/lightning/insufficient-balance"


class PaymentInvalidReturnInvoice(PaymentSchemeError):
    """An open action's return invoice is not an amountless BOLT11 invoice of our network."""

    code = "payment_invalid_return_invoice"
    rpc_code = 1424
    problem_type = "https://paymentauth.org/problems/lightning/invalid-return-invoice"


class NotPaid(MicropayError):
    """Paid content asked for before its purchase was paid (the browser paywall)."""

    code = "payment_required"
    http_status = 402
    rpc_code = 1407


class StreamBalanceLow(MicropayError):
    """A request metered by an incoming stream that has not paid enough for it."""

    code = "stream_balance_low"
    http_status = 402
    rpc_code = 1415


class Forbidden(MicropayError):
    """The credential is good but lacks the scope."""

    code = "forbidden"
    http_status = 403
    rpc_code = 1408


class PayoutsDisabled(MicropayError):
    code = "payouts_disabled"
    http_status = 403
    rpc_code = 1403


class NotFound(MicropayError):
    """No such purchase, payout, stream or paywalled item."""

    code = "not_found"
    http_status = 404
    rpc_code = 1404


class Conflict(MicropayError):
    """An idempotency key reused for something else, or a per-player purchase limit."""

    code = "conflict"
    http_status = 409
    rpc_code = 1409


class PayoutCapReached(MicropayError):
    code = "payout_cap_reached"
    http_status = 409
    rpc_code = 1414


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
    rpc_code = 1504


class NoInvoiceInTime(RateLimited):
    """Fleet mode: no pooled invoice was free and no node's agent answered an on-demand
    ask within the bounded wait; nothing was handed out. Retry shortly."""

    code = "no_invoice_in_time"
    http_status = 503
    rpc_code = 1514


class StoreUnavailable(MicropayError):
    """The database cannot be reached (or stays locked): nothing was written; retry later."""

    code = "store_unavailable"
    http_status = 503
    rpc_code = 1503

    def __init__(self, message: str = "the store is unavailable right now; try again shortly",
                 retry_after_s: int = 5, **detail: object) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **detail)
        self.retry_after_s = retry_after_s


class PricingUnavailable(MicropayError):
    """A route's price_hook raised or returned no positive integer."""

    code = "pricing_unavailable"
    http_status = 503
    rpc_code = 1512


class BudgetExceeded(MicropayError):
    code = "budget_exceeded"
    http_status = 402
    rpc_code = 1410


class InvoiceMismatch(MicropayError):
    """A 402 whose invoice does not agree with its token or advertised price."""

    code = "invoice_mismatch"
    http_status = 502
    rpc_code = 1411


class ForeignChallenge(MicropayError):
    """A 402 that came from another origin than the one asked, after a redirect."""

    code = "foreign_challenge"
    http_status = 502
    rpc_code = 1412


class ResponseTooLarge(MicropayError):
    code = "response_too_large"
    http_status = 502
    rpc_code = 1413


class RequestBodyTooLarge(MicropayError):
    """A Payment credential on a request whose body is larger than the gate binds."""

    code = "request_body_too_large"
    http_status = 413
    rpc_code = 1433


class RequestTimeout(MicropayError):
    """A request body that did not arrive within the server's body deadline."""

    code = "request_timeout"
    http_status = 408
    rpc_code = 1425


class RequestFailed(MicropayError):
    """The HTTP request itself failed: bad URL, no connection, broken response."""

    code = "request_failed"
    http_status = 502
    rpc_code = 1502


class NodeError(MicropayError):
    """The Lightning backend refused or failed an operation."""

    code = "node_error"
    http_status = 502
    rpc_code = 1500


class PaymentFailed(NodeError):
    """The node's verdict: this payment failed and nothing of it is out."""

    code = "payment_failed"
    rpc_code = 1501

    @property
    def no_liquidity(self) -> bool:
        """The node found no route with the capacity (adapters say so in `detail`)."""
        return bool(self.detail.get("no_liquidity"))


class PaymentUnknown(NodeError):
    """The payment may be out (or even complete): its outcome is not known yet. Whoever
    recorded the intent keeps it, and settles it later from the node's record."""

    code = "payment_outcome_unknown"
    rpc_code = 1505


class DuplicateLabel(NodeError):
    code = "duplicate_label"
    http_status = 409
    rpc_code = 1506


class RecordExists(NodeError):
    code = "record_exists"
    rpc_code = 1508


class StaleRecord(NodeError):
    """Someone else changed the record since we read it."""

    code = "stale_record"
    rpc_code = 1509


class UpstreamError(MicropayError):
    """The upstream failed after the request may have reached it: a credit stays spent."""

    code = "upstream_error"
    http_status = 502
    rpc_code = 1510


class UpstreamUnreachable(UpstreamError):
    """No connection to the upstream could be made, so the request never reached it."""

    code = "upstream_unavailable"
    rpc_code = 1511


class UpstreamBusy(RateLimited):
    """This client already holds its share of the connections to the upstream: the
    request was not forwarded (retry when one of its requests has finished)."""

    code = "upstream_busy"
    http_status = 503
    rpc_code = 1513
