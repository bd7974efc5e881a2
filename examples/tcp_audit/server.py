"""A plain ``trio.serve_tcp`` server that records one audit job per connection.

No framework: the program owns its signals. SIGTERM (or SIGINT) stops the
listener, gives open connections a moment to finish, then drains the
background runtime so that every audit record a client was promised is
written before the process exits::

    python examples/tcp_audit/server.py --port 9000 --audit-file audit.jsonl

Protocol, one line per connection: a client sends ``<client-id>\\n`` and gets
``ACK <client-id>\\n`` once its audit job is accepted (``BUSY`` when the queue
is full, ``CLOSING`` during shutdown). ``STATS\\n`` returns the runtime's
statistics as JSON.

The exit status is 0 after a complete drain, 1 if jobs were cut off.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from datetime import datetime, timezone
from functools import partial

import attrs
import trio

from trio_background import (
    BackgroundShutdownError,
    BackgroundTaskConfig,
    QueueFullError,
    RuntimeClosedError,
    open_background_runtime,
)

logger = logging.getLogger("tcp_audit")

MAX_LINE = 1024
#: Seconds open connections get to finish once shutdown begins.
CONNECTION_GRACE = 2.0


async def read_line(stream: trio.SocketStream) -> bytes:
    """Read up to the first newline (at most MAX_LINE bytes); b"" if the peer left early."""
    data = b""
    while b"\n" not in data and len(data) < MAX_LINE:
        chunk = await stream.receive_some(MAX_LINE)
        if not chunk:
            return b""
        data += chunk
    return data.split(b"\n", 1)[0].strip()


async def serve(
    host: str, port: int, audit_path: str, config: BackgroundTaskConfig, job_seconds: float
) -> int:
    # Listen for signals first: from here on SIGTERM can no longer kill us mid-work.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with (
            await trio.open_file(audit_path, "a") as audit_file,
            open_background_runtime(config) as runtime,
        ):
            handle = runtime.handle()
            # File writes run in worker threads: one at a time keeps lines whole.
            write_lock = trio.Lock()

            async def record_audit(client_id: str, peer: str) -> None:
                await trio.sleep(job_seconds)  # stands for a slow audit store
                at = datetime.now(timezone.utc).isoformat()
                record = {"client_id": client_id, "peer": peer, "at": at}
                async with write_lock:
                    await audit_file.write(json.dumps(record) + "\n")

            async def handle_connection(stream: trio.SocketStream) -> None:
                async with stream:
                    with trio.move_on_after(5):  # no slow-loris clients
                        line = (await read_line(stream)).decode("ascii", "replace")
                        if not line:
                            return
                        if line == "STATS":
                            stats = attrs.asdict(runtime.statistics())
                            await stream.send_all(json.dumps(stats).encode() + b"\n")
                            return
                        peer_host, peer_port = stream.socket.getpeername()[:2]
                        try:
                            handle.spawn(
                                record_audit,
                                line,
                                f"{peer_host}:{peer_port}",
                                name="record_audit",
                                request_id=line,
                            )
                        except QueueFullError:
                            reply = "BUSY"
                        except RuntimeClosedError:
                            reply = "CLOSING"
                        else:
                            reply = f"ACK {line}"
                        await stream.send_all(reply.encode() + b"\n")

            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as listening:
                    listeners = await listening.start(
                        partial(
                            trio.serve_tcp,
                            handle_connection,
                            port,
                            host=host,
                            handler_nursery=connections,
                        )
                    )
                    bound = listeners[0].socket.getsockname()
                    print(f"listening on {bound[0]}:{bound[1]}", flush=True)
                    async for signum in signals:
                        logger.info("%s: shutting down", signal.Signals(signum).name)
                        break
                    listening.cancel_scope.cancel()  # stop accepting connections
                connections.cancel_scope.deadline = trio.current_time() + CONNECTION_GRACE

            # Leaving the runtime's block drains it; do it explicitly to report the result.
            try:
                await runtime.aclose()
            except BackgroundShutdownError as error:
                logger.error("%s", error)
                return 1
            logger.info("drained: %s", runtime.statistics())
            return 0


def main() -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000, help="0: any free port")
    parser.add_argument("--audit-file", required=True)
    parser.add_argument("--max-queue-size", type=int, default=1024)
    parser.add_argument("--max-concurrent-tasks", type=int, default=8)
    parser.add_argument("--drain-timeout", type=float, default=10.0)
    parser.add_argument("--job-seconds", type=float, default=0.05)
    args = parser.parse_args()
    config = BackgroundTaskConfig(
        max_queue_size=args.max_queue_size,
        max_concurrent_tasks=args.max_concurrent_tasks,
        drain_timeout=args.drain_timeout,
    )
    return trio.run(serve, args.host, args.port, args.audit_file, config, args.job_seconds)


if __name__ == "__main__":
    sys.exit(main())
