"""Run `micropay serve` as a real process on 127.0.0.1 for end-to-end tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A 127.0.0.1 port to listen on later. pyln-testing's reservation leaves it in
    TIME_WAIT, so the kernel does not hand it out meanwhile as the local port of an
    outgoing connection (a node's connection to its peer took a port picked by binding
    port 0, and the sidecar meant for it could never bind it), and never gives it to a
    node it starts."""
    from pyln.testing.utils import reserve_unused_port
    return reserve_unused_port()


class ServerProcess:
    def __init__(self, args: list[str], cwd: Path, port: int) -> None:
        self.port = port
        self.log = open(cwd / f"serve-{port}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "micropay.cli", *args], cwd=cwd,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.read_log()}")
            try:
                urllib.request.urlopen(f"{self.url}/healthz", timeout=1).read()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not come up: {self.read_log()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def read_log(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def run_cli(*args: str, cwd: Path, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "micropay.cli", *args], cwd=cwd, input=stdin,
                          capture_output=True, text=True, timeout=timeout)
