"""The public surface: names, docstrings, exception hierarchy, fixed messages."""

from __future__ import annotations

import inspect
import types

import pytest

import trio_background
from trio_background import (
    BackgroundJobError,
    BackgroundJobMetadata,
    BackgroundRuntime,
    BackgroundShutdownError,
    BackgroundSpawnError,
    QueueFullError,
    RuntimeClosedError,
    open_background_runtime,
)

# The contract's import list, plus BackgroundInstrument from its "Instruments" section.
CONTRACT_NAMES = {
    "open_background_runtime",
    "BackgroundRuntime",
    "BackgroundHandle",
    "BackgroundTaskConfig",
    "BackgroundJobMetadata",
    "BackgroundStatistics",
    "BackgroundJobError",
    "BackgroundSpawnError",
    "QueueFullError",
    "RuntimeClosedError",
    "BackgroundShutdownError",
    "BackgroundInstrument",
    "BackgroundJob",
    "current_job",
    "JobCancelledError",
    "JobTimeoutError",
    "Retry",
}


def test_contract_names_are_exported() -> None:
    public = {name for name in trio_background.__all__ if not name.startswith("_")}
    assert public == CONTRACT_NAMES
    assert len(trio_background.__all__) == len(set(trio_background.__all__))
    for name in CONTRACT_NAMES:
        assert hasattr(trio_background, name), name
    # The imported objects are the exported ones.
    assert trio_background.open_background_runtime is open_background_runtime
    assert trio_background.BackgroundRuntime is BackgroundRuntime


def test_every_public_attribute_is_listed_in_all() -> None:
    for name, value in vars(trio_background).items():
        if name.startswith("_") or isinstance(value, types.ModuleType):
            continue
        assert name in trio_background.__all__, name


@pytest.mark.parametrize("name", sorted(trio_background.__all__))
def test_exported_name_exists_and_is_documented(name: str) -> None:
    obj = getattr(trio_background, name)
    if name == "__version__":
        assert isinstance(obj, str)
        assert obj
        return
    doc = obj.__doc__  # the object's own docstring, not one inherited through inspect
    assert isinstance(doc, str), name
    assert doc.strip(), name
    # Defined in this package, not re-exported from another library; and a public class or
    # function reports the package itself, so tracebacks and reprs show no private module.
    assert getattr(obj, "__module__", "").startswith("trio_background")
    if inspect.isclass(obj) or inspect.isfunction(obj):
        assert obj.__module__ == "trio_background", name


@pytest.mark.parametrize(
    "cls",
    [
        obj
        for name in sorted(CONTRACT_NAMES)
        if inspect.isclass(obj := getattr(trio_background, name))
    ],
)
def test_public_methods_are_documented(cls: type) -> None:
    for attr_name, attr in vars(cls).items():
        if attr_name.startswith("_"):
            continue
        if isinstance(attr, property):
            target: object = attr.fget
        elif inspect.isfunction(attr) or isinstance(attr, (classmethod, staticmethod)):
            target = attr
        else:
            continue
        doc = getattr(target, "__doc__", None)
        assert isinstance(doc, str), f"{cls.__name__}.{attr_name}"
        assert doc.strip(), f"{cls.__name__}.{attr_name}"


def test_exception_hierarchy() -> None:
    assert issubclass(QueueFullError, BackgroundSpawnError)
    assert issubclass(RuntimeClosedError, BackgroundSpawnError)
    assert not issubclass(QueueFullError, RuntimeClosedError)
    assert not issubclass(RuntimeClosedError, QueueFullError)
    for exc in (BackgroundSpawnError, BackgroundJobError, BackgroundShutdownError):
        assert issubclass(exc, Exception)
    assert not issubclass(BackgroundJobError, BackgroundSpawnError)
    assert not issubclass(BackgroundShutdownError, BackgroundSpawnError)
    with pytest.raises(BackgroundSpawnError):
        raise QueueFullError
    with pytest.raises(BackgroundSpawnError):
        raise RuntimeClosedError


def test_error_messages() -> None:
    assert str(QueueFullError()) == "background task queue is full"
    assert str(RuntimeClosedError()) == "background runtime is closed"
    error = BackgroundJobError("something broke")
    assert error.message == "something broke"
    assert str(error) == "something broke"


async def test_shutdown_error_carries_report() -> None:
    async with open_background_runtime() as runtime:
        stats = runtime.statistics()
    job = BackgroundJobMetadata(name="a", request_id="r")
    error = BackgroundShutdownError("cut off", cancelled=(job,), dropped=(), statistics=stats)
    assert str(error) == "cut off"
    assert error.cancelled == (job,)
    assert error.dropped == ()
    assert error.statistics is stats


DURABLE_NAMES = {
    "TaskRegistry",
    "open_sqlite_queue",
    "DurableQueue",
    "DurableStatistics",
    "DeadLetter",
    "SchemaVersionError",
}


def test_the_durable_module_exports_its_names_documented_as_its_own() -> None:
    from trio_background import durable

    assert set(durable.__all__) == DURABLE_NAMES
    for name in DURABLE_NAMES:
        obj = getattr(durable, name)
        assert obj.__module__ == "trio_background.durable", name
        assert (obj.__doc__ or "").strip(), name
        if inspect.isclass(obj):
            for attr_name, attr in vars(obj).items():
                if not attr_name.startswith("_") and inspect.isfunction(attr):
                    assert (attr.__doc__ or "").strip(), f"{name}.{attr_name}"
    assert issubclass(durable.SchemaVersionError, Exception)
    assert durable.SchemaVersionError.__name__.endswith("Error")


def test_durable_statistics_and_dead_letters_are_frozen() -> None:
    import attrs

    from trio_background.durable import DeadLetter, DurableStatistics

    stats = DurableStatistics(1, 2, 3, 4, 5, 6)
    letter = DeadLetter("1", "t", [], 1, "e")
    for obj, field in ((stats, "pending"), (letter, "error")):
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            setattr(obj, field, None)
