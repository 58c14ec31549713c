"""From one capture to the patient's body in S: segmentation, depth keypoints, mesh fit. Pure over its inputs."""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from positioning.bodymodel import BodyModel
from positioning.capture import Capture, SceneState
from positioning.fit import ARMS, FitResult, fit_body, one_torch_thread
from positioning.frames import scanner_to_table, table_to_scanner
from positioning.keypoints import KEYPOINTS, UPPER, Keypoints, KeypointNet, detect_keypoints
from positioning.poses import ARM_POSES, POSITIONS
from positioning.segment import Segmentation, segment_patient
from positioning.skeleton import JOINT_INDEX, NUM_JOINTS

log = logging.getLogger("ctpos.perceive")
# Adam iterations of the fit. Keypoints start it near the body, so a cold fit may stop from CONVERGE_AFTER on once
# its cost has settled (fit.CONVERGED_FRACTION). On 80 held-out plans (ISO |error| median / p95, joints median /
# p95, mm): 120 fixed 2.2 / 8.1, 17.7 / 53; 50 fixed 2.0 / 7.3, 17.6 / 55 but the knees-bent joint p95 doubled
# on 200 captures; settling from 50 on 1.9 / 7.3, 17.2 / 50. Warm: started from the last frame.
FIT_ITERATIONS = 120
CONVERGE_AFTER = 50
WARM_ITERATIONS = 40


@dataclass(frozen=True)
class Perception:
    """The patient as ctpos sees it.

    vertices (V, 3) float32 mm, frame S; joints (24, 3) float32 mm, frame S (SMPL order);
    joint_confidence (24,) 0..1; patient_position DICOM code with position_confidence 0..1;
    keypoints: the network's keypoints in S (or None); fit: the full FitResult (warm start);
    segmentation: the patient's points and the objects beside them; scene: the camera and
    table state of the capture (a warm start follows the table's move); timing_ms per stage.
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
    scene: SceneState
    timing_ms: dict[str, float] = field(default_factory=dict)


def keypoints_as_joints(kp: Keypoints) -> tuple[np.ndarray, np.ndarray]:
    """(24, 3) mm and (24,) confidence in SMPL joint order; zero confidence where there is no keypoint."""
    pts = np.zeros((NUM_JOINTS, 3))
    conf = np.zeros(NUM_JOINTS)
    for i, name in enumerate(KEYPOINTS):
        pts[JOINT_INDEX[name]] = kp.points_s[i]
        conf[JOINT_INDEX[name]] = kp.confidence[i]
    return pts, conf


# Below this certainty of the network's supine/prone call, the fit tries both and its cost decides.
PRONE_SURE = 0.9
# A wrist this far (mm) beyond its shoulder towards the head is a raised arm; this far below, a lowered one.
ARM_UP_MM, ARM_DOWN_MM = 60.0, -60.0
# A wrist this close (mm) to the body's midline rests on the trunk; this far, beside it.
WRIST_OVER_TRUNK_MM, WRIST_BESIDE_TRUNK_MM = 130.0, 180.0


def hypotheses_from_keypoints(kp: Keypoints) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(positions, arm poses) worth fitting, given the keypoints.

    The head direction is the network's (upper keypoints against lower: not in doubt); supine
    and prone are both tried unless the network is sure. The arms are 'up' when both
    wrists lie beyond the shoulders towards the head; below the shoulders, 'down'
    when both wrists lie beside the trunk and 'belly' when both lie over it (near the
    body's midline), both when unclear; with the wrists split, all three are tried.
    """
    p = kp.prone_probability
    sure = max(p, 1.0 - p) >= PRONE_SURE
    positions = (kp.position,) if sure else (kp.position[:2] + "S", kp.position[:2] + "P")
    k = {n: i for i, n in enumerate(KEYPOINTS)}
    # The trunk's axis from the pelvis (kept between the hips, keypoints.pelvis_from_hips) to the median of the
    # head, neck and shoulders: no one of those turns it.
    top, low = np.median(kp.points_s[[k[n] for n in UPPER], :2], 0), kp.points_s[k["pelvis"], :2]
    axis = (top - low) / max(float(np.linalg.norm(top - low)), 1e-6)
    reach = [float((kp.points_s[k[f"{s}_wrist"], :2] - kp.points_s[k[f"{s}_shoulder"], :2]) @ axis)
             for s in ("left", "right")]
    side = np.array([-axis[1], axis[0]])
    mid = 0.5 * (top + low)
    off = [abs(float((kp.points_s[k[f"{s}_wrist"], :2] - mid) @ side)) for s in ("left", "right")]
    if min(reach) > ARM_UP_MM:
        arms = ("up",)
    elif max(reach) < ARM_DOWN_MM:
        arms = ("belly",) if max(off) < WRIST_OVER_TRUNK_MM else (
            ("down",) if min(off) > WRIST_BESIDE_TRUNK_MM else ("down", "belly"))
    else:
        arms = ARM_POSES
    return positions, arms


