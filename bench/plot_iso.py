"""The ISO-centre table height error of planning runs beside the published anchors (docs/planning.md quotes it).

Reads the per-capture rows that `bench/planning.py` writes beside its output (`*.rows.json`, one row per
planned capture, `iso_err` in mm against the simulator's true body), prints each run's |error| median, p95 and
share within 5 and 12 mm, and with --plot draws their distributions (empirical CDF) over the issue's targets
(median 2 mm, p95 5 mm), the 3D-camera systems' published median (about 5 mm: Booij 2019; Saltybaeva 2018,
5 +- 3 mm) and the technicians' by hand (12-19 mm).
Run: .venv/bin/python bench/plot_iso.py bench/out/planning-chest.rows.json [more.rows.json ...]
     [--label chest ...] [--plot docs/figures/iso-error.png]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def summary(errors_mm: np.ndarray) -> dict:
    """|ISO error| figures of one run; errors_mm (N,) signed, mm."""
    a = np.abs(errors_mm)
    return {"plans": int(len(a)), "median_mm": round(float(np.median(a)), 2),
            "p95_mm": round(float(np.percentile(a, 95)), 2),
            "within_5mm": round(float(np.mean(a <= 5.0)), 3), "within_12mm": round(float(np.mean(a <= 12.0)), 3)}


def plot(runs: dict[str, np.ndarray], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    # The anchors are medians, so they sit on the 50 % line; a run meets a target when its curve passes left of it.
    ax.axhline(50.0, color="0.8", lw=0.8)
    ax.plot([12.0, 19.0], [50.0, 50.0], color="tab:red", lw=6, alpha=0.35, solid_capstyle="butt",
            label="technicians by hand: median 12-19 mm")
    ax.plot([5.0], [50.0], "o", color="tab:red", ms=8, label="3D cameras published: median ~5 mm")
    ax.plot([2.0], [50.0], "kv", ms=8, label="target: median <= 2 mm")
    ax.plot([5.0], [95.0], "k^", ms=8, label="target: p95 <= 5 mm")
    for name, err in runs.items():
        a = np.sort(np.abs(err))
        ax.step(a, 100.0 * np.arange(1, len(a) + 1) / len(a), where="post", label=f"ctpos {name} ({len(a)} plans)")
    ax.set_xlim(0, 25)
    ax.set_ylim(0, 100)
    ax.set_xlabel("|ISO-centre table height error| (mm)")
    ax.set_ylabel("plans with at most this error (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", nargs="+", type=Path, help="*.rows.json of bench/planning.py runs")
    ap.add_argument("--label", action="append", help="a name per rows file (default: the file's stem)")
    ap.add_argument("--plot", type=Path, help="write the plot here (PNG)")
    a = ap.parse_args()
    labels = a.label or [p.name.removesuffix(".rows.json") for p in a.rows]
    if len(labels) != len(a.rows):
        ap.error("give one --label per rows file, or none")
    runs = {}
    for name, path in zip(labels, a.rows):
        try:
            runs[name] = np.array([r["iso_err"] for r in json.loads(path.read_text())], float)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            ap.error(f"{path}: not the rows of a bench/planning.py run ({type(exc).__name__}: {exc})")
        if not len(runs[name]):
            ap.error(f"{path}: no planned captures")
    out = {name: summary(err) for name, err in runs.items()}
    if a.plot:
        plot(runs, a.plot)
        out["plot"] = str(a.plot)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
