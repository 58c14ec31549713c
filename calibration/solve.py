"""Solve camera_to_scanner from views of the ChArUco board at several table positions.

Per view: the board's corners (cv2.aruco ChArUco detection, sub-pixel refined), its
pose in the camera (PnP), and the tabletop plane from depth (Open3D RANSAC). The
table readings say where the table frame T was in S for each view; the jig says
where the board lies in T (calibration/board.py). One robust least-squares solve
over all views then finds camera_to_scanner X and the board's small in-plane yaw
ψ in the jig:

    residual = projection of  X⁻¹ · T_S←T(view) · T_T←B(ψ) · corner  minus the detected corner (px)

The table's motion directions fix X's rotation (the board moves along +y_S when
the table moves in, along -z_S when it is lowered); the readings and the jig fix
its translation. Views that disagree with the rest are dropped and the solve is
repeated (outlier rejection). The tabletop plane from depth is not in the solve:
the depth's spatially correlated error biased the tilt more than it informed it
(measured: docs/calibration.md); it serves the quality report and the daily check.
Everything here is pure: arrays in, dataclasses out.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from calibration.board import BoardSpec, table_pose
from positioning.capture import CameraIntrinsics, Capture
from positioning.frames import depth_to_points, transform

MIN_CORNERS = 6


class CalibrationError(Exception):
    """The session cannot give a calibration; the message says why in one line."""


@dataclass(frozen=True)
class Thresholds:
    """The quality a calibration must reach to be saved (docs/calibration.md)."""

    reprojection_rms_px: float = 0.6
    plane_rms_mm: float = 12.0
    # Per-view table displacement against the readings. Vertical is looser: one view fixes
    # its distance only through the board's scale in the image (measured: docs/calibration.md).
    displacement_horizontal_rms_mm: float = 2.0
    displacement_vertical_rms_mm: float = 6.0
    orthogonality_deg: float = 0.5


@dataclass(frozen=True)
class BoardView:
    """What one view shows. corners_px (N, 2), ids (N,), board_to_camera (4, 4) from PnP (mm),
    plane_points (M, 3) tabletop points in C (mm, off the board), readings in mm."""

    name: str
    table_height_mm: float
    table_longitudinal_mm: float
    corners_px: np.ndarray
    ids: np.ndarray
    board_to_camera: np.ndarray | None
    pnp_rms_px: float
    plane_points: np.ndarray
    plane_rms_mm: float
    problem: str | None = None


@dataclass(frozen=True)
class Solution:
    """camera_to_scanner (4, 4, mm), the board's yaw in the jig (deg), and the quality report."""

    camera_to_scanner: np.ndarray
    board_yaw_deg: float
    report: dict
    used_views: list[str]
    rejected_views: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.report["verdict"] == "pass"


def camera_matrix(cam: CameraIntrinsics) -> np.ndarray:
    return np.array([[cam.fx, 0.0, cam.cx], [0.0, cam.fy, cam.cy], [0.0, 0.0, 1.0]])


def rigid(rvec: np.ndarray, tvec: np.ndarray) -> np.ndarray:
    import cv2

    m = np.eye(4)
    m[:3, :3] = cv2.Rodrigues(np.asarray(rvec, float).reshape(3))[0]
    m[:3, 3] = np.asarray(tvec, float).reshape(3)
    return m


