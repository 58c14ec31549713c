"""Camera sources: live RealSense, a recording, or the simulator, behind one interface.

All three go through librealsense: a live camera through ``rs.pipeline``, a
recording (``.db3`` / ``.bag``) through its playback device and ``rs.syncer``,
the simulator through ``rs.software_device`` (``sim/realsense.py``). Code above
a source gets ``Frame`` objects and cannot tell which it was. This is an I/O
edge; the core never imports it.

Live and recorded frames share one processing path: librealsense's own depth
post-processing (spatial, temporal, hole-filling filters; off unless asked for)
and alignment of depth to the colour camera (``rs.align``). The planner is
measured on raw depth: librealsense's spatial filter moves a patient's surface
4 mm further from the camera at the median, and on 55 held-out captures it moved
the plans' table height by -4.4 mm (median; docs/perception.md, "The camera's own filters").
"""
from __future__ import annotations

import logging
import time
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


def _registered(depth_profile, color_profile) -> bool:
    """True when depth is already registered to colour (same intrinsics, identity extrinsics):
    re-projecting it through rs.align would only punch rounding holes into it."""
    if color_profile is None:
        return True  # no colour stream: nothing to align to
    d, c = depth_profile.as_video_stream_profile(), color_profile.as_video_stream_profile()
    e = d.get_extrinsics_to(c)
    di, ci = d.get_intrinsics(), c.get_intrinsics()
    same = (di.width, di.height, di.fx, di.fy, di.ppx, di.ppy) == (ci.width, ci.height, ci.fx, ci.fy, ci.ppx, ci.ppy)
    return same and np.allclose(e.rotation, np.eye(3).ravel()) and np.allclose(e.translation, 0)


class _RsSource(ABC):
    """Shared path of live and recorded frames: optional librealsense filters, depth aligned to colour."""

    def __init__(self, filters: bool = False) -> None:
        self.filters = filters
        self._align = None
        self._filters: list = []
        self._depth_scale = 0.001
        self._serial = ""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def read(self, timeout_s: float = 2.0) -> Frame: ...

    @abstractmethod
    def stop(self) -> None: ...

    def _prepare(self, device, depth_profile, color_profile) -> None:
        """Read the device's serial and depth scale; set up alignment and filters for its streams."""
        import pyrealsense2 as rs

        self._serial = device.get_info(rs.camera_info.serial_number) \
            if device.supports(rs.camera_info.serial_number) else ""
        self._depth_scale = device.first_depth_sensor().get_depth_scale()
        self._align = None if _registered(depth_profile, color_profile) else rs.align(rs.stream.color)
        # Intel's recommended order: spatial, temporal, then hole filling, in disparity space for the first two.
        self._filters = [rs.disparity_transform(True), rs.spatial_filter(), rs.temporal_filter(),
                         rs.disparity_transform(False), rs.hole_filling_filter()] if self.filters else []

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


class RealSenseSource(_RsSource):
    """A live RealSense camera (D4xx) through rs.pipeline: depth and colour at the same resolution,
    depth aligned to colour.

    Needs a camera on USB; none is attached on the development and CI machines.
    """

    def __init__(self, serial: str | None = None, width: int = 848, height: int = 480, fps: int = 30,
                 filters: bool = False) -> None:
        super().__init__(filters)
        self.serial, self.width, self.height, self.fps = serial, width, height, fps
        self._pipe = None

    def start(self) -> None:
        import pyrealsense2 as rs

        # Asked first: a pipeline waits 15 s for a camera that is not there before it says so.
        attached = [d.get_info(rs.camera_info.serial_number) for d in rs.context().query_devices()]
        if not attached:
            raise CameraError("no RealSense camera is connected")
        if self.serial and self.serial not in attached:
            raise CameraError(f"RealSense camera {self.serial} is not connected (connected: {', '.join(attached)})")
        cfg = rs.config()
        if self.serial:
            cfg.enable_device(self.serial)
        cfg.enable_stream(rs.stream.depth, self.width, self.height, rs.format.z16, self.fps)
        cfg.enable_stream(rs.stream.color, self.width, self.height, rs.format.rgb8, self.fps)
        self._pipe = rs.pipeline()
        try:
            profile = self._pipe.start(cfg)
        except RuntimeError as exc:
            self._pipe = None
            raise CameraError(f"cannot start the camera pipeline: {exc}") from None
        self._prepare(profile.get_device(), profile.get_stream(rs.stream.depth), profile.get_stream(rs.stream.color))

    def read(self, timeout_s: float = 2.0) -> Frame:
        if self._pipe is None:
            raise CameraError("camera source is not started")
        try:
            frames = self._pipe.wait_for_frames(int(timeout_s * 1000))
        except RuntimeError as exc:
            raise CameraError(f"no frame within {timeout_s:.1f} s ({exc})") from None
        return self._process(frames)

    def stop(self) -> None:
        if self._pipe is not None:
            self._pipe.stop()
            self._pipe = None


