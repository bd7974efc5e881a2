"""The live demo, ``python -m trio_background``: plan, output shape, exit status."""

from __future__ import annotations

import io
import logging
import re
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from trio_background import BackgroundStatistics
from trio_background._demo import (
    DemoOptions,
    OutcomeTally,
    _Progress,
    _self_check,
    build_scenario,
    export_report,
    main,
    parse_args,
    rebuild_search_index,
    run_demo,
)

ROOT = Path(__file__).resolve().parent.parent

# "  4.0s submitting 109/200 | queued   0/8 running   1/4 | completed 91 ..."
STATUS = re.compile(
    r"^\s*(\d+\.\d)s (submitting|draining \(\d+\.\ds left\)|closed) (\d+)/(\d+) \| "
)
# The same line in its short form, for narrow terminals: "  4.0s jobs 109/200 q 0/8 ..."
SHORT_STATUS = re.compile(r"^\s*(\d+\.\d)s (jobs|drain \d+\.\ds|closed) (\d+)/(\d+) q ")

OPTIONS = DemoOptions(duration=10.0, jobs=200, seed=1)


def expected_cut_off(options: DemoOptions) -> tuple[int, int]:
    """(cancelled, dropped) the demo's plan guarantees at the drain deadline.

    The slow jobs fill every slot and half the queue; the late ordinary jobs queue
    behind them. All of that is still there when the drain deadline fires. (Exact when
    every ordinary job has ended by the time the slow ones arrive, as with a few hundred
    jobs; with a few dozen, a hanging job may still hold a slot then.)
    """
    scenario = build_scenario(options)
    slots = scenario.config.max_concurrent_tasks
    slow = [job for job in scenario.jobs if job.fn in (export_report, rebuild_search_index)]
    late = [
        job
        for job in scenario.jobs
        if job.fn not in (export_report, rebuild_search_index)
        and 0.72 * options.duration < job.at < scenario.close_at
    ]
    assert len(slow) > slots
    return slots, len(slow) - slots + len(late)


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


async def test_run_demo_plain_output(autojump_clock: trio.testing.MockClock) -> None:
    logger = logging.getLogger("trio_background")
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    out = io.StringIO()
    start = trio.current_time()

    assert await run_demo(OPTIONS, out, interactive=False) == 0

    # aclose() at 0.8 * 10 s, drain_timeout 0.15 * 10 s, then the report.
    assert trio.current_time() - start == 9.5
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0] == "trio_background demo: 200 jobs in ~10s (seed 1; repeat with --seed 1)"
    assert lines[1].startswith("  config: max_concurrent_tasks=4 max_queue_size=8 job_timeout=")
    assert lines[1].endswith(" drain_timeout=1.5s")

    # One plain status line per second, then the final one.
    status = [match.groups() for line in lines if (match := STATUS.match(line))]
    assert [s[0] for s in status] == [f"{t}.0" for t in range(1, 10)] + ["9.5"]
    assert {s[1] for s in status[:7]} == {"submitting"}
    assert status[7][1] in {"submitting", "draining (1.5s left)"}  # the same instant as aclose()
    assert status[8][1] == "draining (0.5s left)"
    assert status[9][1:] == ("closed", "200", "200")
    submitted = [int(s[2]) for s in status]
    assert submitted == sorted(submitted)
    assert all(s[3] == "200" for s in status)
    final = next(line for line in reversed(lines) if STATUS.match(line))
    assert "| queued   0/8 running   0/4 |" in final

    # The shutdown report names what the drain deadline cut off.
    cancelled, dropped = expected_cut_off(OPTIONS)
    report = lines[lines.index("Shutdown report") :]
    assert report[1].startswith("  BackgroundShutdownError: ")
    assert f"  cancelled while running: {cancelled}" in report
    assert f"  dropped before starting: {dropped}" in report
    assert "      by name: export_report x4" in report
    assert "      ... and 1 more" in report  # 6 dropped, 5 listed
    listed = [
        line for line in report if re.fullmatch(r" {6}\w+ \(request_id=req-[0-9a-f]{8}\)", line)
    ]
    assert len(listed) == min(cancelled, 5) + min(dropped, 5)
    assert "  refused after aclose() began (RuntimeClosedError): 3 (write_audit x3)" in report
    assert any(
        line.startswith("  final statistics: accepted ")
        and f" + cancelled {cancelled} + dropped {dropped} (queued 0, running 0)" in line
        for line in report
    )
    assert any(
        re.fullmatch(r"  submitted 200 = accepted \d+ \+ rejected \d+ .*", x) for x in report
    )
    assert "Outcomes by job name (counted by a BackgroundInstrument)" in report
    assert lines[-1] == "Self-check passed: the counters add up; report and instrument agree."

    # Per-job log records: a handful shown, the rest counted in a summary.
    assert 1 <= sum(line.startswith("  log   ERROR: ") for line in lines) <= 3
    assert sum(line.startswith("  log   WARNING: ") for line in lines) == 3
    assert "  log   (more WARNING records: counted, not shown)" in lines
    assert any(re.fullmatch(r"Log records from 'trio_background': \d+ shown, .*", x) for x in lines)

    # The logger is left as it was found.
    assert (logger.handlers, logger.propagate, logger.level) == (handlers, propagate, level)


