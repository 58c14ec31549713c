"""Capture folders: round trip, and every kind of bad folder refused with a one-line reason naming the file."""
from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

from positioning.capture import CaptureError, read_capture, write_capture


def test_round_trip_is_exact(sim_cases, tmp_path):
    cap = read_capture(sim_cases[0])
    out = write_capture(tmp_path / "copy", cap)
    again = read_capture(out)
    assert (again.depth == cap.depth).all() and (again.color == cap.color).all()
    assert again.camera == cap.camera
    np.testing.assert_array_equal(again.scene.camera_to_scanner, cap.scene.camera_to_scanner)
    assert not (out / "truth.json").exists()


def _copy(src, tmp_path):
    dst = tmp_path / "case"
    shutil.copytree(src, dst)
    return dst


def _edit_json(path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


BAD = {
    "no depth": (lambda c: (c / "depth.png").unlink(), "depth.png: missing"),
    "no camera.json": (lambda c: (c / "camera.json").unlink(), "camera.json: missing"),
    "no scene.json": (lambda c: (c / "scene.json").unlink(), "scene.json: missing"),
    "corrupt depth": (lambda c: (c / "depth.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage"), "not a readable PNG"),
    "truncated depth": (lambda c: (c / "depth.png").write_bytes((c / "depth.png").read_bytes()[:500]),
                        "not a readable PNG"),
    "8-bit depth": (lambda c: cv2.imwrite(str(c / "depth.png"), np.zeros((480, 848), np.uint8)), "16-bit"),
    "rgb depth": (lambda c: cv2.imwrite(str(c / "depth.png"), np.zeros((480, 848, 3), np.uint16)), "16-bit"),
    "small depth": (lambda c: cv2.imwrite(str(c / "depth.png"), np.zeros((240, 424), np.uint16)), "does not match"),
    "small colour": (lambda c: cv2.imwrite(str(c / "color.png"), np.zeros((240, 424, 3), np.uint8)),
                     "color.png: size"),
    "16-bit colour": (lambda c: cv2.imwrite(str(c / "color.png"), np.zeros((480, 848, 3), np.uint16)), "8-bit"),
    "NaN in camera": (lambda c: (c / "camera.json").write_text((c / "camera.json").read_text().replace(
        '"fx": ', '"fx": NaN, "x": ')), "non-finite"),
    "Infinity in scene": (lambda c: (c / "scene.json").write_text((c / "scene.json").read_text().replace(
        '"table_height_mm": ', '"table_height_mm": Infinity, "y": ')), "non-finite"),
    "not json": (lambda c: (c / "scene.json").write_text("{camera_to"), "not valid JSON"),
    "json list": (lambda c: (c / "camera.json").write_text("[1, 2]"), "expected a JSON object"),
    "missing fx": (lambda c: _edit_json(c / "camera.json", lambda d: d.pop("fx")), "'fx' is missing"),
    "string fx": (lambda c: _edit_json(c / "camera.json", lambda d: d.update(fx="430")), "finite number"),
    "zero scale": (lambda c: _edit_json(c / "camera.json", lambda d: d.update(depth_scale=0)), "positive"),
    "3x3 matrix": (lambda c: _edit_json(c / "scene.json", lambda d: d.update(camera_to_scanner=[[1, 0, 0]] * 3)),
                   "expected 4x4"),
    "scaled matrix": (lambda c: _edit_json(c / "scene.json", lambda d: d.update(
        camera_to_scanner=(2 * np.eye(4)).tolist())), "not a rigid transform"),
    "null in matrix": (lambda c: _edit_json(c / "scene.json", lambda d: d["camera_to_scanner"][0].__setitem__(0, None)),
                       "non-finite"),
    "missing table height": (lambda c: _edit_json(c / "scene.json", lambda d: d.pop("table_height_mm")),
                             "'table_height_mm' is missing"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_capture_refused_with_one_line_reason(sim_cases, tmp_path, case):
    folder = _copy(sim_cases[0], tmp_path)
    breaker, expect = BAD[case]
    breaker(folder)
    with pytest.raises(CaptureError) as ei:
        read_capture(folder)
    msg = str(ei.value)
    assert expect in msg, msg
    assert str(folder) in msg and "\n" not in msg


def test_missing_folder(tmp_path):
    with pytest.raises(CaptureError, match="capture folder not found"):
        read_capture(tmp_path / "nope")


def test_json_with_a_byte_order_mark_and_extra_keys_is_read_alike(sim_cases, tmp_path):
    """Other tools write these folders: a UTF-8 byte-order mark (Windows editors and .NET write one) and keys
    CONVENTIONS.md does not name (a serial, a timestamp) change nothing."""
    folder = _copy(sim_cases[0], tmp_path)
    _edit_json(folder / "camera.json", lambda d: d.update(serial="215322071234", model="D455"))
    _edit_json(folder / "scene.json", lambda d: d.update(captured_at="2026-12-04T10:00:00Z"))
    for name in ("camera.json", "scene.json"):
        (folder / name).write_bytes(b"\xef\xbb\xbf" + (folder / name).read_bytes())
    cap, ref = read_capture(folder), read_capture(sim_cases[0])
    assert cap.camera == ref.camera
    np.testing.assert_array_equal(cap.scene.camera_to_scanner, ref.scene.camera_to_scanner)
    assert cap.scene.table_height_mm == ref.scene.table_height_mm


def test_colour_is_optional(sim_cases, tmp_path):
    folder = _copy(sim_cases[0], tmp_path)
    (folder / "color.png").unlink()
    assert read_capture(folder).color is None


def test_a_reader_of_depth_alone_never_opens_the_colour(sim_cases, tmp_path):
    """The plan is made from depth (colour is optional in CONVENTIONS.md): it does not decode color.png, so a bad
    one neither slows it nor stops it; a reader that asks for colour still gets the one-line refusal."""
    folder = _copy(sim_cases[0], tmp_path)
    (folder / "color.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    cap = read_capture(folder, colour=False)
    assert cap.color is None and cap.depth.shape == (cap.camera.height, cap.camera.width)
    with pytest.raises(CaptureError, match="color.png: not a readable PNG"):
        read_capture(folder)
