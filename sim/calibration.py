"""Simulated calibration sessions: the ChArUco board in its jig on the bare tabletop, several table positions.

``ctpos sim calibration --out DIR --seed S`` writes one capture folder per table
position plus ``session.json`` (board spec, camera serial). Each ``scene.json``
carries the table readings and the *true* ``camera_to_scanner``: ground truth for
tests, which the solver must not read.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from calibration.board import BoardSpec, table_pose
from positioning.capture import Capture, SceneState, write_capture
from positioning.frames import transform
from sim import render
from sim.room import Mesh, box, room_meshes
from sim.scene import HEIGHT, WIDTH
from sim.simulate import LABEL_COLOURS, camera_pose, d455_intrinsics

BOARD_PX_PER_MM = 4.0


@dataclass(frozen=True)
class CalibrationScene:
    """A camera mount and the table positions of one session. Lengths mm, angles degrees.

    board_offset_t_mm: where the board really lies relative to its jig position
    (non-zero only to simulate a misplaced board); bad_reading: (view, mm) added to
    one view's recorded table height (to simulate a wrong readout).
    """

    seed: int
    camera_height_mm: float
    camera_tilt_deg: float
    camera_roll_deg: float
    camera_lateral_mm: float
    camera_target_y_mm: float
    fx: float
    principal_offset_px: float
    noise_subpixel: float
    noise_wave_mm: float
    table_positions: tuple[tuple[float, float], ...]  # (height, longitudinal) per view
    board: bool = True
    board_offset_t_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    bad_reading: tuple[int, float] | None = None
    serial: str = "SIM-D455-0001"
    bore_diameter_mm: float = 700.0


def sample_calibration(seed: int, n_long: int = 5, n_height: int = 3, camera_height_mm: float | None = None,
                       camera_tilt_deg: float | None = None) -> CalibrationScene:
    """A random mount (height 1.4-2.2 m above the tabletop, tilt up to 20 deg) and a grid of table positions."""
    rng = np.random.default_rng(seed)
    h0, l0 = rng.uniform(200, 300), rng.uniform(-1100, -900)
    longs = l0 + np.linspace(-250, 250, n_long) if n_long > 1 else np.array([l0])
    heights = h0 + np.linspace(-150, 150, n_height) if n_height > 1 else np.array([h0])
    positions = tuple((float(h), float(lo)) for lo in longs for h in heights)
    return CalibrationScene(
        seed=seed,
        camera_height_mm=float(camera_height_mm if camera_height_mm is not None else rng.uniform(1400, 2200)),
        camera_tilt_deg=float(camera_tilt_deg if camera_tilt_deg is not None else rng.uniform(-20, 20)),
        camera_roll_deg=float(rng.uniform(-3, 3)), camera_lateral_mm=float(rng.uniform(-120, 120)),
        camera_target_y_mm=float(rng.uniform(-1050, -900)), fx=float(rng.uniform(415, 440)),
        principal_offset_px=float(rng.uniform(-6, 6)), noise_subpixel=float(rng.uniform(0.05, 0.10)),
        noise_wave_mm=float(rng.uniform(0.5, 2.0)), table_positions=positions)


def camera_to_scanner(scene: CalibrationScene) -> np.ndarray:
    """The true mount, fixed in the room: computed at the session's mid table position."""
    hs = [h for h, _ in scene.table_positions]
    ls = [lo for _, lo in scene.table_positions]
    return camera_pose(scene.camera_height_mm, scene.camera_tilt_deg, scene.camera_roll_deg, scene.camera_lateral_mm,
                       scene.camera_target_y_mm, float(np.mean(hs)), float(np.mean(ls)))


def board_image(spec: BoardSpec) -> np.ndarray:
    """(H, W) uint8 texture of the board, BOARD_PX_PER_MM pixels per mm, origin at the top-left."""
    size = (int(spec.width_mm * BOARD_PX_PER_MM), int(spec.height_mm * BOARD_PX_PER_MM))
    return spec.cv_board().generateImage(size, marginSize=0, borderBits=1)


