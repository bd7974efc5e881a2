"""End-to-end tests of the examples: real servers in subprocesses, real clients, SIGTERM.

These run in real time (a subprocess cannot share a MockClock). Readiness is
found by polling the server's log with a timeout; nothing is ordered by sleeping.
Everything listens on 127.0.0.1 on a port the kernel picks (``:0``), so there is
no race for a "free" port.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO

import attrs
import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
QUART_SERVICE = REPO / "examples" / "quart_service"
TCP_AUDIT = REPO / "examples" / "tcp_audit" / "server.py"
STARTUP_TIMEOUT = 30.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
]


@attrs.define
class Server:
    process: trio.Process
    log_path: Path
    address: str

    async def log(self) -> str:
        return await trio.Path(self.log_path).read_text(errors="replace")

    async def terminate_and_wait(self, within: float) -> tuple[int, float]:
        """Send SIGTERM; return the exit status and the seconds it took to exit."""
        start = trio.current_time()

        self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(within):
            returncode = await self.process.wait()
        return returncode, trio.current_time() - start


def _open_log(path: Path) -> IO[bytes]:
    return path.open("wb")


async def wait_for_output(
    log_path: Path, pattern: str, process: trio.Process
) -> re.Match[str] | None:
    """Poll the log until ``pattern`` appears; None on timeout or if the process exits."""
    with trio.move_on_after(STARTUP_TIMEOUT):
        while True:
            match = re.search(pattern, await trio.Path(log_path).read_text(errors="replace"))
            if match is not None or process.poll() is not None:
                return match
            await trio.sleep(0.05)
    return None


@asynccontextmanager
async def run_server(
    command: list[str], *, ready: str, log_path: Path, env: dict[str, str], cwd: Path = REPO
) -> AsyncIterator[Server]:
    """Start ``command``; wait until its output matches ``ready`` (one group: the address)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    with _open_log(log_path) as log_file:
        process = await trio.lowlevel.open_process(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,  # our signals reach only the process we mean
        )
    try:
        match = await wait_for_output(log_path, ready, process)
        if match is None:
            log = await trio.Path(log_path).read_text(errors="replace")
            pytest.fail(f"server not ready (exit status {process.poll()}):\n{log}")
        yield Server(process, log_path, match.group(1))
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise KeyError(f"{name}{labels} not in /metrics")


async def post_orders(
    base_url: str,
    request_ids: list[str],
    *,
    connections: int = 20,
    answered: trio.Event | None = None,
    answered_after: int = 0,
) -> dict[str, int | str]:
    """POST /orders once per request id, all at once over ``connections`` connections.

    Returns each request's status code, or the name of the transport error
    (expected only once the server shuts down). Sets ``answered`` once
    ``answered_after`` requests have been answered.
    """
    results: dict[str, int | str] = {}
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=None)
    # Queue the requests here rather than in httpx's pool (whose queue is slow when long).
    limiter = trio.CapacityLimiter(connections)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:

        async def post(request_id: str) -> None:
            async with limiter:
                try:
                    response = await client.post("/orders", headers={"X-Request-ID": request_id})
                except httpx.TransportError as error:
                    results[request_id] = type(error).__name__
                    return
            results[request_id] = response.status_code
            if response.status_code == 202:
                assert response.json() == {"status": "accepted", "request_id": request_id}
            if answered is not None and len(results) == answered_after:
                answered.set()

        async with trio.open_nursery() as nursery:
            for request_id in request_ids:
                nursery.start_soon(post, request_id)
    return results


async def get_metrics(base_url: str) -> str:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return response.text


def service_env(jobs_file: Path, **settings: float) -> dict[str, str]:
    env = {"SERVICE_JOBS_FILE": str(jobs_file)}
    env.update({f"SERVICE_{name.upper()}": str(value) for name, value in settings.items()})
    return env


HYPERCORN_READY = r"Running on http://(127\.0\.0\.1:\d+)"


