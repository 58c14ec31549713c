"""Optional colour keypoints: MediaPipe Pose on the colour image, lifted to 3D and fused with the depth network's.

MediaPipe 0.10.21 is the last wheel that ships its pose model; it declares numpy<2
but runs on the numpy 2 here. Install recipe (the Makefile's ``mediapipe`` step):

    pip install --no-deps mediapipe==0.10.21
    pip install absl-py flatbuffers 'protobuf>=4.25.3,<5'

The colour image is registered to the depth image (CONVENTIONS.md), so a landmark's
pixel reads its depth directly. MediaPipe names left and right as if the person faced
the camera, which a prone patient does not; fusion therefore takes the side of each
pair from the depth network (it knows supine from prone) and uses colour only to
confirm and refine where a keypoint lies on the table.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np

from positioning.capture import Capture
from positioning.frames import transform
from positioning.keypoints import FLIP, KEYPOINTS, Keypoints

# MediaPipe Pose landmark indices that make up each of our keypoints (averaged).
MEDIAPIPE_LANDMARKS: dict[str, tuple[int, ...]] = {
    "head": (7, 8),  # the ears: the head's centre seen from above
    "neck": (7, 8, 11, 12),  # between the shoulders and the ears: the base of the neck seen from above
    "left_shoulder": (11,), "right_shoulder": (12,), "left_elbow": (13,), "right_elbow": (14,),
    "left_wrist": (15,), "right_wrist": (16,), "pelvis": (23, 24), "left_hip": (23,), "right_hip": (24,),
    "left_knee": (25,), "right_knee": (26,), "left_ankle": (27,), "right_ankle": (28,),
}
AGREE_MM = 80.0  # colour and depth keypoints closer than this on the table are the same keypoint
DEPTH_WINDOW_PX = 3  # half-size of the window whose median depth lifts a landmark


class ColourKeypointError(Exception):
    """This capture gives no colour keypoints (no colour image, no person found); one line."""


class ColourBackendMissing(Exception):
    """MediaPipe is not installed; one line with where the recipe is."""


@dataclass(frozen=True)
class ColourKeypoints:
    """MediaPipe's keypoints lifted to S: points_s (K, 3) mm on the visible surface (NaN where the depth has
    no data), confidence (K,) 0..1 (MediaPipe's visibility), names KEYPOINTS, sides as MediaPipe names them."""

    points_s: np.ndarray
    confidence: np.ndarray


@functools.lru_cache(maxsize=1)
def _pose_model():
    try:
        import mediapipe as mp
    except ImportError:
        raise ColourBackendMissing("MediaPipe is not installed (see positioning/colour_keypoints.py for the "
                                  "recipe)") from None
    return mp.solutions.pose.Pose(static_image_mode=True, model_complexity=1)


def detect_colour_keypoints(capture: Capture) -> ColourKeypoints:
    """Run MediaPipe Pose on the capture's colour image and lift its landmarks to S through the depth."""
    if capture.color is None:
        raise ColourKeypointError(f"{capture.name or 'capture'}: no colour image")
    res = _pose_model().process(np.ascontiguousarray(capture.color))
    if not res.pose_landmarks:
        raise ColourKeypointError(f"{capture.name or 'capture'}: MediaPipe found no person in the colour image")
    lm = res.pose_landmarks.landmark
    cam = capture.camera
    uv_all = np.array([[p.x * cam.width, p.y * cam.height] for p in lm])
    vis_all = np.array([p.visibility for p in lm])
    depth_mm = capture.depth.astype(np.float64) * capture.camera.depth_scale * 1000.0
    pts, conf = np.full((len(KEYPOINTS), 3), np.nan), np.zeros(len(KEYPOINTS))
    for k, name in enumerate(KEYPOINTS):
        ids = list(MEDIAPIPE_LANDMARKS[name])
        u, v = uv_all[ids].mean(0)
        conf[k] = float(vis_all[ids].min())
        iu, iv = int(round(u)), int(round(v))
        if not (0 <= iu < cam.width and 0 <= iv < cam.height):
            conf[k] = 0.0
            continue
        win = depth_mm[max(iv - DEPTH_WINDOW_PX, 0):iv + DEPTH_WINDOW_PX + 1,
                       max(iu - DEPTH_WINDOW_PX, 0):iu + DEPTH_WINDOW_PX + 1]
        valid = win[win > 0]
        if len(valid) == 0:
            conf[k] = 0.0
            continue
        z = float(np.median(valid))
        p_c = np.array([(u - cam.cx) / cam.fx * z, (v - cam.cy) / cam.fy * z, z])
        pts[k] = transform(p_c, capture.scene.camera_to_scanner)
    return ColourKeypoints(pts, conf)


def fuse_keypoints(depth: Keypoints, colour: ColourKeypoints, agree_mm: float = AGREE_MM) -> Keypoints:
    """The depth network's keypoints, confirmed or refined by colour. Pure.

    Sides: each left/right pair of colour keypoints is swapped when that matches the
    depth keypoints better (MediaPipe assumes the person faces the camera). Where a
    colour keypoint lies within agree_mm of the depth one on the table plane, the
    position on the table is their confidence-weighted mean and the confidence the
    larger of the two; the height stays the depth network's (a joint centre, not the
    surface). Where they disagree, the depth keypoint stays with its confidence
    halved, so that the fit leans on it less.
    """
    c_pts, c_conf = colour.points_s.copy(), colour.confidence.copy()
    done = set()
    for i, j in enumerate(FLIP):
        if i == j or i in done:
            continue
        done.update((i, j))
        straight = np.nansum(np.linalg.norm(c_pts[[i, j], :2] - depth.points_s[[i, j], :2], axis=1))
        swapped = np.nansum(np.linalg.norm(c_pts[[j, i], :2] - depth.points_s[[i, j], :2], axis=1))
        if swapped < straight:
            c_pts[[i, j]], c_conf[[i, j]] = c_pts[[j, i]], c_conf[[j, i]]
    pts, conf = depth.points_s.copy(), depth.confidence.copy()
    d = np.linalg.norm(c_pts[:, :2] - pts[:, :2], axis=1)
    agree = np.isfinite(d) & (d < agree_mm) & (c_conf > 0)
    w_d, w_c = conf[agree], c_conf[agree]
    pts[agree, :2] = (w_d[:, None] * pts[agree, :2] + w_c[:, None] * c_pts[agree, :2]) / (w_d + w_c)[:, None]
    conf[agree] = np.maximum(w_d, w_c)
    disagree = np.isfinite(d) & ~agree & (c_conf > 0.5)
    conf[disagree] *= 0.5
    return replace(depth, points_s=pts, confidence=conf)
