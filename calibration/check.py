"""The daily check: has the camera moved since it was calibrated? One capture of the empty table.

Two measurements, each compared with what the stored calibration predicts at the
table position the capture was taken at:

* the tabletop plane from depth (Open3D RANSAC): its tilt against z_S (degrees)
  and its height against -table_height (mm) — sees gross tilts and vertical shifts;
* where visible, the board in its jig: the detected ChArUco corners against their
  predicted pixels, expressed as millimetres at the board — sees every rotation
  and horizontal shift, which is what would move a plan.

A figure above its limit (DriftLimits, docs/calibration.md) is a warning; the
console refuses to plan until the camera is recalibrated or the warning is
acknowledged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from calibration.board import table_pose
from calibration.solve import board_in_jig, camera_matrix, detect_board, tabletop_points
from calibration.store import Calibration
from positioning.capture import Capture
from positioning.frames import transform


@dataclass(frozen=True)
class DriftLimits:
    """Warning limits of the daily check (chosen from measured noise; docs/calibration.md)."""

    # One depth frame's plane tilts by up to 2.1 deg on an unmoved camera (correlated depth
    # error over a 0.5 m wide tabletop): the plane only catches gross moves.
    plane_tilt_deg: float = 3.0
    plane_offset_mm: float = 10.0
    # Unmoved: 0.55-1.4 mm; bumped 0.5 deg: 4.8-18 mm, 5 mm: 3.0-5.1 mm (docs/calibration.md).
    board_shift_mm: float = 2.0


@dataclass(frozen=True)
class DriftReport:
    """Figures of one daily check. None where the measurement was not possible."""

    plane_tilt_deg: float | None
    plane_offset_mm: float | None
    board_shift_mm: float | None
    board_corners: int
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.warnings

    def to_json(self) -> dict:
        return {"plane_tilt_deg": self.plane_tilt_deg, "plane_offset_mm": self.plane_offset_mm,
                "board_shift_mm": self.board_shift_mm, "board_corners": self.board_corners,
                "verdict": "ok" if self.ok else "drift", "warnings": self.warnings}


def daily_check(capture: Capture, cal: Calibration, limits: DriftLimits = DriftLimits(),
                seed: int = 0) -> DriftReport:
    """Compare one capture of the empty table with the stored calibration."""
    x = cal.camera_to_scanner
    s_to_c = np.linalg.inv(x)
    h, lo = capture.scene.table_height_mm, capture.scene.table_longitudinal_mm
    warnings: list[str] = []

    # Tabletop plane expected in C: z_S = -h.
    n_exp = s_to_c[:3, :3] @ np.array([0.0, 0.0, 1.0])
    centre_s = np.array([0.0, lo + cal.board.origin_t_mm[1] + cal.board.width_mm / 2, -h])
    p_exp = transform(centre_s, s_to_c)
    corners, ids, pose, _ = detect_board(capture.color, capture.camera, cal.board) if capture.color is not None \
        else (np.zeros((0, 2)), np.zeros(0, int), None, float("nan"))
    pts, _ = tabletop_points(capture, (n_exp, float(-n_exp @ p_exp)), np.random.default_rng(seed),
                             (pose, cal.board) if pose is not None else None, corridor_mm=80.0)
    tilt = offset = None
    if len(pts) >= 500:
        # Least-squares plane of the RANSAC inliers, mapped to S: z = a x + b y + c.
        ps = transform(pts, x)
        a = np.column_stack([ps[:, 0], ps[:, 1], np.ones(len(ps))])
        coef, *_ = np.linalg.lstsq(a, ps[:, 2], rcond=None)
        n = np.array([-coef[0], -coef[1], 1.0])
        tilt = float(np.degrees(np.arccos(1.0 / np.linalg.norm(n))))
        offset = float(coef[0] * centre_s[0] + coef[1] * centre_s[1] + coef[2] - centre_s[2])
        if tilt > limits.plane_tilt_deg:
            warnings.append(f"tabletop tilted {tilt:.2f} deg against the calibration (limit {limits.plane_tilt_deg})")
        if abs(offset) > limits.plane_offset_mm:
            warnings.append(f"tabletop {offset:+.1f} mm off its calibrated height (limit {limits.plane_offset_mm})")
    else:
        warnings.append("tabletop not found where the calibration expects it: camera moved or view blocked")

    shift = None
    if pose is not None:
        b_c = s_to_c @ table_pose(h, lo) @ board_in_jig(cal.board, np.radians(cal.board_yaw_deg))
        pc = transform(cal.board.corner_points()[ids], b_c)
        uv = (pc @ camera_matrix(capture.camera).T)[:, :2] / pc[:, 2:3]
        # Pixels to mm at the board's distance: what a plan at the table would be off by.
        mm = np.linalg.norm(uv - corners, axis=1) * pc[:, 2] / capture.camera.fx
        shift = float(np.sqrt(np.mean(mm ** 2)))
        if shift > limits.board_shift_mm:
            warnings.append(f"board seen {shift:.1f} mm from where the calibration puts it "
                            f"(limit {limits.board_shift_mm})")
    return DriftReport(tilt, offset, shift, int(len(ids)), warnings)
