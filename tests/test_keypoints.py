"""The depth keypoint network: its input window, label conventions, and the committed weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from positioning.capture import read_capture, read_truth
from positioning.keypoints import (FLIP, KEYPOINTS, detect_keypoints, load_keypoint_net, position_from_keypoints,
                                   window_input)
from positioning.poses import POSITION_ROTATIONS, canonical_pose
from positioning.segment import segment_patient
from sim.keypoint_training import _augment


def test_flip_swaps_left_and_right_only():
    for i, j in enumerate(FLIP):
        a, b = KEYPOINTS[i], KEYPOINTS[j]
        assert a.replace("left", "right") == b or a.replace("right", "left") == b or a == b
        assert FLIP[j] == i


@pytest.mark.parametrize("position", ["HFS", "FFS", "HFP", "FFP"])
def test_position_rule_from_anatomical_keypoints(body_model, position):
    out = body_model.layer(betas=torch.zeros(1, 16),
                           body_pose=torch.as_tensor(canonical_pose("down")[1:].reshape(1, -1), dtype=torch.float32))
    j = out.joints[0, :24].detach().numpy() @ POSITION_ROTATIONS[position].T
    from positioning.skeleton import JOINT_INDEX

    pts = np.array([j[JOINT_INDEX[n], :2] for n in KEYPOINTS])
    assert position_from_keypoints(pts) == position


def test_augmentations_keep_anatomy(body_model):
    """A half turn of an HFS window reads as FFS; a mirror with swapped labels still reads as HFS."""
    rng = np.random.default_rng(0)
    out = body_model.layer(betas=torch.zeros(1, 16))
    from positioning.skeleton import JOINT_INDEX

    j = out.joints[0].detach().numpy() * 1000.0
    cells = torch.as_tensor(np.array([[128 + j[JOINT_INDEX[n], 1] / 10, 32 + j[JOINT_INDEX[n], 0] / 10]
                                      for n in KEYPOINTS])[None], dtype=torch.float32)
    x = torch.zeros(1, 2, 256, 64)
    h = torch.zeros(1, len(KEYPOINTS))
    seen = set()
    for _ in range(40):
        _, c, _ = _augment(x, cells, h, rng)
        seen.add(position_from_keypoints(c[0].numpy()[:, ::-1]))
    assert seen == {"HFS", "FFS"}


def test_window_is_centred_on_the_patient(sim_cases):
    cap = read_capture(sim_cases[0])
    seg = segment_patient(cap)
    x, win = window_input(seg)
    assert x.shape == (2, 256, 64) and x[1].sum() > 2000
    rows = np.nonzero(x[1].any(1))[0]
    assert abs((rows.min() + rows.max()) / 2 - 128) < 3


def test_committed_network_finds_keypoints_near_the_truth(sim_cases):
    errs, positions = [], []
    for case in sim_cases:
        cap, t = read_capture(case), read_truth(case)
        seg = segment_patient(cap)
        kp = detect_keypoints(seg, cap.scene.table_height_mm, cap.scene.table_longitudinal_mm, load_keypoint_net())
        truth = np.array([t["joints_scanner_mm"][n] for n in KEYPOINTS])
        errs.append(np.linalg.norm(kp.points_s - truth, axis=1))
        positions.append((position_from_keypoints(kp.points_s[:, :2]), t["patient_position"]))
    assert np.median(np.concatenate(errs)) < 60
    assert all(a == b for a, b in positions), positions
