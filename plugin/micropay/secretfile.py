"""Files that hold secrets: created 0600 atomically, refused when readable by others."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import ConfigError


def write_secret(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`, mode 0600, parent directory created 0700."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_secret(path: Path) -> bytes:
    """Read a secret file, refusing one that group or others can read or write."""
    st = path.stat()
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{path}: secret file is accessible by group/others "
            f"(mode {stat.S_IMODE(st.st_mode):o}); run: chmod 600 {path}")
    return path.read_bytes()
