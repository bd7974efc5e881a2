"""The tasks of the monitored-worker example: what its queue may run."""

from __future__ import annotations

import trio

from trio_background import Retry
from trio_background.durable import TaskRegistry

tasks = TaskRegistry()


@tasks.task(name="resize_image", retry=Retry(attempts=3, backoff=0.1), timeout=30)
async def resize_image(path: str, width: int) -> None:
    """Stand-in for real work: a short sleep, failing for paths that name no image."""
    await trio.sleep(0.01)
    if not path.endswith(".png"):
        raise ValueError(f"not an image: {path}")
