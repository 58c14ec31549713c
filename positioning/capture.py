"""The capture folder of CONVENTIONS.md: read, validate, write.

This is an I/O edge: everything past ``read_capture`` works on the ``Capture``
dataclass. Every problem with a folder raises ``CaptureError`` whose message is
one line naming the file and the reason.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CAMERA_KEYS = ("width", "height", "fx", "fy", "cx", "cy", "depth_scale")
SCENE_KEYS = ("camera_to_scanner", "table_height_mm", "table_longitudinal_mm")


class CaptureError(Exception):
    """A capture folder is missing, corrupt or inconsistent. The message is one line."""


@dataclass(frozen=True)
class CameraIntrinsics:
    """Pinhole intrinsics of the depth image (colour is registered to it). Pixels; depth_scale in m/unit."""

    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float
    depth_scale: float = 0.001

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in CAMERA_KEYS}


@dataclass(frozen=True)
class SceneState:
    """Where the camera is and where the table was when the frame was taken.

    camera_to_scanner: (4, 4) float64, maps a point in C (mm) to S (mm).
    table_height_mm: DICOM Table Height, tabletop below the isocenter.
    table_longitudinal_mm: y_S of the table frame's origin.
    """

    camera_to_scanner: np.ndarray
    table_height_mm: float
    table_longitudinal_mm: float

    def to_json(self) -> dict[str, Any]:
        return {"camera_to_scanner": np.asarray(self.camera_to_scanner).tolist(),
                "table_height_mm": float(self.table_height_mm),
                "table_longitudinal_mm": float(self.table_longitudinal_mm)}


@dataclass(frozen=True)
class Capture:
    """One RGB-D frame of the table. depth (H, W) uint16 in camera units; color (H, W, 3) uint8 RGB or None."""

    depth: np.ndarray
    color: np.ndarray | None
    camera: CameraIntrinsics
    scene: SceneState
    name: str = ""

    def depth_mm(self) -> np.ndarray:
        """(H, W) float32 depth along +z_C in mm; 0 where there is no data."""
        return self.depth.astype(np.float32) * np.float32(self.camera.depth_scale * 1000.0)


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name}")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CaptureError(f"{path}: missing")
    try:
        # JSON is UTF-8 (RFC 8259); a byte-order mark, which some Windows tools write, is allowed and skipped.
        data = json.loads(path.read_text(encoding="utf-8-sig"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise CaptureError(f"{path}: not text") from None
    except ValueError as exc:
        raise CaptureError(f"{path}: not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CaptureError(f"{path}: expected a JSON object")
    return data


def _number(path: Path, data: dict[str, Any], key: str) -> float:
    if key not in data:
        raise CaptureError(f"{path}: '{key}' is missing")
    v = data[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise CaptureError(f"{path}: '{key}' must be a finite number, got {v!r}")
    return float(v)


def parse_intrinsics(path: Path, data: dict[str, Any]) -> CameraIntrinsics:
    vals = {k: _number(path, data, k) for k in CAMERA_KEYS}
    for k in ("width", "height"):
        if vals[k] != int(vals[k]) or vals[k] <= 0:
            raise CaptureError(f"{path}: '{k}' must be a positive integer")
    for k in ("fx", "fy", "depth_scale"):
        if vals[k] <= 0:
            raise CaptureError(f"{path}: '{k}' must be positive")
    return CameraIntrinsics(int(vals["width"]), int(vals["height"]), vals["fx"], vals["fy"], vals["cx"], vals["cy"],
                            vals["depth_scale"])


def parse_rigid(path: Path, key: str, value: Any) -> np.ndarray:
    """A 4x4 rigid transform from nested lists; rejects anything else with a reason."""
    try:
        m = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise CaptureError(f"{path}: '{key}' is not a 4x4 matrix of numbers") from None
    if m.shape != (4, 4):
        raise CaptureError(f"{path}: '{key}' has shape {m.shape}, expected 4x4")
    if not np.isfinite(m).all():
        raise CaptureError(f"{path}: '{key}' holds non-finite numbers")
    r = m[:3, :3]
    if not np.allclose(m[3], [0, 0, 0, 1], atol=1e-9) or not np.allclose(r @ r.T, np.eye(3), atol=1e-4) \
            or np.linalg.det(r) < 0:
        raise CaptureError(f"{path}: '{key}' is not a rigid transform (rotation and translation)")
    return m


def parse_scene(path: Path, data: dict[str, Any]) -> SceneState:
    if "camera_to_scanner" not in data:
        raise CaptureError(f"{path}: 'camera_to_scanner' is missing")
    m = parse_rigid(path, "camera_to_scanner", data["camera_to_scanner"])
    return SceneState(m, _number(path, data, "table_height_mm"), _number(path, data, "table_longitudinal_mm"))


def _read_png(path: Path) -> np.ndarray:
    import cv2

    if not path.is_file():
        raise CaptureError(f"{path}: missing")
    raw = np.fromfile(path, dtype=np.uint8)
    img = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) if raw.size else None
    if img is None:
        raise CaptureError(f"{path}: not a readable PNG image")
    return img


def read_capture(folder: str | Path, colour: bool = True) -> Capture:
    """Read and validate a capture folder. Never reads truth.json.

    colour: read color.png too (when there is one); a caller that plans from depth alone skips it (its decoding
    took 7-9 ms of a fresh plan here).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CaptureError(f"{folder}: capture folder not found")
    cam = parse_intrinsics(folder / "camera.json", _read_json(folder / "camera.json"))
    scene = parse_scene(folder / "scene.json", _read_json(folder / "scene.json"))
    dpath = folder / "depth.png"
    depth = _read_png(dpath)
    if depth.dtype != np.uint16 or depth.ndim != 2:
        raise CaptureError(f"{dpath}: depth must be a 16-bit single-channel PNG, got {depth.dtype} "
                           f"with {1 if depth.ndim == 2 else depth.shape[2]} channel(s)")
    if depth.shape != (cam.height, cam.width):
        raise CaptureError(f"{dpath}: size {depth.shape[1]}x{depth.shape[0]} does not match camera.json "
                           f"{cam.width}x{cam.height}")
    color = None
    cpath = folder / "color.png"
    if colour and cpath.exists():
        import cv2

        img = _read_png(cpath)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] not in (3, 4):
            raise CaptureError(f"{cpath}: colour must be an 8-bit RGB PNG")
        if img.shape[:2] != depth.shape:
            raise CaptureError(f"{cpath}: size {img.shape[1]}x{img.shape[0]} does not match depth.png "
                               f"{depth.shape[1]}x{depth.shape[0]}")
        color = cv2.cvtColor(img[..., :3], cv2.COLOR_BGR2RGB)
    return Capture(depth=depth, color=color, camera=cam, scene=scene, name=folder.name)


def read_truth(folder: str | Path) -> dict[str, Any]:
    """The simulator's ground truth of a capture (for evaluation only; the planner never calls this)."""
    return _read_json(Path(folder) / "truth.json")


def write_capture(folder: str | Path, capture: Capture, truth: dict[str, Any] | None = None) -> Path:
    """Write a capture folder (and truth.json when given); returns the folder."""
    import cv2

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if capture.depth.dtype != np.uint16:
        raise ValueError("depth must be uint16")
    cv2.imwrite(str(folder / "depth.png"), capture.depth)
    if capture.color is not None:
        cv2.imwrite(str(folder / "color.png"), cv2.cvtColor(capture.color, cv2.COLOR_RGB2BGR))
    (folder / "camera.json").write_text(json.dumps(capture.camera.to_json(), indent=1) + "\n")
    (folder / "scene.json").write_text(json.dumps(capture.scene.to_json(), indent=1) + "\n")
    if truth is not None:
        (folder / "truth.json").write_text(json.dumps(truth, indent=1, allow_nan=False) + "\n")
    return folder
