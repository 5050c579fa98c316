"""Secret files: created 0600, never replaced once there, refused when others can read them."""
import os
import stat
import threading

import pytest

from micropay.core.errors import ConfigError
from micropay.core.secretfile import load_or_create_secret


def test_created_0600_and_read_back(tmp_path):
    path = tmp_path / "d" / "key"
    first = load_or_create_secret(path, 32)
    assert len(first) == 32 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_secret(path, 32) == first


def test_many_starting_together_read_one_secret(tmp_path):
    """Processes (here threads) creating the same file at once all end with the secret on
    disk: none keeps one it wrote and another replaced."""
    path = tmp_path / "key"
    got, start = [], threading.Barrier(8)

    def one():
        start.wait()
        got.append(load_or_create_secret(path, 32))
    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1 and got[0] == load_or_create_secret(path, 32)
    assert [p.name for p in tmp_path.iterdir()] == ["key"]        # no temporary files left


def test_refused_when_others_can_read_it(tmp_path):
    path = tmp_path / "key"
    load_or_create_secret(path, 32)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_or_create_secret(path, 32)
