"""Streaming payments: the scheduling and accounting rules, free of I/O.

A stream owes `amount_msat` every `interval_s`, split between recipients by share.
Each interval's amount is accrued into per-recipient debts (`owed`); payments pay
debts down. Exact integer split: recipient i accrues (amount*share_i + carry_i) //
total_shares and carries the remainder, so no millisatoshi is ever lost to rounding.

Pacing (AIMD, per recipient): a payment is at most `piece` msat. A liquidity failure
halves the piece (down to MIN_PIECE_MSAT), each success grows it by an eighth of the
per-interval amount, back up to that amount. Failures back off exponentially per
recipient; a recipient failing MAX_CONSECUTIVE_FAILURES times in a row is suspended
while the others keep being paid; when every recipient is suspended, the stream pauses
with the reason. Budget: amount + fees paid, plus the fee cap of the next payment,
never exceed max_total_msat.

Intervals missed while the node was down are not paid in a burst afterwards: the
schedule resumes at the next slot and the skipped slots are counted.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..core.errors import BadRequest
from ..creators.lnurl import LnurlError, address_parts

MIN_PIECE_MSAT = 1000
MAX_CONSECUTIVE_FAILURES = 5
MAX_BACKOFF_S = 300.0
MAX_RECIPIENTS = 32
STATES = ("active", "paused", "stopped", "completed")
TLV_PODCAST = 7629169            # bLIP-10 value-for-value record


@dataclass
class Recipient:
    """One payee of a stream: what the caller asked for, and its own accounts."""

    destination: str             # node id (66 hex), BOLT12 offer ("lno1...") or Lightning Address (name@host)
    share: int = 1
    name: str = ""
    owed: int = 0                # accrued and not yet paid
    carry: int = 0               # remainder of the exact split, in 1/total_shares msat
    piece: int = 0               # the largest payment to try now (AIMD)
    retry_at: float = 0.0
    consecutive_failures: int = 0
    suspended: bool = False
    paid_msat: int = 0

    @property
    def kind(self) -> str:
        """How it is paid: "node" (keysend), "offer" (BOLT12) or "address" (LNURL-pay)."""
        if "@" in self.destination:
            return "address"
        return "offer" if self.destination.lower().startswith("lno1") else "node"


@dataclass
class InFlight:
    """A payment written to the datastore before it is sent."""

    seq: int
    recipient: int
    amount_msat: int
    label: str
    started_at: float
    sendpays_start: int = 0      # listsendpays created_index to search from on reconcile


@dataclass
class Stream:
    id: str
    recipients: list[Recipient]
    amount_msat: int
    interval_s: int
    max_total_msat: int | None
    max_fee_msat: int
    created_at: float
    label: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    state: str = "active"
    reason: str | None = None
    next_due: float = 0.0
    intervals: int = 0
    missed_intervals: int = 0
    paid_msat: int = 0
    fees_msat: int = 0
    payments: int = 0
    failures: int = 0
    last_error: str | None = None
    seq: int = 0
    in_flight: InFlight | None = None
    last_paid_at: float | None = None

    # -- construction and persistence ---------------------------------------
    @classmethod
    def create(cls, stream_id: str, recipients: list[Recipient], amount_msat: int, interval_s: int,
               max_total_msat: int | None, max_fee_msat: int, now: float, label: str = "",
               metadata: dict[str, Any] | None = None) -> "Stream":
        s = cls(stream_id, recipients, amount_msat, interval_s, max_total_msat, max_fee_msat, now,
                label, metadata or {}, next_due=now)
        for i, r in enumerate(recipients):
            r.piece = s.full_piece(i)
        return s

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready view (shares lists with the stream: serialize it right away).
        Hand-built: dataclasses.asdict deep-copies and was most of the scheduler's CPU."""
        doc = {name: getattr(self, name) for name in _STREAM_FIELDS}
        doc["recipients"] = [vars(r).copy() for r in self.recipients]
        doc["in_flight"] = vars(self.in_flight).copy() if self.in_flight is not None else None
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "Stream":
        doc = dict(doc)
        recipients = [dict(r) for r in doc["recipients"]]
        # Release 0.1.0 kept the per-recipient accounts in parallel lists on the stream.
        for old, new in _PER_RECIPIENT_LISTS.items():
            values = doc.pop(old, None)
            if values is not None:
                for r, v in zip(recipients, values, strict=True):
                    r[new] = v
        doc["recipients"] = [Recipient(**r) for r in recipients]
        doc["in_flight"] = InFlight(**doc["in_flight"]) if doc.get("in_flight") else None
        return cls(**doc)

    # -- rules -----------------------------------------------------------------
    @property
    def total_shares(self) -> int:
        return sum(r.share for r in self.recipients)

    def full_piece(self, i: int) -> int:
        """The recipient's share of one interval, rounded up: the largest piece."""
        return max(MIN_PIECE_MSAT, -(-self.amount_msat * self.recipients[i].share // self.total_shares))

    def budget_left(self) -> int | None:
        if self.max_total_msat is None:
            return None
        return self.max_total_msat - self.paid_msat - self.fees_msat

    def accrue(self, now: float) -> int:
        """Accrue the interval that is due (at most one; older missed slots are
        skipped and counted). Returns how many intervals were accrued (0 or 1)."""
        if self.state != "active" or now < self.next_due:
            return 0
        behind = int((now - self.next_due) // self.interval_s)
        if behind:
            self.missed_intervals += behind
            self.next_due += behind * self.interval_s
        total = self.total_shares
        for r in self.recipients:
            numerator = self.amount_msat * r.share + r.carry
            r.owed += numerator // total
            r.carry = numerator % total
        self.intervals += 1
        self.next_due += self.interval_s
        return 1

    def next_payment(self, now: float) -> tuple[int, int] | None:
        """(recipient index, amount) to pay now, or None. May complete the stream
        when the budget cannot cover another payment."""
        if self.state != "active" or self.in_flight is not None:
            return None
        left = self.budget_left()
        for k in range(len(self.recipients)):
            i = (self.seq + k) % len(self.recipients)     # round robin
            r = self.recipients[i]
            if r.owed <= 0 or r.suspended or now < r.retry_at:
                continue
            amount = min(r.owed, r.piece)
            if left is not None:
                amount = min(amount, left - self.max_fee_msat)
                if amount <= 0:
                    self.state, self.reason = "completed", "budget exhausted"
                    return None
            return i, amount
        return None

    def wake_at(self) -> float | None:
        """When this stream next needs attention (None: not until something changes)."""
        if self.state != "active":
            return None
        times = [self.next_due]
        for r in self.recipients:
            if r.owed > 0 and not r.suspended:
                times.append(r.retry_at)
        return min(times)

    def begin(self, recipient: int, amount: int, now: float, sendpays_start: int = 0) -> InFlight:
        self.seq += 1
        self.in_flight = InFlight(self.seq, recipient, amount, f"streampay-{self.id}-{self.seq}",
                                  now, sendpays_start)
        return self.in_flight

    def succeeded(self, fee_msat: int, now: float) -> None:
        f = self.in_flight
        assert f is not None
        self.last_paid_at = now
        r = self.recipients[f.recipient]
        r.owed -= f.amount_msat
        r.paid_msat += f.amount_msat
        self.paid_msat += f.amount_msat
        self.fees_msat += fee_msat
        self.payments += 1
        r.consecutive_failures = 0
        r.retry_at = 0.0
        full = self.full_piece(f.recipient)
        r.piece = min(full, r.piece + max(1, full // 8))
        self.in_flight = None

    def failed(self, error: str, liquidity: bool, now: float) -> None:
        f = self.in_flight
        assert f is not None
        r = self.recipients[f.recipient]
        self.failures += 1
        r.consecutive_failures += 1
        self.last_error = error
        if liquidity:
            r.piece = max(MIN_PIECE_MSAT, r.piece // 2)
        backoff = min(MAX_BACKOFF_S, float(self.interval_s), 2.0 ** (r.consecutive_failures - 1))
        r.retry_at = now + backoff
        if r.consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
            r.suspended = True
            if all(x.suspended for x in self.recipients):
                self.state = "paused"
                self.reason = f"every recipient failed {MAX_CONSECUTIVE_FAILURES} times in a row; last: {error}"
        self.in_flight = None

    def abandon(self) -> None:
        """The in-flight payment provably never left: forget it without penalty."""
        self.in_flight = None

    def pause(self, reason: str) -> None:
        self._require({"active"}, "pause")
        self.state, self.reason = "paused", reason

    def resume(self, now: float) -> None:
        self._require({"paused"}, "resume")
        self.state, self.reason = "active", None
        for r in self.recipients:
            r.suspended, r.consecutive_failures, r.retry_at = False, 0, 0.0
        if self.next_due < now:
            self.next_due = now

    def stop(self) -> None:
        self._require({"active", "paused"}, "stop")
        self.state, self.reason = "stopped", "stopped by request"

    def _require(self, states: set[str], action: str) -> None:
        if self.state not in states:
            raise BadRequest(f"cannot {action} a stream that is {self.state}")

    def status(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id, "label": self.label, "state": self.state, "reason": self.reason,
            "amount_msat": self.amount_msat, "interval_s": self.interval_s,
            "max_total_msat": self.max_total_msat, "max_fee_msat": self.max_fee_msat,
            "paid_msat": self.paid_msat, "fees_msat": self.fees_msat, "payments": self.payments,
            "failures": self.failures, "last_error": self.last_error, "intervals": self.intervals,
            "missed_intervals": self.missed_intervals, "last_paid_at": _seconds(self.last_paid_at),
            "next_due": _seconds(self.next_due) if self.state == "active" else None,
            "in_flight": dict(asdict(self.in_flight), started_at=_seconds(self.in_flight.started_at))
            if self.in_flight else None,
            "recipients": [{"destination": r.destination, "name": r.name, "share": r.share,
                            "paid_msat": r.paid_msat, "owed_msat": r.owed,
                            "suspended": r.suspended, "piece_msat": r.piece}
                           for r in self.recipients],
            "metadata": self.metadata, "created_at": _seconds(self.created_at),
        }

    def tlv_record(self, app_name: str = "micropay") -> dict[str, str]:
        """bLIP-10 record for the in-flight keysend, as xkeysend's extratlvs."""
        f = self.in_flight
        assert f is not None
        doc = {"action": "stream", "value_msat": f.amount_msat, "value_msat_total": self.amount_msat,
               "ts": int(self.intervals * self.interval_s), "app_name": app_name,
               "micropay_stream_id": self.id, "micropay_seq": f.seq}
        name = self.recipients[f.recipient].name
        if name:
            doc["name"] = name
        for key in ("sender_name", "message", "podcast", "episode", "feedID", "itemID"):
            if key in self.metadata:
                doc[key] = self.metadata[key]
        return {str(TLV_PODCAST): json.dumps(doc, separators=(",", ":")).encode().hex()}

    def address_comment(self) -> str:
        """The LUD-12 comment sent with the in-flight payment to a Lightning Address: the
        bLIP-10 fields a keysend would carry, as one line of text, most telling first
        (the service may keep only its first commentAllowed characters), e.g.
        "alice: great show | show - episode 12 | micropay stream 1a2b3c4d5e6f7a8b #3"."""
        f = self.in_flight
        assert f is not None
        m = {k: _one_line(v) for k, v in self.metadata.items()
             if k in _COMMENT_FIELDS and v is not None and _one_line(v)}
        parts = []
        said = ": ".join(m[k] for k in ("sender_name", "message") if k in m)
        if said:
            parts.append(said)
        show = " - ".join(m[k] for k in ("podcast", "episode") if k in m)
        if show:
            parts.append(show)
        parts.append(f"micropay stream {self.id[:16]} #{f.seq}")
        return " | ".join(parts)


_STREAM_FIELDS = tuple(f.name for f in fields(Stream))
_PER_RECIPIENT_LISTS = {"owed": "owed", "carry": "carry", "piece": "piece", "retry_at": "retry_at",
                        "consecutive_failures": "consecutive_failures", "suspended": "suspended",
                        "paid_by_recipient": "paid_msat"}


_COMMENT_FIELDS = ("sender_name", "message", "podcast", "episode")


def _one_line(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())[:500]


def _seconds(t: float | None) -> int | None:
    """Timestamps in answers are whole unix seconds, as on the receiving side."""
    return None if t is None else int(round(t))


# -- input validation -------------------------------------------------------------

def parse_recipients(destination: Any, splits: Any) -> list[Recipient]:
    if splits is None:
        return [Recipient(_destination(destination, "destination"))]
    if not isinstance(splits, list) or not 1 <= len(splits) <= MAX_RECIPIENTS:
        raise BadRequest(f"splits must be a list of 1 to {MAX_RECIPIENTS} recipients")
    out = []
    for k, s in enumerate(splits):
        if not isinstance(s, dict):
            raise BadRequest(f"splits[{k}] must be an object with destination and share")
        share = s.get("share", 1)
        if not isinstance(share, int) or isinstance(share, bool) or not 1 <= share <= 1_000_000:
            raise BadRequest(f"splits[{k}].share must be an integer in [1, 1000000]")
        name = s.get("name", "")
        if not isinstance(name, str) or len(name) > 100:
            raise BadRequest(f"splits[{k}].name must be a string of at most 100 characters")
        out.append(Recipient(_destination(s.get("destination"), f"splits[{k}].destination"), share, name))
    destinations = [r.destination for r in out]
    if len(set(destinations)) != len(destinations):
        raise BadRequest("splits name the same destination twice; give it one entry with the summed share")
    if destination is not None and _destination(destination, "destination") not in destinations:
        raise BadRequest("with splits, destination must be omitted or be one of the split destinations")
    return out


def _destination(value: Any, name: str) -> str:
    if isinstance(value, str):
        v = value.strip()
        if len(v) == 66 and v[:2] in ("02", "03") and all(c in "0123456789abcdef" for c in v.lower()):
            return v.lower()
        if v.lower().startswith("lno1") and len(v) < 4096:
            return v
        if "@" in v:
            try:
                user, host = address_parts(v)
            except LnurlError as exc:
                raise BadRequest(f"{name} is not a Lightning Address: {exc}") from None
            return f"{user}@{host}"
    raise BadRequest(f"{name} must be a node id (66 hex characters), a BOLT12 offer (lno1...) "
                     "or a Lightning Address (name@host)")
