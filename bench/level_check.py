"""The tabletop level check on held-out simulated captures whose calibration is made wrong (docs/planning.md quotes it).

A camera bumped or re-aimed since its calibration turns the whole capture in S; the planner sees the tabletop
slope where it is level (positioning/segment.py, ``support_tilt``). For each scene this turns the capture's
``camera_to_scanner`` about S's x axis (a slope along the table) or y axis (across it), through the camera's
centre, by each angle asked, and reports what segmentation makes of it: refused, warned (CALIBRATION_SUSPECT),
or silent, and the slope it measured. Each capture that is not refused is also planned (chest, a
1000 mm bore so that the bore does not refuse) and the plan compared with the truth: what a silent
miscalibration does to the ISO height and to where the range lies (its middle against the lungs' middle).
Run: .venv/bin/python bench/level_check.py [--n 100] [--no-plan] [--scene-config bench/scenes/noisy-camera.toml]
     [--errors 0:0,1:0,3:0]  (along:across degrees)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
from collections import defaultdict
from pathlib import Path

import numpy as np

SEED0 = 40_000_000
ERRORS = "0:0,0.5:0,1:0,2:0,3:0,5:0,-3:0,0:2,0:3,0:5"


def miscalibrated(capture, along_deg: float, across_deg: float):
    """The capture with its camera_to_scanner turned about S's x (along) then y (across) axis, through the camera."""
    from scipy.spatial.transform import Rotation

    m = np.array(capture.scene.camera_to_scanner, float)
    m[:3, :3] = Rotation.from_euler("xy", [along_deg, across_deg], degrees=True).as_matrix() @ m[:3, :3]
    return dataclasses.replace(capture, scene=dataclasses.replace(capture.scene, camera_to_scanner=m))


def run(n: int, errors: list[tuple[float, float]], plan: bool, seed0: int, scene_config: Path | None) -> dict:
    from positioning.bodymodel import load_body_model
    from positioning.cli import plan_from_capture
    from positioning.keypoints import load_keypoint_net
    from positioning.plan import PlanRefused, ScannerSpec
    from positioning.segment import SegmentationError, TableNotLevel, segment_patient
    from sim.scene import load_config, sample_scene
    from sim.simulate import simulate

    model = load_body_model()
    net = load_keypoint_net() if plan else None
    cfg = load_config(scene_config)
    rows = defaultdict(list)
    for i in range(n):
        p = sample_scene(seed0 + i, cfg, model.data.train["betas"])
        cap, truth = simulate(p, model)
        reg = truth["protocols"]["chest"]
        for along, across in errors:
            c = miscalibrated(cap, along, across)
            row = {"seed": p.seed}
            try:
                seg = segment_patient(c)
            except TableNotLevel:
                rows[(along, across)].append({**row, "outcome": "refused"})
                continue
            except SegmentationError:
                rows[(along, across)].append({**row, "outcome": "other refusal"})
                continue
            warned = any(w["code"] == "CALIBRATION_SUSPECT" for w in seg.warnings)
            row.update(outcome="warned" if warned else "silent", slope=seg.support_tilt_deg)
            if plan:
                try:
                    pl, _ = plan_from_capture(c, "chest", model, net, ScannerSpec(bore_diameter_mm=1000.0))
                    # The chest's margins are equal at both ends: the range's middle is the lungs' middle.
                    mid = 0.5 * (pl.scan_range_scanner_mm["cranial"] + pl.scan_range_scanner_mm["caudal"])
                    row.update(iso_err=pl.table_height_mm - reg["ideal_table_height_mm"],
                               range_err=mid - 0.5 * (reg["cranial_y_mm"] + reg["caudal_y_mm"]))
                except (PlanRefused, SegmentationError) as exc:
                    row["plan_refused"] = type(exc).__name__  # e.g. the table height out of reach
            rows[(along, across)].append(row)
    return {f"{a:+g} along, {b:+g} across": summary(r) for (a, b), r in rows.items()}


def summary(rows: list[dict]) -> dict:
    out = {"n": len(rows)}
    for k in ("refused", "warned", "silent", "other refusal"):
        out[k] = sum(r["outcome"] == k for r in rows)
    for axis, name in ((0, "along"), (1, "across")):
        s = [r["slope"][axis] for r in rows if "slope" in r and r["slope"][axis] is not None]
        out[f"unmeasured_{name}"] = sum("slope" in r and r["slope"][axis] is None for r in rows)
        if s:
            out[f"measured_{name}_deg"] = {"median": float(np.median(s)), "abs_max": float(np.max(np.abs(s)))}
    planned = [r for r in rows if "iso_err" in r]
    out["plan_refused"] = sum("plan_refused" in r for r in rows)
    if planned:
        out["planned"] = {"n": len(planned),
                          "iso_abs_err_median_mm": float(np.median(np.abs([r["iso_err"] for r in planned]))),
                          "iso_abs_err_p95_mm": float(np.percentile(np.abs([r["iso_err"] for r in planned]), 95)),
                          "range_middle_abs_err_median_mm": float(np.median(np.abs([r["range_err"] for r in planned])))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--errors", default=ERRORS, help="comma-separated along:across calibration errors, degrees")
    ap.add_argument("--no-plan", action="store_true", help="segmentation only: do not plan what is not refused")
    ap.add_argument("--seed0", type=int, default=SEED0, help="first scene seed (the tuning set is 50,000,000+)")
    ap.add_argument("--scene-config", type=Path, help="simulator TOML (e.g. bench/scenes/noisy-camera.toml)")
    ap.add_argument("--out", default="bench/out/level-check.json")
    a = ap.parse_args()
    errors = [tuple(float(v) for v in e.split(":")) for e in a.errors.split(",")]
    res = {"machine": f"{platform.processor() or platform.machine()}, {platform.system()} {platform.release()}",
           "scene_config": str(a.scene_config or "defaults"),
           "errors": run(a.n, errors, not a.no_plan, a.seed0, a.scene_config)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
