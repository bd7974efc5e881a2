"""Shared fixtures for the trio_background test suite (kept deliberately small)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest
from redis_server import RedisServer

from trio_background import BackgroundTaskConfig

# The shared helpers assert (counters, invariants): give them pytest's detailed failure
# messages, as when they lived in the test modules themselves.
pytest.register_assert_rewrite("helpers")


@pytest.fixture
def small_config() -> BackgroundTaskConfig:
    """A small runtime: two slots, room for two queued jobs, five seconds to drain."""
    return BackgroundTaskConfig(max_queue_size=2, max_concurrent_tasks=2, drain_timeout=5.0)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server for the whole session, without persistence (``--save ''``)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"), "--appendonly", "no").start()
    try:
        yield server
    finally:
        server.stop()


_streams = itertools.count()


@pytest.fixture
def redis_stream() -> str:
    """A stream name no other test uses (so each test sees a queue of its own)."""
    return f"test{next(_streams)}:{os.getpid()}"
