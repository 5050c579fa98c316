"""Incoming streams and settlement cursors (store/stream_usage.py, store/cursors.py)."""
import asyncio

from micropay.store.cursors import CursorRepository
from micropay.store.stream_usage import StreamUsageRepository


async def test_stream_payments_are_recorded_once_and_spent_at_most_once(store):
    repo = StreamUsageRepository(store)
    assert await repo.add_payment("h1", "s", 1, 5000, 10, "micropay") is True
    assert await repo.add_payment("h1", "s", 1, 5000, 10, "micropay") is False   # hook replay
    assert await repo.debit("s", 6000) is None
    assert await repo.debit("s", 2000) == 3000
    await repo.add_payment("h2", "s", 2, 1000, 11, "micropay")
    results = await asyncio.gather(*(repo.debit("s", 1000) for _ in range(10)))
    assert len([r for r in results if r is not None]) == 4       # 6000 in, 2000 used before
    assert await repo.balance("s") == (6000, 6000)
    (session,) = await repo.sessions("s")
    assert (session.payments, session.received_msat, session.distinct_seqs) == (2, 6000, 2)
    assert session.to_json()["stream_id"] == "s"


async def test_cursor_only_moves_forward(store):
    cursors = CursorRepository(store)
    assert await cursors.get("s") == 0
    await cursors.advance("s", 5)
    await cursors.advance("s", 3)
    assert await cursors.get("s") == 5
    await cursors.advance("s", 6)
    assert await cursors.get("s") == 6
