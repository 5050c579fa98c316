#!/usr/bin/env python3
"""A local regtest network to try micropay on: bitcoind and N lightningd (v26.06) with the
micropay plugin, funded channels in a line (node 1 -> node 2 -> ... -> node N).

    .venv/bin/python contrib/regtest/network.py up [--nodes 3] [--dir /tmp/micropay-regtest] [--sidecar-port 8402]
    .venv/bin/python contrib/regtest/network.py down [--dir ...]

Run it with the Python of the environment micropay is installed in (it needs pyln-client
and starts that environment's micropay-plugin).

`up` prints how to talk to each node and stays in the foreground; Ctrl-C (or `down`
from another shell) stops every daemon. Everything listens on 127.0.0.1 only.
Needs bitcoind, bitcoin-cli and lightningd on PATH, and micropay installed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pyln.client import LightningRpc

FUND_SAT = 2_000_000
CHANNEL_SAT = 1_000_000
STARTED: list[subprocess.Popen] = []   # killed if `up` fails half way


def _unblock_signals() -> None:
    """In the child, before exec: `up` blocks SIGINT/SIGTERM for itself (it waits for them
    with sigwait); the daemons must not inherit that, or `kill <pid>` would not stop them."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(predicate, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"timed out waiting for {what}")


class Bitcoind:
    def __init__(self, root: Path) -> None:
        self.dir = root / "bitcoind"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rpcport = free_port()
        self.args = [f"-datadir={self.dir}", "-regtest", f"-rpcport={self.rpcport}", "-rpcuser=micropay",
                     "-rpcpassword=micropay"]
        self.proc = subprocess.Popen(["bitcoind", *self.args,
                                      "-rpcbind=127.0.0.1", "-rpcallowip=127.0.0.1", "-fallbackfee=0.0002",
                                      "-txindex=1", "-server=1", "-listen=0", "-printtoconsole=0"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=_unblock_signals)
        STARTED.append(self.proc)
        wait(lambda: self.proc.poll() is None and self.cli("getblockchaininfo") is not None, "bitcoind", 60)
        if self.proc.poll() is not None:
            raise RuntimeError("bitcoind exited; see its debug.log in " + str(self.dir))
        self.cli("createwallet", "micropay")
        self.mine(101)

    def cli(self, *args: str) -> object:
        out = subprocess.run(["bitcoin-cli", *self.args, *args], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(out.stderr.strip())
        text = out.stdout.strip()
        try:
            return json.loads(text)
        except ValueError:
            return text

    def mine(self, n: int) -> None:
        self.cli("generatetoaddress", str(n), str(self.cli("getnewaddress")))


class Node:
    def __init__(self, root: Path, index: int, btc: Bitcoind, sidecar_port: int | None,
                 with_plugin: bool = True, options: dict[str, str] | None = None) -> None:
        self.dir = root / f"lightning-{index}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        plugin = shutil.which("micropay-plugin") or str(Path(sys.executable).parent / "micropay-plugin")
        args = ["lightningd", f"--lightning-dir={self.dir}", "--network=regtest", f"--addr=127.0.0.1:{self.port}",
                f"--alias=micropay-{index}", "--bitcoin-rpcuser=micropay", "--bitcoin-rpcpassword=micropay",
                f"--bitcoin-rpcport={btc.rpcport}", "--bitcoin-rpcconnect=127.0.0.1", "--developer",
                "--dev-fast-gossip", "--dev-bitcoind-poll=1", "--log-file=" + str(self.dir / "log")]
        if with_plugin:
            args.append(f"--plugin={plugin}")
        if sidecar_port:
            args.append(f"--micropay-listen=127.0.0.1:{sidecar_port}")
        args += [f"--{k}={v}" for k, v in (options or {}).items()]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=_unblock_signals)
        STARTED.append(self.proc)
        self.rpc_file = self.dir / "regtest" / "lightning-rpc"
        wait(lambda: self.rpc_file.exists(), f"lightningd {index}")
        self.rpc = LightningRpc(str(self.rpc_file))
        wait(lambda: self.rpc.getinfo()["blockheight"] >= 101, f"lightningd {index} to sync")
        self.id = self.rpc.getinfo()["id"]


def up(root: Path, n: int, sidecar_port: int | None, with_plugin: bool = True) -> dict:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    btc = Bitcoind(root)
    nodes = [Node(root, i + 1, btc, sidecar_port if i == n - 1 else None, with_plugin) for i in range(n)]
    for node in nodes[:-1]:
        addr = node.rpc.newaddr("bech32")
        btc.cli("sendtoaddress", addr.get("bech32") or addr["p2tr"], str(FUND_SAT / 1e8))
    btc.mine(1)
    for node in nodes[:-1]:
        wait(lambda node=node: node.rpc.listfunds()["outputs"], "funds")
    for a, b in zip(nodes, nodes[1:]):
        a.rpc.connect(b.id, "127.0.0.1", b.port)
        a.rpc.fundchannel(b.id, CHANNEL_SAT, announce=True)
    btc.mine(6)
    for a, b in zip(nodes, nodes[1:]):
        wait(lambda a=a: all(c["state"] == "CHANNELD_NORMAL" for c in a.rpc.listpeerchannels()["channels"]),
             "channels to be usable")
    btc.mine(6)   # announcement depth
    wait(lambda: len(nodes[0].rpc.listchannels()["channels"]) >= 2 * (n - 1), "gossip to reach node 1")
    state = {"dir": str(root), "bitcoind_pid": btc.proc.pid, "bitcoin_args": btc.args,
             "nodes": [{"id": x.id, "rpc_file": str(x.rpc_file), "pid": x.proc.pid, "port": x.port}
                       for x in nodes], "sidecar": f"http://127.0.0.1:{sidecar_port}" if sidecar_port else None}
    (root / "network.json").write_text(json.dumps(state, indent=1))
    return state


def down(root: Path) -> None:
    state_file = root / "network.json"
    if not state_file.exists():
        print(f"no network at {root}")
        return
    state = json.loads(state_file.read_text())
    # a pid from network.json is only ours if that process still runs on our directory
    ours = [(n["pid"], str(Path(n["rpc_file"]).parent.parent)) for n in state["nodes"]] + \
        [(state["bitcoind_pid"], str(root / "bitcoind"))]
    for node in state["nodes"]:
        try:
            LightningRpc(node["rpc_file"]).stop()
        except Exception:
            _kill(node["pid"], str(Path(node["rpc_file"]).parent.parent))
    subprocess.run(["bitcoin-cli", *state["bitcoin_args"], "stop"], capture_output=True, timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p, d) for p, d in ours):
        time.sleep(0.2)
    for p, d in ours:
        _kill(p, d)
    state_file.unlink()
    print(f"stopped the network in {root}")


