"""The paying client: an HTTP client that pays L402 and Payment challenges within budgets
(payer.py), and Payment sessions (sessions.py). The names below are the public API."""
from .payer import (DAY_S, Budget, CachedToken, L402Client, NodeWallet, PaidInvoice, Result,
                    SandboxHttpWallet, Spend, TokenCache, Wallet)

__all__ = ["DAY_S", "Budget", "CachedToken", "L402Client", "NodeWallet", "PaidInvoice", "Result",
           "SandboxHttpWallet", "Spend", "TokenCache", "Wallet"]
