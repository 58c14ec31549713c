"""A plan against a capture's ground truth: what ``ctpos eval`` compares. Pure (dicts in, numbers out).

``truth.json`` has no fixed schema in CONVENTIONS.md ("optional ground truth written by a simulator"), so a truth
written by another tool may hold some of what ours does, or none of it. Each comparison is made only from the
fields it needs, read from our simulator's layout (docs/simulator.md, "Ground truth"):

* ``patient_position``: a DICOM code, against the plan's;
* ``landmarks_scanner_mm``: ``{name: [x, y, z]}`` in S at capture time (the CONVENTIONS names), each against the
  plan's landmark of that name (Euclidean distance, mm);
* ``protocols.<name>``: ``cranial_y_mm`` and ``caudal_y_mm`` (the region's ends, y_S), ``ideal_table_height_mm``,
  ``iso_offset_lateral_mm``, ``body_thickness_mm``: against the plan's range, table height, lateral offset and
  thickness.

A field that is missing or not a finite number is named in ``Comparison.missing`` and compared no further;
nothing is guessed from fields of another meaning (a top-level ``table_height_mm`` is the table's state at
capture in our truth, not the height to plan).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from positioning.poses import POSITIONS
from positioning.skeleton import LANDMARK_JOINTS

# A region's end counts as covered when the range falls short of it by no more than this (issue #5's tolerance).
COVER_TOLERANCE_MM = 5.0


@dataclass(frozen=True)
class Comparison:
    """One plan against its truth; None where the truth gave nothing to compare. Errors are plan − truth, mm."""

    position_ok: bool | None = None
    height_err_mm: float | None = None
    lateral_err_mm: float | None = None
    thickness_err_mm: float | None = None
    overscan_cranial_mm: float | None = None  # positive: the range reaches past the region's cranial end
    overscan_caudal_mm: float | None = None
    landmark_err_mm: dict[str, float] = field(default_factory=dict)
    missing: tuple[str, ...] = ()

    @property
    def covered(self) -> bool | None:
        if self.overscan_cranial_mm is None or self.overscan_caudal_mm is None:
            return None
        return self.overscan_cranial_mm >= -COVER_TOLERANCE_MM and self.overscan_caudal_mm >= -COVER_TOLERANCE_MM

    def to_json(self) -> dict[str, Any]:
        return {"position_ok": self.position_ok, "height_err": _mm(self.height_err_mm),
                "lateral_err": _mm(self.lateral_err_mm), "thickness_err": _mm(self.thickness_err_mm),
                "overscan_cranial": _mm(self.overscan_cranial_mm), "overscan_caudal": _mm(self.overscan_caudal_mm),
                "covered": self.covered, "landmark_err": {k: _mm(v) for k, v in self.landmark_err_mm.items()},
                "truth_missing": list(self.missing)}


def _mm(v: float | None) -> float | None:
    return None if v is None else round(float(v), 2)


def finite_number(v: Any) -> float | None:
    """v as a float if it is a finite JSON number, else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _point(v: Any) -> np.ndarray | None:
    if not isinstance(v, (list, tuple)) or len(v) != 3:
        return None
    xyz = [finite_number(c) for c in v]
    return None if any(c is None for c in xyz) else np.array(xyz)


