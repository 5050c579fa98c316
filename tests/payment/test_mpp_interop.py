"""The MPP SDKs nobody here wrote, as they come from their registries, against `micropay
serve` (a real process, sandbox backend) in front of an SSE upstream: mppx 0.11.0 (npm,
driven by node through tests/js/mppx_interop.mjs) and pympp 0.16.0 (PyPI, import `mpp`:
tests/payment/test_mpp_interop_pympp.py, on the same server).

Each drives the charge intent (a Payment-only route and a route offering L402 beside
Payment) and the session intent (open with a return invoice, bearer SSE with per-event
billing, a top-up while the stream is held, close with the refund), parses every
challenge, credential and receipt exchanged with the SDK's own code, and records a check
per step. A check's `source` is the SDK (it raised, or mppx's validator reported `fail`)
or `draft`: a MUST of the Payment drafts checked on what the SDK parsed (fresh challenges,
`Cache-Control: private` beside `Payment-Receipt`, as mppx's own server sends it). Issue 17
("Done when"): the SDKs report no failure; every failure is listed in the assertion."""
from __future__ import annotations

import json
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from ..helpers_proc import ServerProcess, free_port

JS_DIR = Path(__file__).parents[1] / "js"
DEPOSIT_UNITS = 3
UNIT_SAT = 2


# -- the server under test: `micropay serve` in front of an upstream ---------------------

class Upstream(BaseHTTPRequestHandler):
    """`/gen?n=N`: N SSE events `{"i": k}` then `data: [DONE]`; anything else: a JSON body."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        url = urlparse(self.path)
        if url.path == "/gen":
            n = min(int(parse_qs(url.query).get("n", ["3"])[0]), 100)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            for i in range(n):
                self.wfile.write(f"data: {json.dumps({'i': i})}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b": a comment costs nothing\n\ndata: [DONE]\n\n")
            self.wfile.flush()
            self.close_connection = True
            return
        body = json.dumps({"path": url.path, "joke": "why did the invoice expire?"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def config(port: int, upstream: str, data_dir: Path) -> str:
    return f"""
service = "interop"
listen = "127.0.0.1:{port}"
upstream = "{upstream}"
data_dir = "{data_dir}"
[backend]
kind = "sandbox"
[[routes]]
method = "GET"
path = "/api/paid"
price_msat = 2000
description = "Payment only"
schemes = ["payment"]
[[routes]]
method = "GET"
path = "/api/joke"
price_msat = 1000
description = "L402 and Payment"
[[routes]]
method = "GET"
path = "/gen"
price_msat = {UNIT_SAT * 1000}
description = "tokens"
[routes.session]
deposit_units = {DEPOSIT_UNITS}
hold_s = 20
unit_type = "chunk"
"""


@pytest.fixture
def served(tmp_path):
    """A fresh `micropay serve` per test: what one SDK saw offered cannot leak into another's run."""
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    upstream.daemon_threads = True
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    port = free_port()
    (tmp_path / "interop.toml").write_text(config(port, f"http://127.0.0.1:{upstream.server_address[1]}",
                                                  tmp_path / "data"))
    server = ServerProcess(["serve", "--config", "interop.toml"], tmp_path, port)
    try:
        yield server.url
    finally:
        server.stop()
        upstream.shutdown()
        upstream.server_close()


def assert_no_failures(report: dict) -> None:
    failures = [c for c in report["checks"] if not c["ok"]]
    assert report["checks"], "no checks ran"
    if failures:
        lines = [f"[{c['source']}] {c['exchange']}: {c['check']}: {c.get('detail', '')}" for c in failures]
        pytest.fail(f"{len(failures)} of {len(report['checks'])} checks failed ({report['scenario']}):\n  "
                    + "\n  ".join(lines), pytrace=False)


# -- mppx (node) ---------------------------------------------------------------------------

def _node_and_mppx() -> str | None:
    if shutil.which("node") is None:
        return "node is not on PATH"
    if not (JS_DIR / "node_modules" / "mppx" / "package.json").is_file():
        return "mppx is not installed: npm ci --prefix tests/js (.ci/run does it)"
    return None


@pytest.fixture
def node_mppx():
    """Skips (saying why) before any server starts when node or mppx is missing."""
    why = _node_and_mppx()
    if why:
        print(f"skipping the mppx interop test: {why}")
        pytest.skip(why)


def mppx(*args: str) -> dict:
    res = subprocess.run(["node", str(JS_DIR / "mppx_interop.mjs"), *args], capture_output=True, text=True,
                         timeout=180, cwd=JS_DIR)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_mppx_validate_reports_no_failure(node_mppx, served):
    """`mppx validate` (the SDK's CLI for server implementers) over /openapi.json: every priced
    route's 402, its challenge, and the answer to a malformed credential."""
    assert_no_failures(mppx("validate", served))


def test_mppx_pays_the_charge_intent_and_reports_no_failure(node_mppx, served):
    assert_no_failures(mppx("charge", served, "/api/paid", "/api/joke"))


def test_mppx_drives_a_session_over_sse_and_reports_no_failure(node_mppx, served):
    assert_no_failures(mppx("session", served, "/gen"))
