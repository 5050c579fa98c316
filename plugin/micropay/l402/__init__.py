"""The L402 dialect: its wire format (wire.py), macaroons (macaroon.py) and the tokens a
gate mints and verifies (tokens.py). `micropay.l402` offers every public name of the module
it replaced (the wire format's)."""
from .wire import (MAX_AUTHORIZATION_LEN, PROBLEM_CONTENT_TYPE, SCHEMES, Challenge, Credential,
                   challenge_headers, format_authorization, parse_authorization, parse_challenges,
                   payment_required_body, problem_body)

__all__ = ["MAX_AUTHORIZATION_LEN", "PROBLEM_CONTENT_TYPE", "SCHEMES", "Challenge", "Credential",
           "challenge_headers", "format_authorization", "parse_authorization", "parse_challenges",
           "payment_required_body", "problem_body"]
