"""Plain-text table, PASS/FAIL lines and the PNG chart."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._scenarios import QUEUED_JOB_BYTES, Bar, Section
from ._util import median

OURS_COLOR = "#d95f02"
PEER_COLOR = "#7570b3"


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(row[i])) for row in [columns, *rows]) for i in range(len(columns))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(columns), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def render(header: Sequence[str], sections: Sequence[Section]) -> str:
    out: list[str] = [*header, ""]
    for section in sections:
        out.append(section.title)
        out += ["  " + line for line in _table(section.columns, section.rows)]
        out += ["  " + note for note in section.notes]
        out.append("")
    out += render_bars([bar for section in sections for bar in section.bars])
    return "\n".join(out)


def render_bars(bars: Sequence[Bar]) -> list[str]:
    rows = [
        [
            "PASS" if bar.passed else "FAIL" if bar.passed is not None else "N/A",
            bar.label,
            bar.measured,
            bar.target,
        ]
        for bar in bars
    ]
    return [
        "Performance bars",
        *("  " + line for line in _table(["", "bar", "measured", "target"], rows)),
    ]


# -- chart --------------------------------------------------------------------------------


def _wrap(label: str) -> str:
    return textwrap.fill(label, 24)


def _hbar(
    ax: Any,
    title: str,
    values: dict[str, list[float]],
    unit: str,
    scale: float,
    highlight: str = "trio_background",
) -> None:
    names = list(values)[::-1]
    meds = [median(values[n]) * scale for n in names]
    lo = [m - min(values[n]) * scale for m, n in zip(meds, names, strict=True)]
    hi = [max(values[n]) * scale - m for m, n in zip(meds, names, strict=True)]
    colors = [OURS_COLOR if n.startswith(highlight) else PEER_COLOR for n in names]
    ax.barh([_wrap(n) for n in names], meds, xerr=[lo, hi], color=colors, capsize=3)
    for y, m in enumerate(meds):
        if not math.isnan(m):
            ax.text(0, y, f" {m:,.0f}", va="center", ha="left", fontsize=7, color="white")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(unit, fontsize=8)
    ax.tick_params(labelsize=7)


def chart(path: Path, sections: dict[str, Section], subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(13, 12))
    burst = sections.get("burst")
    if burst is not None:
        _hbar(
            axes[0][0],
            f"1. Burst of {burst.data['n']:,} no-op jobs, 128 slots",
            burst.data["jobs_per_cpu_second"],
            "jobs per CPU-second (median, min-max)",
            1,
        )
    steady = sections.get("steady")
    if steady is not None:
        _hbar(
            axes[0][1],
            f"2. Steady state: {steady.data['producers']} submitters, queue "
            f"{steady.data['queue']}, 128 slots",
            steady.data["jobs_per_cpu_second"],
            "jobs per CPU-second (median, min-max)",
            1,
        )
    lat = sections.get("latency")
    if lat is not None:
        ax = axes[1][0]
        names = list(lat.data["p50"])[::-1]
        ys = range(len(names))
        p50 = [median(lat.data["p50"][n]) * 1e6 for n in names]
        p99 = [median(lat.data["p99"][n]) * 1e6 for n in names]
        ax.barh([y + 0.2 for y in ys], p50, height=0.4, label="p50", color="#1b9e77")
        ax.barh([y - 0.2 for y in ys], p99, height=0.4, label="p99", color="#e7298a")
        ax.set_yticks(list(ys), [_wrap(n) for n in names])
        for y, (a, b) in enumerate(zip(p50, p99, strict=True)):
            ax.text(a, y + 0.2, f" {a:,.0f}", va="center", fontsize=7)
            ax.text(b, y - 0.2, f" {b:,.0f}", va="center", fontsize=7)
        ax.set_title("3. Latency, submit -> first line of the job, 64/128 slots busy", fontsize=9)
        ax.set_xlabel("microseconds (lower is better)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    mem = sections.get("memory")
    if mem is not None:
        ax = axes[1][1]
        labels = [
            "trio_background\nqueued job",
            "aiojobs 1.4\npending job",
            "worker pool\nbuffered job",
        ]
        vals = [
            mem.data["bytes_per_queued_job"],
            mem.data["aiojobs_bytes_per_pending_job"],
            mem.data["pool_bytes_per_buffered_job"],
        ]
        ax.bar(labels, vals, color=[OURS_COLOR, PEER_COLOR, PEER_COLOR])
        ax.axhline(
            QUEUED_JOB_BYTES,
            color="red",
            linestyle="--",
            linewidth=1,
            label=f"bar: {QUEUED_JOB_BYTES} B",
        )
        for x, v in enumerate(vals):
            ax.text(x, v, f"{v:,.0f} B", ha="center", va="bottom", fontsize=7)
        growth = mem.data["rejected_growth"]
        ax.set_title(
            f"4. Memory per waiting job; {mem.data['rejections']:,} rejected spawns grew "
            f"{growth:,.0f} B",
            fontsize=9,
        )
        ax.set_ylabel("bytes (tracemalloc)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    shut = sections.get("shutdown")
    if shut is not None:
        ax = axes[2][0]
        _hbar(
            ax,
            "5. Shutdown: drain of queued no-op jobs",
            shut.data["drain_wall"],
            "milliseconds, wall-clock (lower is better)",
            1e3,
        )
        idle = shut.data["idle"]
        text = "Idle aclose(), per-round p50: " + "; ".join(
            f"{k.replace('trio_background: idle aclose()', 'trio_background')} "
            f"{median(v['p50']) * 1e6:,.0f} us"
            for k, v in idle.items()
        )
        ax.text(0.0, -0.25, text, transform=ax.transAxes, fontsize=8, va="top")
    ins = sections.get("instruments")
    if ins is not None and "jobs_per_cpu_second" in ins.data:
        _hbar(
            axes[2][1],
            f"6. Instruments: burst of {ins.data['n']:,} no-op jobs",
            ins.data["jobs_per_cpu_second"],
            "jobs per CPU-second (median, min-max)",
            1,
            highlight="no instruments",
        )
    for row in axes:
        for ax in row:
            if not ax.has_data():
                ax.set_visible(False)
    fig.suptitle("trio-background benchmark (python -m bench)\n" + subtitle, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
