"""Serve the Quart-Trio example with Hypercorn's trio worker, draining on SIGTERM.

Run from anywhere::

    python examples/quart_service/serve.py --bind 127.0.0.1:8000

Hypercorn's own command line only shuts down gracefully when SIGTERM reaches
its parent process: with ``--workers 0`` SIGTERM kills the server outright, and
a SIGTERM sent to the whole process group (systemd's default, ``kill -- -PGID``)
kills the worker before the app can drain. Here the server runs in this process
and SIGTERM or SIGINT triggers Hypercorn's graceful shutdown: stop accepting
connections, finish the requests in flight, then run the app's shutdown, which
drains the background runtime. A second signal stops at once.

The exit status is 0 after a complete drain, 1 if the drain timed out and jobs
were cut off.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from service import BackgroundService, app

logger = logging.getLogger("quart_service")


async def main(bind: str, graceful_timeout: float) -> int:
    config = Config()
    config.bind = [bind]
    # How long requests in flight get to finish once shutdown begins.
    config.graceful_timeout = graceful_timeout
    config.errorlog = logging.getLogger("hypercorn.error")  # use the logging set up below
    # Hypercorn's limit on the app's shutdown must leave room for the drain.
    config.shutdown_timeout = app.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] + 5
    service: BackgroundService = app.extensions["background_service"]

    # Listen before the server starts, so an early SIGTERM is not fatal.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        shutdown = trio.Event()
        stopped_now = False
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                nonlocal stopped_now
                async for signum in signals:
                    if not shutdown.is_set():
                        logger.info("%s: shutting down gracefully", signal.Signals(signum).name)
                        shutdown.set()
                    else:
                        # Cancels the server, the app and the drain: the runtime
                        # cuts off what is left (and logs each job) at once.
                        logger.warning("%s again: stopping now", signal.Signals(signum).name)
                        stopped_now = True
                        nursery.cancel_scope.cancel()

            nursery.start_soon(watch_signals)
            await serve(app, config, shutdown_trigger=shutdown.wait)
            nursery.cancel_scope.cancel()
    if stopped_now or service.shutdown_error is not None:
        return 1  # jobs were cut off
    return 0


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1:8000", help="host:port (port 0: any free)")
    parser.add_argument("--graceful-timeout", type=float, default=3.0, help="seconds")
    args = parser.parse_args()
    sys.exit(trio.run(main, args.bind, args.graceful_timeout))
