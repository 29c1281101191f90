"""Fixtures of the kernel tests (they run inside the VM; see run_in_vm.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from kernel_net import IN_VM, delete_topology, make_topology


@pytest.fixture(scope="session")
def topology() -> Iterator[None]:
    """Namespaces gsk-a and gsk-b joined by a veth pair (see kernel_net)."""
    if not IN_VM:
        pytest.skip("kernel test: runs only inside the VM")
    make_topology()
    yield
    delete_topology()
