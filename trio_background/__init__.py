"""Bounded, supervised background jobs for Trio programs."""

from ._config import BackgroundJobMetadata as BackgroundJobMetadata
from ._config import BackgroundTaskConfig as BackgroundTaskConfig
from ._config import Retry as Retry
from ._exceptions import BackgroundJobError as BackgroundJobError
from ._exceptions import BackgroundShutdownError as BackgroundShutdownError
from ._exceptions import BackgroundSpawnError as BackgroundSpawnError
from ._exceptions import JobCancelledError as JobCancelledError
from ._exceptions import JobTimeoutError as JobTimeoutError
from ._exceptions import QueueFullError as QueueFullError
from ._exceptions import RuntimeClosedError as RuntimeClosedError
from ._instrument import BackgroundInstrument as BackgroundInstrument
from ._job import BackgroundJob as BackgroundJob
from ._job import current_job as current_job
from ._runtime import BackgroundHandle as BackgroundHandle
from ._runtime import BackgroundRuntime as BackgroundRuntime
from ._runtime import open_background_runtime as open_background_runtime
from ._statistics import BackgroundStatistics as BackgroundStatistics
from ._version import __version__ as __version__

__all__ = [
    "BackgroundHandle",
    "BackgroundInstrument",
    "BackgroundJob",
    "BackgroundJobError",
    "BackgroundJobMetadata",
    "BackgroundRuntime",
    "BackgroundShutdownError",
    "BackgroundSpawnError",
    "BackgroundStatistics",
    "BackgroundTaskConfig",
    "JobCancelledError",
    "JobTimeoutError",
    "QueueFullError",
    "Retry",
    "RuntimeClosedError",
    "__version__",
    "current_job",
    "open_background_runtime",
]


def _fixup_module_metadata() -> None:
    # Public names report the package, not the private module that defines them (as
    # trio does), in reprs, tracebacks and the docs.
    for name in __all__:
        obj = globals()[name]
        if getattr(obj, "__module__", "").startswith("trio_background._"):
            obj.__module__ = __name__


_fixup_module_metadata()
del _fixup_module_metadata
