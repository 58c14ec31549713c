"""The camera sources through a real librealsense: software device, recording, pipeline playback."""
from __future__ import annotations

import dataclasses
import gc
import time

import numpy as np
import pytest

from positioning.camera import CameraError, RecordingSource
from positioning.capture import read_capture
from sim.realsense import SimulatedSource


def _one_camera(sim_cases):
    """The sim cases as if seen by one camera (a source is one device with one set of intrinsics)."""
    caps = [read_capture(c) for c in sim_cases]
    return [dataclasses.replace(c, camera=caps[0].camera) for c in caps]


def test_simulated_frames_record_and_play_back_exactly(sim_cases, tmp_path):
    caps = _one_camera(sim_cases)
    rec = tmp_path / "session.db3"
    src = SimulatedSource(caps, serial="SIM-TEST-1", record_to=rec)
    src.start()
    live = [src.read() for _ in caps]
    with pytest.raises(CameraError, match="no more captures"):
        src.read()
    src.stop()
    gc.collect()
    for f, c in zip(live, caps):
        assert (f.depth == c.depth).all() and (f.color == c.color).all()
        assert abs(f.camera.fx - c.camera.fx) < 1e-3 and f.serial == "SIM-TEST-1"
    assert rec.stat().st_size > 0

    play = RecordingSource(rec)
    play.start()
    back = [play.read() for _ in caps]
    with pytest.raises(CameraError, match="end of recording"):
        play.read(timeout_s=0.5)
    play.stop()
    for f, c in zip(back, caps):
        assert (f.depth == c.depth).all() and (f.color == c.color).all()
        assert f.serial == "SIM-TEST-1"
        assert abs(f.camera.cx - c.camera.cx) < 1e-3 and abs(f.camera.depth_scale - 0.001) < 1e-9
    # The capture a frame turns into is the same as the simulated one.
    cap = back[0].to_capture(caps[0].scene)
    assert cap.depth.dtype == caps[0].depth.dtype and cap.camera.width == caps[0].camera.width


def test_a_slow_reader_loses_no_recorded_frame(sim_cases, tmp_path):
    """Playback waits for its reader: nothing is dropped when frames are taken late."""
    caps = _one_camera(sim_cases)
    rec = tmp_path / "slow.db3"
    src = SimulatedSource(caps, record_to=rec)
    src.start()
    for _ in caps:
        src.read()
    src.stop()
    gc.collect()
    play = RecordingSource(rec)
    play.start()
    back = []
    for _ in caps:
        time.sleep(0.3)  # longer than the recording's 33 ms frame interval
        back.append(play.read())
    play.stop()
    assert [f.frame_number for f in back] == list(range(len(caps)))
    assert all((f.depth == c.depth).all() for f, c in zip(back, caps))


def _played_back(cap, rec, filters: bool):
    """One capture recorded through the software device and played back, with or without librealsense's filters."""
    src = SimulatedSource([cap], record_to=rec)
    src.start()
    src.read()
    src.stop()
    gc.collect()
    play = RecordingSource(rec, filters=filters)
    play.start()
    f = play.read()
    play.stop()
    return f


def test_librealsense_filters_fill_holes_in_playback(sim_cases, tmp_path):
    cap = read_capture(sim_cases[0])
    f = _played_back(cap, tmp_path / "one.db3", filters=True)
    assert (f.depth > 0).mean() > (cap.depth > 0).mean() + 0.01


def test_sources_hand_the_planner_raw_depth_unless_filters_are_asked_for(sim_cases, tmp_path):
    """librealsense's spatial filter moves a patient's surface about 4 mm (docs/perception.md): plans get raw depth."""
    from positioning.camera import RealSenseSource

    cap = read_capture(sim_cases[0])
    assert np.array_equal(_played_back(cap, tmp_path / "one.db3", filters=False).depth, cap.depth)
    assert RealSenseSource(serial="ANY").filters is False  # the constructor does no I/O


def test_a_second_camera_in_one_source_is_refused(sim_cases):
    caps = [read_capture(c) for c in sim_cases[:2]]
    src = SimulatedSource(caps)
    src.start()
    src.read()
    with pytest.raises(CameraError, match="intrinsics differ"):
        src.read()
    src.stop()


def test_missing_recording_is_refused(tmp_path):
    with pytest.raises(CameraError, match="recording not found"):
        RecordingSource(tmp_path / "none.db3").start()


def test_corrupt_recording_is_refused(tmp_path):
    bad = tmp_path / "bad.db3"
    bad.write_bytes(b"SQLite format 3\x00" + b"\x00" * 100)
    with pytest.raises(CameraError, match="cannot start"):
        RecordingSource(bad).start()


def test_an_absent_live_camera_is_refused_in_one_line():
    """librealsense's own device list, asked for a camera that is not attached (none is, here)."""
    from positioning.camera import RealSenseSource

    cam = RealSenseSource(serial="NO-SUCH-CAMERA-0000")
    with pytest.raises(CameraError, match="not started"):
        cam.read()
    with pytest.raises(CameraError, match="no RealSense camera is connected|NO-SUCH-CAMERA-0000 is not connected"):
        cam.start()
