"""BackgroundTaskConfig and BackgroundJobMetadata: defaults, validation, equality, immutability.

Every bad value is refused at construction with an error that names the field; the
messages are matched exactly.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import pytest

from trio_background import BackgroundJobMetadata, BackgroundTaskConfig

# -- BackgroundTaskConfig -------------------------------------------------------------------


def test_config_defaults() -> None:
    config = BackgroundTaskConfig()
    assert config.max_queue_size == 1024
    assert config.max_concurrent_tasks == 128
    assert config.drain_timeout == 30.0
    assert config.job_timeout is None
    assert config == BackgroundTaskConfig(
        max_queue_size=1024, max_concurrent_tasks=128, drain_timeout=30.0, job_timeout=None
    )


def test_config_is_keyword_only() -> None:
    positional: Any = BackgroundTaskConfig
    with pytest.raises(TypeError):
        positional(10)
    with pytest.raises(TypeError):
        positional(10, 2, 5.0, None)


def test_config_is_frozen() -> None:
    config = BackgroundTaskConfig(max_queue_size=3)
    assert attrs.has(type(config))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(config, "max_queue_size", 4)  # noqa: B010 (mypy knows the field is frozen)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(config, "job_timeout", 1.0)  # noqa: B010
    # mypy knows it too: with warn_unused_ignores, this ignore must be needed.
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.max_concurrent_tasks = 1  # type: ignore[misc]
    assert config == BackgroundTaskConfig(max_queue_size=3)


def test_config_equality_and_hash_are_by_value() -> None:
    a = BackgroundTaskConfig(max_queue_size=3, max_concurrent_tasks=2, job_timeout=1.5)
    b = BackgroundTaskConfig(max_queue_size=3, max_concurrent_tasks=2, job_timeout=1.5)
    assert a == b
    assert a is not b
    assert hash(a) == hash(b)
    assert a != BackgroundTaskConfig(max_queue_size=3, max_concurrent_tasks=2, job_timeout=2.5)
    assert a != BackgroundTaskConfig(max_queue_size=4, max_concurrent_tasks=2, job_timeout=1.5)
    assert BackgroundTaskConfig() == BackgroundTaskConfig()
    assert hash(BackgroundTaskConfig()) == hash(BackgroundTaskConfig())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_queue_size", 0),
        ("max_concurrent_tasks", 1),
        ("drain_timeout", 0),
        ("drain_timeout", 0.0),
        ("drain_timeout", 7),
        ("drain_timeout", math.inf),
        ("job_timeout", 1e-9),
        ("job_timeout", 3),
        ("job_timeout", math.inf),
        ("job_timeout", None),
    ],
)
def test_config_accepts_boundary_values(field: str, value: object) -> None:
    kwargs: dict[str, Any] = {field: value}
    config = BackgroundTaskConfig(**kwargs)
    assert getattr(config, field) == value


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_queue_size", "10", "max_queue_size must be an int, not str"),
        ("max_queue_size", True, "max_queue_size must be an int, not bool"),
        ("max_queue_size", False, "max_queue_size must be an int, not bool"),
        ("max_queue_size", 1.5, "max_queue_size must be an int, not float"),
        ("max_queue_size", 10.0, "max_queue_size must be an int, not float"),
        ("max_queue_size", math.nan, "max_queue_size must be an int, not float"),
        ("max_queue_size", None, "max_queue_size must be an int, not NoneType"),
        ("max_concurrent_tasks", "10", "max_concurrent_tasks must be an int, not str"),
        ("max_concurrent_tasks", True, "max_concurrent_tasks must be an int, not bool"),
        ("max_concurrent_tasks", 1.5, "max_concurrent_tasks must be an int, not float"),
        ("max_concurrent_tasks", None, "max_concurrent_tasks must be an int, not NoneType"),
        ("drain_timeout", "10", "drain_timeout must be a number, not str"),
        ("drain_timeout", True, "drain_timeout must be a number, not bool"),
        ("drain_timeout", None, "drain_timeout must be a number, not NoneType"),
        ("drain_timeout", [1.0], "drain_timeout must be a number, not list"),
        ("job_timeout", "1", "job_timeout must be a number or None, not str"),
        ("job_timeout", True, "job_timeout must be a number or None, not bool"),
        ("job_timeout", b"1", "job_timeout must be a number or None, not bytes"),
    ],
)
def test_config_rejects_wrong_type(field: str, value: object, message: str) -> None:
    kwargs: dict[str, Any] = {field: value}
    with pytest.raises(TypeError, match=rf"^{message}$"):
        BackgroundTaskConfig(**kwargs)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_queue_size", -1, "max_queue_size must be >= 0, got -1"),
        ("max_concurrent_tasks", 0, "max_concurrent_tasks must be >= 1, got 0"),
        ("max_concurrent_tasks", -5, "max_concurrent_tasks must be >= 1, got -5"),
        ("drain_timeout", -1, "drain_timeout must be >= 0, got -1"),
        ("drain_timeout", -0.5, "drain_timeout must be >= 0, got -0.5"),
        ("drain_timeout", -math.inf, "drain_timeout must be >= 0, got -inf"),
        ("drain_timeout", math.nan, "drain_timeout must not be NaN"),
        ("job_timeout", 0, "job_timeout must be > 0, got 0"),
        ("job_timeout", 0.0, "job_timeout must be > 0, got 0.0"),
        ("job_timeout", -1.5, "job_timeout must be > 0, got -1.5"),
        ("job_timeout", math.nan, "job_timeout must not be NaN"),
    ],
)
def test_config_rejects_out_of_range(field: str, value: object, message: str) -> None:
    kwargs: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=rf"^{message}$"):
        BackgroundTaskConfig(**kwargs)


@pytest.mark.parametrize("field", ["drain_timeout", "job_timeout"])
def test_config_rejects_an_int_too_large_for_a_float(field: str) -> None:
    # A ValueError like any out-of-range value, never the OverflowError of float(10**400).
    kwargs: dict[str, Any] = {field: 10**400}
    message = (
        rf"^{field} is too large for a number of seconds \(it does not fit in a float\); "
        r"use math\.inf for no limit$"
    )
    with pytest.raises(ValueError, match=message) as excinfo:
        BackgroundTaskConfig(**kwargs)
    assert type(excinfo.value) is ValueError


def test_config_evolve_validates_too() -> None:
    config = BackgroundTaskConfig(max_queue_size=3)
    bad: dict[str, Any] = {"job_timeout": "5"}
    with pytest.raises(ValueError, match=r"^max_queue_size must be >= 0, got -1$"):
        attrs.evolve(config, max_queue_size=-1)
    with pytest.raises(TypeError, match=r"^job_timeout must be a number or None, not str$"):
        attrs.evolve(config, **bad)
    assert config == BackgroundTaskConfig(max_queue_size=3)


# -- BackgroundJobMetadata ------------------------------------------------------------------


def test_metadata_defaults_frozen_and_equal_by_value() -> None:
    meta = BackgroundJobMetadata()
    assert attrs.has(type(meta))
    assert meta.name == "background_task"
    assert meta.request_id is None
    assert meta == BackgroundJobMetadata(name="background_task", request_id=None)
    assert hash(meta) == hash(BackgroundJobMetadata())
    assert BackgroundJobMetadata(name="a", request_id="r") != BackgroundJobMetadata(name="a")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(meta, "name", "other")  # noqa: B010
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        meta.request_id = "r"  # type: ignore[misc]
    assert meta == BackgroundJobMetadata()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": 5}, "name must be a str, not int"),
        ({"name": None}, "name must be a str, not NoneType"),
        ({"request_id": 5}, "request_id must be a str or None, not int"),
        ({"request_id": b"r"}, "request_id must be a str or None, not bytes"),
    ],
)
def test_metadata_rejects_wrong_type(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(TypeError, match=rf"^{message}$"):
        BackgroundJobMetadata(**kwargs)
