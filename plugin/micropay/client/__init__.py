"""The paying client: an HTTP client that pays L402 and Payment challenges within budgets
(payer.py), the wallets it pays through (wallets.py, nwc_wallet.py), its persisted tokens
and spending ledger (tokencache.py), and Payment sessions (sessions.py). `micropay.client` offers every public name
the module it replaced did; they are the public API."""
from ..core.errors import BudgetExceeded
from .payer import (BUDGET_HINT, DAY_S, DEAD_KEPT_S, DEFAULT_MAX_BODY, MAX_CHALLENGE_BODY, Budget,
                    CachedToken, ClientState, L402Client, NodeWallet, PaidInvoice, PaymentNeverLeft, Result,
                    SandboxHttpWallet, Spend, TokenCache, Wallet, challenge_invoice)

__all__ = ["BUDGET_HINT", "DAY_S", "DEAD_KEPT_S", "DEFAULT_MAX_BODY", "MAX_CHALLENGE_BODY", "Budget",
           "BudgetExceeded", "CachedToken", "ClientState", "L402Client", "NodeWallet", "PaidInvoice",
           "PaymentNeverLeft", "Result", "SandboxHttpWallet", "Spend", "TokenCache", "Wallet",
           "challenge_invoice"]
