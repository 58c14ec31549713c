"""What librealsense's own depth post-processing does to plans, on held-out simulated scenes
(docs/perception.md, "The camera's own filters", quotes it).

Each capture goes through librealsense as a camera's would: recorded through ``rs.software_device``
(``sim.realsense.SimulatedSource``) and played back through ``positioning.camera.RecordingSource`` without
filters (raw, what the planner gets) and with Intel's recommended chain (spatial and temporal filters in
disparity space, then hole filling). For each: how far the patient's pixels moved (median signed, mean
absolute, mm; + further from the camera) and the chest plan both ways against the truth (an 850 mm bore, so
that fewer are refused for it): ISO table height error, lungs covered within 5 mm.
Run: .venv/bin/python bench/camera_filters.py [--n 75] [--out bench/out/camera-filters.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import tempfile
from pathlib import Path

import numpy as np

SEED0 = 40_000_000


def play(cap, rec: Path, filters: bool):
    """The capture as a recording played back through librealsense, with or without its filters."""
    from positioning.camera import RecordingSource

    src = RecordingSource(rec, filters=filters)
    src.start()
    try:
        frame = src.read()
    finally:
        src.stop()
        gc.collect()  # librealsense releases a played-back device's resources with its Python objects
    return frame.to_capture(cap.scene, name="filtered" if filters else "raw")


def main() -> None:
    from positioning.bodymodel import load_body_model
    from positioning.cli import plan_from_capture
    from positioning.keypoints import load_keypoint_net
    from positioning.plan import PlanRefused, ScannerSpec
    from positioning.segment import SegmentationError, segment_patient
    from sim.realsense import SimulatedSource
    from sim.scene import load_config, sample_scene
    from sim.simulate import simulate

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=75)
    ap.add_argument("--out", type=Path, default=Path("bench/out/camera-filters.json"))
    a = ap.parse_args()
    model, net = load_body_model(), load_keypoint_net()
    cfg = load_config(None)
    spec = ScannerSpec(bore_diameter_mm=850.0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.n):
            p = sample_scene(SEED0 + i, cfg, model.data.train["betas"])
            cap, truth = simulate(p, model)
            rec = Path(tmp) / f"{i}.db3"
            src = SimulatedSource([cap], record_to=rec)
            src.start()
            src.read()
            src.stop()
            gc.collect()
            raw, filt = play(cap, rec, False), play(cap, rec, True)
            row = {"seed": p.seed}
            try:
                px = segment_patient(raw).pixels
                moved = filt.depth_mm()[px[:, 0], px[:, 1]] - raw.depth_mm()[px[:, 0], px[:, 1]]
                moved = moved[filt.depth[px[:, 0], px[:, 1]] > 0]
                row.update(moved_median_mm=float(np.median(moved)), moved_abs_mean_mm=float(np.abs(moved).mean()))
            except SegmentationError as exc:  # no patient's pixels to compare; the plans below say why too
                row["segmentation"] = str(exc)
            reg = truth["protocols"]["chest"]
            hd = 1.0 if truth["patient_position"].startswith("H") else -1.0
            for name, c in (("raw", raw), ("filtered", filt)):
                try:
                    plan, _ = plan_from_capture(c, "chest", model, net, spec)
                except (PlanRefused, SegmentationError) as exc:
                    row[name] = {"refused": str(exc)}
                    continue
                r = plan.scan_range_scanner_mm
                row[name] = {"iso_err": plan.table_height_mm - reg["ideal_table_height_mm"],
                             "covered": bool((r["cranial"] - reg["cranial_y_mm"]) * hd >= -5.0
                                             and (reg["caudal_y_mm"] - r["caudal"]) * hd >= -5.0)}
            rows.append(row)
    both = [r for r in rows if "iso_err" in r["raw"] and "iso_err" in r["filtered"]]
    res = {"machine": f"{platform.processor() or platform.machine()}, {platform.system()} {platform.release()}",
           "n": a.n, "planned_both_ways": len(both),
           "patient_pixels_moved_mm": {"median_of_medians": float(np.median([r["moved_median_mm"] for r in rows
                                                                                if "moved_median_mm" in r])),
                                       "abs_mean_median": float(np.median([r["moved_abs_mean_mm"] for r in rows
                                                                           if "moved_abs_mean_mm" in r]))}}
    if both:
        shift = np.array([r["filtered"]["iso_err"] - r["raw"]["iso_err"] for r in both])
        res["table_height_shift_mm"] = {"median": float(np.median(shift)), "p5": float(np.percentile(shift, 5)),
                                        "p95": float(np.percentile(shift, 95))}
        for name in ("raw", "filtered"):
            e = np.abs([r[name]["iso_err"] for r in both])
            res[name] = {"iso_abs_err_mm": {"median": float(np.median(e)), "p95": float(np.percentile(e, 95))},
                         "within_5mm": float(np.mean(e <= 5.0)),
                         "covered_5mm": float(np.mean([r[name]["covered"] for r in both]))}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    a.out.with_suffix(".rows.json").write_text(json.dumps(rows) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
