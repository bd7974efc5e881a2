"""``python -m bench``: the trio-background benchmark.

Usage::

    python -m bench                 # full sizes (several minutes)
    python -m bench --quick         # CI sizes, well under a minute
    python -m bench --update-docs   # also copy the chart to docs/_static/bench.png
    python -m bench --only burst,send --rounds 5
    python -m bench --quick --strict  # exit 1 if a bar fails

Everything runs in one process. Each scenario runs its contenders in interleaved
rounds (the order rotates every round), reports medians, and computes ratios per
round (A's round i over B's round i) before taking their median, so that a noisy
moment on a shared machine hits both sides of a ratio alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType

from . import _scenarios as scenarios
from ._durable import durable as durable_section
from ._report import chart, render
from ._scenarios import Section
from ._util import log

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS_PNG = ROOT / "docs" / "_static" / "bench.png"
SECTIONS = (
    "burst",
    "steady",
    "latency",
    "memory",
    "shutdown",
    "instruments",
    "send",
    "release",
    "scheduling",
    "durable",
)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _import_ours() -> ModuleType | None:
    try:
        import trio_background
    except ImportError as exc:
        log(f"trio_background is not importable ({exc}); running the peers only")
        return None
    return trio_background


def _load() -> str:
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="The trio-background benchmark; see docs/performance.rst.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes for CI (< 60 s)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per scenario (>= 3)")
    parser.add_argument(
        "--only", help="comma-separated subset of: " + ", ".join(SECTIONS), default=""
    )
    parser.add_argument(
        "--update-docs", action="store_true", help=f"copy the chart to {DOCS_PNG.relative_to(ROOT)}"
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS, help="directory for the PNG, table and JSON"
    )
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if any bar fails")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="also count instructions per job under valgrind (noise-free instrument bar)",
    )
    parser.add_argument(
        "--replot",
        type=Path,
        metavar="JSON",
        help="redraw the chart from a bench-*.json file instead of measuring",
    )
    args = parser.parse_args(argv)
    if args.replot is not None:
        return _replot(args.replot, args.output, update_docs=args.update_docs)

    sizes = scenarios.QUICK if args.quick else scenarios.FULL
    if args.rounds is not None:
        if args.rounds < 3:
            parser.error("--rounds must be >= 3")
        sizes = dataclasses.replace(
            sizes, rounds=args.rounds, instrument_rounds=max(args.rounds, sizes.instrument_rounds)
        )
    only = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")

    tb = _import_ours()
    package_dir = Path(str(tb.__file__)).resolve().parent if tb is not None else None
    started = time.perf_counter()
    load_before = _load()
    sections: dict[str, Section] = {}
    for key in SECTIONS:
        if key not in only:
            continue
        section_started = time.perf_counter()
        if key == "burst":
            sections[key] = scenarios.burst(tb, sizes)
        elif key == "steady":
            sections[key] = scenarios.steady(tb, sizes)
        elif key == "latency":
            sections[key] = scenarios.latency(tb, sizes)
        elif key == "memory":
            sections[key] = scenarios.memory(tb, sizes)
        elif key == "shutdown":
            sections[key] = scenarios.shutdown(tb, sizes)
        elif key == "instruments":
            sections[key] = scenarios.instruments(
                tb, sizes, package_dir, count_instructions=args.instructions
            )
        elif key == "release":
            sections[key] = scenarios.release(tb, sizes, count_instructions=args.instructions)
        elif key == "scheduling":
            sections[key] = scenarios.scheduling(tb, sizes)
        elif key == "durable":
            sections[key] = durable_section(tb, sizes)
        else:
            sections[key] = scenarios.send(tb, sizes)
        log(f"{key}: {time.perf_counter() - section_started:,.1f} s")
    elapsed = time.perf_counter() - started

    mode = "quick" if args.quick else "full"
    versions = (
        f"trio_background {_version('trio-background') if tb is None else tb.__version__}, "
        f"trio {_version('trio')}, anyio {_version('anyio')}, aiojobs {_version('aiojobs')}"
    )
    machine = (
        f"Python {platform.python_version()} on {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs, load avg {load_before} -> {_load()}"
    )
    rounds = f"{sizes.rounds} interleaved rounds"
    if "instruments" in only:
        rounds += f" (instruments: {sizes.instrument_rounds})"
    header = [
        f"trio-background benchmark, {mode} mode: {rounds}; medians, ratios per round; "
        f"{elapsed:,.0f} s",
        versions,
        machine,
    ]
    text = render(header, list(sections.values()))
    print(text)

    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench-{mode}.txt").write_text(text + "\n", encoding="utf-8")
    payload = {
        "mode": mode,
        "sizes": dataclasses.asdict(sizes),
        "header": header,
        "sections": {
            key: {
                "title": s.title,
                "data": s.data,
                "bars": [dataclasses.asdict(b) for b in s.bars],
            }
            for key, s in sections.items()
        },
    }
    (out / f"bench-{mode}.json").write_text(
        json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8"
    )
    png = out / "bench.png"
    subtitle = f"{mode} mode, {sizes.rounds} rounds; {versions}\n{machine}"
    chart(png, sections, subtitle)
    log(f"wrote {png}, {out / f'bench-{mode}.txt'} and {out / f'bench-{mode}.json'}")
    if args.update_docs:
        DOCS_PNG.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, DOCS_PNG)
        log(f"copied the chart to {DOCS_PNG}")

    failed = [b for s in sections.values() for b in s.bars if b.passed is False]
    return 1 if args.strict and failed else 0


def _replot(source: Path, out: Path, *, update_docs: bool) -> int:
    payload = json.loads(source.read_text(encoding="utf-8"))
    sizes = payload["sizes"]
    sections: dict[str, Section] = {}
    for key, raw in payload["sections"].items():
        data = raw["data"]
        # Files written before every section recorded its own sizes: take them from "sizes".
        data.setdefault("rounds", sizes["instrument_rounds" if key == "instruments" else "rounds"])
        if key in ("burst", "steady", "instruments", "send"):
            data.setdefault("n", sizes[key])
        if key == "steady":
            data.setdefault("producers", sizes["producers"])
            data.setdefault("queue", sizes["steady_queue"])
        if key == "latency":
            data.setdefault("samples", sizes["latency_samples"])
            data.setdefault("load", sizes["latency_load"])
        if key == "memory":
            data.setdefault("queued", sizes["mem_queued"])
        if key == "shutdown":
            data.setdefault("n", sizes["drain"])
            data.setdefault("idle_samples", sizes["idle_samples"])
        bars = [scenarios.Bar(**bar) for bar in raw["bars"]]
        sections[key] = Section(key, raw["title"], [], data=data, bars=bars)
    header = payload["header"]
    subtitle = f"{payload['mode']} mode, {sizes['rounds']} rounds; {header[1]}\n{header[2]}"
    png = out / "bench.png"
    chart(png, sections, subtitle)
    log(f"wrote {png}")
    if update_docs:
        DOCS_PNG.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, DOCS_PNG)
        log(f"copied the chart to {DOCS_PNG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
