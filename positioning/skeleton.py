"""The SMPL joint layout that every body model in ctpos follows.

Joint order, names and kinematic tree are SMPL's, so that licensed SMPL files and
the embedded open model are interchangeable. Left/right are the patient's.
"""
from __future__ import annotations

JOINT_NAMES: tuple[str, ...] = (
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee",
    "spine2", "left_ankle", "right_ankle", "spine3", "left_foot", "right_foot",
    "neck", "left_collar", "right_collar", "head", "left_shoulder",
    "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hand", "right_hand",
)
PARENTS: tuple[int, ...] = (
    -1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21,
)
NUM_JOINTS = len(JOINT_NAMES)
JOINT_INDEX: dict[str, int] = {n: i for i, n in enumerate(JOINT_NAMES)}

# Vertex landmarks each body model carries (vertex ids differ per mesh).
# 'vertex' is the top of the head; the five face points are smplx's extra joints.
VERTEX_LANDMARKS: tuple[str, ...] = ("vertex", "nose", "reye", "leye", "rear", "lear")

# Landmarks of CONVENTIONS.md ("landmarks_scanner_mm") and the joint each is.
LANDMARK_JOINTS: dict[str, str] = {
    "neck": "neck",
    "shoulder_left": "left_shoulder", "shoulder_right": "right_shoulder",
    "elbow_left": "left_elbow", "elbow_right": "right_elbow",
    "wrist_left": "left_wrist", "wrist_right": "right_wrist",
    "hip_left": "left_hip", "hip_right": "right_hip",
    "knee_left": "left_knee", "knee_right": "right_knee",
    "ankle_left": "left_ankle", "ankle_right": "right_ankle",
}

# Joints whose vertices are the arms: left out where the trunk's cross-section is wanted.
ARM_JOINTS: frozenset[int] = frozenset(JOINT_INDEX[f"{s}_{j}"] for s in ("left", "right")
                                       for j in ("shoulder", "elbow", "wrist", "hand"))
