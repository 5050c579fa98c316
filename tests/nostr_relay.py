"""A real Nostr relay on loopback for the tests: rust-nostr's LocalRelay (nostr-sdk, a
test extra), in a process of its own so a test can stop it and start it again on the
same port (what a relay going away looks like to its clients). Offline, in memory.

    python tests/nostr_relay.py PORT       # prints "ready ws://127.0.0.1:PORT" when listening
"""
from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path


class RelayProcess:
    def __init__(self, port: int, log_dir: Path) -> None:
        self.port = port
        self.log_path = log_dir / f"relay-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, __file__, str(self.port)], stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the relay exited: {self.log_path.read_text(errors='replace')}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("the relay did not come up within 20 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


async def _serve(port: int) -> None:
    import nostr_sdk
    relay = nostr_sdk.LocalRelayBuilder().addr("127.0.0.1").port(port).build()
    await relay.run()
    print(f"ready {await relay.url()}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1])))
