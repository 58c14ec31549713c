"""The depth keypoint network: its input window, label conventions, and the committed weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from positioning.capture import read_capture, read_truth
from positioning.keypoints import (FLIP, KEYPOINTS, detect_keypoints, load_keypoint_net, position_from_sides,
                                   side_to_anatomy, window_input)
from positioning.poses import POSITION_ROTATIONS, canonical_pose
from positioning.segment import segment_patient
from sim.keypoint_training import _augment, side_labels


def test_flip_swaps_left_and_right_only():
    for i, j in enumerate(FLIP):
        a, b = KEYPOINTS[i], KEYPOINTS[j]
        assert a.replace("left", "right") == b or a.replace("right", "left") == b or a == b
        assert FLIP[j] == i


def _posed_keypoints(body_model, position: str) -> np.ndarray:
    """(K, 3) anatomical keypoints (mm) of the mean body, arms down, lying in a position (no yaw)."""
    from positioning.skeleton import JOINT_INDEX

    out = body_model.layer(betas=torch.zeros(1, 16),
                           body_pose=torch.as_tensor(canonical_pose("down")[1:].reshape(1, -1), dtype=torch.float32))
    j = out.joints[0, :24].detach().numpy() @ POSITION_ROTATIONS[position].T * 1000.0
    return np.array([j[JOINT_INDEX[n]] for n in KEYPOINTS])


@pytest.mark.parametrize("position", ["HFS", "FFS", "HFP", "FFP"])
def test_side_labels_put_the_plus_x_limb_first_in_every_position(body_model, position):
    """The network's "left_*" channel is the limb at +x; side_to_anatomy turns it back into the patient's left."""
    anat = _posed_keypoints(body_model, position)
    side, _ = side_labels(anat[None, :, [1, 0]], anat[None, :, 2], np.array([position]))
    k = {n: i for i, n in enumerate(KEYPOINTS)}
    for limb in ("shoulder", "elbow", "wrist", "hip", "knee", "ankle"):
        # cells are (row along y, column along x)
        assert side[0, k[f"left_{limb}"], 1] > side[0, k[f"right_{limb}"], 1], (position, limb)
    back = side[0, list(side_to_anatomy(position))]
    assert np.allclose(back, anat[:, [1, 0]])


@pytest.mark.parametrize("position", ["HFS", "FFS", "HFP", "FFP"])
def test_position_from_head_direction_and_prone_output(body_model, position):
    kp = _posed_keypoints(body_model, position)
    k = {n: i for i, n in enumerate(KEYPOINTS)}
    p_prone = 0.9 if position.endswith("P") else 0.1
    assert position_from_sides(kp[k["head"], 1], kp[k["pelvis"], 1], p_prone) == position


def test_augmentations_keep_the_side_labels(body_model):
    """After a half turn or a mirror the "left_*" (+x) channels still hold the limbs at larger x."""
    rng = np.random.default_rng(0)
    anat = _posed_keypoints(body_model, "HFS")
    side, hts = side_labels((anat[None, :, [1, 0]] / 10.0 + [128, 32]).astype(np.float32), anat[None, :, 2],
                            np.array(["HFS"]))
    cells, h = torch.as_tensor(side, dtype=torch.float32), torch.as_tensor(hts, dtype=torch.float32)
    x = torch.zeros(1, 2, 256, 64)
    k = {n: i for i, n in enumerate(KEYPOINTS)}
    turned = set()
    for _ in range(40):
        _, c, _ = _augment(x, cells, h, rng)
        c = c[0].numpy()
        assert c[k["left_shoulder"], 1] > c[k["right_shoulder"], 1] and c[k["left_knee"], 1] > c[k["right_knee"], 1]
        turned.add(bool(c[k["head"], 0] < c[k["pelvis"], 0]))
    assert turned == {True, False}


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
        positions.append((kp.position, t["patient_position"]))
    assert np.median(np.concatenate(errs)) < 60
    assert all(a == b for a, b in positions), positions
