"""Fixtures: a controller home with a two-level group (helpers in ctl_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from ctl_helpers import make_home

from groupsec.controller.config import load_config


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return make_home(tmp_path)


@pytest.fixture
def config(home: Path):
    return load_config(home / "groupsec.toml")
