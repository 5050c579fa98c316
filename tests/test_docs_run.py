"""The docs' sandbox examples run as written.

Every fenced block that a doc marks with `<!-- docs-test: run -->` (run it) or
`<!-- docs-test: save FILE -->` (write it to FILE, for a later block to run) is taken
from quickstart.md, client.md, sessions.md, protocol.md ("Library use") and creators.md, and run in
a temp dir against a real `micropay serve` (the built-in demo on the sandbox) on a free
port of 127.0.0.1: the documented `127.0.0.1:8402` becomes that port, the library
snippet's 8080 another free one, `.venv/bin/` is this test's virtualenv (a `.venv`
symlink in the temp dir), and HOME is the temp dir, so the client's cache starts empty.
Shell blocks run with `set -eo pipefail`; each block has a deadline. A block that
fails, or a marker that goes missing, fails the test, so the docs cannot drift from the
program again.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers_proc import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BLOCK = re.compile(r"<!-- docs-test: (run|save [\w.-]+) -->\n```(sh|python)\n(.*?)```", re.S)
# The fewest marked blocks each doc must keep (a marker dropped by an edit fails here).
EXPECTED = {"quickstart.md": 3, "client.md": 2, "sessions.md": 3, "protocol.md": 3, "creators.md": 3}
# What the output of each doc's blocks must contain, beyond their exit status.
MUST_SAY = {
    "quickstart.md": ["paid 1000 msat", "joke", "credits left", "closed, refund"],
    "client.md": ["200", "DEBUG micropay.client: sent GET", "HTTP 200"],
    "sessions.md": ['"refundStatus": "succeeded"', "once upon a block", "refundStatus': 'succeeded'"],
    "protocol.md": ["all systems paid", '"premium": true', "[true,[\"/api/report\"]]"],
    "creators.md": ['"tag": "payRequest"', '"settled": true', '"comment":"great stream"'],
}

pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("bash", "curl", "jq", "basenc")),
                                reason="the docs' shell examples need bash, curl, jq and basenc")


def blocks(doc: str) -> list[tuple[str, str, str]]:
    """(action, language, text) of each marked block, in order."""
    return BLOCK.findall((DOCS / doc).read_text())


def venv_root() -> Path:
    here = ROOT / ".venv"
    return here if (here / "bin" / "micropay").exists() else Path(sys.prefix)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("docs-serve")
    port = free_port()
    server = ServerProcess(["serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(cwd / "data")], cwd, port)
    yield server
    server.stop()


def run_doc(doc: str, port: int, workdir: Path) -> str:
    """Run the doc's marked blocks in order in `workdir`; their output, stdout and stderr."""
    (workdir / ".venv").symlink_to(venv_root())
    app_port = free_port()
    env = dict(os.environ, HOME=str(workdir), PYTHONUNBUFFERED="1")
    env.pop("VIRTUAL_ENV", None)
    out = []
    for action, lang, text in blocks(doc):
        text = (text.replace("127.0.0.1:8402", f"127.0.0.1:{port}")
                    .replace("127.0.0.1:8080", f"127.0.0.1:{app_port}").replace("port=8080", f"port={app_port}"))
        if action.startswith("save "):
            (workdir / action.split()[1]).write_text(text)
            continue
        if lang == "sh":
            cmd = ["bash", "-c", "set -eo pipefail\n" + text]
        else:
            (workdir / "snippet.py").write_text(text)
            cmd = [str(workdir / ".venv" / "bin" / "python"), "snippet.py"]
        try:
            res = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"{doc}: a block ran over 120 s:\n{text}\n--- output so far:\n{exc.stdout}\n{exc.stderr}")
        out.append(res.stdout + res.stderr)
        assert res.returncode == 0, (f"{doc}: this block failed (exit {res.returncode}):\n{text}\n"
                                     f"--- stdout:\n{res.stdout}\n--- stderr:\n{res.stderr}")
        assert "Traceback" not in res.stderr and "micropay: error" not in res.stderr, res.stderr
    return "\n".join(out)


@pytest.mark.parametrize("doc", sorted(EXPECTED))
def test_the_docs_marked_examples_run_as_written(doc, demo, tmp_path):
    found = blocks(doc)
    assert len(found) >= EXPECTED[doc], f"{doc}: {len(found)} marked blocks, expected {EXPECTED[doc]}"
    output = run_doc(doc, demo.port, tmp_path)
    for text in MUST_SAY[doc]:
        assert text.lower() in output.lower(), f"{doc}: the output does not say {text!r}:\n{output}"


def test_every_marked_example_is_in_a_doc_this_test_runs():
    """A marker in another doc would never run: say so rather than pass in silence."""
    for path in sorted(DOCS.glob("*.md")):
        if path.name not in EXPECTED:
            assert not BLOCK.search(path.read_text()), f"{path.name} marks a block this test does not run"