def _alive(pid: int, directory: str) -> bool:
    """The process `pid` runs, and it is the one started on `directory` (not a reused pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return directory.encode() in f.read()
    except OSError:
        return False


def _kill(pid: int, directory: str) -> None:
    if _alive(pid, directory):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def usage(state: dict) -> str:
    nodes = state["nodes"]
    lines = [f"micropay regtest network in {state['dir']}:"]
    for i, n in enumerate(nodes, 1):
        lines.append(f"  node {i}: {n['id']}\n      lightning-cli --rpc-file={n['rpc_file']} getinfo")
    first, last = nodes[0]["rpc_file"], nodes[-1]
    lines += ["", "Try:",
              f"  lightning-cli --rpc-file={last['rpc_file']} micropay-invoice 21000 'a coffee'",
              f"  lightning-cli --rpc-file={first} -k streampay-start destination={last['id']} "
              "amount_msat=1000 interval_s=5 max_total_msat=20000",
              f"  lightning-cli --rpc-file={first} streampay-list"]
    if state.get("sidecar"):
        lines += [f"  micropay get --wallet cln:{first} {state['sidecar']}/api/joke   (the sidecar on node {len(nodes)})"]
    lines += ["", "Stop with Ctrl-C, or: python contrib/regtest/network.py down --dir " + state["dir"]]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["up", "down"])
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/micropay-regtest")
    ap.add_argument("--sidecar-port", type=int, default=8402, help="0 for no sidecar on the last node")
    ap.add_argument("--detach", action="store_true", help="print the usage and return, leaving it running")
    a = ap.parse_args()
    root = Path(a.dir)
    if a.action == "down":
        down(root)
        return 0
    for binary in ("bitcoind", "bitcoin-cli", "lightningd"):
        if shutil.which(binary) is None:
            print(f"{binary} is not on PATH", file=sys.stderr)
            return 2
    if not 2 <= a.nodes <= 6:
        print("--nodes must be 2 to 6", file=sys.stderr)
        return 2
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        state = up(root, a.nodes, a.sidecar_port or None)
    except BaseException:
        for proc in STARTED:
            proc.kill()
        raise
    print(usage(state), flush=True)
    if a.detach:
        return 0
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        down(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