@pytest.mark.parametrize("width", [80, 200])
async def test_run_demo_interactive_output(
    autojump_clock: trio.testing.MockClock, width: int
) -> None:
    out = io.StringIO()

    assert await run_demo(OPTIONS, out, interactive=True, width=width) == 0

    text = out.getvalue()
    assert text.count("\r") > 10
    # Every status line drawn fits the terminal: the long form when it fits, else the short.
    pattern = STATUS if width == 200 else SHORT_STATUS
    drawn = [piece for piece in re.split(r"[\r\n]", text) if pattern.match(piece)]
    assert len(drawn) >= 10 * 8  # ten a second, for most of the run
    assert all(len(piece) < width for piece in drawn)
    # On screen, the status line was rewritten in place: only its final state remains.
    screen = render_terminal(text)
    final = [line for line in screen if STATUS.match(line) or SHORT_STATUS.match(line)]
    assert len(final) == 1
    assert pattern.match(final[0])
    assert final[0].startswith("  9.5s closed 200/200 ")
    assert screen[0].startswith("trio_background demo: 200 jobs")
    assert "Shutdown report" in screen
    assert sum(line.startswith("  log   ") for line in screen) >= 4
    assert screen[-1].startswith("Self-check passed")


def test_self_check_reports_disagreements() -> None:
    progress = _Progress(planned=10, submitted=10, accepted=6, rejected=3)
    stats = BackgroundStatistics(
        queued=0,
        running=1,
        completed=4,
        failed=0,
        timed_out=0,
        cancelled=0,
        dropped=0,
        rejected=4,
        max_queue_size=2,
        max_concurrent_tasks=2,
        closed=False,
    )
    problems = _self_check(progress, stats, None, OutcomeTally())
    assert problems[:5] == [
        "after aclose(): queued 0, running 1, closed False",
        "accepted 5, but 6 calls succeeded",
        "rejected 4, but 3 QueueFullErrors",
        "10 calls made, 9 came back",
        "aclose() cut nothing off: expected a BackgroundShutdownError (did the demo fall"
        " behind its plan? try fewer --jobs or a longer --duration)",
    ]
    assert "instrument saw 0 completed, statistics count 4" in problems


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
        timeout = config.job_timeout if job.timeout is None else job.timeout
        assert job.work.seconds < timeout
    # ... and the slow ones outlast the drain deadline even if they start at once.
    slow = [job for job in scenario.jobs if job.fn in (export_report, rebuild_search_index)]
    assert slow
    for job in slow:
        assert job.at + job.work.seconds > scenario.close_at + config.drain_timeout
        assert not job.wait  # spawn(): accepted or rejected synchronously
    # Some jobs fail and some hang, even in a small plan.
    if jobs >= 200:
        assert any(job.work.failure is not None for job in scenario.jobs)
        assert any(job.work.hang for job in scenario.jobs)
    # Request ids are unique.
    assert len({job.request_id for job in scenario.jobs}) == jobs


