"""The runtime's log records, emitted so that a failing handler cannot derail it."""

from __future__ import annotations

import logging
import sys
import traceback
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._config import BackgroundJobMetadata

logger = logging.getLogger("trio_background")


def emit(
    on_interrupt: Callable[[BaseException], None],
    level: int,
    msg: str,
    *args: object,
    exc_info: BaseException | None = None,
    extra: dict[str, object] | None = None,
) -> None:
    """Log one record on ``"trio_background"``; never raises.

    Logging runs user code (filters, handlers). A `BaseException` that is not an
    `Exception` (KeyboardInterrupt, SystemExit) raised there is handed to
    ``on_interrupt``, which shuts the runtime down and re-raises it from the block; an
    `Exception` is printed to standard error, the way `logging.Handler.handleError`
    reports a failing handler, and the runtime carries on.
    """
    try:
        logger.log(level, msg, *args, exc_info=exc_info, extra=extra)
    except Exception:
        try:
            sys.stderr.write("--- trio_background: error while logging ---\n")
            traceback.print_exc(file=sys.stderr)
        except BaseException:  # nothing is left to report with
            pass
    except BaseException as exc:  # KeyboardInterrupt, SystemExit: never swallowed
        on_interrupt(exc)


def emit_job(
    on_interrupt: Callable[[BaseException], None],
    level: int,
    job: BackgroundJobMetadata,
    what: str,
    *,
    exc_info: BaseException | None = None,
) -> None:
    """Log ``background job '<name>' <what>``, naming the request id in the text too.

    The record carries the ``job_name`` and ``request_id`` attributes as well.
    """
    if job.request_id is None:
        emit(
            on_interrupt,
            level,
            "background job %r %s",
            job.name,
            what,
            exc_info=exc_info,
            extra={"job_name": job.name, "request_id": None},
        )
    else:
        emit(
            on_interrupt,
            level,
            "background job %r %s (request_id=%r)",
            job.name,
            what,
            job.request_id,
            exc_info=exc_info,
            extra={"job_name": job.name, "request_id": job.request_id},
        )
