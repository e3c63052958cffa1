"""Shared helpers of the benchmarks: timing, tables, JSON output, machine description."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def interleaved_medians(a: Callable[[], Any], b: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median seconds of ``a`` and of ``b``, run alternately (after one warm-up each) so drift hits both."""
    a(), b()
    ta: list[float] = []
    tb: list[float] = []
    for _ in range(repeats):
        for fn, out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def machine() -> dict[str, Any]:
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    """A right-aligned text table; floats with 3 decimals, None as ``-`` (not measured / too few)."""
    cells = [["-" if c is None else f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


def write_json(path: str, data: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2))
    print(f"wrote {path}")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def tail_percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile, or None when there are too few values for it to be anything but the
    maximum (fewer than ``100 / (100 - q)``: a p99 needs 100 values). Report the maximum as such."""
    if q < 100 and len(values) < 100 / (100 - q):
        return None
    return percentile(values, q)


def latency_summary(values: list[float]) -> dict[str, Any]:
    """``n``, p50, p90, p99 (None where ``n`` is too small for them, see ``tail_percentile``), max."""
    return {"n": len(values), "p50": tail_percentile(values, 50), "p90": tail_percentile(values, 90),
            "p99": tail_percentile(values, 99), "max": max(values) if values else None}
