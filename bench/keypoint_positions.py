"""The keypoint network on one patient at three table positions: how far each keypoint moves along the table
between them, and how far it lies from the truth (docs/perception.md, "One patient, three table positions",
quotes it).

Held-out patients (the keypoint training's test seeds + 1000, so none is among its 300 test captures), each
captured at the table as sampled and moved towards and away from the gantry by 50-250 mm
(``sim.keypoint_training.table_shifts``); each position read as ``detect_keypoints`` reads a capture (both
views, their flips). Spread: per patient and keypoint, the largest minus the smallest position along the
table (mm, table frame), median and p95 over all keypoints and over the trunk's (neck, shoulders, pelvis,
hips: what places a chest or abdomen range). Error: 2D distance to the truth on the table, every position, and
each keypoint's robust sd across and along the table.
Run: .venv/bin/python bench/keypoint_positions.py [WEIGHTS ...] [--n 150] [--data bench/out/keypoint-data]
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np

TRUNK = ("neck", "left_shoulder", "right_shoulder", "pelvis", "left_hip", "right_hip")
POSITIONS = 3


def measure(weights: Path, data: dict) -> dict:
    from positioning.keypoints import KEYPOINTS, load_keypoint_net
    from sim.keypoint_training import read_position, truth_on_table

    net = load_keypoint_net(weights)
    net.eval()
    spreads, offsets = [], []
    for n in range(len(data["views"])):
        got = np.array([read_position(net, data, n, k)[0] for k in range(POSITIONS)])  # (P, K, 2) mm, table
        offsets.append(got - truth_on_table(data, n))
        spreads.append(np.ptp(got[:, :, 1], axis=0))
    s, d = np.array(spreads), np.concatenate(offsets)  # (N, K), (N * P, K, 2) mm
    e = np.linalg.norm(d, axis=2).ravel()
    trunk = s[:, [KEYPOINTS.index(k) for k in TRUNK]]
    return {"patients": len(s),
            "spread_mm": {"median": float(np.median(s)), "p95": float(np.percentile(s, 95))},
            "trunk_spread_mm": {"median": float(np.median(trunk)), "p95": float(np.percentile(trunk, 95))},
            "error_2d_mm": {"median": float(np.median(e)), "p95": float(np.percentile(e, 95))},
            "error_robust_sd_mm_across_along": {k: [round(_robust_sd(d[:, i, 0]), 1), round(_robust_sd(d[:, i, 1]), 1)]
                                                for i, k in enumerate(KEYPOINTS)}}


def _robust_sd(x: np.ndarray) -> float:
    """1.4826 x the median absolute deviation: a normal sd that a few keypoints on the wrong limb do not inflate."""
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def main() -> None:
    from positioning.keypoints import WEIGHTS
    from sim.keypoint_training import TEST_SEED0, generate

    ap = argparse.ArgumentParser()
    ap.add_argument("weights", nargs="*", type=Path, default=[WEIGHTS])
    ap.add_argument("--n", type=int, default=150, help="patients")
    ap.add_argument("--data", type=Path, default=Path("bench/out/keypoint-data"))
    a = ap.parse_args()
    a.data.mkdir(parents=True, exist_ok=True)
    cache = a.data / f"positions-{a.n}-x{POSITIONS}-views.npz"
    if not cache.exists():
        generate([TEST_SEED0 + 1000 + i for i in range(a.n)], cache, workers=2, positions=POSITIONS)
    data = dict(np.load(cache))
    res = {"machine": f"{platform.machine()}, {platform.system()} {platform.release()}",
           "weights": {str(w): measure(w, data) for w in a.weights}}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
