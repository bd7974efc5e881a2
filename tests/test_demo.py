"""The live demo, ``python -m trio_background``: plan, output, self-check, exit statuses."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import subprocess
import sys
import types
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

import attrs
import pytest
import trio
import trio.testing

from trio_background import (
    BackgroundShutdownError,
    BackgroundStatistics,
    BackgroundTaskConfig,
    open_background_runtime,
)
from trio_background._demo import (
    INTERRUPTED,
    OUTPUT_CUT,
    DemoOptions,
    PlannedJob,
    _Console,
    _Run,
    build_scenario,
    main,
    parse_args,
    run_demo,
)

ROOT = Path(__file__).resolve().parent.parent
COMMAND = [sys.executable, "-W", "error", "-m", "trio_background"]
ENVIRONMENT = {**os.environ, "COLUMNS": "80"}

# "  4.0s submitting 109/200 | queued   0/8 running   1/4 | completed 91 ..."
STATUS = re.compile(r"^\s*(\d+\.\d)s (submitting|draining \(\d+\.\ds left\)|closed) (\d+)/(\d+) ")
# The figures of the shutdown report, once wrapped lines are joined again.
FIGURES = re.compile(
    r"final statistics: accepted (\d+) = completed (\d+) \+ failed (\d+) \+ timed_out (\d+)"
    r" \+ cancelled (\d+) \+ dropped (\d+) \(queued 0, running 0\); \d+ runs retried;"
    r" webhooks keyed by customer, never overlapping"
    r" submitted (\d+) = accepted (\d+) \+ rejected (\d+) \(QueueFullError\)"
    r" \+ refused (\d+) \(RuntimeClosedError, after aclose\(\) began\)"
)
OPTIONS = DemoOptions(duration=10.0, jobs=200, seed=1)


def expected_cut_off(options: DemoOptions) -> tuple[int, int]:
    """(cancelled, dropped) the plan guarantees at the drain deadline.

    The slow jobs fill every slot and half the queue, and are all still there when the
    drain deadline fires.
    """
    scenario = build_scenario(options)
    slots = scenario.config.max_concurrent_tasks
    slow = [job for job in scenario.jobs if job.name == "export_report"]
    assert len(slow) > slots
    return slots, len(slow) - slots


def render_terminal(text: str) -> list[str]:
    """What a terminal shows for ``text``: ``\\r`` returns to column 0, ``\\n`` ends a line."""
    screen: list[str] = []
    line: list[str] = []
    column = 0
    for char in text:
        if char == "\r":
            column = 0
        elif char == "\n":
            screen.append("".join(line).rstrip())
            line, column = [], 0
        else:
            if column < len(line):
                line[column] = char
            else:
                line.append(char)
            column += 1
    assert not line, "output must end with a newline"
    return screen


def figures(text: str) -> tuple[int, ...]:
    match = FIGURES.search(" ".join(text.split()))
    assert match, text
    return tuple(map(int, match.groups()))


async def run_in_process(width: int, *, interactive: bool = False) -> str:
    out = io.StringIO()
    assert await run_demo(OPTIONS, out, interactive=interactive, width=width) == 0
    return out.getvalue()


async def test_run_demo_plain_output(autojump_clock: trio.testing.MockClock) -> None:
    logger = logging.getLogger("trio_background")
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    start = trio.current_time()

    text = await run_in_process(200)

    # aclose() at 0.8 * 10 s, drain_timeout 0.15 * 10 s, then the report.
    assert trio.current_time() - start == 9.5
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0] == "trio_background demo: 200 jobs in ~10s (--seed 1 repeats this plan)"
    assert lines[1].startswith(
        "  BackgroundTaskConfig(max_queue_size=8, max_concurrent_tasks=4, drain_timeout=1.5,"
    )

    # One plain status line per second, then the final one.
    status = [match.groups() for line in lines if (match := STATUS.match(line))]
    assert [s[0] for s in status] == [f"{t}.0" for t in range(1, 10)] + ["9.5"]
    assert {s[1] for s in status[:7]} == {"submitting"}
    assert status[8][1] == "draining (0.5s left)"
    assert status[9][1:] == ("closed", "200", "200")
    assert [int(s[2]) for s in status] == sorted(int(s[2]) for s in status)
    final = next(line for line in reversed(lines) if STATUS.match(line))
    assert final.startswith("  9.5s closed 200/200 | queued   0/8 running   0/4 | completed ")
    assert "  8.0s aclose(): intake closed; draining up to 1.5s" in lines

    # Mid-burst, resize() doubles the 4 slots: queued jobs take the new slots at once; later
    # it shrinks them back without cancelling anything (the excess drains).
    grow, shrink = (
        re.fullmatch(
            rf"  {at} resize\(max_concurrent_tasks={n}\): running (\d+) -> (\d+), "
            r"queued (\d+) -> (\d+)",
            line,
        )
        for at, n, line in zip(
            ("5.0s", "6.2s"), (8, 4), [x for x in lines if "resize(" in x], strict=True
        )
    )
    assert grow is not None
    assert shrink is not None
    run_before, run_after, queued_before, queued_after = map(int, grow.groups())
    assert run_after == min(8, run_before + queued_before)
    assert queued_after == queued_before - (run_after - run_before)
    assert queued_before > 0  # the queue was long: the resize had work to start
    assert shrink.group(1) == shrink.group(2)  # shrinking stops nothing that runs

    # The shutdown report names what the drain deadline cut off, and the numbers add up.
    cancelled, dropped = expected_cut_off(OPTIONS)
    numbers = figures(text)
    assert numbers[4:6] == (cancelled, dropped)
    assert numbers[0] == sum(numbers[1:6]) == numbers[7]
    assert numbers[6] == 200 == sum(numbers[7:])
    assert numbers[9] == 3  # the requests that came after aclose() began
    # Cache warm-ups refused once are retried (and then succeed), without being counted failed.
    retried = re.search(r"(\d+) runs retried", " ".join(text.split()))
    assert retried is not None
    assert int(retried.group(1)) > 0
    report = lines[lines.index("Shutdown report") :]
    assert report[1].startswith("  BackgroundShutdownError: drain timed out")
    assert "Outcomes by job name (counted by a BackgroundInstrument)" in report
    header = report[report.index("Outcomes by job name (counted by a BackgroundInstrument)") + 1]
    assert header == "  job           completed failed timed_out cancelled dropped rejected"
    assert lines[-1] == "Self-check passed: the counters add up; report and instrument agree."

    # A few per-job log records are shown, the rest only mentioned.
    assert 1 <= sum(line.startswith("  log   ERROR: ") for line in lines) <= 3
    assert sum(line.startswith("  log   WARNING: ") for line in lines) == 3
    assert "  log   (further WARNING records not shown)" in lines

    # The logger is left as it was found.
    assert (logger.handlers, logger.propagate, logger.level) == (handlers, propagate, level)


@pytest.mark.parametrize("width", [60, 80])
async def test_run_demo_fits_the_width(autojump_clock: trio.testing.MockClock, width: int) -> None:
    wide = await run_in_process(200)
    text = await run_in_process(width)

    assert max(map(len, text.splitlines())) <= width < max(map(len, wide.splitlines()))
    # Nothing is lost: the report's figures are all there, in the same words.
    assert figures(text) == figures(wide)
    assert " ".join(text.split()).endswith("report and instrument agree.")
    assert sum(bool(STATUS.match(line)) for line in text.splitlines()) == 10  # none wrapped
    if width == 80:  # the table keeps its long column names
        assert "  job           completed failed timed_out cancelled dropped rejected" in text


@pytest.mark.parametrize("width", [60, 80, 200])
async def test_run_demo_interactive_output(
    autojump_clock: trio.testing.MockClock, width: int
) -> None:
    text = await run_in_process(width, interactive=True)

    assert text.count("\r") > 10
    # Every piece drawn fits the terminal.
    drawn = re.split(r"[\r\n]", text)
    assert max(map(len, drawn)) <= width
    assert sum(bool(STATUS.match(piece)) for piece in drawn) >= 10 * 8  # ten a second
    # On screen, the status line was rewritten in place: only its final state remains.
    screen = render_terminal(text)
    final = [line for line in screen if re.match(r"^\s*\d+\.\ds ", line)]
    assert [line[:22] for line in final] == [
        "  5.0s resize(max_conc",
        "  6.2s resize(max_conc",
        "  8.0s aclose(): intak",
        "  9.5s closed 200/200 ",
    ]
    assert screen[0].startswith("trio_background demo: 200 jobs")
    assert "Shutdown report" in screen
    assert sum(line.startswith("  log   ") for line in screen) >= 4
    assert any(line.startswith("Self-check passed") for line in screen[-2:])


class ClosedAfter(io.StringIO):
    """A stdout whose reader goes away (as ``| head`` does) after ``lines`` lines."""

    def __init__(self, lines: int) -> None:
        super().__init__()
        self.lines = lines
        self.failed: list[float] = []  # when writes failed

    def write(self, text: str) -> int:
        if self.getvalue().count("\n") >= self.lines:
            self.failed.append(trio.current_time())
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


async def test_run_demo_stops_once_stdout_is_gone(autojump_clock: trio.testing.MockClock) -> None:
    logger = logging.getLogger("trio_background")
    handlers = list(logger.handlers)
    out = ClosedAfter(3)
    start = trio.current_time()

    assert await run_demo(OPTIONS, out) == OUTPUT_CUT

    # It stopped at once, at the first write that failed, and tried no other.
    assert out.failed == [trio.current_time()]
    assert trio.current_time() - start < build_scenario(OPTIONS).close_at
    assert len(out.getvalue().splitlines()) == 3
    assert logger.handlers == handlers


async def test_self_check_compares_with_the_demos_own_count(
    autojump_clock: trio.testing.MockClock,
) -> None:
    run = _Run(build_scenario(OPTIONS), _Console(io.StringIO(), False, 80, lambda: None))
    config = BackgroundTaskConfig(drain_timeout=1.0)
    async with open_background_runtime(config, instruments=[run]) as runtime:
        for job in (PlannedJob(0, "quick", 0.5, "req-1"), PlannedJob(0, "slow", 5.0, "req-2")):
            await run.submit(runtime.handle(), job)
        with pytest.raises(BackgroundShutdownError) as exc_info:
            await runtime.aclose()
    stats, report = runtime.statistics(), exc_info.value
    assert (run.submitted, run.accepted, stats.completed, stats.cancelled) == (2, 2, 1, 1)
    assert run.check(stats, report) == []

    # Statistics that add up among themselves, but not to what the demo submitted.
    problems = run.check(attrs.evolve(stats, completed=2), report)
    assert (
        "accepted (counted by the demo) vs queued 0 + running 0 + completed 2 + failed 0"
        " + timed_out 0 + cancelled 1 + dropped 0: 2 != 3"
    ) in problems
    # A runtime whose `accepted` counter disagrees with the demo's count.
    fields = {**attrs.asdict(stats), "accepted": 3}
    doctored = cast(BackgroundStatistics, types.SimpleNamespace(**fields))
    problems = run.check(doctored, report)
    assert "statistics' accepted vs the demo's count: 3 != 2" in problems
    assert not any(problem.startswith("accepted (counted by") for problem in problems)
    # A run that was not interrupted must have cut jobs off.
    assert run.check(stats, None)[-1].startswith("aclose() cut nothing off")


@pytest.mark.parametrize("jobs", [20, 200, 3000])
def test_build_scenario_plan(jobs: int) -> None:
    options = DemoOptions(duration=10.0, jobs=jobs, seed=7)
    scenario = build_scenario(options)
    config = scenario.config

    assert len(scenario.jobs) == jobs
    times = [job.at for job in scenario.jobs]
    assert times == sorted(times)
    assert times[0] >= 0.0
    assert times[-1] < options.duration
    assert scenario.close_at == 8.0
    assert config.drain_timeout == 1.5
    assert config.job_timeout is not None
    assert 4 <= config.max_concurrent_tasks <= 64
    assert config.max_queue_size == 2 * config.max_concurrent_tasks
    # Ordinary jobs end well within their timeout unless they are meant to hang...
    for job in scenario.jobs:
        assert job.seconds < (config.job_timeout if job.timeout is None else job.timeout)
    # ... and the slow ones outlast the drain deadline even if they start at once.
    slow = [job for job in scenario.jobs if job.name == "export_report"]
    assert slow
    for job in slow:
        assert job.at + job.seconds > scenario.close_at + config.drain_timeout
        assert not job.wait  # spawn(): accepted or rejected synchronously
    # Some jobs fail and some hang, even in a small plan.
    if jobs >= 200:
        assert any(job.failure is not None for job in scenario.jobs)
        assert any(job.hang for job in scenario.jobs)
    assert len({job.request_id for job in scenario.jobs}) == jobs


def test_build_scenario_depends_only_on_the_options() -> None:
    def plan(seed: int) -> list[tuple[object, ...]]:
        jobs = build_scenario(DemoOptions(duration=3.0, jobs=500, seed=seed)).jobs
        # (exceptions compare by identity: the failure by its repr)
        return [(*job._replace(failure=None), repr(job.failure)) for job in jobs]

    assert plan(1) == plan(1)
    assert plan(1) != plan(2)


def test_parse_args_defaults_and_values() -> None:
    options = parse_args([])
    assert (options.duration, options.jobs) == (10.0, 3000)
    assert isinstance(options.seed, int)
    assert parse_args(["--duration", "2.5", "--jobs", "20", "--seed", "42"]) == DemoOptions(
        duration=2.5, jobs=20, seed=42
    )


def test_parse_args_durable() -> None:
    options = parse_args(["--durable"])
    assert (options.jobs, options.durable) == (400, True)
    options = parse_args(["--durable", "--jobs", "50", "--seed", "1"])
    assert options == DemoOptions(jobs=50, seed=1, durable=True)


async def test_python_m_trio_background_durable_kills_a_worker_and_loses_nothing() -> None:
    # Real processes and time: a worker is killed with SIGKILL, another one finishes.
    env = {name: value for name, value in os.environ.items() if name != "COLUMNS"}
    with trio.fail_after(90):
        result = await trio.run_process(
            [sys.executable, "-m", "trio_background", "--durable", "--jobs", "120"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )
    stdout = result.stdout.decode()
    assert result.returncode == 0, stdout + result.stderr.decode()
    lines = stdout.splitlines()
    assert lines[0].startswith("Enqueued 120 receipts in ")
    assert any(line.startswith("kill -9 worker 1 with ") for line in lines)
    assert "Store: 120 completed, 0 dead, 0 pending, 0 running," in stdout
    assert "Receipts: 120 of 120 sent, each once;" in " ".join(stdout.split())
    assert lines[-1] == "Self-check passed: every receipt was sent once, and no job was lost."
    assert max(map(len, lines)) <= 80


def test_parse_args_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        parse_args(["--help"])
    assert exc_info.value.code == 0
    usage = capsys.readouterr().out
    assert usage.startswith("usage: python -m trio_background ")
    for option in ("--duration SECONDS", "--jobs JOBS", "--seed SEED"):
        assert option in usage
    # --seed fixes the plan, not the outcome.
    seed = " ".join(usage[usage.index("--seed SEED  ") :].split())
    assert seed.startswith("--seed SEED fix the plan: which jobs are submitted, when, and which")
    assert "It does not fix the outcome: timings vary on a loaded machine" in seed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--duration", "0"], "argument --duration: must be a finite number >= 0.1, got 0.0"),
        (["--duration", "inf"], "argument --duration: must be a finite number >= 0.1, got inf"),
        (["--duration", "nan"], "argument --duration: must be a finite number >= 0.1, got nan"),
        (["--duration", "soon"], "argument --duration: invalid float value: 'soon'"),
        (["--jobs", "19"], "argument --jobs: must be >= 20, got 19"),
        (["--jobs", "1e3"], "argument --jobs: invalid int value: '1e3'"),
        (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
        (["--verbose"], "unrecognized arguments: --verbose"),
    ],
)
def test_parse_args_rejects(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exc_info:
        parse_args(argv)
    assert exc_info.value.code == 2
    assert capsys.readouterr().err.rstrip().endswith(f"error: {message}")


async def test_output_speaks_of_the_project_only(
    autojump_clock: trio.testing.MockClock, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out + await run_in_process(80)
    assert not re.search(r"(?i)\b(issues?|sessions?|tickets?|brief|agents?)\b", text)


def test_the_demo_modules_are_at_most_500_lines_each() -> None:
    modules = sorted((ROOT / "trio_background").glob("_demo*.py"))
    assert len(modules) == 2  # the in-process demo, and the durable one
    for path in modules:
        assert len(path.read_text().splitlines()) <= 500, path.name


def test_main_runs_the_demo(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Real time, 0.5 s; captured stdout is not a terminal, so plain lines.
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["--duration", "0.5", "--jobs", "40", "--seed", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "\r" not in captured.out
    lines = captured.out.splitlines()
    assert lines[0] == "trio_background demo: 40 jobs in ~0.5s (--seed 2 repeats this plan)"
    assert sum(bool(STATUS.match(line)) for line in lines) >= 5
    assert lines[-1].startswith("Self-check passed")


def test_main_on_ctrl_c_before_the_demo_starts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def interrupted_demo(*args: object, **kwargs: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr("trio_background._demo.run_demo", interrupted_demo)
    assert main(["--jobs", "20"]) == INTERRUPTED
    assert capsys.readouterr().out == ""


async def test_ctrl_c_drains_and_reports(autojump_clock: trio.testing.MockClock) -> None:
    out = io.StringIO()
    status: list[int] = []

    async def demo() -> None:
        status.append(await run_demo(OPTIONS, out))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(demo)
        await trio.sleep(3.0)  # of the mock clock: the demo is three seconds in
        signal.raise_signal(signal.SIGINT)
    assert status == [INTERRUPTED]
    lines = out.getvalue().splitlines()
    assert "  3.0s Ctrl-C: aclose() early: intake closed; draining up to 1.5s" in lines
    assert "  aclose() returned None: all work finished within drain_timeout" in lines
    assert lines[-1] == "Self-check passed: the counters add up; report and instrument agree."


async def run_short_demo(env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    """Run a one-second demo of 200 jobs (``--seed 3``) with stdout and stderr captured."""
    with trio.fail_after(30):
        return await trio.run_process(
            [*COMMAND, "--duration", "1", "--jobs", "200", "--seed", "3"],
            cwd=ROOT,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )


async def test_python_m_trio_background_with_piped_stdout() -> None:
    # Real time: about one second of demo plus the interpreter's start-up.
    env = {name: value for name, value in os.environ.items() if name != "COLUMNS"}
    result = await run_short_demo(env)
    stdout = result.stdout.decode()
    assert result.returncode == 0, stdout + result.stderr.decode()
    assert result.stderr == b""
    assert "\r" not in stdout
    lines = stdout.splitlines()
    assert lines[0] == "trio_background demo: 200 jobs in ~1s (--seed 3 repeats this plan)"
    assert max(map(len, lines)) <= 80  # not a terminal: 80 columns
    status = [line for line in lines if STATUS.match(line)]
    assert len(status) >= 5  # every 0.1 s for a one-second demo, then the final line
    assert re.match(r"^\s*\d\.\ds closed 200/200 q 0/8 run 0 ok \d+ ", status[-1])
    assert lines[-1] == "Self-check passed: the counters add up; report and instrument agree."


@pytest.mark.parametrize("columns", [80, 60])
async def test_python_m_trio_background_honours_columns(columns: int) -> None:
    result = await run_short_demo({**ENVIRONMENT, "COLUMNS": str(columns)})
    stdout = result.stdout.decode()
    assert result.returncode == 0, stdout + result.stderr.decode()
    assert max(map(len, stdout.splitlines())) <= columns
    numbers = figures(stdout)  # all present, and adding up
    assert numbers[0] == sum(numbers[1:6]) == numbers[7]
    assert numbers[6] == 200 == sum(numbers[7:])


async def read_until(stream: trio.abc.ReceiveStream, done: Callable[[bytes], bool]) -> bytes:
    data = b""
    while not done(data):
        chunk = await stream.receive_some()
        assert chunk, f"end of output before the expected point: {data!r}"
        data += chunk
    return data


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some():
        data += chunk
    return data


@asynccontextmanager
async def demo_process(*args: str) -> AsyncIterator[tuple[trio.Process, trio.abc.ReceiveStream]]:
    """``python -m trio_background`` with its stdout and stderr piped; killed if left running."""
    process = await trio.lowlevel.open_process(
        [*COMMAND, *args], cwd=ROOT, env=ENVIRONMENT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        yield process, process.stdout
    finally:
        process.kill()


async def test_python_m_trio_background_piped_into_head() -> None:
    # As `python -m trio_background | head -3`: the reader goes away after three lines.
    with trio.fail_after(15):  # far less than --duration: the demo must stop early
        async with demo_process("--duration", "30", "--seed", "3") as (process, stdout):
            head = await read_until(stdout, lambda data: data.count(b"\n") >= 3)
            await stdout.aclose()
            assert process.stderr is not None
            stderr = await read_all(process.stderr)
            assert await process.wait() == OUTPUT_CUT
    assert head.startswith(b"trio_background demo: 3000 jobs in ~30s")
    assert stderr == b""  # no BrokenPipeError, no "Exception ignored"


async def test_python_m_trio_background_on_ctrl_c() -> None:
    with trio.fail_after(20):
        async with demo_process("--duration", "30", "--seed", "3") as (process, stdout):
            pattern = re.compile(rb"\n\s*\d+\.\ds submitting ")
            before = await read_until(stdout, lambda data: bool(pattern.search(data)))
            process.send_signal(signal.SIGINT)  # after its first status line
            after = await read_all(stdout)
            assert process.stderr is not None
            stderr = await read_all(process.stderr)
            assert await process.wait() == INTERRUPTED
    lines = (before + after).decode().splitlines()
    assert stderr == b""  # no traceback
    assert any(
        line.endswith(" Ctrl-C: aclose() early: intake closed; draining up to 4.5s")
        for line in lines
    )
    assert "Shutdown report" in lines
    assert any(line.startswith("  final statistics: accepted ") for line in lines)
    assert lines[-1] == "Self-check passed: the counters add up; report and instrument agree."
