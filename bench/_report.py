"""Plain-text table, PASS/FAIL lines and the PNG chart."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
#
# The docs show the PNG at page width (about 660 px in the docs' theme), so the figure is
# one column of panels, 7.2 inches wide: at that width one point of font is about 1.2
# pixels on the page, and no text is smaller than 8 pt. The layout is computed in inches
# (not by tight_layout) so that each panel's axes size is known before anything is drawn:
# value labels are then measured and put inside a bar when they fit, outside (past the
# whisker) when they do not, with the x axis widened to make room.

FIG_WIDTH = 7.2  # inches
DPI = 150  # 1080 px wide: crisp when the page scales it down
LEFT = 1.95  # inches for the contender names
RIGHT = 0.2
EDGE = 0.15  # titles and footnotes start here
TOP_BLOCK = 0.85  # figure title and subtitle
TITLE = 0.5  # a panel's two title lines
AXIS = 0.3  # x tick labels under a panel
FOOT_LINE = 0.17  # one footnote line
GAP = 0.3  # between panels
FONT = 8.5  # tick labels, value labels, footnotes
FOOT_WRAP = 110  # characters per footnote line (the full figure width at FONT)
TITLE_FONT = 9.5
TEXT = "#222222"
MUTED = "#555555"


@dataclass
class _Series:
    label: str  # legend entry ("" for a single series: no legend)
    values: dict[str, list[float]]  # per contender, one value per round
    color: str | None = None  # None: OURS_COLOR for highlighted contenders, else PEER_COLOR


@dataclass
class _Panel:
    title: str  # first title line: the scenario and its N
    metric: str  # second title line: unit and which way is better
    series: list[_Series]
    fmt: Callable[[float], str]  # value label of a median
    scale: float = 1.0
    names: dict[str, str] = field(default_factory=dict)  # contender -> shorter display name
    highlight: Callable[[str], bool] = lambda name: name.startswith("trio_background")
    footnotes: list[str] = field(default_factory=list)
    ref_line: tuple[float, str] | None = None  # (x, label): a bar's target, dashed

    @property
    def rows(self) -> int:
        return len(self.series[0].values)

    @property
    def foot_lines(self) -> list[str]:
        return [line for note in self.footnotes for line in textwrap.wrap(note, FOOT_WRAP)]

    def height(self) -> float:
        slot = 0.3 if len(self.series) == 1 else 0.44
        return TITLE + self.rows * slot + 0.12 + AXIS + FOOT_LINE * len(self.foot_lines)


def _wrap(label: str, width: int = 26) -> str:
    """Two lines for a long contender name, broken at a phrase boundary when one fits."""
    if len(label) <= width:
        return label
    cuts = [i + 2 for i in range(len(label)) if label[i : i + 2] in (", ", ": ", "; ")]
    cuts += [i + 1 for i in range(len(label)) if label[i : i + 2] == " ("]
    fitting = [c for c in cuts if c - 1 <= width and len(label) - c <= width]
    if fitting:
        cut = max(fitting)
        return label[:cut].rstrip() + "\n" + label[cut:]
    return textwrap.fill(label, width)


def _k(value: float, _pos: object = None) -> str:
    """Tick labels: 40k rather than 40000."""
    if value >= 10_000:
        return f"{value / 1000:,.0f}k"
    return f"{value:,.0f}" if value >= 10 or value == 0 else f"{value:g}"


def _median_footnote(label: str, values: Sequence[float], bar: str = "") -> str:
    return f"{label} {median(values):.2f}x" + (f" ({bar})" if bar else "")


def _panels(sections: dict[str, Section]) -> list[_Panel]:
    panels: list[_Panel] = []
    rate = "jobs per CPU-second, higher is better; bar: median, whisker: min-max of the rounds"

    burst = sections.get("burst")
    if burst is not None:
        d = burst.data
        foot = []
        r = d.get("ratios", {})
        if {"aiojobs_counted", "aiojobs", "floor_nowait", "floor_await"} <= set(r):
            foot = [
                "trio_background / "
                + _median_footnote("aiojobs counted drain:", r["aiojobs_counted"])
                + "; / "
                + _median_footnote("aiojobs wait_and_close():", r["aiojobs"], "bar >= 6x"),
                "trio_background / "
                + _median_footnote("floor nowait first:", r["floor_nowait"], "bar >= 1.0x")
                + "; / "
                + _median_footnote("floor await always:", r["floor_await"]),
                "(medians of the per-round ratios of jobs per CPU-second)",
            ]
        panels.append(
            _Panel(
                f"1. Burst: {d['n']:,} no-op jobs into 128 slots, {d['rounds']} rounds",
                rate,
                [_Series("", d["jobs_per_cpu_second"])],
                lambda v: f"{v:,.0f}",
                footnotes=foot,
            )
        )
    steady = sections.get("steady")
    if steady is not None:
        d = steady.data
        panels.append(
            _Panel(
                f"2. Steady state: {d['n']:,} jobs from {d['producers']} submitters, "
                f"queue {d['queue']:,}, {d['rounds']} rounds",
                rate,
                [_Series("", d["jobs_per_cpu_second"])],
                lambda v: f"{v:,.0f}",
            )
        )
    lat = sections.get("latency")
    if lat is not None:
        d = lat.data
        panels.append(
            _Panel(
                f"3. Latency, submit to first line: {d['samples']:,} probes per round, "
                f"{d['rounds']} rounds",
                f"microseconds, lower is better; {d['load']} of 128 slots busy; "
                "medians of the per-round p50 and p99",
                [_Series("p50", d["p50"], "#1b9e77"), _Series("p99", d["p99"], "#e7298a")],
                lambda v: f"{v:,.0f} µs",
                scale=1e6,
            )
        )
    mem = sections.get("memory")
    if mem is not None:
        d = mem.data
        values = {
            "trio_background: queued job": [d["bytes_per_queued_job"]],
            "aiojobs 1.4: pending job": [d["aiojobs_bytes_per_pending_job"]],
            "worker pool: buffered job (fn, args)": [d["pool_bytes_per_buffered_job"]],
        }
        panels.append(
            _Panel(
                f"4. Memory per waiting job: {d['queued']:,} jobs waiting, one measurement",
                "bytes (tracemalloc), lower is better",
                [_Series("", values)],
                lambda v: f"{v:,.0f} B",
                footnotes=[
                    f"{d['rejections']:,} rejected spawns grew the traced total by "
                    f"{d['rejected_growth']:,.0f} B (bar: < 1 MB)"
                ],
                ref_line=(QUEUED_JOB_BYTES, f"bar: {QUEUED_JOB_BYTES} B"),
            )
        )
    shut = sections.get("shutdown")
    if shut is not None:
        d = shut.data
        idle = "; ".join(
            f"{name.replace(': idle aclose()', '').replace('reference: ', '')} "
            f"{median(v['p50']) * 1e6:,.1f} µs"
            for name, v in d["idle"].items()
        )
        panels.append(
            _Panel(
                f"5. Shutdown: drain of {d['n']:,} queued no-op jobs, {d['rounds']} rounds",
                "milliseconds, wall-clock, lower is better; bar: median, whisker: min-max",
                [_Series("", d["drain_wall"])],
                lambda v: f"{v:,.0f} ms",
                scale=1e3,
                footnotes=[
                    f"idle aclose(), median of the per-round p50 ({d['idle_samples']:,} "
                    "samples per round):",
                    idle,
                ],
            )
        )
    ins = sections.get("instruments")
    if ins is not None and "jobs_per_cpu_second" in ins.data:
        d = ins.data
        foot = []
        if "cost" in d:
            foot.append(
                f"no instruments / stripped, median of per-round ratios: {1 - d['cost']:.3f} "
                f"(cost {d['cost'] * 100:+.1f}%, CPU time)"
            )
        if "instructions_per_job" in d:
            counts = d["instructions_per_job"]
            cost_i = counts["trio_background"] / counts["stripped copy"] - 1
            foot.append(f"instructions per job (valgrind): cost {cost_i * 100:+.2f}% (bar < 3%)")
        panels.append(
            _Panel(
                f"6. Instruments: burst of {d['n']:,} no-op jobs, {d['rounds']} rounds",
                rate,
                [_Series("", d["jobs_per_cpu_second"])],
                lambda v: f"{v:,.0f}",
                highlight=lambda name: name.startswith("no instruments"),
                footnotes=foot,
            )
        )
    send = sections.get("send")
    if send is not None and "cpu_per_job" in send.data:
        d = send.data
        names = list(d["cpu_per_job"])
        panels.append(
            _Panel(
                f"7. One submitter, nothing waits: {d['n']:,} no-op jobs, {d['rounds']} rounds",
                "CPU time per job, lower is better; bar: median, whisker: min-max",
                [_Series("", d["cpu_per_job"])],
                lambda v: f"{v:,.2f} µs",
                scale=1e6,
                names={names[0]: "await handle.send(job)", names[1]: _SPAWN_CHECKPOINT},
                highlight=lambda name: name == names[0],
                footnotes=[
                    _median_footnote(
                        "send / (spawn + checkpoint), median of per-round ratios:",
                        d["ratios"],
                        "bar <= 1.2x",
                    )
                ],
            )
        )
    sched = sections.get("scheduling")
    if sched is not None and "spawn_cpu_per_job" in sched.data:
        d = sched.data
        flat = d["flatness"]["spawn"]
        panels.append(
            _Panel(
                f"9. Scheduling: bursts of {d['n']:,} and {d['small']:,} no-op jobs, "
                f"mock clock, {d['rounds']} rounds",
                "CPU time per job, lower is better; bar: median, whisker: min-max of the rounds",
                [
                    _Series("spawn loop", d["spawn_cpu_per_job"], "#1b9e77"),
                    _Series("whole run", d["whole_cpu_per_job"], "#e7298a"),
                ],
                lambda v: f"{v:,.1f} µs",
                scale=1e6,
                footnotes=[
                    "spawn loop at N / at N/5, median of per-round ratios: "
                    + ", ".join(f"{v} {median(r):.2f}x" for v, r in flat.items())
                    + " (bar: delayed and keyed <= 2x)"
                    + (
                        "; less the cyclic GC's share: "
                        + ", ".join(
                            f"{v} {median(r):.2f}x"
                            for v, r in d["flatness"]["spawn_less_gc"].items()
                        )
                        if "spawn_less_gc" in d["flatness"]
                        else ""
                    )
                ],
            )
        )
    return panels


_SPAWN_CHECKPOINT = "handle.spawn(job); await checkpoint()"


def _draw(fig: Any, ax: Any, panel: _Panel) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    names = list(panel.series[0].values)
    k = len(panel.series)
    height = 0.8 / k
    renderer = fig.canvas.get_renderer()
    pad = 3 * fig.dpi / 72  # pixels between a label and what it follows
    labels = []  # (y, median, right end of the whisker, text artist)
    for i, series in enumerate(panel.series):
        for row, name in enumerate(names):
            vals = [v * panel.scale for v in series.values[name]]
            med, lo, hi = median(vals), min(vals), max(vals)
            if math.isnan(med):
                continue
            y = row + (i - (k - 1) / 2) * height
            color = series.color or (OURS_COLOR if panel.highlight(name) else PEER_COLOR)
            whisker = len(vals) > 1 and hi > lo
            ax.barh(
                y,
                med,
                height=height * 0.9,
                color=color,
                xerr=[[med - lo], [hi - med]] if whisker else None,
                error_kw={"elinewidth": 0.9, "capsize": 2.5, "ecolor": TEXT},
            )
            text = ax.annotate(
                f"{series.label} {panel.fmt(med)}" if series.label else panel.fmt(med),
                (0, y),
                xytext=(0, 0),
                textcoords="offset pixels",
                va="center_baseline",
                fontsize=FONT,
                fontweight="bold",  # measured as drawn inside: bold is the wider style
                annotation_clip=False,  # else a point outside the limits so far measures 1 px
            )
            labels.append((y, med, hi if whisker else med, text))
    # Fit the x axis to the labels that have to go outside their bar.
    ax_width = ax.get_window_extent(renderer).width
    widths = [t.get_window_extent(renderer).width + 2 * pad for *_, t in labels]
    xmax = max([end for _, _, end, _ in labels] + [panel.ref_line[0] if panel.ref_line else 0])
    xmax = xmax * 1.03 if xmax > 0 else 1.0
    for _ in range(10):
        need = xmax
        for (_, med, end, _), w in zip(labels, widths, strict=True):
            if med / xmax * ax_width < w:  # does not fit inside: goes past the whisker
                need = max(need, end / max(1 - w / ax_width, 0.05))
        if need <= xmax * 1.001:
            break
        xmax = need
    ax.set_xlim(0, xmax)
    for (y, med, end, text), w in zip(labels, widths, strict=True):
        if med / xmax * ax_width >= w:
            text.xy = (0, y)
            text.xyann = (pad, 0)
            text.set_color("white")
        else:
            text.xy = (end, y)
            text.xyann = (pad, 0)
            text.set_color(TEXT)
            text.set_fontweight("normal")
    if panel.ref_line is not None:
        x, label = panel.ref_line
        ax.axvline(x, color="#c00000", linestyle="--", linewidth=1)
        ax.annotate(
            label,
            (x, 1),
            xycoords=("data", "axes fraction"),
            xytext=(3, -3),
            textcoords="offset points",
            va="top",
            fontsize=FONT,
            color="#c00000",
        )
    ax.set_yticks(range(len(names)), [_wrap(panel.names.get(n, n)) for n in names])
    for tick, name in zip(ax.get_yticklabels(), names, strict=True):
        if panel.highlight(name) and k == 1:
            tick.set_fontweight("bold")
    ax.set_ylim(len(names) - 0.5, -0.5)  # first contender on top
    ax.tick_params(labelsize=FONT, colors=TEXT)
    ax.xaxis.set_major_locator(MaxNLocator(6))
    ax.xaxis.set_major_formatter(FuncFormatter(_k))
    ax.spines[["top", "right"]].set_visible(False)


def chart(path: Path, sections: dict[str, Section], subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(sections)
    total = TOP_BLOCK + sum(p.height() for p in panels) + GAP * max(len(panels) - 1, 0) + 0.1
    fig = plt.figure(figsize=(FIG_WIDTH, total), dpi=DPI)
    fig.text(
        0.5,
        1 - 0.12 / total,
        "trio-background benchmark (python -m bench)",
        ha="center",
        va="top",
        fontsize=11,
        fontweight="bold",
        color=TEXT,
    )
    fig.text(
        0.5,
        1 - 0.36 / total,
        subtitle,
        ha="center",
        va="top",
        fontsize=8,
        color=MUTED,
        linespacing=1.3,
    )
    top = total - TOP_BLOCK  # inches from the bottom of the figure
    for panel in panels:
        h = panel.height()
        axes_top = top - TITLE
        axes_bottom = top - h + AXIS + FOOT_LINE * len(panel.foot_lines)
        ax = fig.add_axes(
            (
                LEFT / FIG_WIDTH,
                axes_bottom / total,
                (FIG_WIDTH - LEFT - RIGHT) / FIG_WIDTH,
                (axes_top - axes_bottom) / total,
            )
        )
        _draw(fig, ax, panel)
        fig.text(
            EDGE / FIG_WIDTH,
            (top - 0.04) / total,
            panel.title,
            va="top",
            fontsize=TITLE_FONT,
            fontweight="bold",
            color=TEXT,
        )
        fig.text(
            EDGE / FIG_WIDTH,
            (top - 0.04 - 0.2) / total,
            panel.metric,
            va="top",
            fontsize=FONT,
            color=MUTED,
        )
        for i, line in enumerate(panel.foot_lines):
            fig.text(
                EDGE / FIG_WIDTH,
                (axes_bottom - AXIS - FOOT_LINE * i + 0.02) / total,
                line,
                va="top",
                fontsize=FONT,
                color=MUTED,
            )
        top -= h + GAP
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
