"""Patient positions and the canonical CT poses, shared by the fitter (as starting points and
priors) and the simulator (as the centre of its pose distribution). Pure.

Poses are SMPL axis-angle vectors (24, 3), radians, in the body model's T-pose rest
frame; index 0 is the global orientation and stays zero (the position rotation is
applied separately).
"""
from __future__ import annotations

import cv2
import numpy as np

from positioning.skeleton import JOINT_INDEX as J
from positioning.skeleton import NUM_JOINTS

POSITIONS = ("HFS", "FFS", "HFP", "FFP")
# Body frame (y to the head, z to the front, x to the body's left) -> S, before yaw.
# Head first: +y_body -> +y_S (into the gantry); supine: +z_body -> +z_S (face up).
POSITION_ROTATIONS = {
    "HFS": np.diag([1.0, 1.0, 1.0]),
    "FFS": np.diag([-1.0, -1.0, 1.0]),
    "HFP": np.diag([-1.0, 1.0, -1.0]),
    "FFP": np.diag([1.0, -1.0, -1.0]),
}


ARM_POSES = ("down", "up", "belly")
# Prone, the ankles stretch about 60 degrees from standing (toes pointing along the table). Started at 0 (toes into the
# mattress), the five worst prone whole-body tuning plans ended 28-68 mm short of the soles; started at 1.1, 3-14 mm.
PRONE_ANKLE_RAD = 1.1


def _turn(a, b) -> np.ndarray:
    """(3, 3) the smallest rotation taking direction a onto direction b (a, b not opposite)."""
    a, b = np.asarray(a, float) / np.linalg.norm(a), np.asarray(b, float) / np.linalg.norm(b)
    axis = np.cross(a, b)
    s = np.linalg.norm(axis)
    if s < 1e-12:
        return np.eye(3)
    return cv2.Rodrigues(axis / s * np.arctan2(s, float(a @ b)))[0]


def _rotvec(r: np.ndarray) -> np.ndarray:
    """(3,) the axis-angle vector of a (3, 3) rotation."""
    return cv2.Rodrigues(r)[0][:, 0]


def canonical_pose(arms: str, head_turn_rad: float = 0.0, prone: bool = False) -> np.ndarray:
    """(24, 3) a typical lying pose: arms 'down' (at the sides), 'up' (above the head,
    elbows bent) or 'belly' (hands resting on the belly: upper arms down beside the
    trunk and a little forward, forearms across the belly); the head turned about the
    body's long axis by head_turn_rad (+ turns the face to the body's left); prone,
    the feet stretched out (PRONE_ANKLE_RAD)."""
    p = np.zeros((NUM_JOINTS, 3))
    p[J["head"], 1] = head_turn_rad
    if arms == "down":
        p[J["left_shoulder"]] = [0, 0, -1.35]
        p[J["right_shoulder"]] = [0, 0, 1.35]
    elif arms == "up":
        p[J["left_collar"]] = [0, 0, 0.2]
        p[J["right_collar"]] = [0, 0, -0.2]
        p[J["left_shoulder"]] = [0, 0, 1.45]
        p[J["right_shoulder"]] = [0, 0, -1.45]
        p[J["left_elbow"]] = [0, 0, 0.8]
        p[J["right_elbow"]] = [0, 0, -0.8]
    elif arms == "belly":
        for side, sg in (("left", 1.0), ("right", -1.0)):
            # Body frame: y to the head, z to the front, x to the body's left; the T-pose arm points along sg * x.
            upper = _turn([sg, 0.0, 0.0], [0.0, -1.0, 0.3])
            fore = _turn(upper @ [sg, 0.0, 0.0], [-sg, 0.25, 0.3]) @ upper
            p[J[f"{side}_shoulder"]] = _rotvec(upper)
            p[J[f"{side}_elbow"]] = _rotvec(upper.T @ fore)
    else:
        raise ValueError(f"unknown arm pose {arms!r}")
    for s, sg in (("left", 1), ("right", -1)):
        p[J[f"{s}_hip"]] = [0, 0, -sg * 0.07]
        if prone:  # the feet stretch out along the shins: a prone patient does not stand on the toes
            p[J[f"{s}_ankle"]] = [PRONE_ANKLE_RAD, 0, 0]
    return p
