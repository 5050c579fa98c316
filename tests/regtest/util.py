"""Helpers for the regtest tier."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path


def plugin_path() -> str:
    """The installed `micropay-plugin` executable (next to this interpreter)."""
    candidate = Path(sys.executable).parent / "micropay-plugin"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("micropay-plugin")
    if found is None:
        raise RuntimeError("micropay-plugin is not installed (pip install .)")
    return found


def helper_plugin(name: str) -> str:
    """plugins/<name>.py behind a wrapper that runs it with this interpreter (the one
    that has pyln-client), whatever `python3` on PATH is."""
    import tempfile
    wrapper = Path(tempfile.gettempdir()) / f"micropay-{name}-{abs(hash(sys.executable))}"
    if not wrapper.exists():
        target = Path(__file__).parent / "plugins" / f"{name}.py"
        wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {target} \"$@\"\n")
        wrapper.chmod(0o755)
    return str(wrapper)


def listener_path() -> str:
    return helper_plugin("listener")


def opts(listener: bool = False, **extra) -> dict:
    """node_factory options loading micropay (and the notification listener)."""
    return {"plugin": [plugin_path(), listener_path()] if listener else plugin_path(), **extra}
