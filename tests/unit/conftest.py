from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.bridgekit import RUNNING, stop_bridge


@pytest.fixture(autouse=True)
async def _stop_leftover_bridges() -> AsyncIterator[None]:
    """A test that fails half-way still stops its bridge: its threads would hold up the run."""
    yield
    for bridge in list(RUNNING):
        await stop_bridge(bridge, deadline_s=1.0)
