"""The store adapters: SQLite's files (both adapters run every repository's tests, see
the `store` fixture)."""


async def test_sqlite_files_are_private_from_the_first_open(tmp_path):
    import os
    import stat

    from micropay.store import CORE_SCHEMA
    from micropay.store.sqlite import SqliteStore
    old = os.umask(0o022)
    try:
        s = SqliteStore(tmp_path / "fresh" / "db.sqlite3", (CORE_SCHEMA,))
        await s.open()
        await s.execute("INSERT INTO micropay_cursors (name, value) VALUES ('c', 1)")   # WAL and shm exist now
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "fresh").iterdir()}
        await s.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o700
    assert modes == {"db.sqlite3": 0o600, "db.sqlite3-wal": 0o600, "db.sqlite3-shm": 0o600}
