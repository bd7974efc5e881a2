"""A monitored worker for a Redis queue: per-worker Prometheus metrics plus queue-wide ones.

Run it from the root of a clone, with the ``redis`` and ``prometheus`` extras installed::

    python examples/redis_worker/worker.py redis://127.0.0.1:6379/0 --metrics-port 9100

It serves the queue of the tasks in ``tasks.py`` next to it until SIGINT or SIGTERM,
then drains. ``GET http://127.0.0.1:9100/metrics`` shows this worker's jobs
(``trio_background_jobs_*``, from the runtime's instrument) and the whole queue's
(``trio_background_queue_jobs{state=...}`` and ``trio_background_queue_retried``, read
from the store every ``--every`` seconds). Run one per machine or more; in a real
deployment export the queue-wide gauges from one process only.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import trio
from prometheus_client import CollectorRegistry, Gauge, start_http_server

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tasks import tasks

# -- the worker --
from trio_background import BackgroundTaskConfig, open_background_runtime
from trio_background.durable import DurableQueue
from trio_background.prometheus import PrometheusInstrument
from trio_background.redis import open_redis_queue


async def export_queue_statistics(queue: DurableQueue, gauge: Gauge, every: float) -> None:
    """Copy the queue-wide statistics (one atomic read) into the gauges, forever."""
    while True:
        stats = await queue.statistics()
        for state in ("pending", "scheduled", "running", "completed", "dead", "retried"):
            gauge.labels(state=state).set(getattr(stats, state))
        await trio.sleep(every)


async def main(url: str, stream: str, port: int, every: float) -> None:
    registry = CollectorRegistry()
    instrument = PrometheusInstrument(registry)  # this worker's jobs
    queue_jobs = Gauge(
        "trio_background_queue_jobs",
        "Jobs in the whole queue by state (retried: retries so far)",
        ["state"],
        registry=registry,
    )
    start_http_server(port, addr="127.0.0.1", registry=registry)
    config = BackgroundTaskConfig(max_concurrent_tasks=16, max_queue_size=64, drain_timeout=30)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with (
            open_redis_queue(url, tasks, stream=stream) as queue,
            trio.open_nursery() as exporting,
        ):
            exporting.start_soon(export_queue_statistics, queue, queue_jobs, every)
            async with (
                open_background_runtime(config, instruments=[instrument]) as runtime,
                trio.open_nursery() as serving,
            ):
                await serving.start(queue.serve, runtime)
                print(f"ready: metrics on http://127.0.0.1:{port}/metrics", flush=True)
                async for _ in signals:
                    break
                serving.cancel_scope.cancel()  # stop claiming; leaving the block drains
            exporting.cancel_scope.cancel()


# -- end --


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the Redis server, e.g. redis://127.0.0.1:6379/0")
    parser.add_argument("--stream", default="trio_background", help="the queue's stream")
    parser.add_argument("--metrics-port", type=int, default=9100)
    parser.add_argument("--every", type=float, default=5.0, help="seconds between queue reads")
    args = parser.parse_args()
    trio.run(main, args.url, args.stream, args.metrics_port, args.every)