def detect_board(color: np.ndarray, cam: CameraIntrinsics, spec: BoardSpec):
    """ChArUco corners (N, 2) px, their ids (N,), the board pose B->C (4, 4, mm) and PnP RMS (px).

    Returns (corners, ids, None, nan) when fewer than MIN_CORNERS corners are found.
    """
    import cv2

    gray = cv2.cvtColor(color, cv2.COLOR_RGB2GRAY)
    board = spec.cv_board()
    corners, ids, _, _ = cv2.aruco.CharucoDetector(board).detectBoard(gray)
    if ids is None or len(ids) < MIN_CORNERS:
        return np.zeros((0, 2)), np.zeros(0, int), None, float("nan")
    corners = cv2.cornerSubPix(gray, corners.astype(np.float32), (4, 4), (-1, -1),
                               (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 40, 0.01))
    ids = ids.ravel()
    obj = spec.corner_points()[ids]
    k = camera_matrix(cam)
    ok, rvec, tvec = cv2.solvePnP(obj, corners, k, None, flags=cv2.SOLVEPNP_IPPE)
    if not ok:
        return corners.reshape(-1, 2), ids, None, float("nan")
    rvec, tvec = cv2.solvePnPRefineLM(obj, corners, k, None, rvec, tvec)
    proj, _ = cv2.projectPoints(obj, rvec, tvec, k, None)
    rms = float(np.sqrt(np.mean(np.sum((proj.reshape(-1, 2) - corners.reshape(-1, 2)) ** 2, 1))))
    return corners.reshape(-1, 2).astype(np.float64), ids, rigid(rvec, tvec), rms


def tabletop_points(capture: Capture, near_plane: tuple[np.ndarray, float] | None, rng: np.random.Generator,
                    exclude_board: tuple[np.ndarray, BoardSpec] | None = None,
                    corridor_mm: float = 60.0) -> tuple[np.ndarray, float]:
    """Points of the tabletop in C (mm) and the RMS (mm) of Open3D's RANSAC plane through them.

    near_plane: (unit normal n, offset d) with n·p + d = 0 for a plane close to the
    tabletop (the board's face, or the tabletop a stored calibration predicts); only
    points within corridor_mm of it are searched, which keeps the floor and the gantry
    out. exclude_board: (board_to_camera, spec) leaves the board itself out.
    """
    import open3d as o3d

    pts = depth_to_points(capture.depth_mm(), capture.camera)[capture.depth > 0]
    if near_plane is not None:
        n, d = near_plane
        pts = pts[np.abs(pts @ n + d) < corridor_mm]
    if exclude_board is not None:
        pose, spec = exclude_board
        pb = transform(pts, np.linalg.inv(pose))
        on_board = ((pb[:, 0] > -20) & (pb[:, 0] < spec.width_mm + 20) & (pb[:, 1] > -20)
                    & (pb[:, 1] < spec.height_mm + 20))
        pts = pts[~on_board]
    if len(pts) < 500:
        return np.zeros((0, 3)), float("nan")
    if len(pts) > 60000:
        pts = pts[rng.choice(len(pts), 60000, replace=False)]
    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
    plane, inliers = pc.segment_plane(distance_threshold=12.0, ransac_n=3, num_iterations=400, probability=0.9999)
    q = pts[np.asarray(inliers)]
    rms = float(np.sqrt(np.mean((q @ np.asarray(plane[:3]) + plane[3]) ** 2)))
    return q, rms


def board_plane(board_to_camera: np.ndarray, spec: BoardSpec) -> tuple[np.ndarray, float]:
    """The tabletop plane under a board lying on it, in C: (unit normal, offset), n·p + d = 0."""
    n = board_to_camera[:3, 2]
    p0 = transform(np.array([0.0, 0.0, spec.thickness_mm]), board_to_camera)
    return n, float(-n @ p0)


def analyse_view(name: str, capture: Capture, spec: BoardSpec, rng: np.random.Generator) -> BoardView:
    """Detect the board and the tabletop in one capture (no solve)."""
    if capture.color is None:
        return BoardView(name, capture.scene.table_height_mm, capture.scene.table_longitudinal_mm, np.zeros((0, 2)),
                         np.zeros(0, int), None, float("nan"), np.zeros((0, 3)), float("nan"), "no colour image")
    corners, ids, pose, rms = detect_board(capture.color, capture.camera, spec)
    plane_pts, plane_rms = (tabletop_points(capture, board_plane(pose, spec), rng, (pose, spec)) if pose is not None
                            else (np.zeros((0, 3)), float("nan")))
    problem = None
    if pose is None:
        problem = f"board not found ({len(ids)} corners)"
    elif board_off_table(capture, pose, spec):
        problem = "board extends beyond the tabletop"
    return BoardView(name, capture.scene.table_height_mm, capture.scene.table_longitudinal_mm, corners, ids, pose,
                     rms, plane_pts, plane_rms, problem)