async def test_quart_service_drains_every_accepted_job_on_sigterm(tmp_path: Path) -> None:
    """The issue's scenario: 1,000 concurrent requests, /metrics, SIGTERM mid-flight."""
    drain_timeout = 20.0
    jobs_file = tmp_path / "jobs.json"
    # Jobs take 0.5 s, so the last ones accepted are still running when SIGTERM comes.
    env = service_env(
        jobs_file, max_concurrent_tasks=128, job_seconds=0.5, drain_timeout=drain_timeout
    )
    command = [sys.executable, str(QUART_SERVICE / "serve.py"), "--bind", "127.0.0.1:0"]
    async with run_server(
        command, ready=HYPERCORN_READY, log_path=tmp_path / "server.log", env=env
    ) as server:
        base_url = f"http://{server.address}"
        request_ids = [f"req-{i:04d}" for i in range(1000)]
        load_start = trio.current_time()
        results = await post_orders(base_url, request_ids)
        load_time = trio.current_time() - load_start
        # The queue holds 1024 jobs, so none of the 1,000 can be refused.
        assert results == dict.fromkeys(request_ids, 202), await server.log()

        text = await get_metrics(base_url)
        job = {"job": "process_order"}
        assert metric(text, "trio_background_jobs_accepted_total", **job) == 1000
        assert metric(text, "trio_background_jobs_rejected_total", **job) == 0
        queued = metric(text, "trio_background_jobs_queued", **job)
        running = metric(text, "trio_background_jobs_running", **job)
        completed_before = metric(
            text, "trio_background_jobs_finished_total", outcome="completed", **job
        )
        assert queued + running + completed_before == 1000
        # The point of the test: SIGTERM arrives while jobs are still in flight.
        assert running > 0, text

        returncode, shutdown_time = await server.terminate_and_wait(drain_timeout)
        log = await server.log()

    assert returncode == 0, log
    report = json.loads(await trio.Path(jobs_file).read_text())
    assert report["cancelled"] == []
    assert report["dropped"] == []
    assert sorted(report["ran"]) == request_ids  # every accepted job, each exactly once
    statistics = report["statistics"]
    assert statistics["completed"] == 1000
    assert statistics["queued"] == statistics["running"] == statistics["rejected"] == 0
    assert statistics["closed"] is True
    assert "SIGTERM: shutting down gracefully" in log
    at_shutdown = report["statistics_at_shutdown"]
    print(
        f"\nquart_service via serve.py: 1000 requests -> 1000 x 202 in {load_time:.2f}s; "
        f"/metrics before SIGTERM: {queued:.0f} queued, {running:.0f} running, "
        f"{completed_before:.0f} done; drain began with {at_shutdown['running']} running, "
        f"took {report['drain_seconds']:.2f}s; exit 0 after {shutdown_time:.2f}s; "
        f"{len(report['ran'])} jobs ran"
    )


