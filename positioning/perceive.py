"""From one capture to the patient's body in S: segmentation, depth keypoints, mesh fit. Pure over its inputs."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from positioning.bodymodel import BodyModel
from positioning.capture import Capture
from positioning.fit import FitResult, fit_body
from positioning.keypoints import KEYPOINTS, Keypoints, KeypointNet, detect_keypoints, position_from_keypoints
from positioning.poses import POSITIONS
from positioning.segment import Segmentation, segment_patient
from positioning.skeleton import JOINT_INDEX, NUM_JOINTS


@dataclass(frozen=True)
class Perception:
    """The patient as ctpos sees it.

    vertices (V, 3) float32 mm, frame S; joints (24, 3) float32 mm, frame S (SMPL order);
    joint_confidence (24,) 0..1; patient_position DICOM code with position_confidence 0..1;
    keypoints: the network's keypoints in S (or None); fit: the full FitResult (warm start);
    segmentation: the patient's points and the objects beside them; timing_ms per stage.
    """

    vertices: np.ndarray
    joints: np.ndarray
    joint_confidence: np.ndarray
    patient_position: str
    position_confidence: float
    residual_mm: float
    keypoints: Keypoints | None
    fit: FitResult
    segmentation: Segmentation
    timing_ms: dict[str, float] = field(default_factory=dict)


def keypoints_as_joints(kp: Keypoints) -> tuple[np.ndarray, np.ndarray]:
    """(24, 3) mm and (24,) confidence in SMPL joint order; zero confidence where there is no keypoint."""
    pts = np.zeros((NUM_JOINTS, 3))
    conf = np.zeros(NUM_JOINTS)
    for i, name in enumerate(KEYPOINTS):
        pts[JOINT_INDEX[name]] = kp.points_s[i]
        conf[JOINT_INDEX[name]] = kp.confidence[i]
    return pts, conf


def perceive(capture: Capture, model: BodyModel, net: KeypointNet | None = None, warm: Perception | None = None,
             use_keypoints: bool = True) -> Perception:
    """Segment, detect keypoints (unless use_keypoints is False), fit. Raises SegmentationError on a bad scene."""
    timing = {}
    t = time.perf_counter()
    seg = segment_patient(capture)
    timing["segment"] = (time.perf_counter() - t) * 1000
    kp = kp24 = conf24 = None
    if use_keypoints:
        t = time.perf_counter()
        kp = detect_keypoints(seg, capture.scene.table_height_mm, capture.scene.table_longitudinal_mm, net)
        kp24, conf24 = keypoints_as_joints(kp)
        timing["keypoints"] = (time.perf_counter() - t) * 1000
    # The keypoints say which way the patient lies; the fit then only decides the arms.
    positions = (position_from_keypoints(kp.points_s[:, :2]),) if kp is not None else POSITIONS
    res = fit_body(model, seg.points_s, seg.support_z_s, kp24, conf24, positions=positions,
                   iterations=40 if warm is not None else 120, warm=warm.fit if warm is not None else None)
    timing.update(res.timing_ms)
    jc = np.full(NUM_JOINTS, 0.5) if conf24 is None else np.where(conf24 > 0, conf24, 0.5)
    pos_conf = float(np.clip(res.position_margin, 0.0, 1.0))
    return Perception(res.vertices, res.joints, np.clip(jc * (0.5 + 0.5 * pos_conf), 0, 1), res.patient_position,
                      pos_conf, res.residual_mm, kp, res, seg, timing)
