"""No request can write a log line of its own (issue 18, section 3): the access log
shows the target as sent, with control characters escaped, never decoded."""
from __future__ import annotations

import asyncio
import logging

from micropay.sidecar.limits import ThrottledLog, escape_for_log

from ..conftest import make_config, start_sidecar
from ..rawhttp import RecordingUpstream, raw_request

FORGED = "2026-12-04 00:00:00,000 WARNING micropay.sessions: session forged closed"
TARGETS = ["/x%0a" + FORGED.replace(" ", "%20"), "/x%0d%0a" + FORGED.replace(" ", "%20"),
           "/api/joke%0a" + FORGED.replace(" ", "%20"), "/x%1b[2J%e2%80%a8%c2%85%00%ff"]


async def test_a_target_with_encoded_newlines_writes_one_access_log_line(tmp_path, caplog):
    up = await RecordingUpstream().start()
    sc = await start_sidecar(make_config(tmp_path, f'demo = true\nupstream = "{up.url}"\n'
                                         '[[routes]]\npath = "/api/joke"\nprice_msat = 1000\n'))
    try:
        with caplog.at_level(logging.INFO):
            for target in TARGETS:
                status, _, _ = await asyncio.to_thread(raw_request, sc.port, "GET", target)
                assert status < 500
        access = [r for r in caplog.records if r.name.endswith("access")]
        assert len(access) == len(TARGETS)
        for record in caplog.records:
            line = record.getMessage()
            assert line.isprintable(), repr(line)          # no newline, CR, ESC, NUL, NEL, LS
        assert any(FORGED.replace(" ", "%20") in r.getMessage() for r in access)
    finally:
        await sc.runner.cleanup()
        await up.runner.cleanup()


def test_escape_for_log_leaves_printable_text_and_escapes_the_rest():
    assert escape_for_log("/api/jöke?x=1") == "/api/jöke?x=1"
    assert escape_for_log("/a\nb\r\x1b\x7f\x85\u2028\udcff") == "/a%0Ab%0D%1B%7F%C2%85%E2%80%A8%FF"


async def test_an_event_repeated_many_times_is_logged_once_per_interval_with_its_count(caplog):
    throttled = ThrottledLog(logging.getLogger("micropay.test"), logging.WARNING, "refused %s", interval_s=0.3)
    with caplog.at_level(logging.WARNING, "micropay.test"):
        for i in range(10_000):
            throttled(f"client {i}")
        await asyncio.sleep(0.5)
    lines = [r.getMessage() for r in caplog.records if r.name == "micropay.test"]
    assert lines == ["refused client 0", "refused client 9999 (9999 times in the last 0.3 s; the latest shown)"]


async def test_200_malformed_requests_log_a_few_lines_not_a_traceback_each(tmp_path, caplog):
    """aiohttp's server logger writes a traceback per request it cannot parse; the
    sidecar counts them and logs one line per interval instead."""
    sc = await start_sidecar(make_config(tmp_path, 'demo = true\n'))
    bad = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"

    async def one() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
        writer.write(bad)
        try:
            return await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
    try:
        with caplog.at_level(logging.DEBUG):
            answers = []
            for _ in range(20):
                answers += await asyncio.gather(*(one() for _ in range(10)))
            assert all(a.split(b" ", 2)[1:2] == [b"400"] for a in answers), answers[:2]
            await sc.runner.cleanup()                        # flushes the counted ones
            lines = [r for r in caplog.records if r.levelno >= logging.INFO
                     and (r.name.startswith("aiohttp.server") or "malformed" in r.getMessage())]
    finally:
        await sc.runner.cleanup()
    text = [r.getMessage() for r in lines]
    print(f"200 malformed requests: {len(lines)} log lines: {text}")
    assert len(lines) <= 3, text
    assert not any(r.exc_info for r in lines)
    assert any("200 times" in t or "199 times" in t for t in text), text