async def test_quart_service_under_the_hypercorn_command_line(tmp_path: Path) -> None:
    """``hypercorn --worker-class trio``, SIGTERM to its parent in the middle of the load.

    The parent relays the signal to the worker, which stops taking requests,
    finishes those in flight, then runs the app's shutdown: the drain.
    """
    drain_timeout = 20.0
    jobs_file = tmp_path / "jobs.json"
    # Jobs take 4 s: those accepted in the last seconds before SIGTERM are still
    # running when the worker, after its 1 s of grace for requests, starts the drain.
    env = service_env(
        jobs_file, max_concurrent_tasks=256, job_seconds=4, drain_timeout=drain_timeout
    )
    command = [
        sys.executable,
        "-m",
        "hypercorn",
        "--worker-class",
        "trio",
        "--graceful-timeout",
        "1",
        "--bind",
        "127.0.0.1:0",
        "service:app",
    ]
    async with run_server(
        command,
        ready=HYPERCORN_READY,
        log_path=tmp_path / "server.log",
        env=env,
        cwd=QUART_SERVICE,
    ) as server:
        base_url = f"http://{server.address}"
        request_ids = [f"cli-{i:03d}" for i in range(300)]
        results: dict[str, int | str] = {}
        answered = trio.Event()

        async def load() -> None:
            results.update(
                await post_orders(
                    base_url, request_ids, connections=10, answered=answered, answered_after=100
                )
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(load)
            await answered.wait()
            text = await get_metrics(base_url)
            job = {"job": "process_order"}
            in_flight = metric(text, "trio_background_jobs_queued", **job) + metric(
                text, "trio_background_jobs_running", **job
            )
            assert in_flight > 0, text
            # SIGTERM while requests are still being sent and jobs are running.
            returncode, shutdown_time = await server.terminate_and_wait(drain_timeout)
        log = await server.log()

    assert returncode == 0, log
    accepted = {request_id for request_id, result in results.items() if result == 202}
    assert len(accepted) >= 100
    # The others never reached the app (connection refused or closed by the server
    # on its way down), or at worst were told it is shutting down.
    refused = [result for result in results.values() if result != 202]
    assert all(isinstance(result, str) or result == 503 for result in refused), refused
    report = json.loads(await trio.Path(jobs_file).read_text())
    assert report["cancelled"] == report["dropped"] == []
    at_shutdown = report["statistics_at_shutdown"]
    assert at_shutdown["running"] > 0, at_shutdown  # the drain had work to do
    ran = report["ran"]
    assert len(ran) == len(set(ran)) == report["statistics"]["completed"]
    # Every job whose 202 reached the client ran; nothing ran that was not sent.
    assert accepted <= set(ran) <= set(request_ids)
    print(
        f"\nhypercorn CLI: 300 requests, SIGTERM after 100 answers; {len(accepted)} x 202, "
        f"{len(results) - len(accepted)} refused while closing; "
        f"{at_shutdown['running']} running when the drain began, drained in "
        f"{report['drain_seconds']:.2f}s; exit 0 after {shutdown_time:.2f}s; {len(ran)} jobs ran"
    )


async def test_quart_service_full_queue_gives_503_and_cut_off_exits_1(tmp_path: Path) -> None:
    jobs_file = tmp_path / "jobs.json"
    env = service_env(
        jobs_file,
        max_concurrent_tasks=1,
        max_queue_size=2,
        job_seconds=60,
        drain_timeout=0.5,
    )
    command = [sys.executable, str(QUART_SERVICE / "serve.py"), "--bind", "127.0.0.1:0"]
    async with run_server(
        command, ready=HYPERCORN_READY, log_path=tmp_path / "server.log", env=env
    ) as server:
        base_url = f"http://{server.address}"
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
            statuses = []
            for request_id in ["a", "b", "c", "d"]:
                response = await client.post("/orders", headers={"X-Request-ID": request_id})
                statuses.append(response.status_code)
            assert statuses == [202, 202, 202, 503]
            assert response.json() == {
                "error": "background queue is full, retry later",
                "request_id": "d",
            }
            assert response.headers["Retry-After"] == "1"
            # Without the header the service makes up a request id.
            response = await client.post("/orders")
            assert response.status_code == 503
            assert re.fullmatch(r"[0-9a-f]{32}", response.json()["request_id"])
        text = await get_metrics(base_url)
        assert metric(text, "trio_background_jobs_rejected_total", job="process_order") == 2
        assert metric(text, "trio_background_jobs_queued", job="process_order") == 2
        assert metric(text, "trio_background_jobs_running", job="process_order") == 1

        returncode, _ = await server.terminate_and_wait(10)
        log = await server.log()

    # The jobs outlive the drain timeout: they are cut off, reported, and the exit says so.
    assert returncode == 1, log
    report = json.loads(await trio.Path(jobs_file).read_text())
    assert report["ran"] == []
    assert report["cancelled"] == ["a"]
    assert report["dropped"] == ["b", "c"]
    assert report["statistics"]["cancelled"] == 1
    assert report["statistics"]["dropped"] == 2
    assert report["statistics"]["rejected"] == 2


async def test_quart_service_second_sigterm_stops_at_once(tmp_path: Path) -> None:
    jobs_file = tmp_path / "jobs.json"
    env = service_env(jobs_file, job_seconds=60, drain_timeout=60)
    command = [sys.executable, str(QUART_SERVICE / "serve.py"), "--bind", "127.0.0.1:0"]
    async with run_server(
        command, ready=HYPERCORN_READY, log_path=tmp_path / "server.log", env=env
    ) as server:
        results = await post_orders(f"http://{server.address}", ["x", "y"])
        assert results == {"x": 202, "y": 202}
        server.process.send_signal(signal.SIGTERM)
        draining = await wait_for_output(
            server.log_path, "draining background jobs", server.process
        )
        assert draining is not None, await server.log()
        # The drain would wait up to 60 s; a second signal cuts it short.
        returncode, _ = await server.terminate_and_wait(10)
        log = await server.log()

    assert returncode == 1, log
    assert "SIGTERM again: stopping now" in log
    assert log.count("background job 'process_order' cancelled at shutdown") == 2
    assert not await trio.Path(jobs_file).exists()  # the shutdown hook never finished


async def test_hypercorn_single_process_trio_worker_dies_on_sigterm(tmp_path: Path) -> None:
    """Why serve.py exists: ``--workers 0`` has no SIGTERM handler, so nothing drains.

    If this starts failing, Hypercorn learned to shut down on SIGTERM in this mode
    and docs/sigterm.rst should say so.
    """
    jobs_file = tmp_path / "jobs.json"
    command = [
        sys.executable,
        "-m",
        "hypercorn",
        "--worker-class",
        "trio",
        "--workers",
        "0",
        "--bind",
        "127.0.0.1:0",
        "service:app",
    ]
    async with run_server(
        command,
        ready=HYPERCORN_READY,
        log_path=tmp_path / "server.log",
        env=service_env(jobs_file, job_seconds=0.01),
        cwd=QUART_SERVICE,
    ) as server:
        returncode, _ = await server.terminate_and_wait(10)
    assert returncode == -signal.SIGTERM
    assert not await trio.Path(jobs_file).exists()


async def read_reply(stream: trio.SocketStream) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
    return data


async def tcp_request(address: str, line: str) -> bytes:
    host, port = address.rsplit(":", 1)
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        await stream.send_all(line.encode() + b"\n")
        return await read_reply(stream)


async def test_tcp_audit_records_every_acknowledged_connection(tmp_path: Path) -> None:
    drain_timeout = 10.0
    audit_file = tmp_path / "audit.jsonl"
    command = [
        sys.executable,
        str(TCP_AUDIT),
        "--port",
        "0",
        "--audit-file",
        str(audit_file),
        "--max-concurrent-tasks",
        "8",
        "--job-seconds",
        "0.05",
        "--drain-timeout",
        str(drain_timeout),
    ]
    async with run_server(
        command,
        ready=r"listening on (127\.0\.0\.1:\d+)",
        log_path=tmp_path / "server.log",
        env={},
    ) as server:
        client_ids = [f"client-{i:03d}" for i in range(300)]
        replies: dict[str, bytes] = {}
        limiter = trio.CapacityLimiter(100)

        async def connect(client_id: str) -> None:
            async with limiter:
                replies[client_id] = await tcp_request(server.address, client_id)

        async with trio.open_nursery() as nursery:
            for client_id in client_ids:
                nursery.start_soon(connect, client_id)
        assert replies == {client_id: f"ACK {client_id}\n".encode() for client_id in client_ids}

        stats = json.loads(await tcp_request(server.address, "STATS"))
        assert stats["completed"] + stats["queued"] + stats["running"] == 300
        assert stats["queued"] + stats["running"] > 0, stats  # SIGTERM comes mid-flight

        returncode, shutdown_time = await server.terminate_and_wait(drain_timeout)
        log = await server.log()

    assert returncode == 0, log
    records = [json.loads(line) for line in (await trio.Path(audit_file).read_text()).splitlines()]
    recorded = [record["client_id"] for record in records]
    assert sorted(recorded) == client_ids  # each exactly once
    assert all(record["peer"].startswith("127.0.0.1:") for record in records)
    assert "drained: BackgroundStatistics(scheduled=0, queued=0, running=0, completed=300," in log
    print(
        f"\ntcp_audit: 300 connections; at SIGTERM {stats['queued']} queued, "
        f"{stats['running']} running; exit 0 after {shutdown_time:.2f}s; {len(recorded)} recorded"
    )
