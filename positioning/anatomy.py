"""Where internal anatomy sits relative to the body model's joints: pure functions.

The simulator uses these rules (plus per-patient variability) to write the ground
truth; the planner uses the same rules without the variability. The rules and
their grounding are in docs/anatomy.md:

* lung apex: ``APEX_ABOVE_SHOULDERS`` x torso length above the midpoint of the
  shoulder joints (the apex rises 2-4 cm above the clavicle, whose lateral end
  sits at the shoulder joint's height);
* lung base (posterior costophrenic recess): ``LUNG_LENGTH`` x torso length below
  the apex. The real inspiration chest CT in ../shared/data/ct-chest-cip/ has
  lungs 271 mm long; with our template's 484 mm torso that is 0.56.
* torso length: from the midpoint of the hip joints to the midpoint of the
  shoulder joints, in the rest pose.

Shapes: joints (..., 24, 3) in metres, model frame (y towards the head).
"""
from __future__ import annotations

import numpy as np

from positioning.skeleton import JOINT_INDEX as J

APEX_ABOVE_SHOULDERS = 0.07
LUNG_LENGTH = 0.56
# Per-patient spread the simulator draws (1 sigma, metres): apex position and
# depth of inspiration move the lungs against the skeleton.
APEX_SD_M = 0.006
BASE_SD_M = 0.012
# Pubic symphysis below the hip joint centres; iliac crest above them; skull base
# below the ears: fractions of torso length.
SYMPHYSIS_BELOW_HIPS = 0.03
ILIAC_CREST_ABOVE_HIPS = 0.17
DIAPHRAGM_DOME_ABOVE_BASE = 0.09


def torso_length(rest_joints: np.ndarray) -> np.ndarray:
    """(...,) distance from the hips' midpoint to the shoulders' midpoint, metres."""
    hips = 0.5 * (rest_joints[..., J["left_hip"], :] + rest_joints[..., J["right_hip"], :])
    sh = 0.5 * (rest_joints[..., J["left_shoulder"], :] + rest_joints[..., J["right_shoulder"], :])
    return np.linalg.norm(sh - hips, axis=-1)


def trunk_levels(rest_joints: np.ndarray, apex_offset_m: float = 0.0, base_offset_m: float = 0.0) -> dict[str, float]:
    """Heights (model y, metres, rest pose) of the internal levels protocols are defined on.

    rest_joints: (24, 3) of one body. Offsets are the simulator's per-patient draw.
    """
    t = float(torso_length(rest_joints))
    sh_y = 0.5 * (rest_joints[J["left_shoulder"], 1] + rest_joints[J["right_shoulder"], 1])
    hip_y = 0.5 * (rest_joints[J["left_hip"], 1] + rest_joints[J["right_hip"], 1])
    apex = sh_y + APEX_ABOVE_SHOULDERS * t + apex_offset_m
    base = sh_y + APEX_ABOVE_SHOULDERS * t - LUNG_LENGTH * t + base_offset_m
    return {
        "lung_apex": float(apex),
        "lung_base": float(base),
        "diaphragm_dome": float(base + DIAPHRAGM_DOME_ABOVE_BASE * t),
        "iliac_crest": float(hip_y + ILIAC_CREST_ABOVE_HIPS * t),
        "symphysis": float(hip_y - SYMPHYSIS_BELOW_HIPS * t),
    }


# Which joint's frame carries each level when the body is posed (the trunk bends at these).
LEVEL_JOINT = {
    "lung_apex": "spine3",
    "lung_base": "spine2",
    "diaphragm_dome": "spine2",
    "iliac_crest": "pelvis",
    "symphysis": "pelvis",
}


def posed_levels(rest_joints: np.ndarray, rel_transforms: np.ndarray, apex_offset_m: float = 0.0,
                 base_offset_m: float = 0.0) -> dict[str, np.ndarray]:
    """Internal levels as posed points in the body's own frame (metres).

    rest_joints: (24, 3) of one body; rel_transforms: (24, 4, 4) smplx's posed joint
    transforms (``batch_rigid_transform``'s second output), which map rest-pose points
    to posed points. Each level is the midline point at its height, carried by its
    joint (LEVEL_JOINT).
    """
    out = {}
    for name, y in trunk_levels(rest_joints, apex_offset_m, base_offset_m).items():
        j = J[LEVEL_JOINT[name]]
        out[name] = (rel_transforms[j] @ np.array([rest_joints[j, 0], y, rest_joints[j, 2], 1.0]))[:3]
    return out
