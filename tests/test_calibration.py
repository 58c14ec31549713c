"""Calibration: solve accuracy, refusals, the calibration file, and the daily check, on simulated sessions."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from calibration.board import BoardSpec
from calibration.check import daily_check
from calibration.cli import calibrate, read_session
from calibration.solve import CalibrationError, analyse_view, solve
from calibration.store import CalibrationFileError, load_calibration, save_calibration
from sim.calibration import camera_to_scanner, render_view, sample_calibration, write_session


def rotation_deg(a, b):
    r = a[:3, :3].T @ b[:3, :3]
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1))))


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    scene = sample_calibration(7)
    return scene, write_session(tmp_path_factory.mktemp("cal") / "session", scene)


@pytest.fixture(scope="module")
def solved(session, tmp_path_factory):
    scene, folder = session
    out = tmp_path_factory.mktemp("calfile") / "camera.json"
    code, report = calibrate(folder, out)
    assert code == 0, report
    return scene, load_calibration(out), out


def test_solve_recovers_the_true_mount(solved):
    scene, cal, _ = solved
    truth = camera_to_scanner(scene)
    assert np.linalg.norm(cal.camera_to_scanner[:3, 3] - truth[:3, 3]) < 3.0
    assert rotation_deg(cal.camera_to_scanner, truth) < 0.3
    r = cal.report
    assert r["verdict"] == "pass" and r["reprojection_rms_px"] < 0.6 and abs(r["axis_orthogonality_deg"] - 90) < 0.5
    assert r["views_used"] == 15 and not r["rejected_views"]


def test_solver_never_reads_the_true_matrix(session, tmp_path):
    """Scramble every view's camera_to_scanner: the solution must not change."""
    import shutil

    scene, folder = session
    copy = tmp_path / "s"
    shutil.copytree(folder, copy)
    for view in copy.glob("view-*"):
        d = json.loads((view / "scene.json").read_text())
        d["camera_to_scanner"] = np.eye(4).tolist()
        (view / "scene.json").write_text(json.dumps(d))
    code_a, a = calibrate(folder, tmp_path / "a.json")
    code_b, b = calibrate(copy, tmp_path / "b.json")
    np.testing.assert_allclose(load_calibration(tmp_path / "a.json").camera_to_scanner,
                               load_calibration(tmp_path / "b.json").camera_to_scanner, atol=1e-9)


def _views(scene, tmp_path):
    folder = write_session(tmp_path / "s", scene)
    meta, board, caps = read_session(folder)
    return [analyse_view(n, c, board, np.random.default_rng(0)) for n, c in caps], board, caps[0][1].camera


def test_too_few_views_refused(tmp_path):
    views, board, cam = _views(sample_calibration(3, n_long=1, n_height=3), tmp_path)
    with pytest.raises(CalibrationError, match="too few usable views"):
        solve(views, board, cam)


def test_board_never_seen_refused(tmp_path):
    views, board, cam = _views(dataclasses.replace(sample_calibration(3, 2, 2), board=False), tmp_path)
    with pytest.raises(CalibrationError, match="board never seen"):
        solve(views, board, cam)


def test_board_half_off_the_table_refused(tmp_path):
    scene = dataclasses.replace(sample_calibration(4, 2, 2), board_offset_t_mm=(260.0, 0.0, 0.0))
    views, board, cam = _views(scene, tmp_path)
    with pytest.raises(CalibrationError, match="board extends beyond the tabletop"):
        solve(views, board, cam)


def test_one_wrong_reading_is_rejected_and_the_rest_solve(tmp_path):
    scene = dataclasses.replace(sample_calibration(5), bad_reading=(4, 30.0))
    views, board, cam = _views(scene, tmp_path)
    sol = solve(views, board, cam)
    assert list(sol.rejected_views) == ["view-04"] and "table reading" in sol.rejected_views["view-04"]
    assert rotation_deg(sol.camera_to_scanner, camera_to_scanner(scene)) < 0.3


