"""Calibration accuracy on simulated sessions: camera_to_scanner error against the simulator's truth.

Run: .venv/bin/python bench/calibration_accuracy.py [--n 20]. 20 sessions, each with its
own seed, mount (1.4-2.2 m above the tabletop, tilt up to 20 deg) and noise; 5 x 3
table positions. Prints per-session errors and the summary quoted in docs/calibration.md.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def rotation_deg(a: np.ndarray, b: np.ndarray) -> float:
    r = a[:3, :3].T @ b[:3, :3]
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--first-seed", type=int, default=1000)
    args = ap.parse_args()
    from calibration.cli import calibrate
    from calibration.store import load_calibration
    from sim.calibration import camera_to_scanner, sample_calibration, write_session

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.n):
            seed = args.first_seed + i
            scene = sample_calibration(seed)
            folder = write_session(Path(tmp) / f"s{seed}", scene)
            t = time.perf_counter()
            code, rep = calibrate(folder, Path(tmp) / f"c{seed}.json", force=True)
            dt = time.perf_counter() - t
            x = load_calibration(Path(tmp) / f"c{seed}.json").camera_to_scanner
            truth = camera_to_scanner(scene)
            te, re = float(np.linalg.norm(x[:3, 3] - truth[:3, 3])), rotation_deg(x, truth)
            rows.append((te, re, rep["reprojection_rms_px"], rep["displacement_horizontal_rms_mm"], rep["displacement_vertical_rms_mm"],
                         abs(rep["axis_orthogonality_deg"] - 90), dt, rep["verdict"], len(rep["rejected_views"])))
            print(f"seed {seed}: height {scene.camera_height_mm:6.0f} mm tilt {scene.camera_tilt_deg:6.1f} deg | "
                  f"translation {te:5.2f} mm rotation {re:6.3f} deg | reproj {rep['reprojection_rms_px']:.3f} px "
                  f"displ h {rep['displacement_horizontal_rms_mm']:.2f} v {rep['displacement_vertical_rms_mm']:.2f} mm axes {rep['axis_orthogonality_deg']:.3f} deg "
                  f"| {rep['verdict']} | solve {dt:.1f} s")
    a = np.array([r[:7] for r in rows])
    print(f"\nmachine: {platform.machine()}, {__import__('os').cpu_count()} cores; sessions: {args.n}")
    print(f"translation error: median {np.median(a[:, 0]):.2f} mm, max {a[:, 0].max():.2f} mm (target <= 1 / 3)")
    print(f"rotation error:    median {np.median(a[:, 1]):.3f} deg, max {a[:, 1].max():.3f} deg (target <= 0.1 / 0.3)")
    print(f"reprojection RMS:  median {np.median(a[:, 2]):.3f} px, max {a[:, 2].max():.3f} px")
    print(f"displacement RMS:  horizontal median {np.median(a[:, 3]):.2f} mm, max {a[:, 3].max():.2f} mm; "
          f"vertical median {np.median(a[:, 4]):.2f} mm, max {a[:, 4].max():.2f} mm")
    print(f"axes off 90 deg:   median {np.median(a[:, 5]):.3f} deg, max {a[:, 5].max():.3f} deg")
    print(f"solve time:        median {np.median(a[:, 6]):.1f} s (detection + solve, 15 views)")
    print(f"verdicts:          {sum(r[7] == 'pass' for r in rows)} pass / {len(rows)}; "
          f"views rejected: {sum(r[8] for r in rows)}")


if __name__ == "__main__":
    main()
