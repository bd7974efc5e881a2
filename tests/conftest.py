"""Shared fixtures for the trio_background test suite (kept deliberately small)."""

from __future__ import annotations

import pytest

from trio_background import BackgroundTaskConfig

# The shared helpers assert (counters, invariants): give them pytest's detailed failure
# messages, as when they lived in the test modules themselves.
pytest.register_assert_rewrite("helpers")


@pytest.fixture
def small_config() -> BackgroundTaskConfig:
    """A small runtime: two slots, room for two queued jobs, five seconds to drain."""
    return BackgroundTaskConfig(max_queue_size=2, max_concurrent_tasks=2, drain_timeout=5.0)
