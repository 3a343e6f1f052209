"""Fixtures of the in-process tier (see ``harness``): a daemon per test on the test's clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from inprocess.harness import Clock, InProcess, config
from scratchd.api.app import create_app
from scratchd.config import parse_config
from scratchd.daemon import Daemon


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def settings(tmp_path: Path) -> dict[str, Any]:
    """The config the ``scratchd`` fixture starts with; a test may change it first."""
    return config(tmp_path, gc={"interval": "1h", "orphan_grace": "10m"})


@pytest.fixture
async def scratchd(settings: dict[str, Any], clock: Clock) -> AsyncIterator[InProcess]:
    daemon = Daemon(parse_config(settings), clock=clock)
    app = create_app(daemon)
    await daemon.start()  # what the app's lifespan does under uvicorn
    try:
        yield InProcess(daemon, app, clock)
    finally:
        await daemon.stop()
