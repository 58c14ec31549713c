"""Perception accuracy and speed on held-out simulated captures (seeds the keypoint network never saw).

For each capture: patient position, 3D error of shoulders, elbows, wrists, hips, knees,
ankles and neck against truth, visible-surface error (each measured body point to the
fitted mesh), and time cold (all hypotheses) and warm (a second frame of the same
scene, started from the first). Broken down by pose and body type.
Run: .venv/bin/python bench/perception.py [--n 200] [--no-keypoints]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

EVAL = ("left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip",
        "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle", "neck")
SEED0 = 30_000_000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--no-keypoints", action="store_true")
    ap.add_argument("--json", type=Path, default=Path("bench/out/perception.json"))
    args = ap.parse_args()
    import dataclasses

    from positioning.bodymodel import load_body_model
    from positioning.keypoints import load_keypoint_net
    from positioning.perceive import perceive
    from positioning.segment import SegmentationError
    from positioning.skeleton import JOINT_INDEX
    from sim.scene import load_config, sample_scene
    from sim.simulate import simulate

    model = load_body_model()
    net = None if args.no_keypoints else load_keypoint_net()
    cfg = load_config(None)
    rows = []
    for i in range(args.n):
        p = sample_scene(SEED0 + i, cfg, model.data.train["betas"])
        cap, truth = simulate(p, model)
        try:
            t = time.perf_counter()
            per = perceive(cap, model, net, use_keypoints=net is not None)
            cold = (time.perf_counter() - t) * 1000
            # A second frame of the same scene: new sensor noise, same patient.
            cap2, _ = simulate(dataclasses.replace(p, seed=p.seed + 1), model)
            t = time.perf_counter()
            per2 = perceive(cap2, model, net, warm=per, use_keypoints=net is not None)
            warm = (time.perf_counter() - t) * 1000
        except SegmentationError as exc:
            rows.append({"seed": p.seed, "refused": str(exc)})
            continue
        tj = np.array([truth["joints_scanner_mm"][n] for n in EVAL])
        err = np.linalg.norm(per.joints[[JOINT_INDEX[n] for n in EVAL]] - tj, axis=1)
        surf = cKDTree(per.vertices).query(per.segmentation.points_s)[0]
        warm_err = np.linalg.norm(per2.joints[[JOINT_INDEX[n] for n in EVAL]] - tj, axis=1)
        kinds = [truth["pose"], "prone" if truth["patient_position"].endswith("P") else "supine"]
        if truth["bmi"] > 35:
            kinds.append("BMI>35")
        if truth["age_years"] is not None and truth["age_years"] < 18:
            kinds.append("adolescent")
        if truth["blanket"]:
            kinds.append("blanket")
        rows.append({"seed": p.seed, "position_ok": per.patient_position == truth["patient_position"],
                     "truth_position": truth["patient_position"], "position": per.patient_position,
                     "joint_err": err.tolist(), "warm_joint_err": warm_err.tolist(),
                     "surface_median_mm": float(np.median(surf)), "cold_ms": cold, "warm_ms": warm,
                     "timing": per.timing_ms, "kinds": kinds})
        print(f"{i:3d} {truth['patient_position']}->{per.patient_position} {truth['pose']:15s} "
              f"joints med {np.median(err):5.1f} p95 {np.percentile(err, 95):6.1f} surf {np.median(surf):4.1f} "
              f"cold {cold:5.0f} ms warm {warm:5.0f} ms", flush=True)
    ok = [r for r in rows if "refused" not in r]
    e = np.concatenate([r["joint_err"] for r in ok])
    we = np.concatenate([r["warm_joint_err"] for r in ok])
    print(f"\nmachine: {platform.machine()}, {__import__('os').cpu_count()} cores; keypoints: {net is not None}")
    print(f"captures: {len(rows)}, refused: {len(rows) - len(ok)}")
    print(f"patient position correct: {np.mean([r['position_ok'] for r in ok]) * 100:.1f} %")
    print(f"joint error (13 joints): median {np.median(e):.1f} mm, p95 {np.percentile(e, 95):.1f} mm "
          f"(warm-started second frame: {np.median(we):.1f} / {np.percentile(we, 95):.1f})")
    print(f"visible-surface error: median of medians {statistics.median(r['surface_median_mm'] for r in ok):.1f} mm")
    print(f"time: cold median {statistics.median(r['cold_ms'] for r in ok):.0f} ms, "
          f"warm median {statistics.median(r['warm_ms'] for r in ok):.0f} ms")
    stages = defaultdict(list)
    for r in ok:
        for k, v in r["timing"].items():
            stages[k].append(v)
    print("cold stages (median ms): " + ", ".join(f"{k} {statistics.median(v):.0f}" for k, v in stages.items()))
    groups = defaultdict(list)
    for r in ok:
        for k in r["kinds"]:
            groups[k].append(r)
    print(f"{'group':16s} {'n':>4s} {'position':>9s} {'joint med':>10s} {'joint p95':>10s}")
    for k, rs in sorted(groups.items()):
        ge = np.concatenate([r["joint_err"] for r in rs])
        print(f"{k:16s} {len(rs):4d} {np.mean([r['position_ok'] for r in rs]) * 100:8.1f}% "
              f"{np.median(ge):9.1f} {np.percentile(ge, 95):10.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows) + "\n")


if __name__ == "__main__":
    main()
