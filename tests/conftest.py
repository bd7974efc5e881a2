"""Shared fixtures for the trio_background test suite (kept deliberately small)."""

from __future__ import annotations

import pytest

from trio_background import BackgroundTaskConfig


@pytest.fixture
def small_config() -> BackgroundTaskConfig:
    """A small runtime: two slots, room for two queued jobs, five seconds to drain."""
    return BackgroundTaskConfig(max_queue_size=2, max_concurrent_tasks=2, drain_timeout=5.0)
