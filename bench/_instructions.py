"""Instructions per job, counted by valgrind (cachegrind): a measure that noise cannot move.

On a shared machine even CPU time varies by tens of percent between two runs of the
same code, which swamps differences of a few percent (the instrument bar is 3%).
Executed instructions do not depend on what else runs on the machine. For each
contender we run a burst of ``small`` and of ``large`` jobs in a fresh interpreter
under ``valgrind --tool=cachegrind --cache-sim=no`` and take
``(I(large) - I(small)) / (large - small)``: the interpreter's start-up and imports
cancel out. Instructions are not time (memory stalls differ), but for one program
and two near-identical variants of it they are the steadiest proxy there is.

Run as ``python -m bench._instructions KIND N`` inside valgrind; KIND is ``ours``,
``stripped:<dir>``, ``floor`` (await always), ``floor_nowait`` (nowait first) or ``pool``.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CAP = 128


def available() -> bool:
    return shutil.which("valgrind") is not None


def _count(kind: str, n: int) -> int:
    env = dict(os.environ, PYTHONHASHSEED="0")
    cmd = [
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=no",
        "--cachegrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "bench._instructions",
        kind,
        str(n),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    match = re.search(r"I\s+refs:\s+([\d,]+)", proc.stderr)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"valgrind run of {kind} failed:\n{proc.stderr[-2000:]}")
    return int(match.group(1).replace(",", ""))


def per_job(kinds: dict[str, str], small: int = 3000, large: int = 9000) -> dict[str, float]:
    """Instructions per job for each ``label -> kind``, two valgrind runs at a time."""
    jobs = [(label, kind, n) for label, kind in kinds.items() for n in (small, large)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        counts = list(pool.map(lambda job: _count(job[1], job[2]), jobs))
    by_label: dict[str, dict[int, int]] = {}
    for (label, _, n), count in zip(jobs, counts, strict=True):
        by_label.setdefault(label, {})[n] = count
    return {label: (c[large] - c[small]) / (large - small) for label, c in by_label.items()}


def _main(kind: str, n: int) -> None:
    from . import _ours, _peers

    if kind == "ours":
        import trio_background

        _ours.burst(trio_background, n, CAP)
    elif kind.startswith("stripped:"):
        directory = Path(kind.split(":", 1)[1])
        sys.path.insert(0, str(directory.parent))
        _ours.burst(importlib.import_module(directory.name), n, CAP)
    elif kind == "floor":
        _peers.floor_burst(n, CAP)
    elif kind == "floor_nowait":
        _peers.floor_nowait_burst(n, CAP)
    elif kind == "pool":
        _peers.pool_burst(n, CAP)
    else:
        raise SystemExit(f"unknown kind {kind!r}")


if __name__ == "__main__":
    _main(sys.argv[1], int(sys.argv[2]))
