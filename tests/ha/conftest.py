"""A real 3-node etcd cluster on loopback (Debian's etcd-server), one per test module."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from groupsec.controller.etcdcluster import LocalEtcdCluster, etcd_binary
from groupsec.controller.sealing import FileKeyProvider

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))  # agent_helpers (real agent processes)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEtcdCluster]:
    if etcd_binary() is None:
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    c = LocalEtcdCluster(3, tmp_path_factory.mktemp("etcd"))
    c.start()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def sealer() -> FileKeyProvider:
    return FileKeyProvider([os.urandom(32)])


@pytest.fixture
def store_key(tmp_path: Path) -> Path:
    p = tmp_path / "store.key"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, os.urandom(32))
    os.close(fd)
    return p