class RecordingSource(_RsSource):
    """A librealsense recording (.db3 or .bag): every recorded frame, in order, as fast as it is read.

    Not through rs.pipeline: a pipeline starts a recording in real time and keeps one
    frameset, so frames played before ``set_real_time(False)`` can land are lost (CI
    lost the first of three that way). Here the playback device is made non-real-time
    before any sensor starts; ``rs.syncer`` pairs depth with colour, and a processing
    block holds each stream's latest frame, as the pipeline does, so every set is whole.
    """

    _POLL_MS = 50  # how long one wait on the syncer may block, so that read() keeps its deadline

    def __init__(self, path: str | Path, filters: bool = False) -> None:
        super().__init__(filters)
        self.path = Path(path)
        self._playback = None
        self._sensors: list = []
        self._sync = self._sets = self._aggregate = None

    def start(self) -> None:
        import pyrealsense2 as rs

        if not self.path.is_file():
            raise CameraError(f"{self.path}: recording not found")
        try:
            dev = rs.context().load_device(str(self.path))
        except RuntimeError as exc:
            raise CameraError(f"{self.path.name}: cannot start playback ({exc})") from None
        self._playback = dev.as_playback()
        self._playback.set_real_time(False)
        profiles = {p.stream_type(): p for s in dev.query_sensors() for p in s.get_stream_profiles()}
        if rs.stream.depth not in profiles:
            raise CameraError(f"{self.path.name}: the recording holds no depth stream")
        self._prepare(dev, profiles[rs.stream.depth], profiles.get(rs.stream.color))
        streams = {p.unique_id() for p in profiles.values()}
        latest: dict = {}

        def aggregate(frame, source) -> None:
            for f in frame.as_frameset():
                latest[f.profile.unique_id()] = f
            if latest.keys() >= streams:
                source.frame_ready(source.allocate_composite_frame(list(latest.values())))

        self._aggregate = rs.processing_block(aggregate)
        self._sets = rs.frame_queue(2, keep_frames=True)
        self._aggregate.start(self._sets)
        self._sync = rs.syncer()
        self._sensors = [s for s in dev.query_sensors() if s.get_stream_profiles()]
        for s in self._sensors:
            s.open(s.get_stream_profiles())
            s.start(self._sync)

    def read(self, timeout_s: float = 2.0) -> Frame:
        import pyrealsense2 as rs

        if self._sync is None:
            raise CameraError("recording is not started")
        deadline = time.monotonic() + timeout_s
        while True:
            ok, frames = self._sets.try_wait_for_frame(0)
            if ok:
                return self._process(frames.as_frameset())
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            ok, frames = self._sync.try_wait_for_frames(min(left_ms, self._POLL_MS))
            if ok:
                self._aggregate.invoke(frames)
        if self._playback.current_status() == rs.playback_status.stopped:
            raise CameraError(f"{self.path.name}: end of recording")
        raise CameraError(f"{self.path.name}: no frame within {timeout_s:.1f} s")

    def stop(self) -> None:
        for s in self._sensors:
            s.stop()
            s.close()
        self._sensors, self._sync, self._sets, self._aggregate, self._playback = [], None, None, None, None
