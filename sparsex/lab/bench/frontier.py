"""Methods compared at matched speed: each swept over its own knob, quality against measured TTFT.

A sweep is written in ``sparsex eval --methods`` with ``|`` between a knob's values:
``blend:budget=0.05|0.1|0.2`` runs three points labelled ``blend@budget=0.05`` ... (the family is
the label before ``@``). ``sparsex eval --frontier`` runs :data:`FRONTIER_METHODS`, every method
at several settings of its own knob, and ``--frontier-plot`` draws, per workload, the 16-token gap
closed (and the first token's) against TTFT as a fraction of full prefill's on the same items,
with bootstrap intervals: one curve per method family.
"""

from __future__ import annotations

import itertools
from typing import Any

FRONTIER_METHODS = ",".join([
    "naive",
    "blend:budget=0.03|0.05|0.1|0.2",
    "cacheblend:budget=0.05|0.1|0.2|0.3",
    "epic:epic_tokens=4|16|64",
    "sparsex:boundary=2|5|8",
    "oracle:budget=0.05|0.1|0.2",
])
"""Every method over its own knob: the recompute budget (blend, CacheBlend as published, the
selection-only oracle), EPIC's leading tokens per segment, the paper's hybrid boundary layer."""


def expand_sweeps(text: str) -> list[tuple[str, str]]:
    """``"blend:budget=0.05|0.1+shift=0"`` -> ``[("blend@budget=0.05", "blend:budget=0.05+shift=0"),
    ...]``: one (label, method text) per combination of the ``|`` alternatives; a text without
    alternatives is its own label."""
    name, _, rest = text.partition(":")
    opts = [kv for kv in rest.split("+") if kv]
    fixed = [kv for kv in opts if "|" not in kv]
    swept = [(kv.partition("=")[0], kv.partition("=")[2].split("|")) for kv in opts if "|" in kv]
    if not swept:
        return [(text, text)]
    base = name + (":" + "+".join(fixed) if fixed else "")
    out = []
    for values in itertools.product(*(vals for _, vals in swept)):
        chosen = [f"{key}={v}" for (key, _), v in zip(swept, values, strict=True)]
        out.append((f"{base}@{','.join(chosen)}", f"{name}:{'+'.join([*fixed, *chosen])}"))
    return out


PANELS = (("gap_closed16", "KL gap closed, 16 forced tokens"), ("gap_closed", "KL gap closed, first token"))


def plot_frontier(rows: list[dict[str, Any]], path: str, title: str = "") -> None:
    """One column per workload: quality (rows of :data:`PANELS`) against TTFT / full prefill, one
    curve per method family, points with their bootstrap intervals on both axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    fig, axes = plt.subplots(len(PANELS), len(kinds), figsize=(5.5 * len(kinds), 4 * len(PANELS)), squeeze=False)
    for col, kind in enumerate(kinds):
        for row_i, (key, label) in enumerate(PANELS):
            ax = axes[row_i][col]
            families: dict[str, list[dict[str, Any]]] = {}
            for r in rows:
                if r["kind"] == kind and r.get(key) is not None and r.get("ttft_ratio") is not None:
                    families.setdefault(r["method"].split("@")[0], []).append(r)
            for j, (family, pts) in enumerate(sorted(families.items())):
                pts.sort(key=lambda r: r["ttft_ratio"])
                xs, ys = [r["ttft_ratio"] for r in pts], [r[key] for r in pts]
                xerr = [[x - (r["ci"].get("ttft_ratio") or (x, x))[0] for x, r in zip(xs, pts, strict=True)],
                        [(r["ci"].get("ttft_ratio") or (x, x))[1] - x for x, r in zip(xs, pts, strict=True)]]
                yerr = [[y - (r["ci"].get(key) or (y, y))[0] for y, r in zip(ys, pts, strict=True)],
                        [(r["ci"].get(key) or (y, y))[1] - y for y, r in zip(ys, pts, strict=True)]]
                ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="os^Dv<>"[j % 7], capsize=2, alpha=0.85,
                            color=plt.get_cmap("tab10")(j % 10), label=family,
                            linewidth=2.5 if family == "blend" else 1.2)
            ax.set_title(f"{title}{kind}: {label}", fontsize=9)
            ax.set_xlabel("TTFT / full prefill (median over items)")
            ax.grid(alpha=0.3)
            if row_i == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
