"""Prometheus metrics for background jobs (optional extra).

Install the extra with ``pip install '.[prometheus]'`` from a clone (it brings
``prometheus-client``); this is the only module that imports
``prometheus_client``, and `trio_background` does not import it. Create one
`PrometheusInstrument` and pass it to `~trio_background.open_background_runtime`
through ``instruments=``::

    from prometheus_client import CollectorRegistry
    from trio_background import open_background_runtime
    from trio_background.prometheus import PrometheusInstrument

    registry = CollectorRegistry()
    instrument = PrometheusInstrument(registry)
    async with open_background_runtime(instruments=[instrument]) as runtime:
        ...

.. versionadded:: 1.0
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from ._config import BackgroundJobMetadata
from ._instrument import BackgroundInstrument

__all__ = ["DEFAULT_BUCKETS", "PrometheusInstrument"]

#: Upper bounds (seconds) of the job duration histogram's buckets, from 5 ms to 5 minutes.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)


class PrometheusInstrument(BackgroundInstrument):
    """A `~trio_background.BackgroundInstrument` that exports job metrics to Prometheus.

    Every metric has the label ``job``, the job's name (the ``name`` of its
    `~trio_background.BackgroundJobMetadata`);
    ``<namespace>_jobs_finished_total`` also has ``outcome`` (``completed``,
    ``failed``, ``timed_out`` or ``cancelled``). All the series of a job name
    appear, at zero, when the first job of that name is accepted or rejected.
    With the default namespace the metrics are:

    - ``trio_background_jobs_accepted_total`` (counter): jobs accepted by
      `~trio_background.BackgroundHandle.spawn` or
      `~trio_background.BackgroundHandle.send`.
    - ``trio_background_jobs_rejected_total`` (counter): spawns refused with
      `~trio_background.QueueFullError`.
    - ``trio_background_jobs_dropped_total`` (counter): jobs discarded without
      running: at shutdown, or cancelled while queued or scheduled.
    - ``trio_background_jobs_finished_total`` (counter): jobs that started and
      ended, by ``outcome``.
    - ``trio_background_jobs_retried_total`` (counter): runs that failed and
      were scheduled to run again.
    - ``trio_background_job_duration_seconds`` (histogram): seconds from a job's
      start to its end, whatever the outcome.
    - ``trio_background_jobs_queued`` (gauge): jobs queued: ready to start,
      waiting for a slot or for their key.
    - ``trio_background_jobs_scheduled`` (gauge): jobs waiting until they are
      due: accepted with a delay, or waiting to be retried.
    - ``trio_background_jobs_running`` (gauge): jobs running now.

    The three gauges follow the job statuses ``"queued"``, ``"scheduled"`` and
    ``"running"``, so each adds up to the `~trio_background.BackgroundStatistics`
    field of that name, except that a job moves from queued to running when its
    code begins (``job_started``) rather than when it takes its slot. One
    instrument may serve several runtimes at once; its gauges then add up the
    runtimes' jobs. A registry can hold only one instrument per namespace:
    creating a second one with the same registry and namespace raises
    `ValueError` (from ``prometheus_client``, for the duplicated names).

    Args:
        registry: The registry to register the metrics in. `None` means
            ``prometheus_client.REGISTRY``, the default registry that
            ``start_http_server`` and ``generate_latest`` use.
        namespace: The prefix of every metric name.
        buckets: The duration histogram's bucket upper bounds, in seconds.

    Raises:
        ValueError: ``registry`` already holds metrics with these names.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        namespace: str = "trio_background",
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        if registry is None:
            registry = REGISTRY
        #: The registry the metrics are registered in.
        self.registry: CollectorRegistry = registry
        self._accepted = Counter(
            "jobs_accepted",
            "Background jobs accepted by spawn() or send().",
            ["job"],
            namespace=namespace,
            registry=None,
        )
        self._rejected = Counter(
            "jobs_rejected",
            "Background jobs refused because the queue was full.",
            ["job"],
            namespace=namespace,
            registry=None,
        )
        self._dropped = Counter(
            "jobs_dropped",
            "Background jobs discarded without running (at shutdown, or cancelled).",
            ["job"],
            namespace=namespace,
            registry=None,
        )
        self._finished = Counter(
            "jobs_finished",
            "Background jobs that started and ended, by outcome.",
            ["job", "outcome"],
            namespace=namespace,
            registry=None,
        )
        self._retried = Counter(
            "jobs_retried",
            "Runs of background jobs that failed and were scheduled to run again.",
            ["job"],
            namespace=namespace,
            registry=None,
        )
        self._duration = Histogram(
            "job_duration_seconds",
            "Seconds from a background job's start to its end.",
            ["job"],
            namespace=namespace,
            buckets=tuple(buckets),
            registry=None,
        )
        self._queued = Gauge(
            "jobs_queued",
            "Background jobs queued: ready, waiting for a slot or their key.",
            ["job"],
            namespace=namespace,
            registry=None,
        )
        self._scheduled = Gauge(
            "jobs_scheduled",
            "Background jobs waiting until they are due (delayed, or to be retried).",
            ["job"],
            namespace=namespace,
            registry=None,
        )
        self._running = Gauge(
            "jobs_running",
            "Background jobs running now.",
            ["job"],
            namespace=namespace,
            registry=None,
        )
        collectors = (
            self._accepted,
            self._rejected,
            self._dropped,
            self._finished,
            self._retried,
            self._duration,
            self._queued,
            self._scheduled,
            self._running,
        )
        # The jobs counted as scheduled, by the identity of their metadata (a job keeps
        # one metadata object), so that job_dropped knows which gauge the job leaves.
        self._waiting: dict[int, BackgroundJobMetadata] = {}
        # Names whose series exist already (see _first_seen).
        self._seen: set[str] = set()
        # Register all or nothing, so a name clash leaves the registry as it was.
        registered: list[Counter | Gauge | Histogram] = []
        try:
            for collector in collectors:
                registry.register(collector)
                registered.append(collector)
        except ValueError:
            for collector in registered:
                registry.unregister(collector)
            raise

    def _first_seen(self, name: str) -> None:
        """Create every series of a job name at zero, so queries see 0 rather than nothing."""
        self._seen.add(name)
        for metric in (
            self._accepted,
            self._rejected,
            self._dropped,
            self._retried,
            self._duration,
            self._queued,
            self._scheduled,
            self._running,
        ):
            metric.labels(name)
        for outcome in ("completed", "failed", "timed_out", "cancelled"):
            self._finished.labels(name, outcome)

    def job_accepted(self, job: BackgroundJobMetadata) -> None:
        """Count the job as accepted and queued.

        Args:
            job: The job's metadata.
        """
        if job.name not in self._seen:
            self._first_seen(job.name)
        self._accepted.labels(job.name).inc()
        self._queued.labels(job.name).inc()

    def job_scheduled(self, job: BackgroundJobMetadata, delay: float) -> None:
        """Move the job, accepted with a delay, from queued to scheduled.

        Args:
            job: The job's metadata.
            delay: Seconds until the job is due.
        """
        if id(job) not in self._waiting:
            self._waiting[id(job)] = job
            self._queued.labels(job.name).dec()
            self._scheduled.labels(job.name).inc()

    def job_due(self, job: BackgroundJobMetadata) -> None:
        """Move the job, now due, from scheduled to queued.

        Args:
            job: The job's metadata.
        """
        if self._waiting.pop(id(job), None) is not None:
            self._scheduled.labels(job.name).dec()
            self._queued.labels(job.name).inc()

    def job_rejected(self, job: BackgroundJobMetadata) -> None:
        """Count the job as rejected.

        Args:
            job: The job's metadata.
        """
        if job.name not in self._seen:
            self._first_seen(job.name)
        self._rejected.labels(job.name).inc()

    def job_started(self, job: BackgroundJobMetadata) -> None:
        """Move the job from queued (or scheduled) to running.

        Args:
            job: The job's metadata.
        """
        self._waiting_gauge(job).dec()
        self._running.labels(job.name).inc()

    def job_finished(self, job: BackgroundJobMetadata, outcome: str, duration: float) -> None:
        """Count the job's outcome and record its duration.

        Args:
            job: The job's metadata.
            outcome: One of ``"completed"``, ``"failed"``, ``"timed_out"``,
                ``"cancelled"``.
            duration: Seconds from the job's start to its end.
        """
        self._running.labels(job.name).dec()
        self._finished.labels(job.name, outcome).inc()
        self._duration.labels(job.name).observe(duration)

    def job_retrying(
        self, job: BackgroundJobMetadata, exception: BaseException, delay: float
    ) -> None:
        """Count a retry: the job is no longer running, and is scheduled to run again.

        Args:
            job: The job's metadata.
            exception: What the run raised.
            delay: Seconds until the job is due again.
        """
        self._waiting[id(job)] = job
        self._running.labels(job.name).dec()
        self._scheduled.labels(job.name).inc()
        self._retried.labels(job.name).inc()

    def job_dropped(self, job: BackgroundJobMetadata) -> None:
        """Count the job as dropped, and no longer queued or scheduled.

        Args:
            job: The job's metadata.
        """
        self._waiting_gauge(job).dec()
        self._dropped.labels(job.name).inc()

    def _waiting_gauge(self, job: BackgroundJobMetadata) -> Gauge:
        """The gauge a job leaves as it starts or is dropped: scheduled, or else queued.

        Instruments normally see a scheduled job due before it starts; if another
        instrument's hook re-entered the runtime in between, it may start first.
        """
        if self._waiting.pop(id(job), None) is None:
            return self._queued.labels(job.name)
        return self._scheduled.labels(job.name)

    def __repr__(self) -> str:
        return f"<trio_background.prometheus.PrometheusInstrument at {id(self):#x}>"
