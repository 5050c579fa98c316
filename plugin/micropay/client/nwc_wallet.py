"""Paying from any Nostr Wallet Connect wallet (`--wallet nwc:<uri>`): invoices are paid
with pay_invoice, a Payment session's return invoice is made with make_invoice.

What the wallet says decides: an error answer means nothing was paid (PaymentFailed);
no answer means it may have been (PaymentUnknown: the client keeps the intent in its
ledger, and a retry pays the same invoice, which a wallet pays once). The routing fee
limit is the wallet service's own: NIP-47 has no field for it; the fee it reports is
counted in the budgets."""
from __future__ import annotations

from ..core.errors import PaymentFailed, PaymentUnknown, RequestFailed
from ..nostr.keys import NostrError
from ..nwc.client import NoAnswer, NwcClient
from ..nwc.protocol import Code, NwcError
from ..nwc.uri import parse_uri
from .wallets import PaidInvoice


# Answers that say the wallet paid nothing (NIP-47's codes for a refusal before paying).
REFUSED = frozenset({Code.PAYMENT_FAILED, Code.QUOTA_EXCEEDED, Code.INSUFFICIENT_BALANCE, Code.RESTRICTED,
                     Code.UNAUTHORIZED, Code.NOT_IMPLEMENTED, Code.UNSUPPORTED_ENCRYPTION, Code.RATE_LIMITED})


class NwcWallet:
    def __init__(self, uri_text: str) -> None:
        try:
            self.uri = parse_uri(uri_text)
        except NostrError as exc:
            raise PaymentFailed(f"--wallet nwc: {exc}") from None
        self.client = NwcClient(self.uri)

    def __repr__(self) -> str:
        return f"NwcWallet({self.uri})"

    async def pay(self, bolt11: str, amount_msat: int, max_fee_msat: int) -> PaidInvoice:
        try:
            result = await self.client.request("pay_invoice", {"invoice": bolt11})
        except ConnectionError as exc:
            raise PaymentFailed(f"NWC wallet unreachable: {exc}") from None
        except NoAnswer as exc:
            raise PaymentUnknown(str(exc)) from None
        except NwcError as exc:
            if exc.code in REFUSED:
                raise PaymentFailed(f"the NWC wallet refused: {exc.code}: {exc.message}") from None
            # OTHER, INTERNAL or a code we do not know: the wallet does not say that nothing
            # left (ours answers OTHER while an earlier attempt at the invoice is in flight)
            raise PaymentUnknown(f"the NWC wallet answered {exc.code}: {exc.message}; whether it paid is not "
                                 "known, so the payment stays in the ledger") from None
        preimage = result.get("preimage")
        fee = result.get("fees_paid") or 0
        if not isinstance(preimage, str) or not isinstance(fee, int) or fee < 0:
            raise PaymentUnknown("the NWC wallet answered pay_invoice without a usable preimage")
        return PaidInvoice(preimage.lower(), amount_msat, fee)

    async def invoice_any(self, description: str, expiry_s: int) -> str:
        """An amountless invoice (a Payment session's refund comes back on it). NIP-47's
        make_invoice asks for an amount; wallets that insist on one cannot take refunds."""
        try:
            result = await self.client.request("make_invoice", {"description": description[:200],
                                                                "expiry": min(expiry_s, 30 * 86400)}, 30)
        except (ConnectionError, NoAnswer) as exc:
            raise RequestFailed(f"the NWC wallet made no invoice: {exc}") from None
        except NwcError as exc:
            raise RequestFailed(f"the NWC wallet made no amountless invoice for the session's refund "
                                f"({exc.code}: {exc.message})") from None
        invoice = result.get("invoice")
        if not isinstance(invoice, str):
            raise RequestFailed("the NWC wallet answered make_invoice without an invoice")
        return invoice

    async def close(self) -> None:
        await self.client.close()

