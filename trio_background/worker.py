"""The durable-queue worker: ``python -m trio_background.worker MODULE:REGISTRY --sqlite PATH``.

It imports ``MODULE``, takes its `~trio_background.durable.TaskRegistry` named
``REGISTRY``, and serves the queue in the SQLite file ``PATH`` (or, given ``--redis URL``
instead, in that Redis server) through a runtime of its own until SIGINT or SIGTERM.
Then it stops claiming, drains (running jobs finish, their outcomes are recorded;
whatever the drain deadline cuts off is given back to the queue for another worker) and
prints the runtime's shutdown report.

Exit status: 0 after a clean drain, 1 if the drain deadline cut jobs off (they were
given back to the queue, not lost) or the queue's store failed while serving (its claims
run again once their leases run out), 2 on bad usage (a bad option, a module or registry
that cannot be found, a file or keys that are not a queue, a server that cannot be
reached).

.. versionadded:: 2.0
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sqlite3
import sys
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Sequence

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

import trio

from . import BackgroundShutdownError, BackgroundStatistics, BackgroundTaskConfig
from . import open_background_runtime as _open_runtime
from ._store import SchemaVersionError
from .durable import DurableQueue, TaskRegistry, open_sqlite_queue

USAGE_ERROR = 2
CUT_OFF = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trio_background.worker",
        description=(
            "Serve a durable trio_background queue: claim its jobs, run them with bounded "
            "concurrency, record how each ended. SIGINT or SIGTERM drains and stops "
            "(later signals are ignored: the drain lasts --drain-timeout at most). "
            "Exit status: 0 after a clean drain, 1 "
            "if jobs were cut off at the drain deadline (they go back to the queue) or the "
            "queue's store failed while serving, 2 on bad usage."
        ),
    )
    parser.add_argument(
        "registry",
        metavar="MODULE:REGISTRY",
        help="the module to import and the name of its TaskRegistry, e.g. myapp.jobs:tasks",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--sqlite",
        metavar="PATH",
        help="the queue's SQLite file (created if missing); every worker of the queue opens it",
    )
    where.add_argument(
        "--redis",
        metavar="URL",
        help=(
            "the Redis server of the queue, e.g. redis://:password@host:6379/0 "
            "(rediss:// for TLS); needs the redis extra"
        ),
    )
    parser.add_argument(
        "--stream",
        metavar="S",
        default="trio_background",
        help="with --redis: the queue's stream (default: %(default)s)",
    )
    parser.add_argument(
        "--group",
        metavar="G",
        default="workers",
        help="with --redis: the consumer group the workers share (default: %(default)s)",
    )
    parser.add_argument(
        "--consumer",
        metavar="C",
        default=None,
        help="with --redis: this worker's name in the group (default: host:pid:number)",
    )
    parser.add_argument(
        "--concurrency",
        metavar="N",
        type=int,
        default=16,
        help="jobs run at once (default: %(default)s)",
    )
    parser.add_argument(
        "--queue-size",
        metavar="N",
        type=int,
        default=64,
        help="claimed jobs waiting for a free slot, at most (default: %(default)s)",
    )
    parser.add_argument(
        "--drain-timeout",
        metavar="S",
        type=float,
        default=30.0,
        help="seconds running jobs get to finish at shutdown (default: %(default)s)",
    )
    parser.add_argument(
        "--lease",
        metavar="S",
        type=float,
        default=30.0,
        help=(
            "seconds a claim lasts without renewal: a job of a worker that died runs "
            "again this long after its last renewal (default: %(default)s)"
        ),
    )
    return parser


def _load(parser: argparse.ArgumentParser, spec: str) -> TaskRegistry:
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        parser.error(f"expected MODULE:REGISTRY (e.g. myapp.jobs:tasks), got {spec!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: modules of the current dir
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        parser.error(f"cannot import {module_name!r}: {exc}")
    registry = getattr(module, attribute, None)
    if not isinstance(registry, TaskRegistry):
        what = "nothing" if registry is None else f"a {type(registry).__name__}"
        parser.error(f"{spec} is {what}, not a trio_background.durable.TaskRegistry")
    return registry


def _summary(stats: BackgroundStatistics, how: str) -> str:
    return (
        f"stopped ({how}): {stats.completed} completed, {stats.failed} failed, "
        f"{stats.timed_out} timed out, {stats.cancelled} cut off while running, "
        f"{stats.dropped} given back unstarted"
    )


async def _serve(args: argparse.Namespace, registry: TaskRegistry, serving: list[bool]) -> int:
    config = BackgroundTaskConfig(
        max_concurrent_tasks=args.concurrency,
        max_queue_size=args.queue_size,
        drain_timeout=args.drain_timeout,
    )
    opened: contextlib.AbstractAsyncContextManager[DurableQueue]
    if args.redis is not None:
        from .redis import open_redis_queue

        opened = open_redis_queue(
            args.redis,
            registry,
            stream=args.stream,
            group=args.group,
            consumer=args.consumer,
            lease=args.lease,
        )
    else:
        opened = open_sqlite_queue(args.sqlite, registry, lease=args.lease)
    # (Until the queue is open, SIGTERM and SIGINT act as usual: nothing is claimed yet.)
    async with opened as queue, trio.open_nursery() as ignoring:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            status = await _serve_until_signalled(args, queue, config, signals, ignoring, serving)
        ignoring.cancel_scope.cancel()
    return status


async def _serve_until_signalled(
    args: argparse.Namespace,
    queue: DurableQueue,
    config: BackgroundTaskConfig,
    signals: AsyncIterator[int],
    ignoring: trio.Nursery,
    serving: list[bool],
) -> int:
    """Serve until the first signal, then drain; later signals are taken and dropped."""

    async def ignore_signals() -> None:
        async for _ in signals:
            pass

    try:
        async with _open_runtime(config) as runtime, trio.open_nursery() as nursery:
            await nursery.start(queue.serve, runtime)
            print(
                f"ready: serving {_where(args)} (pid {os.getpid()}, "
                f"concurrency {args.concurrency})",
                flush=True,
            )
            serving.append(True)
            async for _ in signals:
                break
            # Stop claiming; leaving the block drains. Further signals are
            # ignored (the drain lasts --drain-timeout at most).
            ignoring.start_soon(ignore_signals)
            nursery.cancel_scope.cancel()
    except BackgroundShutdownError as report:
        print(_summary(report.statistics, "drain cut short"), flush=True)
        for what, jobs in (
            ("cut off while running", report.cancelled),
            ("given back unstarted", report.dropped),
        ):
            for name, count in Counter(job.name for job in jobs).items():
                print(f"  {what}: {name}" + (f" x{count}" if count > 1 else ""))
        sys.stdout.flush()
        return CUT_OFF
    print(_summary(runtime.statistics(), "drained"), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error("--concurrency must be >= 1")
    if args.queue_size < 0:
        parser.error("--queue-size must be >= 0")
    if not args.drain_timeout >= 0:
        parser.error("--drain-timeout must be >= 0")
    if not 0 < args.lease < float("inf"):
        parser.error("--lease must be a positive number of seconds")
    if args.redis is None:
        for option in ("stream", "group", "consumer"):
            if getattr(args, option) != parser.get_default(option):
                parser.error(f"--{option} goes with --redis")
    else:
        try:
            import coredis
        except ImportError:
            parser.error("--redis needs coredis: pip install 'trio-background[redis]'")
        for option in ("stream", "group", "consumer"):
            if getattr(args, option) == "":
                parser.error(f"--{option} must not be empty")
        try:
            coredis.Redis.from_url(args.redis)  # (parses the URL; connects to nothing)
        except Exception as exc:  # (ValueError; an assertion in the client's parser)
            parser.error(f"--redis {_without_password(args.redis)}: not a Redis URL ({exc!r})")
    registry = _load(parser, args.registry)
    serving: list[bool] = []  # (set once the worker printed ready)
    try:
        return trio.run(_serve, args, registry, serving)
    except KeyboardInterrupt:
        if serving:
            raise
        return 130  # (Ctrl-C while the queue was opening: nothing was claimed)
    except BaseException as exc:
        # Raised opening the queue: a file or keys that are not a queue, a path that
        # cannot be opened, a server that cannot be reached or refuses the password. Once
        # serving, a store that fails (a lost server) stops the worker: its claims run
        # again elsewhere when their leases run out.
        reason = _cannot_open(exc)
        if reason is None:
            raise
        if serving:
            print(
                f"{parser.prog}: error: stopped serving {_where(args)}: {reason}", file=sys.stderr
            )
            return CUT_OFF
        print(f"{parser.prog}: error: cannot serve {_where(args)}: {reason}", file=sys.stderr)
        return USAGE_ERROR


def _where(args: argparse.Namespace) -> str:
    if args.redis is None:
        return str(args.sqlite)
    return f"{_without_password(args.redis)} stream {args.stream}"


def _without_password(url: str) -> str:
    """The URL as it may be printed: any password (``:pw@`` or ``?password=``) is ``***``."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    user, at, host = netloc.rpartition("@")
    if at:
        name, colon, _ = user.partition(":")
        netloc = f"{name}{':***' if colon else ''}@{host}"
    query = "&".join(
        f"{key}=***" if key.lower() in ("password", "pass", "passwd") else f"{key}={value}"
        for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    )
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def _cannot_open(exc: BaseException) -> BaseException | None:
    """The error in ``exc`` that says the queue could not be opened (bad usage), or None.

    Opening goes through task groups, so it may come inside exception groups.
    """
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, (SchemaVersionError, sqlite3.Error, OSError)):
        return exc
    if type(exc).__module__.startswith("coredis"):
        return exc
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith("coredis"):
        return exc  # (raised inside the client: a URL it could not use, say)
    return None


if __name__ == "__main__":
    sys.exit(main())
