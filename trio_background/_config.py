"""Configuration and job metadata."""

from __future__ import annotations

import math
from typing import Any

import attrs


def _type_name(value: object) -> str:
    return type(value).__name__


def check_int(field: str, value: object, minimum: int) -> None:
    """Validate an int field (`bool` is rejected), raising errors that name ``field``."""
    if type(value) is bool or not isinstance(value, int):
        raise TypeError(f"{field} must be an int, not {_type_name(value)}")
    if value < minimum:
        raise ValueError(f"{field} must be >= {minimum}, got {value!r}")


def check_timeout(field: str, value: object, *, allow_none: bool, allow_zero: bool) -> None:
    """Validate a timeout-like number of seconds, raising errors that name ``field``.

    Args:
        field: The argument's name, used in the message.
        value: The value to check.
        allow_none: Whether `None` is valid.
        allow_zero: Whether 0 is valid (otherwise the value must be > 0).

    Raises:
        TypeError: ``value`` is not a real number (`bool` is rejected).
        ValueError: ``value`` is NaN, out of range, or an int too large for a float.
    """
    if value is None and allow_none:
        return
    if type(value) is bool or not isinstance(value, (int, float)):
        kind = "a number or None" if allow_none else "a number"
        raise TypeError(f"{field} must be {kind}, not {_type_name(value)}")
    try:
        seconds = float(value)
    except OverflowError:
        raise ValueError(
            f"{field} is too large for a number of seconds (it does not fit in a float); "
            f"use math.inf for no limit"
        ) from None
    if math.isnan(seconds):
        raise ValueError(f"{field} must not be NaN")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{field} must be {bound}, got {value!r}")


def _queue_size(_: Any, attribute: attrs.Attribute[int], value: int) -> None:
    check_int(attribute.name, value, 0)


def _slots(_: Any, attribute: attrs.Attribute[int], value: int) -> None:
    check_int(attribute.name, value, 1)


def _drain_timeout(_: Any, attribute: attrs.Attribute[float], value: float) -> None:
    check_timeout(attribute.name, value, allow_none=False, allow_zero=True)


def _job_timeout(_: Any, attribute: attrs.Attribute[float | None], value: float | None) -> None:
    check_timeout(attribute.name, value, allow_none=True, allow_zero=False)


@attrs.frozen(kw_only=True)
class BackgroundTaskConfig:
    """How a runtime queues, runs and drains jobs.

    Construct it with keywords; instances are immutable and compare by value.
    A wrong type raises `TypeError` and an out-of-range value (or NaN) raises
    `ValueError`; both name the field.

    Args:
        max_queue_size: Jobs that may wait for a slot (``>= 0``). With 0, a
            job is accepted only if it can start at once.
        max_concurrent_tasks: Jobs that may run at once (``>= 1``).
        drain_timeout: Seconds shutdown waits for queued and running jobs
            before cutting them off (``>= 0``; `math.inf` waits forever).
        job_timeout: Default per-job time limit in seconds (``> 0``), or
            `None` for no limit.
    """

    max_queue_size: int = attrs.field(default=1024, validator=_queue_size)
    max_concurrent_tasks: int = attrs.field(default=128, validator=_slots)
    drain_timeout: float = attrs.field(default=30.0, validator=_drain_timeout)
    job_timeout: float | None = attrs.field(default=None, validator=_job_timeout)


def _name(_: Any, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"name must be a str, not {_type_name(value)}")


def _request_id(_: Any, attribute: attrs.Attribute[str | None], value: str | None) -> None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"request_id must be a str or None, not {_type_name(value)}")


@attrs.frozen
class BackgroundJobMetadata:
    """What a runtime knows about a job: used in logs, instruments and reports.

    Args:
        name: The job's name (by default the function's ``__qualname__``).
        request_id: An optional id tying the job to the request that made it.
    """

    name: str = attrs.field(default="background_task", validator=_name)
    request_id: str | None = attrs.field(default=None, validator=_request_id)
