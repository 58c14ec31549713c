"""The calibration file: versioned JSON with a checksum, and its strict loader.

Layout (version 1)::

    {"format": "ctpos-calibration", "version": 1,
     "camera_serial": "...", "created": "2026-11-23T07:50:00Z",
     "camera_to_scanner": [[4x4]], "intrinsics": {camera.json keys},
     "board": {BoardSpec}, "board_yaw_deg": ..., "table_positions": [[height, longitudinal], ...],
     "report": {quality report}, "forced": false,
     "sha256": "<hex of the canonical JSON of every other key>"}

Loading refuses, with a one-line reason: a missing or unreadable file, a wrong
format or unknown version, a checksum mismatch (edited or corrupted), a camera
serial other than the one in use, and a matrix that is not rigid.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibration.board import BoardSpec
from positioning.capture import CameraIntrinsics, CaptureError, parse_intrinsics, parse_rigid

FORMAT = "ctpos-calibration"
VERSION = 1


class CalibrationFileError(Exception):
    """A calibration file cannot be used; the message says why in one line."""


@dataclass(frozen=True)
class Calibration:
    """A stored calibration. camera_to_scanner (4, 4) maps C (mm) to S (mm)."""

    camera_to_scanner: np.ndarray
    intrinsics: CameraIntrinsics
    camera_serial: str
    created: str
    board: BoardSpec
    board_yaw_deg: float
    table_positions: list[tuple[float, float]]
    report: dict
    forced: bool = False


def _checksum(doc: dict) -> str:
    body = {k: v for k, v in doc.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_calibration(path: str | Path, cal: Calibration) -> Path:
    """Write atomically (temp file, fsync, rename): a crash never leaves half a calibration."""
    path = Path(path)
    doc = {
        "format": FORMAT, "version": VERSION, "camera_serial": cal.camera_serial, "created": cal.created,
        "camera_to_scanner": np.asarray(cal.camera_to_scanner).tolist(), "intrinsics": cal.intrinsics.to_json(),
        "board": cal.board.to_json(), "board_yaw_deg": cal.board_yaw_deg,
        "table_positions": [list(p) for p in cal.table_positions], "report": cal.report, "forced": cal.forced,
    }
    doc["sha256"] = _checksum(doc)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(doc, indent=1, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_calibration(path: str | Path, expect_serial: str | None = None) -> Calibration:
    """Read and verify a calibration file (see module doc for what is refused)."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationFileError(f"{path}: calibration file not found; run 'ctpos calibrate' first")
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"),
                         parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except (ValueError, UnicodeDecodeError):
        raise CalibrationFileError(f"{path}: not a readable calibration file (corrupt JSON)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CalibrationFileError(f"{path}: not a ctpos calibration file")
    if doc.get("version") != VERSION:
        raise CalibrationFileError(f"{path}: calibration version {doc.get('version')!r} is not supported "
                                   f"(this ctpos reads version {VERSION})")
    if doc.get("sha256") != _checksum(doc):
        raise CalibrationFileError(f"{path}: checksum mismatch: the file was edited or corrupted; recalibrate")
    serial = str(doc.get("camera_serial", ""))
    if expect_serial is not None and serial != expect_serial:
        raise CalibrationFileError(f"{path}: calibration is for camera {serial!r}, but camera {expect_serial!r} "
                                   f"is connected; recalibrate")
    try:
        m = parse_rigid(path, "camera_to_scanner", doc["camera_to_scanner"])
        intr = parse_intrinsics(path, doc["intrinsics"])
        board = BoardSpec.from_json(doc["board"])
    except CaptureError as exc:
        raise CalibrationFileError(str(exc)) from None
    except (KeyError, TypeError):
        raise CalibrationFileError(f"{path}: calibration file is missing fields") from None
    return Calibration(m, intr, serial, str(doc.get("created", "")), board, float(doc.get("board_yaw_deg", 0.0)),
                       [tuple(p) for p in doc.get("table_positions", [])], doc.get("report", {}),
                       bool(doc.get("forced", False)))


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
