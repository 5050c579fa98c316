"""Files that hold secrets: created 0600 atomically, refused when readable by others."""
from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from .errors import ConfigError


def private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) if needed; the directory itself is created
    0700 whatever the umask. An existing directory keeps its mode: it is the user's."""
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)
    return path


@contextlib.contextmanager
def private_umask():
    """Files created inside are 0600 and directories 0700 (the umask is per process:
    keep the block short)."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def write_secret(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`, mode 0600, parent directory created 0700."""
    private_dir(path.parent)
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


def _create_secret(path: Path, data: bytes) -> None:
    """Write a new secret file unless one appeared meanwhile: two processes starting
    together end up reading the same secret (the first one linked in wins)."""
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)              # fails if the file exists: never replaces a secret in use
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


def load_or_create_secret(path: Path, n_bytes: int) -> bytes:
    """An `n_bytes` random secret kept as hex in a 0600 file: read (refused if others can
    read it, or if it is not `n_bytes` of hex), or created the first time."""
    if not path.exists():
        _create_secret(path, os.urandom(n_bytes).hex().encode() + b"\n")
    text = read_secret(path).decode("ascii", "replace").strip()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != n_bytes:
        raise ConfigError(f"{path}: expected {n_bytes} bytes of hex (the file holds something else; "
                          "move it away to start with a new secret)")
    return raw