def render_view(scene: CalibrationScene, spec: BoardSpec, height: float, longitudinal: float,
                cam_to_s: np.ndarray, rng: np.random.Generator, texture: np.ndarray | None = None) -> Capture:
    """One capture of the bare table (no mattress) with the board in its jig (if scene.board)."""
    import cv2

    intr, k = d455_intrinsics(scene.fx, scene.principal_offset_px)
    meshes = [m for m in room_meshes(height, longitudinal, 0.0, scene.bore_diameter_mm) if m.label != "mattress"]
    t_s = table_pose(height, longitudinal)
    b_t = spec.board_to_table()
    b_t[:3, 3] += scene.board_offset_t_mm
    b_s = t_s @ b_t
    if scene.board:
        corners_b = np.array([[0, 0, 0], [spec.width_mm, spec.height_mm, spec.thickness_mm]])
        lo, hi = np.sort(transform(corners_b, b_s), axis=0)
        meshes.append(box(lo, hi, "board"))
    ideal = render.raycast(meshes, k, cam_to_s, WIDTH, HEIGHT)
    depth = render.add_depth_noise(ideal.depth, intr.fx, scene.noise_subpixel, scene.noise_wave_mm, 0.005, rng)
    albedo = [LABEL_COLOURS.get(m.label, (0.5, 0.5, 0.5)) for m in meshes]
    color = render.shade_color(ideal, albedo, rng)
    if scene.board:
        on = ideal.label == len(meshes) - 1
        tex = texture if texture is not None else board_image(spec)
        shade = 0.35 + 0.65 * ideal.shade[on]
        val = board_pixels(np.argwhere(on), k, cam_to_s, b_s, tex) * shade
        val = np.clip(0.08 + 0.85 * val + rng.normal(0, 0.01, val.shape), 0, 1)
        color[on] = (val[:, None] * 255).round().astype(np.uint8)
    reading_h = height
    return Capture(depth=depth, color=color, camera=intr,
                   scene=SceneState(cam_to_s, reading_h, longitudinal), name=f"calib-{scene.seed}")


def board_pixels(pix: np.ndarray, k: np.ndarray, cam_to_s: np.ndarray, board_to_s: np.ndarray,
                 texture: np.ndarray, ss: int = 4) -> np.ndarray:
    """Brightness (0..1) of image pixels (N, 2) [row, col] that see the board's face.

    Each pixel integrates its whole area, as a camera's does: ss x ss sub-rays are
    intersected with the face's plane (z_B = 0) and the texture averaged over them.
    """
    import cv2

    off = (np.arange(ss) + 0.5) / ss - 0.5
    du, dv = np.meshgrid(off, off)
    u = pix[:, 1, None] + du.ravel()[None]
    v = pix[:, 0, None] + dv.ravel()[None]
    d_c = np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u)], -1)
    s_to_b = np.linalg.inv(board_to_s)
    cam_to_b = s_to_b @ cam_to_s
    o_b = cam_to_b[:3, 3]
    d_b = d_c @ cam_to_b[:3, :3].T
    t = -o_b[2] / d_b[..., 2]
    hit = o_b + d_b * t[..., None]
    mx = (hit[..., 0] * BOARD_PX_PER_MM - 0.5).astype(np.float32)
    my = (hit[..., 1] * BOARD_PX_PER_MM - 0.5).astype(np.float32)
    samples = cv2.remap(texture, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=255)
    return samples.astype(np.float64).mean(1) / 255.0


def write_session(out: Path, scene: CalibrationScene, spec: BoardSpec = BoardSpec()) -> Path:
    """Write a calibration session folder: view-XX capture folders and session.json."""
    out.mkdir(parents=True, exist_ok=True)
    cam_to_s = camera_to_scanner(scene)
    rng = np.random.default_rng(scene.seed + 17)
    tex = board_image(spec)
    views = []
    for i, (h, lo) in enumerate(scene.table_positions):
        cap = render_view(scene, spec, h, lo, cam_to_s, rng, tex)
        if scene.bad_reading is not None and scene.bad_reading[0] == i:
            cap = replace(cap, scene=replace(cap.scene, table_height_mm=h + scene.bad_reading[1]))
        name = f"view-{i:02d}"
        write_capture(out / name, cap)
        views.append(name)
    session = {"format": "ctpos-calibration-session", "version": 1, "camera_serial": scene.serial,
               "board": spec.to_json(), "views": views, "simulated": asdict(scene)}
    (out / "session.json").write_text(json.dumps(session, indent=1) + "\n")
    return out


def patient_on_mount(p, scene: CalibrationScene):
    """Scene params p (a patient scene) seen by this session's camera: same mount, intrinsics and noise.

    The table stays where p has it; the camera's table-relative parameters are
    recomputed so that its pose in S is the session's true mount.
    """
    from sim.scene import with_table_at

    hs = [h for h, _ in scene.table_positions]
    ls = [lo for _, lo in scene.table_positions]
    at_session = replace(p, table_height_mm=float(np.mean(hs)), table_longitudinal_mm=float(np.mean(ls)),
                         camera_height_mm=scene.camera_height_mm, camera_tilt_deg=scene.camera_tilt_deg,
                         camera_roll_deg=scene.camera_roll_deg, camera_lateral_mm=scene.camera_lateral_mm,
                         camera_target_y_mm=scene.camera_target_y_mm, fx=scene.fx,
                         principal_offset_px=scene.principal_offset_px, noise_subpixel=scene.noise_subpixel,
                         noise_wave_mm=scene.noise_wave_mm, bore_diameter_mm=scene.bore_diameter_mm)
    return with_table_at(at_session, p.table_height_mm, p.table_longitudinal_mm)
