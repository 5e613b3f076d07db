"""The result table, as aligned text or as Markdown for the README."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from bench.scenarios import Scenario
from bench.wrk import WrkResult

MB = 1 << 20


@dataclass
class Row:
    scenario: Scenario
    direct: list[WrkResult] = field(default_factory=list)
    harp: list[WrkResult] = field(default_factory=list)
    reference: list[WrkResult] = field(default_factory=list)
    #: CPU% of the reference's processes during its runs (``--reference-pid``)
    reference_cpu: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    #: total RSS of HaRP's processes after each run, and the largest single process
    rss: list[int] = field(default_factory=list)
    rss_largest: list[int] = field(default_factory=list)
    processes: int = 1

    def value(self, result: WrkResult) -> float:
        return result.mb_per_s if self.scenario.bulk else result.rps

    def median(self, results: list[WrkResult]) -> float:
        return statistics.median(self.value(r) for r in results) if results else 0.0

    def ratio(self, side: list[WrkResult]) -> float:
        """Median of the per-rep ratios (each rep's run ÷ the direct run just before it)."""
        pairs = [
            self.value(s) / self.value(d)
            for d, s in zip(self.direct, side, strict=False)
            if self.value(d) > 0
        ]
        return statistics.median(pairs) if pairs else 0.0

    def errors(self) -> int:
        return sum(r.errors for r in self.harp)


def _fmt_value(row: Row, value: float) -> str:
    if row.scenario.bulk:
        return f"{value:,.0f} MB/s"
    if value >= 10_000:
        return f"{value / 1000:.1f}k req/s"
    return f"{value:,.0f} req/s"


def _ms(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def columns(with_reference: bool) -> list[str]:
    head = ["scenario", "direct", "HaRP", "ratio", "ref ratio", "ours ÷ ref"]
    if with_reference:
        head += ["reference (measured)", "ref ratio (measured)", "ours ÷ ref (measured)",
                 "ref p50 / p99 ms", "ref CPU %"]
    return [*head, "HaRP p50 / p99 ms", "HaRP CPU %", "HaRP RSS MB"]


def cells(row: Row, with_reference: bool) -> list[str]:
    sc = row.scenario
    ratio = row.ratio(row.harp)
    harp_median = row.median(row.harp)
    ref = "—"
    ours_vs_ref = "—"
    if sc.ref_ratio is not None:
        ref = f"{sc.ref_ratio:.3f}"
        ours_vs_ref = f"{ratio / sc.ref_ratio:.2f}"
    elif sc.ref_rps is not None:
        ref = f"{sc.ref_rps / 1000:.1f}k req/s"
        ours_vs_ref = f"{harp_median / sc.ref_rps:.2f}"
    harp_cell = _fmt_value(row, harp_median)
    if row.errors():
        harp_cell += f" ({row.errors()} errors)"
    out = [sc.title, _fmt_value(row, row.median(row.direct)), harp_cell, f"{ratio:.3f}", ref,
           ours_vs_ref]
    if with_reference:
        out += _reference_cells(row, ratio)
    p50 = statistics.median(r.p50_ms for r in row.harp)
    p99 = statistics.median(r.p99_ms for r in row.harp)
    latency = f"{_ms(p50)} / {_ms(p99)}"
    if sc.ref_p50_ms is not None and sc.ref_p99_ms is not None:
        latency += f" (ref {_ms(sc.ref_p50_ms)} / {_ms(sc.ref_p99_ms)})"
    elif sc.ref_p99_ms is not None:
        latency += f" (ref p99 {_ms(sc.ref_p99_ms)})"
    cpu = f"{statistics.median(row.cpu):.0f}"
    rss = f"{statistics.median(row.rss) / MB:.0f}"
    if row.processes > 1:
        rss += f" ({row.processes} procs, max {statistics.median(row.rss_largest) / MB:.0f})"
    return [*out, latency, cpu, rss]


def _reference_cells(row: Row, ours: float) -> list[str]:
    """The measured reference: its rate, ratio, ours ÷ its ratio, latency and CPU."""
    if not row.reference:
        return ["—"] * 5
    errors = sum(r.errors for r in row.reference)
    value = _fmt_value(row, row.median(row.reference))
    if errors:
        value += f" ({errors} errors)"
    ref_ratio = row.ratio(row.reference)
    versus = f"{ours / ref_ratio:.2f}" if ref_ratio > 0 else "—"
    p50 = statistics.median(r.p50_ms for r in row.reference)
    p99 = statistics.median(r.p99_ms for r in row.reference)
    cpu = f"{statistics.median(row.reference_cpu):.0f}" if row.reference_cpu else "—"
    return [value, f"{ref_ratio:.3f}", versus, f"{_ms(p50)} / {_ms(p99)}", cpu]


def markdown(rows: list[Row], with_reference: bool) -> str:
    head = columns(with_reference)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells(row, with_reference)) + " |" for row in rows]
    return "\n".join(lines)


def text(rows: list[Row], with_reference: bool) -> str:
    table = [columns(with_reference)] + [cells(row, with_reference) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    out = []
    for n, line in enumerate(table):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