def test_build_scenario_depends_only_on_the_options() -> None:
    def plan(seed: int) -> list[tuple[object, ...]]:
        scenario = build_scenario(DemoOptions(duration=3.0, jobs=500, seed=seed))
        return [
            (
                j.at,
                j.fn,
                j.request_id,
                j.timeout,
                j.wait,
                j.work.seconds,
                j.work.hang,
                j.work.subject,
            )
            for j in scenario.jobs
        ]

    assert plan(1) == plan(1)
    assert plan(1) != plan(2)


def test_parse_args_defaults_and_values() -> None:
    options = parse_args([])
    assert (options.duration, options.jobs) == (10.0, 3000)
    assert isinstance(options.seed, int)
    assert parse_args(["--duration", "2.5", "--jobs", "20", "--seed", "42"]) == DemoOptions(
        duration=2.5, jobs=20, seed=42
    )


def test_parse_args_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        parse_args(["--help"])
    assert exc_info.value.code == 0
    usage = capsys.readouterr().out
    assert usage.startswith("usage: python -m trio_background ")
    for option in ("--duration SECONDS", "--jobs N", "--seed SEED"):
        assert option in usage


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--duration", "0"], "argument --duration: must be a finite number >= 0.1, got 0"),
        (["--duration", "inf"], "argument --duration: must be a finite number >= 0.1, got inf"),
        (["--duration", "nan"], "argument --duration: must be a finite number >= 0.1, got nan"),
        (["--duration", "soon"], "argument --duration: not a number: 'soon'"),
        (["--jobs", "19"], "argument --jobs: must be >= 20, got 19"),
        (["--jobs", "1e3"], "argument --jobs: not an integer: '1e3'"),
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


def test_main_runs_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    # Real time, 0.5 s; captured stdout is not a terminal, so plain lines.
    assert main(["--duration", "0.5", "--jobs", "40", "--seed", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "\r" not in captured.out
    lines = captured.out.splitlines()
    assert lines[0] == "trio_background demo: 40 jobs in ~0.5s (seed 2; repeat with --seed 2)"
    assert sum(bool(STATUS.match(line)) for line in lines) >= 5
    assert lines[-1].startswith("Self-check passed")


def test_main_on_ctrl_c(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def interrupted_demo(*args: object, **kwargs: object) -> int:
        # As trio delivers Ctrl-C to the main task: inside the demo's nurseries.
        async with trio.open_nursery():
            raise KeyboardInterrupt

    monkeypatch.setattr("trio_background._demo.run_demo", interrupted_demo)
    assert main(["--jobs", "20"]) == 130
    assert capsys.readouterr().out == "\ninterrupted\n"


async def test_python_m_trio_background_with_piped_stdout() -> None:
    # Real time: about one second of demo plus the interpreter's start-up.
    command = [sys.executable, "-W", "error", "-m", "trio_background"]
    result = await trio.run_process(
        [*command, "--duration", "1", "--jobs", "200", "--seed", "3"],
        cwd=ROOT,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    stdout = result.stdout.decode()
    assert result.returncode == 0, stdout + result.stderr.decode()
    assert result.stderr == b""
    assert "\r" not in stdout
    lines = stdout.splitlines()
    assert lines[0] == "trio_background demo: 200 jobs in ~1s (seed 3; repeat with --seed 3)"
    status = [line for line in lines if STATUS.match(line)]
    # Ten lines a second for a one-second demo (every 0.1 s, then the final line).
    assert len(status) >= 5
    assert re.match(r"^\s*\d\.\ds closed 200/200 \| queued   0/8 running   0/4 \|", status[-1])
    assert "Shutdown report" in lines
    assert any(line.startswith("  BackgroundShutdownError: ") for line in lines)
    assert lines[-1] == "Self-check passed: the counters add up; report and instrument agree."