def test_inconsistent_readings_refused(tmp_path):
    """Half the views recorded with heights 40 mm off: no view stands out, the quality check refuses it
    (calibrate() then saves nothing and exits 1)."""
    views, board, cam = _views(sample_calibration(6), tmp_path)
    views = [dataclasses.replace(v, table_height_mm=v.table_height_mm + 40.0) if i % 2 else v
             for i, v in enumerate(views)]
    sol = solve(views, board, cam)
    assert not sol.passed
    assert any("readings and images disagree" in f for f in sol.report["failures"]), sol.report["failures"]


def test_calibration_file_refusals(solved, tmp_path):
    _, cal, path = solved
    assert load_calibration(path, expect_serial=cal.camera_serial).camera_serial == cal.camera_serial
    with pytest.raises(CalibrationFileError, match="not found"):
        load_calibration(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text(path.read_text()[:200])
    with pytest.raises(CalibrationFileError, match="corrupt"):
        load_calibration(bad)
    doc = json.loads(path.read_text())
    doc["camera_to_scanner"][0][3] += 5.0  # an edit by hand
    bad.write_text(json.dumps(doc))
    with pytest.raises(CalibrationFileError, match="checksum"):
        load_calibration(bad)
    doc = json.loads(path.read_text())
    doc["version"] = 99
    bad.write_text(json.dumps(doc))
    with pytest.raises(CalibrationFileError, match="version 99"):
        load_calibration(bad)
    with pytest.raises(CalibrationFileError, match="is connected"):
        load_calibration(path, expect_serial="OTHER-CAMERA")
    again = save_calibration(tmp_path / "copy.json", cal)
    assert load_calibration(again).report == cal.report
    bom = tmp_path / "bom.json"  # re-saved by an editor that writes a UTF-8 byte-order mark: the same calibration
    bom.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    np.testing.assert_array_equal(load_calibration(bom).camera_to_scanner, cal.camera_to_scanner)


def _bumped(x, rot_deg, trans_mm, seed):
    rng = np.random.default_rng(seed)
    axis, d = rng.normal(size=3), rng.normal(size=3)
    y = x.copy()
    y[:3, :3] = x[:3, :3] @ cv2.Rodrigues(axis / np.linalg.norm(axis) * np.radians(rot_deg))[0]
    y[:3, 3] += d / np.linalg.norm(d) * trans_mm
    return y


@pytest.mark.parametrize("rot_deg, trans_mm", [(0.0, 0.0), (0.5, 0.0), (0.0, 5.0)])
@pytest.mark.parametrize("seed", [11, 12])
def test_daily_check_sees_a_bumped_camera_and_stays_quiet_otherwise(solved, rot_deg, trans_mm, seed):
    scene, cal, _ = solved
    h, lo = scene.table_positions[7]
    x = _bumped(camera_to_scanner(scene), rot_deg, trans_mm, seed)
    capture = render_view(scene, BoardSpec(), h, lo, x, np.random.default_rng(seed))
    rep = daily_check(capture, cal)
    if rot_deg == 0 and trans_mm == 0:
        assert rep.ok, rep.warnings
        assert rep.board_shift_mm < 2.0
    else:
        assert not rep.ok and any("board seen" in w for w in rep.warnings)


def test_cli_end_to_end(tmp_path):
    def run(*a):
        return subprocess.run([sys.executable, "-m", "ctpos", *a], capture_output=True, text=True, timeout=600)

    r = run("sim", "calibration", "--out", str(tmp_path / "s"), "--seed", "9", "--longitudinal", "3", "--heights", "2")
    assert r.returncode == 0, r.stderr
    r = run("calibrate", str(tmp_path / "s"), "--out", str(tmp_path / "c.json"))
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout + r.stderr
    r = run("calibrate", "--check", str(tmp_path / "c.json"), str(tmp_path / "s" / "view-02"), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["verdict"] == "ok", r.stdout
    r = run("sim", "calibration", "--out", str(tmp_path / "n"), "--seed", "9", "--no-board")
    r = run("calibrate", str(tmp_path / "n"), "--out", str(tmp_path / "n.json"))
    assert r.returncode == 2 and "board never seen" in r.stderr and r.stderr.count("\n") == 1
    r = run("calibrate", "--check", str(tmp_path / "missing.json"), str(tmp_path / "s" / "view-02"))
    assert r.returncode == 2 and "calibration file not found" in r.stderr
