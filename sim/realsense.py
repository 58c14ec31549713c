"""The simulator as a RealSense camera: simulated frames fed through librealsense's software device.

``SimulatedSource`` is a ``positioning.camera.FrameSource``: frames leave it through
real librealsense frame queues as librealsense frames, and can be recorded to a
``.db3`` file that ``RecordingSource`` plays back frame by frame.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from positioning.camera import CameraError, Frame, intrinsics_from_rs
from positioning.capture import Capture, CameraIntrinsics

log = logging.getLogger("ctpos.sim.realsense")
FPS = 30


def _rs_intrinsics(cam: CameraIntrinsics):
    import pyrealsense2 as rs

    i = rs.intrinsics()
    i.width, i.height, i.fx, i.fy, i.ppx, i.ppy = cam.width, cam.height, cam.fx, cam.fy, cam.cx, cam.cy
    i.model = rs.distortion.none
    i.coeffs = [0.0] * 5
    return i


class SimulatedSource:
    """Frames of simulated captures through ``rs.software_device``; optionally recorded to ``record_to``.

    captures: the captures to play, in order (all of one camera). The software
    device gets the first capture's intrinsics; colour is registered to depth.
    """

    def __init__(self, captures: Iterable[Capture], serial: str = "SIM-D455-0001",
                 record_to: str | Path | None = None) -> None:
        self._captures: Iterator[Capture] = iter(captures)
        self.serial = serial
        self.record_to = Path(record_to) if record_to else None
        self._first: Capture | None = None
        self._n = 0
        self._dev = self._rec = None
        self._queues: list = []
        self._sensors: list = []

    def start(self) -> None:
        import pyrealsense2 as rs

        try:
            self._first = next(self._captures)
        except StopIteration:
            raise CameraError("simulated source has no captures") from None
        cam = self._camera = self._first.camera
        dev = rs.software_device()
        dev.register_info(rs.camera_info.serial_number, self.serial)
        dev.register_info(rs.camera_info.name, "ctpos simulated D455")
        depth_s, color_s = dev.add_sensor("Depth"), dev.add_sensor("Color")
        streams = []
        for sensor, kind, fmt, bpp, uid in ((depth_s, rs.stream.depth, rs.format.z16, 2, 0),
                                             (color_s, rs.stream.color, rs.format.rgb8, 3, 1)):
            vs = rs.video_stream()
            vs.type, vs.index, vs.uid, vs.width, vs.height = kind, 0, uid, cam.width, cam.height
            vs.fps, vs.bpp, vs.fmt, vs.intrinsics = FPS, bpp, fmt, _rs_intrinsics(cam)
            streams.append(sensor.add_video_stream(vs, True))
        depth_s.add_read_only_option(rs.option.depth_units, float(cam.depth_scale))
        ident = rs.extrinsics()
        ident.rotation, ident.translation = [1, 0, 0, 0, 1, 0, 0, 0, 1], [0, 0, 0]
        streams[0].register_extrinsics_to(streams[1], ident)
        self._dev, self._src_sensors, self._profiles = dev, (depth_s, color_s), streams
        if self.record_to is not None:
            self.record_to.parent.mkdir(parents=True, exist_ok=True)
            self.record_to.unlink(missing_ok=True)
            self._rec = rs.recorder(str(self.record_to), dev)
            names = {s.get_info(rs.camera_info.name): s for s in self._rec.query_sensors()}
            self._sensors = [names["Depth"], names["Color"]]
        else:
            self._sensors = list(dev.query_sensors())
        # One librealsense frame queue per stream: each pushed frame comes straight back,
        # whereas a syncer holds a frameset until the next one arrives.
        self._queues = [rs.frame_queue(4, keep_frames=True), rs.frame_queue(4, keep_frames=True)]
        for s, prof, q in zip(self._sensors, streams, self._queues):
            s.open(prof)
            s.start(q)
        self._depth_scale = float(cam.depth_scale)

    def _push(self, cap: Capture) -> None:
        import pyrealsense2 as rs

        ts = self._n * 1000.0 / FPS
        for sensor, prof, pixels, bpp in ((self._src_sensors[0], self._profiles[0], cap.depth, 2),
                                          (self._src_sensors[1], self._profiles[1], cap.color, 3)):
            f = rs.software_video_frame()
            f.pixels = np.ascontiguousarray(pixels)
            f.bpp, f.stride = bpp, cap.camera.width * bpp
            f.timestamp, f.domain, f.frame_number = ts, rs.timestamp_domain.hardware_clock, self._n
            f.profile = prof.as_video_stream_profile()
            if bpp == 2:
                f.depth_units = self._depth_scale
            sensor.on_video_frame(f)

    def read(self, timeout_s: float = 2.0) -> Frame:
        if not self._sensors:
            raise CameraError("simulated source is not started")
        cap = self._first if self._first is not None else next(self._captures, None)
        self._first = None
        if cap is None:
            raise CameraError("simulated source has no more captures")
        if cap.color is None:
            raise CameraError(f"{cap.name}: a simulated frame needs a colour image")
        if cap.camera != self._camera:
            raise CameraError(f"{cap.name}: intrinsics differ from the simulated camera's; one source is one camera")
        self._push(cap)
        try:
            d = self._queues[0].wait_for_frame(int(timeout_s * 1000)).as_depth_frame()
            c = self._queues[1].wait_for_frame(int(timeout_s * 1000)).as_video_frame()
        except RuntimeError as exc:
            raise CameraError(f"no simulated frame within {timeout_s:.1f} s ({exc})") from None
        self._n += 1
        cam = intrinsics_from_rs(d.profile, self._depth_scale)
        return Frame(np.asanyarray(d.get_data()).copy(), np.asanyarray(c.get_data()).copy(), cam,
                     float(d.get_timestamp()), int(d.get_frame_number()), self.serial)

    def stop(self) -> None:
        for s in self._sensors:
            s.stop()
            s.close()
        # The recording is written out when the recorder and its sensors are released.
        self._sensors, self._rec, self._queues, self._dev = [], None, [], None
