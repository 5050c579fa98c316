"""The L402 dialect: its wire format (wire.py), macaroons (macaroon.py) and the tokens a
gate mints and verifies (tokens.py). `micropay.l402` keeps offering the wire format's
names, as the module it replaced did."""
from .wire import (Challenge, Credential, challenge_headers, format_authorization, parse_authorization,
                   parse_challenges, payment_required_body, problem_body)

__all__ = ["Challenge", "Credential", "challenge_headers", "format_authorization", "parse_authorization",
           "parse_challenges", "payment_required_body", "problem_body"]