def board_off_table(capture: Capture, board_to_camera: np.ndarray, spec: BoardSpec, margin: float = 25.0) -> bool:
    """True when a side of the board has no tabletop next to it (the board overhangs an edge).

    Samples points just outside each edge, where the tabletop should be; an edge fails
    when the measured depth there lies, by its median, far behind that surface.
    """
    w, h = spec.width_mm, spec.height_mm
    s = np.linspace(0.1, 0.9, 9)
    edges = {
        "near": np.stack([s * w, np.full_like(s, -margin)], 1),
        "far": np.stack([s * w, np.full_like(s, h + margin)], 1),
        "left": np.stack([np.full_like(s, -margin), s * h], 1),
        "right": np.stack([np.full_like(s, w + margin), s * h], 1),
    }
    cam = capture.camera
    depth = capture.depth_mm()
    for pts in edges.values():
        # Outside the board the tabletop lies board-thickness below the board's face (+z_B).
        pc = transform(np.column_stack([pts, np.full(len(pts), spec.thickness_mm)]), board_to_camera)
        u = np.round(cam.fx * pc[:, 0] / pc[:, 2] + cam.cx).astype(int)
        v = np.round(cam.fy * pc[:, 1] / pc[:, 2] + cam.cy).astype(int)
        inside = (u >= 0) & (u < cam.width) & (v >= 0) & (v < cam.height)
        if inside.sum() < 3:
            continue  # edge out of view: nothing to judge
        z = depth[v[inside], u[inside]]
        behind = np.where(z > 0, z - pc[inside, 2], np.inf)  # no data counts as nothing there
        # Something nearer (the gantry, a hand) hides the edge: no verdict from those samples.
        behind = behind[behind > -60.0]
        # Beyond a table edge lies the floor, most of a metre down; sensor noise is tens of mm.
        if len(behind) >= 3 and np.median(behind) > 150.0:
            return True
    return False


def board_in_jig(spec: BoardSpec, yaw_rad: float) -> np.ndarray:
    """Pose of B in T with the board rotated by yaw about the jig's vertical axis through its centre."""
    import cv2

    jig = spec.board_to_table()
    centre_b = np.array([spec.width_mm / 2, spec.height_mm / 2, 0.0])
    rot = np.eye(4)
    rot[:3, :3] = cv2.Rodrigues(np.array([0.0, 0.0, yaw_rad]))[0]
    c_t = transform(centre_b, jig)
    shift = np.eye(4)
    shift[:3, 3] = c_t
    back = np.eye(4)
    back[:3, 3] = -c_t
    return shift @ rot @ back @ jig


def _pack(x: np.ndarray) -> tuple[np.ndarray, float]:
    return rigid(x[:3], x[3:6]), float(x[6])


def _residuals(x: np.ndarray, views: list[BoardView], spec: BoardSpec, k: np.ndarray) -> np.ndarray:
    """Stacked corner reprojection residuals (px) of all views."""
    s_to_c, yaw = _pack(x)  # parameters are X⁻¹ (scanner -> camera), better conditioned for projection
    b_t = board_in_jig(spec, yaw)
    corners_b = spec.corner_points()
    out = []
    for v in views:
        t_s = table_pose(v.table_height_mm, v.table_longitudinal_mm)
        pc = transform(corners_b[v.ids], s_to_c @ t_s @ b_t)
        uv = (pc @ k.T)[:, :2] / pc[:, 2:3]
        out.append((uv - v.corners_px).ravel())
    return np.concatenate(out)


def _initial(views: list[BoardView], spec: BoardSpec) -> np.ndarray:
    """X⁻¹ from the first view's PnP pose and its readings (yaw 0)."""
    import cv2

    v = views[0]
    s_to_c = v.board_to_camera @ np.linalg.inv(table_pose(v.table_height_mm, v.table_longitudinal_mm)
                                              @ spec.board_to_table())
    return np.concatenate([cv2.Rodrigues(s_to_c[:3, :3])[0].ravel(), s_to_c[:3, 3], [0.0]])


