"""ClnNode.pay when an earlier attempt of the same invoice is still in flight (after a
restart): wait for lightningd's verdict instead of failing at once. A scripted RPC."""
import hashlib

import pytest

from micropay.core.errors import PaymentUnknown
from micropay.lightning.cln import ClnNode, ClnRpcError

PREIMAGE = "11" * 32
HASH = hashlib.sha256(bytes.fromhex(PREIMAGE)).hexdigest()
IN_PROGRESS = {"code": 200, "message": "Payment with groupid=1 still in progress, cannot retry before that completes."}


class ScriptedRpc:
    def __init__(self, sendpays: list[str], xpay_ok_after: int | None = None):
        self.sendpays, self.xpay_calls, self.xpay_ok_after = list(sendpays), 0, xpay_ok_after

    async def call(self, method, params=None, timeout_s=None):
        if method == "xpay":
            self.xpay_calls += 1
            if self.xpay_ok_after is not None and self.xpay_calls > self.xpay_ok_after:
                return {"payment_preimage": PREIMAGE, "amount_msat": 7000, "amount_sent_msat": 7001}
            raise ClnRpcError("xpay", IN_PROGRESS)
        if method == "decode":
            return {"payment_hash": HASH}
        if method == "listsendpays":
            state = self.sendpays.pop(0) if len(self.sendpays) > 1 else self.sendpays[0]
            part = {"status": state, "amount_msat": 7000, "amount_sent_msat": 7002}
            if state == "complete":
                part["payment_preimage"] = PREIMAGE
            return {"payments": [part]}
        raise AssertionError(method)


def node(rpc, wait_s=5.0):
    n = ClnNode("/nonexistent")
    n.rpc, n.pending_wait_s = rpc, wait_s
    return n


async def test_an_earlier_attempt_that_completes_is_the_payment():
    rpc = ScriptedRpc(["pending", "pending", "complete"])
    paid = await node(rpc).pay("lnbcrt70n1x")
    assert paid.preimage == PREIMAGE and paid.fee_msat == 2 and rpc.xpay_calls == 1


async def test_an_earlier_attempt_that_fails_is_followed_by_a_new_payment():
    rpc = ScriptedRpc(["pending", "failed"], xpay_ok_after=1)
    paid = await node(rpc).pay("lnbcrt70n1x")
    assert paid.preimage == PREIMAGE and paid.fee_msat == 1 and rpc.xpay_calls == 2


async def test_an_attempt_still_pending_after_the_wait_is_unknown_not_failed():
    rpc = ScriptedRpc(["pending"])
    with pytest.raises(PaymentUnknown):
        await node(rpc, wait_s=0.6).pay("lnbcrt70n1x")
    assert rpc.xpay_calls == 1