def perceive(capture: Capture, model: BodyModel, net: KeypointNet | None = None, warm: Perception | None = None,
             use_keypoints: bool = True, colour: bool = False,
             segmentation: tuple[Segmentation, float] | None = None) -> Perception:
    """Segment, detect keypoints (unless use_keypoints is False), fit. Raises SegmentationError on a bad scene.

    warm: an earlier frame's Perception of the same patient (a live console re-planning): the fit starts from
    that body, moved with the table where the table moved since (the patient lies on it).

    segmentation: this capture's segmentation already made, and the ms it took (``ctpos plan`` makes it in a
    child process while it loads torch); None segments here.

    colour: also run MediaPipe on the colour image and fuse (positioning/colour_keypoints.py);
    where it finds nobody, the depth keypoints go on alone (logged).
    """
    timing = {}
    if segmentation is None:
        t = time.perf_counter()
        seg = segment_patient(capture)
        timing["segment"] = (time.perf_counter() - t) * 1000
    else:
        seg, timing["segment"] = segmentation
    kp = kp24 = conf24 = None
    if use_keypoints:
        t = time.perf_counter()
        kp = detect_keypoints(seg, capture.scene.table_height_mm, capture.scene.table_longitudinal_mm, net)
        timing["keypoints"] = (time.perf_counter() - t) * 1000
        if colour:
            from positioning.colour_keypoints import ColourKeypointError, detect_colour_keypoints, fuse_keypoints

            t = time.perf_counter()
            try:
                kp = fuse_keypoints(kp, detect_colour_keypoints(capture))
            except ColourKeypointError as exc:
                log.warning("colour keypoints not used: %s", exc)
            timing["colour_keypoints"] = (time.perf_counter() - t) * 1000
        kp24, conf24 = keypoints_as_joints(kp)
    positions, arms = hypotheses_from_keypoints(kp) if kp is not None else (POSITIONS, ARMS)
    if warm is not None and warm.patient_position not in positions:
        log.info("the patient lies %s now, not %s: fitted afresh", "/".join(positions), warm.patient_position)
        warm = None
    warm_fit = None
    if warm is not None:
        # The patient lies on the table: where the table moved since that frame, the body moved with it.
        moved = table_to_scanner(scanner_to_table(warm.fit.translation_mm, warm.scene.table_height_mm,
                                                  warm.scene.table_longitudinal_mm),
                                 capture.scene.table_height_mm, capture.scene.table_longitudinal_mm)
        warm_fit = dataclasses.replace(warm.fit, translation_mm=moved)
    with one_torch_thread():
        res = fit_body(model, seg.points_s, seg.support_z_s, kp24, conf24, positions=positions, arms=arms,
                       iterations=WARM_ITERATIONS if warm is not None else FIT_ITERATIONS,
                       warm=warm_fit,
                       converge_after=CONVERGE_AFTER if warm is None and kp is not None else None,
                       table_origin_s_mm=table_to_scanner(np.zeros(3), capture.scene.table_height_mm,
                                                          capture.scene.table_longitudinal_mm))
    timing.update(res.timing_ms)
    jc = np.full(NUM_JOINTS, 0.5) if conf24 is None else np.where(conf24 > 0, conf24, 0.5)
    pos_conf = float(np.clip(res.position_margin, 0.0, 1.0))
    if kp is not None and len(positions) == 1:
        # Only one position was fitted: the confidence is the network's.
        pos_conf = abs(2.0 * kp.prone_probability - 1.0)
    return Perception(res.vertices, res.joints, np.clip(jc * (0.5 + 0.5 * pos_conf), 0, 1), res.patient_position,
                      pos_conf, res.residual_mm, kp, res, seg, capture.scene, timing)
