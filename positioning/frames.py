"""Frame conversions of CONVENTIONS.md: camera C, scanner S, table T. Pure; millimetres."""
from __future__ import annotations

import numpy as np

from positioning.capture import CameraIntrinsics


def table_to_scanner(p_t: np.ndarray, table_height_mm: float, table_longitudinal_mm: float) -> np.ndarray:
    """(..., 3) points in T -> S at the given table state: p_S = p_T + (0, long, -height)."""
    return np.asarray(p_t, float) + np.array([0.0, table_longitudinal_mm, -table_height_mm])


def scanner_to_table(p_s: np.ndarray, table_height_mm: float, table_longitudinal_mm: float) -> np.ndarray:
    """(..., 3) points in S -> T at the given table state (float32 stays float32)."""
    p_s = np.asarray(p_s)
    dtype = p_s.dtype if p_s.dtype == np.float32 else np.float64
    return p_s - np.array([0.0, table_longitudinal_mm, -table_height_mm], dtype)


def grid_means(points: np.ndarray, cell_mm: float, origin: np.ndarray | None = None) -> np.ndarray:
    """(M, 3) float64: the mean of the points (N, 3) in each occupied cell of a cubic grid of cell_mm laid from
    origin (3,) (the points' frame and unit; the frame's own origin when None), one row per cell.

    Open3D's voxel_down_sample lays its grid from the cloud's own corner, which moves with what the camera sees;
    this one stays where it is put (on the table, for the fit), and importing Open3D would cost a fresh
    `ctpos plan` a second.
    """
    p = np.asarray(points, np.float64)
    idx = np.floor((p - (0.0 if origin is None else np.asarray(origin, np.float64))) / cell_mm).astype(np.int64)
    idx -= idx.min(0)
    span = idx.max(0) + 1
    key = (idx[:, 0] * span[1] + idx[:, 1]) * span[2] + idx[:, 2]
    _, inv, count = np.unique(key, return_inverse=True, return_counts=True)
    return np.stack([np.bincount(inv, p[:, k]) for k in range(3)], 1) / count[:, None]


def transform(points: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Apply a 4x4 rigid transform to (..., 3) points."""
    return np.asarray(points, float) @ m[:3, :3].T + m[:3, 3]


def depth_to_points(depth_mm: np.ndarray, cam: CameraIntrinsics) -> np.ndarray:
    """(H, W) z-depth mm -> (H, W, 3) points in C, mm (zeros where depth is 0)."""
    h, w = depth_mm.shape
    u, v = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    z = depth_mm.astype(np.float32)
    return np.stack([(u - cam.cx) / cam.fx * z, (v - cam.cy) / cam.fy * z, z], -1)


def valid_depth_to_scanner(depth_mm: np.ndarray, cam: CameraIntrinsics,
                           camera_to_scanner: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pixels with depth (> 0) of an (H, W) z-depth image in mm, as points in S.

    Returns rows (N,), cols (N,) and points (N, 3) float32, mm, frame S. Only the valid
    pixels and in float32 (float32 keeps 0.001 mm at the room's distances), the rigid
    transform by OpenCV: at 1280x720 ``depth_to_points`` then ``transform`` over the
    full image in float64 take 13 ms, this 7 ms (fastest of 10, 2026-11-28).
    """
    import cv2

    flat = np.flatnonzero(depth_mm > 0)
    rows, cols = np.divmod(flat, depth_mm.shape[1])
    z = depth_mm.ravel()[flat].astype(np.float32)
    # Each pixel's ray at unit depth, scaled by its depth: p_C = (x z, y z, z).
    rx = (np.arange(depth_mm.shape[1], dtype=np.float32) - np.float32(cam.cx)) / np.float32(cam.fx)
    ry = (np.arange(depth_mm.shape[0], dtype=np.float32) - np.float32(cam.cy)) / np.float32(cam.fy)
    p_c = np.empty((len(z), 3), np.float32)
    np.multiply(rx[cols], z, out=p_c[:, 0])
    np.multiply(ry[rows], z, out=p_c[:, 1])
    p_c[:, 2] = z
    m = np.asarray(camera_to_scanner, np.float32)[:3]
    return rows, cols, cv2.transform(p_c.reshape(-1, 1, 3), m).reshape(-1, 3)


def project(points_s: np.ndarray, camera_to_scanner: np.ndarray, cam: CameraIntrinsics) -> np.ndarray:
    """(..., 3) points in S -> (..., 2) pixel coordinates (u, v); NaN behind the camera."""
    p = transform(points_s, np.linalg.inv(camera_to_scanner))
    z = np.where(p[..., 2] > 1e-6, p[..., 2], np.nan)
    return np.stack([cam.fx * p[..., 0] / z + cam.cx, cam.fy * p[..., 1] / z + cam.cy], -1)
