"""Perception accuracy and speed on held-out simulated captures (seeds the keypoint network never saw).

For each capture: patient position, 3D error of shoulders, elbows, wrists, hips, knees,
ankles and neck against truth, visible-surface error (the true body's camera-visible
surface to the fitted mesh), and time cold (all hypotheses) and warm (a second frame of the same
scene, started from the first). Broken down by pose and body type.
Run: .venv/bin/python bench/perception.py [--n 200] [--no-keypoints] [--colour]
     [--scene-config bench/scenes/anny-bodies.toml]  (bodies outside the body model's training set)
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

EVAL = ("left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip",
        "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle", "neck")
SEED0 = 30_000_000


def visible_surface_error(true_v: np.ndarray, faces: np.ndarray, fit_v: np.ndarray, cam_s: np.ndarray) -> np.ndarray:
    """Distances (mm) from the true body's camera-visible vertices to the fitted mesh's surface.

    Visible: facing the camera and the first surface along the ray (Open3D ray casting
    on the true mesh); distance: Open3D's exact point-to-triangle distance.
    """
    import open3d as o3d

    tm = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(true_v), o3d.utility.Vector3iVector(faces))
    tm.compute_vertex_normals()
    n = np.asarray(tm.vertex_normals)
    to_cam = cam_s - true_v
    dist = np.linalg.norm(to_cam, axis=1)
    facing = (n * to_cam).sum(1) / dist > 0.2
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.t.geometry.TriangleMesh.from_legacy(tm))
    rays = np.column_stack([np.broadcast_to(cam_s, true_v.shape), -to_cam / dist[:, None]]).astype(np.float32)
    t_hit = scene.cast_rays(o3d.core.Tensor(rays))["t_hit"].numpy()
    visible = facing & (np.abs(t_hit - dist) < 3.0)
    fit = o3d.t.geometry.RaycastingScene()
    fit.add_triangles(o3d.core.Tensor(fit_v.astype(np.float32)), o3d.core.Tensor(faces.astype(np.uint32)))
    return fit.compute_distance(o3d.core.Tensor(true_v[visible].astype(np.float32))).numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--no-keypoints", action="store_true")
    ap.add_argument("--colour", action="store_true", help="fuse MediaPipe's colour keypoints (optional extra)")
    ap.add_argument("--scene-config", type=Path,
                    help="simulator TOML for the captures (e.g. bench/scenes/anny-bodies.toml)")
    ap.add_argument("--json", type=Path, default=Path("bench/out/perception.json"))
    args = ap.parse_args()
    import dataclasses

    from positioning.bodymodel import load_body_model
    from positioning.keypoints import load_keypoint_net
    from positioning.perceive import perceive
    from positioning.segment import SegmentationError
    from positioning.skeleton import JOINT_INDEX
    from sim.scene import load_config, sample_scene
    from sim.simulate import posed_patient, simulate

    model = load_body_model()
    net = None if args.no_keypoints else load_keypoint_net()
    cfg = load_config(args.scene_config)
    rows = []
    for i in range(args.n):
        p = sample_scene(SEED0 + i, cfg, model.data.train["betas"])
        cap, truth = simulate(p, model)
        try:
            t = time.perf_counter()
            per = perceive(cap, model, net, use_keypoints=net is not None, colour=args.colour)
            cold = (time.perf_counter() - t) * 1000
            # A second frame of the same scene: new sensor noise, same patient.
            cap2, _ = simulate(dataclasses.replace(p, seed=p.seed + 1), model)
            t = time.perf_counter()
            per2 = perceive(cap2, model, net, warm=per, use_keypoints=net is not None, colour=args.colour)
            warm = (time.perf_counter() - t) * 1000
        except SegmentationError as exc:
            rows.append({"seed": p.seed, "refused": str(exc)})
            continue
        tj = np.array([truth["joints_scanner_mm"][n] for n in EVAL])
        err = np.linalg.norm(per.joints[[JOINT_INDEX[n] for n in EVAL]] - tj, axis=1)
        surf = visible_surface_error(posed_patient(p, model)[1], model.faces, per.vertices,
                                     cap.scene.camera_to_scanner[:3, 3])
        warm_err = np.linalg.norm(per2.joints[[JOINT_INDEX[n] for n in EVAL]] - tj, axis=1)
        kinds = [truth["pose"], "prone" if truth["patient_position"].endswith("P") else "supine"]
        if truth["bmi"] > 35:
            kinds.append("BMI>35")
        if truth["age_years"] is not None and truth["age_years"] < 18:
            kinds.append("adolescent")
        if truth["blanket"]:
            kinds.append("blanket")
        if not 1450 <= truth["stature_mm"] <= 2050:  # the body model's bodies span 1.45-2.05 m
            kinds.append("stature < 1.45 m" if truth["stature_mm"] < 1450 else "stature > 2.05 m")
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
    print(f"\nmachine: {platform.machine()}, {__import__('os').cpu_count()} cores; keypoints: {net is not None}; "
          f"colour: {args.colour}")
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
