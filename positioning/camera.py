"""Camera sources: live RealSense, a recording, or the simulator, behind one interface.

All three go through librealsense: a live camera and a recording (``.db3`` /
``.bag``) through ``rs.pipeline``, the simulator through ``rs.software_device``
(``sim/realsense.py``). Code above a source gets ``Frame`` objects and cannot
tell which it was. This is an I/O edge; the core never imports it.

Live and recorded frames share one processing path: librealsense's own depth
post-processing (spatial, temporal, hole-filling filters; optional) and
alignment of depth to the colour camera (``rs.align``).
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from positioning.capture import CameraIntrinsics, Capture, SceneState

log = logging.getLogger("ctpos.camera")


class CameraError(Exception):
    """A camera or recording cannot deliver frames; the message says why in one line."""


@dataclass(frozen=True)
class Frame:
    """One RGB-D frame: depth (H, W) uint16 in camera units, colour (H, W, 3) uint8 RGB registered to it."""

    depth: np.ndarray
    color: np.ndarray | None
    camera: CameraIntrinsics
    timestamp_ms: float
    frame_number: int
    serial: str

    def to_capture(self, scene: SceneState, name: str = "") -> Capture:
        """The frame as a capture, given where the camera and the table were (calibration, table readout)."""
        return Capture(depth=self.depth, color=self.color, camera=self.camera, scene=scene, name=name)


class FrameSource(Protocol):
    """What every camera source offers."""

    def start(self) -> None: ...

    def read(self, timeout_s: float = 2.0) -> Frame: ...

    def stop(self) -> None: ...


def intrinsics_from_rs(profile, depth_scale: float) -> CameraIntrinsics:
    """CameraIntrinsics from a librealsense video stream profile."""
    i = profile.as_video_stream_profile().get_intrinsics()
    return CameraIntrinsics(i.width, i.height, i.fx, i.fy, i.ppx, i.ppy, float(depth_scale))


def _registered(profile) -> bool:
    """True when depth is already registered to colour (same intrinsics, identity extrinsics):
    re-projecting it through rs.align would only punch rounding holes into it."""
    import pyrealsense2 as rs

    try:
        d = profile.get_stream(rs.stream.depth).as_video_stream_profile()
        c = profile.get_stream(rs.stream.color).as_video_stream_profile()
    except RuntimeError:
        return True  # no colour stream: nothing to align to
    e = d.get_extrinsics_to(c)
    di, ci = d.get_intrinsics(), c.get_intrinsics()
    same = (di.width, di.height, di.fx, di.fy, di.ppx, di.ppy) == (ci.width, ci.height, ci.fx, ci.fy, ci.ppx, ci.ppy)
    return same and np.allclose(e.rotation, np.eye(3).ravel()) and np.allclose(e.translation, 0)


class _PipelineSource(ABC):
    """Shared path of live and recorded frames: rs.pipeline, optional filters, depth aligned to colour."""

    def __init__(self, filters: bool = True) -> None:
        self.filters = filters
        self._pipe = None
        self._align = None
        self._filters: list = []
        self._depth_scale = 0.001
        self._serial = ""

    @abstractmethod
    def _config(self):
        """The rs.config saying where this source's frames come from."""

    def start(self) -> None:
        import pyrealsense2 as rs

        self._pipe = rs.pipeline()
        try:
            profile = self._pipe.start(self._config())
        except RuntimeError as exc:
            self._pipe = None
            raise CameraError(f"cannot start the camera pipeline: {exc}") from None
        dev = profile.get_device()
        self._serial = dev.get_info(rs.camera_info.serial_number) if dev.supports(rs.camera_info.serial_number) else ""
        ds = dev.first_depth_sensor()
        self._depth_scale = ds.get_depth_scale()
        self._after_start(dev)
        self._align = None if _registered(profile) else rs.align(rs.stream.color)
        # Intel's recommended order: spatial, temporal, then hole filling, in disparity space for the first two.
        self._filters = [rs.disparity_transform(True), rs.spatial_filter(), rs.temporal_filter(),
                         rs.disparity_transform(False), rs.hole_filling_filter()] if self.filters else []

    def _after_start(self, device) -> None:
        """Hook for a source to adjust its device once started (a recording turns off real-time playback)."""

    def read(self, timeout_s: float = 2.0) -> Frame:
        if self._pipe is None:
            raise CameraError("camera source is not started")
        try:
            frames = self._pipe.wait_for_frames(int(timeout_s * 1000))
        except RuntimeError as exc:
            raise CameraError(f"no frame within {timeout_s:.1f} s ({exc})") from None
        return self._process(frames)

    def _process(self, frames) -> Frame:
        has_color = bool(frames.get_color_frame())
        if has_color and self._align is not None:
            frames = self._align.process(frames)
        depth = frames.get_depth_frame()
        if not depth:
            raise CameraError("frameset holds no depth frame")
        for f in self._filters:
            depth = f.process(depth)
        depth = depth.as_depth_frame()
        color = frames.get_color_frame() if has_color else None
        cam = intrinsics_from_rs(depth.profile, self._depth_scale)
        d = np.asanyarray(depth.get_data()).copy()
        c = np.asanyarray(color.get_data()).copy() if color else None
        if c is not None and color.profile.format().name == "bgr8":
            c = c[..., ::-1].copy()
        return Frame(d, c, cam, float(depth.get_timestamp()), int(depth.get_frame_number()), self._serial)

    def stop(self) -> None:
        if self._pipe is not None:
            self._pipe.stop()
            self._pipe = None


class RealSenseSource(_PipelineSource):
    """A live RealSense camera (D4xx): depth and colour at the same resolution, depth aligned to colour.

    Needs a camera on USB; none is attached on the development and CI machines.
    """

    def __init__(self, serial: str | None = None, width: int = 848, height: int = 480, fps: int = 30,
                 filters: bool = True) -> None:
        super().__init__(filters)
        self.serial, self.width, self.height, self.fps = serial, width, height, fps

    def _config(self):
        import pyrealsense2 as rs

        cfg = rs.config()
        if self.serial:
            cfg.enable_device(self.serial)
        cfg.enable_stream(rs.stream.depth, self.width, self.height, rs.format.z16, self.fps)
        cfg.enable_stream(rs.stream.color, self.width, self.height, rs.format.rgb8, self.fps)
        return cfg


class RecordingSource(_PipelineSource):
    """A librealsense recording (.db3 or .bag) played back through rs.pipeline, as fast as it is read."""

    def __init__(self, path: str | Path, filters: bool = False) -> None:
        super().__init__(filters)
        self.path = Path(path)

    def _config(self):
        import pyrealsense2 as rs

        if not self.path.is_file():
            raise CameraError(f"{self.path}: recording not found")
        cfg = rs.config()
        cfg.enable_device_from_file(str(self.path), repeat_playback=False)
        return cfg

    def _after_start(self, device) -> None:
        device.as_playback().set_real_time(False)
