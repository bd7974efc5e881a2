"""Durable jobs over Redis: one queue served by workers on any number of machines.

The same `~trio_background.durable.DurableQueue` as `~trio_background.durable.open_sqlite_queue`
gives, kept in a Redis server and served through a Redis Streams consumer group. Every
state change is one server-side script (atomic), so leases, fencing, retries, dead
letters and the queue-wide statistics hold across every worker. Needs the ``redis``
extra (``pip install 'trio-background[redis]'``, which installs ``coredis``) and Redis
6.2 or later. See the "Scaling out with Redis" page of the docs::

    from trio_background.redis import open_redis_queue

    async with open_redis_queue("redis://127.0.0.1:6379/0", tasks) as queue:
        job_id = await queue.enqueue(send_email, "ada@example.com", "Hi")

.. versionadded:: 2.0
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from ._store import SchemaVersionError
from .durable import DurableQueue, TaskRegistry, _check_options, _open_queue

__all__ = ["SchemaVersionError", "open_redis_queue"]


@contextlib.asynccontextmanager
async def open_redis_queue(
    url: str,
    registry: TaskRegistry,
    *,
    stream: str = "trio_background",
    group: str = "workers",
    consumer: str | None = None,
    lease: float = 30.0,
    max_pending: int | None = None,
    keep_completed: float = 86400.0,
) -> AsyncIterator[DurableQueue]:
    """Open the durable queue kept in the Redis server at ``url``, under ``stream``.

    Args:
        url: Where the server is, with its password and database:
            ``redis://[[user]:password@]host[:port][/db]``, or ``rediss://...`` for TLS
            (certificate options as query arguments, e.g. ``?ssl_ca_certs=/path/ca.pem``),
            or ``unix:///path/to/redis.sock``.
        registry: The tasks jobs may name.
        stream: The Redis stream of the queue; its other keys are named
            ``<stream>:...``. Queues with different streams are independent.
        group: The consumer group the workers serve in: every worker of one queue uses
            the same group.
        consumer: This process's name in the group (what ``XINFO CONSUMERS`` and
            ``XPENDING`` show); by default host name, process id and a number. Give
            each process a name of its own.
        lease: Seconds a claim lasts without renewal; a job whose worker died runs
            again this long after it was last renewed. Renewals come every third of it.
        max_pending: Refuse `~trio_background.durable.DurableQueue.enqueue` with
            `~trio_background.QueueFullError` while this many jobs are unfinished
            (`None`: no limit).
        keep_completed: Seconds a completed job's record is kept (then deleted within
            a minute; the ``completed`` count keeps it).

    Raises:
        SchemaVersionError: The keys under ``stream`` hold another version's queue,
            or something that is not a queue.
        ImportError: ``coredis`` is not installed.
    """
    for name, value in (("url", url), ("stream", stream), ("group", group)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, not {type(value).__name__}")
        if not value:
            raise ValueError(f"{name} must not be empty")
    if consumer is not None and (not isinstance(consumer, str) or not consumer):
        raise TypeError(f"consumer must be a non-empty str or None, not {consumer!r}")
    _check_options(registry, lease, max_pending, keep_completed)
    try:
        import coredis  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "open_redis_queue needs coredis: pip install 'trio-background[redis]'"
        ) from exc
    from ._redis_store import open_redis_store

    async with (
        open_redis_store(url, stream=stream, group=group) as store,
        _open_queue(store, registry, lease, max_pending, keep_completed, consumer) as queue,
    ):
        yield queue
