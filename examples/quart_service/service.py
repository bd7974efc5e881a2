"""A Quart-Trio service that runs one background job per request.

One trio_background runtime lives as long as the app: it is opened at startup
in a task inside the app's nursery and drained at shutdown, before the process
exits. Serve it with Hypercorn's trio worker, preferably through ``serve.py``
(which turns SIGTERM into a graceful shutdown)::

    python examples/quart_service/serve.py --bind 127.0.0.1:8000

or with the Hypercorn command line (see the documentation for the caveats)::

    hypercorn --worker-class trio --bind 127.0.0.1:8000 examples/quart_service/service:app

Settings come from the environment:

``SERVICE_MAX_QUEUE_SIZE``, ``SERVICE_MAX_CONCURRENT_TASKS``, ``SERVICE_DRAIN_TIMEOUT``
    The runtime's `BackgroundTaskConfig` (defaults 1024, 16, 20 seconds).
``SERVICE_JOB_SECONDS``
    How long each demo job works (default 0.1 seconds).
``SERVICE_JOBS_FILE``
    If set, a JSON report of the jobs that ran is written there at shutdown.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from typing import Any

import attrs
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from quart import Response, request
from quart_trio import QuartTrio

from trio_background import (
    BackgroundHandle,
    BackgroundInstrument,
    BackgroundShutdownError,
    BackgroundStatistics,
    BackgroundTaskConfig,
    QueueFullError,
    RuntimeClosedError,
    open_background_runtime,
)
from trio_background.prometheus import PrometheusInstrument

logger = logging.getLogger("quart_service")


class BackgroundService:
    """Owns the app's background runtime, from startup to the end of the drain."""

    def __init__(
        self, config: BackgroundTaskConfig, instruments: list[BackgroundInstrument]
    ) -> None:
        self.config = config
        self.instruments = instruments
        self.handle: BackgroundHandle | None = None
        self.statistics_at_shutdown: BackgroundStatistics | None = None
        self.final_statistics: BackgroundStatistics | None = None
        self.shutdown_error: BackgroundShutdownError | None = None
        self.drain_seconds: float | None = None
        self._stop = trio.Event()
        self._stopped = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the runtime open until `stop` is called, then drain it."""
        try:
            async with open_background_runtime(
                self.config, instruments=self.instruments
            ) as runtime:
                self.handle = runtime.handle()
                task_status.started()
                await self._stop.wait()
                self.statistics_at_shutdown = runtime.statistics()
                logger.info("draining background jobs: %s", self.statistics_at_shutdown)
                start = trio.current_time()
                try:
                    await runtime.aclose()  # Refuses new jobs, then drains.
                except BackgroundShutdownError as error:
                    # The drain timed out: the error lists what was cut off.
                    self.shutdown_error = error
                    logger.error("%s", error)
                self.drain_seconds = trio.current_time() - start
                self.final_statistics = runtime.statistics()
                logger.info("drained in %.2fs: %s", self.drain_seconds, self.final_statistics)
        finally:
            self._stopped.set()

    async def stop(self) -> None:
        """Close the runtime and wait until it has drained (or hit its drain timeout)."""
        self._stop.set()
        await self._stopped.wait()


def _env(name: str, default: str) -> str:
    return os.environ.get(f"SERVICE_{name}", default)


def create_app() -> QuartTrio:
    app = QuartTrio(__name__)
    config = BackgroundTaskConfig(
        max_queue_size=int(_env("MAX_QUEUE_SIZE", "1024")),
        max_concurrent_tasks=int(_env("MAX_CONCURRENT_TASKS", "16")),
        drain_timeout=float(_env("DRAIN_TIMEOUT", "20")),
    )
    job_seconds = float(_env("JOB_SECONDS", "0.1"))
    jobs_file = os.environ.get("SERVICE_JOBS_FILE")

    registry = CollectorRegistry()
    service = BackgroundService(config, [PrometheusInstrument(registry)])
    app.extensions["background_service"] = service
    ran: list[str] = []  # request ids of completed jobs, for the report (demo only)

    # Quart-Trio cancels everything in app.nursery this many seconds after
    # shutdown begins, *before* the after_serving hooks run: give the drain
    # room, or the runtime would be cut off from outside.
    app.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] = config.drain_timeout + 5

    async def process_order(request_id: str) -> None:
        await trio.sleep(job_seconds)  # stands for real work: I/O, an API call...
        ran.append(request_id)

    @app.before_serving
    async def start_background_runtime() -> None:
        await app.nursery.start(service.run)

    @app.after_serving
    async def drain_background_runtime() -> None:
        await service.stop()
        if jobs_file is not None:
            await write_report(jobs_file, ran, service)

    @app.post("/orders")
    async def create_order() -> tuple[dict[str, Any], int, dict[str, str]]:
        request_id = request.headers.get("X-Request-ID") or uuid.uuid4().hex
        assert service.handle is not None
        try:
            service.handle.spawn(
                process_order, request_id, name="process_order", request_id=request_id
            )
        except QueueFullError:
            body = {"error": "background queue is full, retry later", "request_id": request_id}
            return body, 503, {"Retry-After": "1"}
        except RuntimeClosedError:
            body = {"error": "service is shutting down", "request_id": request_id}
            return body, 503, {}
        return {"status": "accepted", "request_id": request_id}, 202, {}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)

    return app


async def write_report(path: str, ran: list[str], service: BackgroundService) -> None:
    def as_dict(statistics: BackgroundStatistics | None) -> dict[str, Any] | None:
        return None if statistics is None else attrs.asdict(statistics)

    error = service.shutdown_error
    report = {
        "ran": ran,
        "statistics_at_shutdown": as_dict(service.statistics_at_shutdown),
        "statistics": as_dict(service.final_statistics),
        "cancelled": [job.request_id for job in error.cancelled] if error else [],
        "dropped": [job.request_id for job in error.dropped] if error else [],
        "drain_seconds": service.drain_seconds,
    }
    await trio.Path(path).write_text(json.dumps(report))


app = create_app()
