"""The optional colour keypoints (MediaPipe Pose, installed by the Makefile) and their fusion with the depth ones."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from positioning.capture import read_capture, read_truth
from positioning.colour_keypoints import (ColourKeypointError, ColourKeypoints, detect_colour_keypoints,
                                          fuse_keypoints)
from positioning.keypoints import FLIP, KEYPOINTS, Keypoints

K = {n: i for i, n in enumerate(KEYPOINTS)}


def _depth_keypoints() -> Keypoints:
    rng = np.random.default_rng(1)
    pts = np.column_stack([rng.uniform(-200, 200, len(KEYPOINTS)), np.linspace(-1800, -200, len(KEYPOINTS)),
                           rng.uniform(-100, 0, len(KEYPOINTS))])
    return Keypoints(pts, np.full(len(KEYPOINTS), 0.8), "HFS", 0.05)


def test_fusion_takes_sides_from_depth_and_refines_where_both_agree():
    depth = _depth_keypoints()
    colour = depth.points_s.copy()
    colour[:, :2] += 20.0  # agrees, 28 mm off
    colour[:, 2] += 90.0  # the visible surface, above the joint centre
    colour = colour[list(FLIP)]  # named as if a prone patient faced the camera: every pair swapped
    colour[K["pelvis"], :2] += 400.0  # one landmark on something else
    fused = fuse_keypoints(depth, ColourKeypoints(colour, np.full(len(KEYPOINTS), 0.9)))
    agree = [i for i in range(len(KEYPOINTS)) if i != K["pelvis"]]
    # Equal-ish weights: half-way to the colour position on the table; the height stays the depth network's.
    expect = depth.points_s[agree, :2] + 20.0 * 0.9 / 1.7
    assert np.allclose(fused.points_s[agree, :2], expect, atol=1e-6)
    assert np.allclose(fused.points_s[:, 2], depth.points_s[:, 2])
    assert np.allclose(fused.confidence[agree], 0.9)
    # The disagreeing keypoint keeps its depth position with less weight.
    assert np.allclose(fused.points_s[K["pelvis"]], depth.points_s[K["pelvis"]])
    assert fused.confidence[K["pelvis"]] == pytest.approx(0.4)
    assert fused.position == "HFS"


def test_fusion_ignores_landmarks_without_depth_or_confidence():
    depth = _depth_keypoints()
    colour = np.full_like(depth.points_s, np.nan)
    fused = fuse_keypoints(depth, ColourKeypoints(colour, np.zeros(len(KEYPOINTS))))
    assert np.array_equal(fused.points_s, depth.points_s) and np.array_equal(fused.confidence, depth.confidence)


@pytest.mark.slow
def test_mediapipe_finds_the_patient_in_a_simulated_capture(sim_cases):
    """The real MediaPipe model on the simulator's colour image: the supine patient's joints on the table."""
    pytest.importorskip("mediapipe")  # the Makefile installs it; a bare `pip install -e .` does not
    cap, t = read_capture(sim_cases[0]), read_truth(sim_cases[0])
    ck = detect_colour_keypoints(cap)
    truth = np.array([t["joints_scanner_mm"][n] for n in KEYPOINTS])
    err = np.linalg.norm(ck.points_s[:, :2] - truth[:, :2], axis=1)
    limbs = [K[f"{s}_{j}"] for s in ("left", "right") for j in ("shoulder", "hip", "knee", "ankle")]
    assert np.nanmedian(err[limbs]) < 60.0, err.round()
    assert (ck.confidence[limbs] > 0.5).all()


def test_no_colour_image_is_a_clear_error(sim_cases):
    cap = dataclasses.replace(read_capture(sim_cases[0]), color=None)
    with pytest.raises(ColourKeypointError, match="no colour image"):
        detect_colour_keypoints(cap)
