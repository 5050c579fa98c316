"""The fleet agent's spend ledger (plugin/agent.py): what the payment queue has taken from
this node per UTC day, kept in the node's own records (lightningd's datastore), not in
the shared store, together with each payment's attempts (the node label it was sent
under, where the node's payment records stood, when). Whoever can write to the store's
payment table cannot make the caps forget what was paid, nor get a payment this node
settled, or has an attempt of, sent again: the agent asks the node about the attempts
recorded here, not about what the store's row says.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from ..lightning.base import RecordExists, RecordStore, StaleRecord

log = logging.getLogger("micropay.agent")

# A spend ledger entry (per payment key): [subject, msat, RESERVED or SETTLED, [[node label,
# sendpays position, unix time] of each attempt]]; an entry of an earlier version is
# [subject, msat].
RESERVED, SETTLED, FULL = "reserved", "settled", "full"
MAX_ATTEMPTS = 16        # labels kept per key (each one a restart between lease and sending)


def _settled(held: list[Any] | None) -> bool:
    return held is not None and len(held) > 2 and held[2] == SETTLED


class SpendLedger:
    """What the payment queue has taken from this node per UTC day, kept in the node's own
    records (lightningd's datastore), not in the shared store: whoever can write to the
    store's payment table cannot make the caps forget what was paid. Reserved (amount +
    the most it may pay in fees) before the node is asked to pay, idempotent by the payment's key;
    trimmed to amount + fee when paid, released when it failed."""

    def __init__(self, records: RecordStore, clock: Callable[[], float]) -> None:
        self.records, self.clock = records, clock

    def _day(self, offset: int = 0) -> str:
        return time.strftime("%Y-%m-%d", time.gmtime(self.clock() + offset * 86_400))

    async def _read(self, day: str) -> tuple[dict[str, Any], int | None]:
        found = await self.records.get(("fleet", "spent", day))
        if found is None:
            return {"total": 0, "subjects": {}, "keys": {}}, None
        return found[0], found[1]

    async def _write(self, day: str, doc: dict[str, Any], generation: int | None) -> None:
        if generation is None:
            await self.records.create(("fleet", "spent", day), doc)
        else:
            await self.records.replace(("fleet", "spent", day), doc, generation)

    async def today(self, subject: str = "") -> tuple[int, int]:
        """(all spent today, spent today for `subject`)."""
        doc, _ = await self._read(self._day())
        return int(doc["total"]), int(doc["subjects"].get(subject, 0)) if subject else 0

    async def _update(self, day: str, change: Callable[[dict[str, Any]], bool | None]) -> bool | None:
        """Read the day's record, let `change` edit it (True: edited, False: nothing to
        change, None: the key is not in it), and write it back at the generation read."""
        for _ in range(5):
            doc, generation = await self._read(day)
            outcome = change(doc)
            if not outcome:
                return outcome
            try:
                await self._write(day, doc, generation)
                return True
            except (RecordExists, StaleRecord):
                continue
        raise StaleRecord("the spend ledger kept changing underneath us")

    @staticmethod
    def _move(doc: dict[str, Any], subject: str, msat: int) -> None:
        doc["total"] = int(doc["total"]) + msat
        if subject:
            doc["subjects"][subject] = int(doc["subjects"].get(subject, 0)) + msat

    async def reserve(self, key: str, subject: str, msat: int, label: str, sendpays_start: int) -> str:
        """Reserve `msat` for `key`, about to be sent under the node label `label`, the
        node's payment records standing at `sendpays_start`. Idempotent: a retry after a
        crash keeps the first reservation and adds its attempt, in whichever day's record
        holds the key (yesterday's for a payment first sent before midnight). Returns
        RESERVED (go on), SETTLED (this node settled the key already: the queue never
        hands a settled payment out again, so the store's row was rewritten, and paying
        it would pay twice) or FULL (MAX_ATTEMPTS recorded: send nothing more under it)."""
        outcome = RESERVED

        def add(doc: dict[str, Any]) -> bool | None:
            nonlocal outcome
            held = doc["keys"].get(key)
            attempt = [label, sendpays_start, int(self.clock())]
            if held is None:
                return None
            if _settled(held):
                outcome = SETTLED
                return False
            if len(held) < 4:
                return False                        # an earlier version's entry: reserved already
            if len(held[3]) >= MAX_ATTEMPTS:
                outcome = FULL
                return False
            held[3].append(attempt)
            return True
        for offset in (-1, 0):                      # an entry the key already has, yesterday's first
            if await self._update(self._day(offset), add) is not None:
                return outcome

        def new(doc: dict[str, Any]) -> bool:
            if key in doc["keys"]:                  # made meanwhile: the next call sees it
                return False
            doc["keys"][key] = [subject, msat, RESERVED, [[label, sendpays_start, int(self.clock())]]]
            self._move(doc, subject, msat)
            return True
        if not await self._update(self._day(), new):
            return await self.reserve(key, subject, msat, label, sendpays_start)
        return RESERVED

    async def attempts(self, key: str) -> list[tuple[str, int, int]] | None:
        """(label, sendpays_start, time sent) of each attempt this node recorded for a
        reserved `key`; None if it holds no such entry (none, settled, or of an earlier
        version)."""
        for offset in (0, -1):
            doc, _ = await self._read(self._day(offset))
            held = doc["keys"].get(key)
            if held is not None:
                if len(held) < 4 or held[2] != RESERVED:
                    return None
                return [(str(a[0]), int(a[1]), int(a[2])) for a in held[3]]
        return None

    async def settle(self, key: str, final_msat: int, label: str | None = None) -> None:
        """The reservation of `key` becomes `final_msat` (0: it failed), as its attempt
        under `label` turned out. Looks in today's and yesterday's record (a payment sent
        before midnight). A settled entry is final, and an outcome under a label this node
        never recorded for the key changes nothing: the store's row names the label, and
        whoever rewrites the store must not make the caps forget a payment."""
        def trim(doc: dict[str, Any]) -> bool | None:
            held = doc["keys"].get(key)
            if held is None:
                return None
            if _settled(held):
                return False
            if label is not None and len(held) >= 4 and label not in (a[0] for a in held[3]):
                log.warning("spend ledger: %s settled under %s, not a label of this node's for it; "
                            "its reservation stays", key, label)
                return False
            subject, reserved = held[0], int(held[1])
            doc["keys"][key] = [subject, final_msat, SETTLED, held[3] if len(held) >= 4 else []]
            self._move(doc, subject, final_msat - reserved)
            return True
        for offset in (0, -1):
            if await self._update(self._day(offset), trim) is not None:
                return
