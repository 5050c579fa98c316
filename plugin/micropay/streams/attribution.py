"""Which incoming stream an HTLC belongs to: bLIP-10 keysends, read from the
htlc_accepted hook's onion payload. No I/O.

A session is keyed by `micropay_stream_id` when the payer's record carries one that
looks like a secret it chose (16-64 lowercase hex characters, as micropay's stream ids
are): only such sessions can be spent on metered API access. Any other bLIP-10 stream
(other podcast apps) is keyed `<app_name>/<feedID>`: public values, so such sessions are
recorded for streampay-received but can never be spent.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..core.errors import BadRequest
from ..core.inputs import decimal, load_json
from .schedule import TLV_PODCAST
from .tlv import TlvError, onion_payload_records

SECRET_STREAM_ID = re.compile(r"[0-9a-f]{16,64}")


@dataclass(frozen=True, slots=True)
class IncomingStreamPayment:
    payment_hash: str
    stream_id: str
    seq: int
    amount_msat: int
    app_name: str

    @property
    def spendable(self) -> bool:
        return is_secret_stream_id(self.stream_id)

    @property
    def shown_id(self) -> str:
        """For logs: a secret id is a bearer credential, so only its start is shown."""
        return f"{self.stream_id[:8]}…" if self.spendable else self.stream_id


def is_secret_stream_id(value: Any) -> bool:
    return isinstance(value, str) and SECRET_STREAM_ID.fullmatch(value) is not None


def attribute(onion: dict[str, Any], htlc: dict[str, Any]) -> IncomingStreamPayment | None:
    """The stream payment this HTLC carries, or None (not a bLIP-10 stream or boost)."""
    payload = onion.get("payload")
    if not isinstance(payload, str) or not payload or not isinstance(htlc.get("payment_hash"), str):
        return None
    try:
        record = onion_payload_records(payload).get(TLV_PODCAST)
        doc = load_json(record, "bLIP-10 record") if record else None
    except (TlvError, ValueError, BadRequest):
        return None
    if not isinstance(doc, dict) or doc.get("action", "stream") not in ("stream", "boost"):
        return None
    app = str(doc.get("app_name", ""))[:64]
    secret = doc.get("micropay_stream_id")
    if is_secret_stream_id(secret):
        stream_id = secret
    else:
        stream_id = f"{app}/{doc.get('feedID') or doc.get('podcast') or 'unknown'}"[:128]
    seq = doc.get("micropay_seq")
    amount = htlc.get("amount_msat", 0)
    if not isinstance(amount, int):
        amount = decimal(str(amount).removesuffix("msat")) or 0
    return IncomingStreamPayment(htlc["payment_hash"], stream_id,
                                 seq if isinstance(seq, int) and not isinstance(seq, bool) else 0, amount, app)