def _check_coverage(views: list[BoardView]) -> None:
    longs = sorted({round(v.table_longitudinal_mm) for v in views})
    heights = sorted({round(v.table_height_mm) for v in views})
    if len(views) < 4 or np.ptp(longs) < 50 or np.ptp(heights) < 30:
        raise CalibrationError(
            f"too few usable views: {len(views)} with the board seen, at longitudinal positions {longs} mm and "
            f"heights {heights} mm; need at least 4 views spanning two longitudinal positions (>= 50 mm apart) "
            f"and two heights (>= 30 mm apart)")


def motion_axes(positions_c: np.ndarray, views: list[BoardView]) -> tuple[np.ndarray, np.ndarray]:
    """Directions (in C) in which the board moves per mm of longitudinal travel and per mm of lowering.

    positions_c: (N, 3) the board origin in C per view. Linear least squares:
    position_i = c + l_i * u - h_i * w.
    """
    a = np.column_stack([np.ones(len(views)), [v.table_longitudinal_mm for v in views],
                         [-v.table_height_mm for v in views]])
    coef, *_ = np.linalg.lstsq(a, positions_c, rcond=None)
    return coef[1], coef[2]


def view_offsets(s_to_c: np.ndarray, yaw: float, views: list[BoardView], spec: BoardSpec,
                 k: np.ndarray) -> np.ndarray:
    """(N, 3) mm: per view, the shift of the board in S that best explains its corners with X held fixed.

    What each view says about where the table really was, against its reading. With
    the rotation fixed this is far better conditioned than a free PnP pose per view.
    """
    from scipy.optimize import least_squares

    b_t = board_in_jig(spec, yaw)
    corners_b = spec.corner_points()
    out = []
    for v in views:
        base = table_pose(v.table_height_mm, v.table_longitudinal_mm) @ b_t
        pts_s = transform(corners_b[v.ids], base)

        def res(d, pts_s=pts_s, v=v):
            pc = transform(pts_s + d, s_to_c)
            return ((pc @ k.T)[:, :2] / pc[:, 2:3] - v.corners_px).ravel()

        out.append(least_squares(res, np.zeros(3)).x)
    return np.array(out)


