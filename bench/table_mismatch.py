"""Captures whose depth or table reading disagrees with the calibration, on held-out simulated scenes
(docs/planning.md quotes it).

The planner places every height from the depth, the calibration and the table height reading together; an
error in any of them moves the tabletop in T. For each scene this adds a constant to every depth (a depth
camera's range bias, or a wrong unit or mount) or to the table height reading (a stale or wrong reading), plans
the chest (a 1000 mm bore, so that the bore does not refuse) and reports what came of it: refused because the
support is not where the tabletop should be (``TableMismatch``), refused for another reason, planned with the
warning that the support lies where no CT mattress does (TABLE_READING_SUSPECT), or planned silently; with the
planned ISO height's error against the truth. A plan that comes out is an error of about the offset.
Run: .venv/bin/python bench/table_mismatch.py [--n 60] [--depth-mm -200,...] [--reading-mm -300,...]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
from collections import Counter
from pathlib import Path

import numpy as np

SEED0 = 40_000_000
DEPTH_MM = "0,-200,-150,-100,-60,-30,30,60,100,150,200"
READING_MM = "-300,-100,-60,-30,30,60,100,300"


def offset(capture, depth_mm: float, reading_mm: float):
    """The capture with depth_mm added to every depth reading (along the optical axis) and reading_mm to the
    table height reading (positive: the reading puts the tabletop lower than it is)."""
    unit_mm = capture.camera.depth_scale * 1000.0
    d = capture.depth.astype(np.int64)
    depth = np.where(d > 0, np.clip(d + round(depth_mm / unit_mm), 1, np.iinfo(np.uint16).max), 0)
    scene = dataclasses.replace(capture.scene, table_height_mm=capture.scene.table_height_mm + reading_mm)
    return dataclasses.replace(capture, depth=depth.astype(np.uint16), scene=scene)


def run(n: int, cases: list[tuple[str, float, float]], seed0: int) -> dict:
    from positioning.bodymodel import load_body_model
    from positioning.cli import plan_from_capture
    from positioning.keypoints import load_keypoint_net
    from positioning.plan import PlanRefused, ScannerSpec
    from positioning.segment import SegmentationError, TableMismatch
    from sim.scene import load_config, sample_scene
    from sim.simulate import simulate

    model, net, cfg = load_body_model(), load_keypoint_net(), load_config(None)
    rows: dict[str, list[dict]] = {name: [] for name, _, _ in cases}
    for i in range(n):
        p = sample_scene(seed0 + i, cfg, model.data.train["betas"])
        cap, truth = simulate(p, model)
        ideal = truth["protocols"]["chest"]["ideal_table_height_mm"]
        for name, depth_mm, reading_mm in cases:
            row = {"seed": p.seed}
            try:
                pl, _ = plan_from_capture(offset(cap, depth_mm, reading_mm), "chest", model, net,
                                          ScannerSpec(bore_diameter_mm=1000.0))
                row["iso_err"] = pl.table_height_mm - ideal
                row["warned"] = any(w["code"] == "TABLE_READING_SUSPECT" for w in pl.warnings)
            except TableMismatch:
                row["outcome"] = "table mismatch"
            except PlanRefused as exc:
                row["outcome"] = f"other: {exc.code}"
            except SegmentationError as exc:
                row["outcome"] = f"other: {str(exc).split(':')[0][:60]}"
            rows[name].append(row)
    return {name: summary(r) for name, r in rows.items()}


def summary(rows: list[dict]) -> dict:
    out = {"n": len(rows), "refused_table_mismatch": sum(r.get("outcome") == "table mismatch" for r in rows),
           "refused_other": dict(Counter(r["outcome"][7:] for r in rows if r.get("outcome", "").startswith("other")))}
    for name, warned in (("planned_warned", True), ("planned_silent", False)):
        err = np.array([r["iso_err"] for r in rows if "iso_err" in r and r["warned"] == warned])
        out[name] = {"n": len(err)}
        if len(err):
            out[name].update(iso_err_signed_median_mm=float(np.median(err)),
                             iso_abs_err_median_mm=float(np.median(np.abs(err))),
                             iso_abs_err_p95_mm=float(np.percentile(np.abs(err), 95)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--depth-mm", default=DEPTH_MM, help="comma-separated constant depth errors, mm")
    ap.add_argument("--reading-mm", default=READING_MM, help="comma-separated table height reading errors, mm")
    ap.add_argument("--seed0", type=int, default=SEED0, help="first scene seed (the tuning set is 50,000,000+)")
    ap.add_argument("--out", default="bench/out/table-mismatch.json")
    a = ap.parse_args()
    cases = [(f"depth {v:+g} mm", v, 0.0) for v in map(float, a.depth_mm.split(","))]
    cases += [(f"table reading {v:+g} mm", 0.0, v) for v in map(float, a.reading_mm.split(","))]
    res = {"machine": f"{platform.processor() or platform.machine()}, {platform.system()} {platform.release()}",
           "seed0": a.seed0, "cases": run(a.n, cases, a.seed0)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