def compare(plan: dict[str, Any], truth: dict[str, Any], protocol: str) -> Comparison:
    """Compare a plan (its CONVENTIONS JSON, ``Plan.to_json()``) with a capture's truth (parsed truth.json)."""
    missing: list[str] = []
    pos = truth.get("patient_position")
    position_ok = plan["patient_position"] == pos if pos in POSITIONS else None
    if position_ok is None:
        missing.append("patient_position")

    landmarks = truth.get("landmarks_scanner_mm")
    errs: dict[str, float] = {}
    if isinstance(landmarks, dict):
        for name, planned in plan["landmarks_scanner_mm"].items():
            t = _point(landmarks.get(name))
            if t is not None:
                errs[name] = float(np.linalg.norm(np.asarray(planned, dtype=float) - t))
    if not errs:
        missing.append("landmarks_scanner_mm")

    region = truth.get("protocols", {}).get(protocol) if isinstance(truth.get("protocols"), dict) else None
    region = region if isinstance(region, dict) else {}
    key = f"protocols.{protocol}"
    got = {k: finite_number(region.get(k)) for k in ("cranial_y_mm", "caudal_y_mm", "ideal_table_height_mm",
                                               "iso_offset_lateral_mm", "body_thickness_mm")}
    absent = [k for k, v in got.items() if v is None]
    missing += [key] if len(absent) == len(got) else [f"{key}.{k}" for k in absent]

    over_cr = over_ca = None
    cr, ca = got["cranial_y_mm"], got["caudal_y_mm"]
    if cr is not None and ca is not None and cr != ca:
        toward_head = 1.0 if cr > ca else -1.0  # head first: the head lies towards +y_S (CONVENTIONS)
        pr = plan["scan_range_scanner_mm"]
        over_cr = (pr["cranial"] - cr) * toward_head
        over_ca = (ca - pr["caudal"]) * toward_head

    def err(plan_key: str, truth_key: str) -> float | None:
        return None if got[truth_key] is None else float(plan[plan_key]) - got[truth_key]

    return Comparison(position_ok, err("table_height_mm", "ideal_table_height_mm"),
                      err("iso_offset_lateral_mm", "iso_offset_lateral_mm"),
                      err("body_thickness_mm", "body_thickness_mm"), over_cr, over_ca, errs, tuple(missing))


def summarise(rows: list[Comparison]) -> list[str]:
    """The accuracy table's lines over the planned captures: each figure over the captures whose truth gave it."""
    def stat(values: list[float], what: str) -> str:
        a = np.abs(values)
        return f"{what}: median {np.median(a):.1f} mm, p95 {np.percentile(a, 95):.1f} mm (|error|, n={len(a)})"

    lines = []
    for attr, what in (("height_err_mm", "table height error"), ("lateral_err_mm", "lateral offset error"),
                       ("thickness_err_mm", "body thickness error")):
        v = [getattr(r, attr) for r in rows if getattr(r, attr) is not None]
        if v:
            lines.append(stat(v, what))
    cov = [r for r in rows if r.covered is not None]
    if cov:
        lines.append(f"range covers the truth region ({COVER_TOLERANCE_MM:.0f} mm tolerance): "
                     f"{np.mean([r.covered for r in cov]) * 100:.1f} % (n={len(cov)})")
        lines.append(f"overscan: cranial median {np.median([r.overscan_cranial_mm for r in cov]):.1f} mm, "
                     f"caudal median {np.median([r.overscan_caudal_mm for r in cov]):.1f} mm")
    pos = [r.position_ok for r in rows if r.position_ok is not None]
    if pos:
        lines.append(f"patient position correct: {np.mean(pos) * 100:.1f} % (n={len(pos)})")
    named = {n for r in rows for n in r.landmark_err_mm}
    order = ["vertex", *LANDMARK_JOINTS]  # head to feet, as CONVENTIONS lists them
    names = [n for n in order if n in named] + sorted(named - set(order))
    if names:
        lines.append("landmarks, distance to the truth's, median / p95 mm:")
        errs = {n: [r.landmark_err_mm[n] for r in rows if n in r.landmark_err_mm] for n in names}
        lines += ["  " + ", ".join(f"{n} {np.median(errs[n]):.1f} / {np.percentile(errs[n], 95):.1f}"
                                   for n in names[i:i + 5]) for i in range(0, len(names), 5)]
    gaps = sorted({m for r in rows for m in r.missing})
    if gaps:
        lines.append("not compared, as truth.json gives no usable " + "; ".join(
            f"{m} (in {sum(m in r.missing for r in rows)} of {len(rows)})" for m in gaps))
    return lines