def solve(views: list[BoardView], spec: BoardSpec, cam: CameraIntrinsics,
          thresholds: Thresholds = Thresholds()) -> Solution:
    """One robust least-squares solve over all usable views, with rejection of inconsistent views."""
    from scipy.optimize import least_squares

    if not views:
        raise CalibrationError("no views in the session")
    usable = [v for v in views if v.problem is None]
    rejected = {v.name: v.problem for v in views if v.problem is not None}
    off = [n for n, p in rejected.items() if p == "board extends beyond the tabletop"]
    if off:
        raise CalibrationError(f"board extends beyond the tabletop in {', '.join(off)}: place it in its jig")
    if not usable:
        reasons = sorted(set(rejected.values()))
        raise CalibrationError(f"board never seen: {'; '.join(reasons)} in all {len(views)} views")
    _check_coverage(usable)
    k = camera_matrix(cam)
    x = _initial(usable, spec)
    for _ in range(3):
        res = least_squares(_residuals, x, args=(usable, spec, k), loss="soft_l1", f_scale=1.0, x_scale="jac")
        x = res.x
        per_view = _per_view_rms(x, usable, spec, k)
        med = float(np.median(list(per_view.values())))
        bad = {n: r for n, r in per_view.items() if r > max(4.0 * med, 0.6)}
        if not bad:
            break
        for n, r in bad.items():
            rejected[n] = f"inconsistent with the other views (reprojection {r:.1f} px): check the table reading"
        usable = [v for v in usable if v.name not in bad]
        if len(usable) < max(4, (2 * len(views)) // 3):
            raise CalibrationError(f"inconsistent table readings: {len(bad)} of {len(views)} views disagree with "
                                   f"the rest ({', '.join(sorted(bad))})")
        _check_coverage(usable)
    s_to_c, yaw = _pack(x)
    cam_to_s = np.linalg.inv(s_to_c)
    report = quality_report(cam_to_s, yaw, usable, spec, k, thresholds)
    return Solution(cam_to_s, float(np.degrees(yaw)), report, [v.name for v in usable], rejected)


def _per_view_rms(x: np.ndarray, views: list[BoardView], spec: BoardSpec, k: np.ndarray) -> dict[str, float]:
    out = {}
    for v in views:
        r = _residuals(x, [v], spec, k)
        out[v.name] = float(np.sqrt(np.mean(r.reshape(-1, 2) ** 2) * 2))
    return out


def quality_report(cam_to_s: np.ndarray, yaw: float, views: list[BoardView], spec: BoardSpec, k: np.ndarray,
                   th: Thresholds) -> dict:
    """The figures a service engineer signs off, with the verdict against the documented thresholds."""
    import cv2

    s_to_c = np.linalg.inv(cam_to_s)
    x = np.concatenate([cv2.Rodrigues(s_to_c[:3, :3])[0].ravel(), s_to_c[:3, 3], [yaw]])
    r = _residuals(x, views, spec, k).reshape(-1, 2)
    reproj = float(np.sqrt(np.mean(np.sum(r ** 2, 1))))
    plane_rms = float(np.sqrt(np.nanmean([v.plane_rms_mm ** 2 for v in views])))
    # Where each view says the table was, against its reading (mm, S).
    offsets = view_offsets(s_to_c, yaw, views, spec, k)
    dev = offsets - offsets.mean(0)
    horiz, vert = np.linalg.norm(dev[:, :2], axis=1), np.abs(dev[:, 2])
    origin_s = np.array([transform(np.zeros(3), table_pose(v.table_height_mm, v.table_longitudinal_mm)
                                   @ board_in_jig(spec, yaw)) for v in views])
    u, w = motion_axes(transform(origin_s + offsets, s_to_c), views)
    ortho = float(np.degrees(np.arccos(np.clip(u @ w / np.linalg.norm(u) / np.linalg.norm(w), -1, 1))))
    figures = {
        "reprojection_rms_px": reproj,
        "plane_rms_mm": plane_rms,
        "displacement_horizontal_rms_mm": float(np.sqrt(np.mean(horiz ** 2))),
        "displacement_horizontal_max_mm": float(horiz.max()),
        "displacement_vertical_rms_mm": float(np.sqrt(np.mean(vert ** 2))),
        "displacement_vertical_max_mm": float(vert.max()),
        "axis_orthogonality_deg": ortho,
        "motion_scale_longitudinal": float(np.linalg.norm(u)),
        "motion_scale_height": float(np.linalg.norm(w)),
        "board_yaw_deg": float(np.degrees(yaw)),
        "views_used": len(views),
        "corners_used": int(sum(len(v.ids) for v in views)),
    }
    fails = []
    if reproj > th.reprojection_rms_px:
        fails.append(f"reprojection RMS {reproj:.2f} px > {th.reprojection_rms_px} px")
    if plane_rms > th.plane_rms_mm:
        fails.append(f"tabletop plane RMS {plane_rms:.1f} mm > {th.plane_rms_mm} mm")
    for axis in ("horizontal", "vertical"):
        v, lim = figures[f"displacement_{axis}_rms_mm"], getattr(th, f"displacement_{axis}_rms_mm")
        if v > lim:
            fails.append(f"{axis} table displacement RMS {v:.2f} mm > {lim} mm: readings and images disagree")
    if abs(ortho - 90.0) > th.orthogonality_deg:
        fails.append(f"table axes {ortho:.2f} deg apart, not 90 +- {th.orthogonality_deg}")
    figures["thresholds"] = {k2: getattr(th, k2) for k2 in th.__dataclass_fields__}
    figures["verdict"] = "pass" if not fails else "fail"
    figures["failures"] = fails
    return figures
