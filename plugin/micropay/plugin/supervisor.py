"""The sidecar the plugin runs for its node (`micropay-listen`): a `micropay serve`
child process, restarted with backoff when it dies, stopped with the plugin.

The sidecar never outlives its supervisor: it is started with `--exit-with-stdin` and
its stdin is a pipe from the plugin, so when the plugin process ends in any way (a
kill -9 of the plugin or of lightningd included) the pipe closes and the sidecar shuts
down. Its pid is kept in <data dir>/sidecar.pid, so a restarted plugin also stops a
sidecar left over from before (one started by an older version) and gets its port back.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path

from ..core.secretfile import write_secret
from ..core.tasks import Backoff

log = logging.getLogger("micropay.plugin")
PID_FILE = "sidecar.pid"


class SidecarSupervisor:
    def __init__(self, rpc_file: str, data_dir: Path, listen: str, config: str | None) -> None:
        self.rpc_file, self.data_dir, self.listen, self.config = rpc_file, data_dir, listen, config
        self.proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self.restarts = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise())

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "micropay.cli", "serve", "--backend", "cln", "--rpc-file", self.rpc_file,
               "--data-dir", str(self.data_dir), "--listen", self.listen, "--exit-with-stdin"]
        return cmd + (["--config", self.config] if self.config else [])

    async def _supervise(self) -> None:
        await stop_leftover(self.data_dir / PID_FILE, self.data_dir)
        backoff = Backoff(first_s=1.0, max_s=60.0)
        while True:
            started = time.monotonic()
            log_file = os.fdopen(os.open(self.data_dir / "sidecar.log",
                                         os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")
            self.proc = await asyncio.create_subprocess_exec(*self.command(), stdin=asyncio.subprocess.PIPE,
                                                             stdout=log_file, stderr=asyncio.subprocess.STDOUT)
            log_file.close()
            write_secret(self.data_dir / PID_FILE, f"{self.proc.pid}\n".encode())
            log.info("sidecar started (pid %d) on %s", self.proc.pid, self.listen)
            code = await self.proc.wait()
            if time.monotonic() - started > 60:
                backoff.reset()            # it ran a while: a new failure starts the series over
            self.restarts += 1
            wait = backoff.next()
            log.warning("sidecar exited with %s; restarting in %.1fs (restart %d; its log: %s)", code, wait,
                        self.restarts, self.data_dir / "sidecar.log")
            await asyncio.sleep(wait)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except asyncio.TimeoutError:
                self.proc.kill()
        with contextlib.suppress(OSError):
            (self.data_dir / PID_FILE).unlink()


async def stop_leftover(pid_file: Path, data_dir: Path) -> None:
    """Stop a sidecar an earlier run of the plugin left behind, if it is still ours."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return
    if b"serve" not in cmdline or str(data_dir).encode() not in cmdline:
        return                      # the pid was reused by something else: not ours to stop
    log.warning("stopping a sidecar left over from an earlier run (pid %d)", pid)
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists() or _zombie(pid):
                return
            await asyncio.sleep(0.1)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True
