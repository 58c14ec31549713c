"""A complete simulated exam through the real parts, headless: what ``ctpos demo`` runs.

1. Fresh CURVE keys; the scanner simulator and ``ctpos daemon`` as separate
   processes on loopback.
2. A calibration session: the console drives the table to each position through
   the bridge, the board is rendered where the table *reports* it is, and the
   session is solved. Everything after uses the solved calibration.
3. A simulated patient on the table under that camera, captured through
   librealsense's ``software_device`` (and recorded to a ``.db3``).
4. Perception and the plan; a second capture checks the patient has not moved.
5. The technician's part, played by this module only with ``simulated_technician``
   (a simulation-only switch): approve, load the plan, move to it while following
   telemetry, confirm the room is clear, scan.
6. The report (``sim/exam_report.py``).

The daemon and the scanner simulator are stopped in every case. Any failing
step raises ExamError with the step's name and a one-line reason.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("ctpos.exam")

# The default demo patient: obese, feet first, arms raised, table lowered for getting on, lying near the
# middle as the room's prompts ask; a wide-bore (780 mm) scanner, as sites choose for obese patients.
DEMO_PATIENT: dict[str, Any] = {"patient_position": "FFS", "pose": "arms_up", "blanket": False,
                                "table_height_mm": [380.0, 450.0], "table_longitudinal_mm": [-1200.0, -950.0],
                                "lateral_offset_mm": [-30.0, 30.0], "yaw_deg": [-4.0, 4.0], "bore_diameter_mm": 780.0}
DEMO_BMI = (30.0, 36.0)  # obese, class I (class II and above often need a wider bore than 780 mm here)
MOVE_TIMEOUT_S = 120.0


class ExamError(Exception):
    """A step of the exam failed; the message names the step and says why in one line."""


@dataclass
class ExamConfig:
    """What the exam runs. patient: scene overrides on top of DEMO_PATIENT (see sim/scene.py)."""

    out: Path
    seed: int = 7
    protocol: str = "chest"
    simulated_technician: bool = False
    patient: dict[str, Any] = field(default_factory=dict)
    calibration_longs: int = 3
    calibration_heights: tuple[float, ...] = (150.0, 240.0, 330.0)


@dataclass
class Trace:
    """Telemetry as followed by the console: time s (from the exam's start), height, longitudinal mm, state."""

    t: list[float] = field(default_factory=list)
    height: list[float] = field(default_factory=list)
    longitudinal: list[float] = field(default_factory=list)
    state: list[str] = field(default_factory=list)
    scan_progress: list[float] = field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _free_endpoints(n: int) -> list[str]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [f"tcp://127.0.0.1:{s.getsockname()[1]}" for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop(proc: subprocess.Popen, group: bool) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM) if group else proc.terminate()
        proc.wait(timeout=5)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()
        proc.wait()


@contextmanager
def scanner_side(state: Path, keys: Path):
    """The scanner simulator and the daemon as processes; yields (request, telemetry endpoint). Always stopped."""
    from scanner_bridge.cli import spawn_scanner_sim

    state.mkdir(parents=True, exist_ok=True)
    scanner_ep = f"ipc://{state.resolve()}/scanner.ipc"
    scanner = spawn_scanner_sim(scanner_ep, state / "scanner-sim.log")
    daemon = None
    try:
        bind, tele = _free_endpoints(2)
        log_file = open(state / "daemon.log", "w")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "ctpos", "daemon", "--sim", "--scanner", scanner_ep, "--bind", bind,
             "--telemetry", tele, "--keys", str(keys), "--state-dir", str(state)],
            stdout=subprocess.PIPE, stderr=log_file, text=True)
        sel = selectors.DefaultSelector()
        sel.register(daemon.stdout, selectors.EVENT_READ)
        line = daemon.stdout.readline() if sel.select(timeout=30) else ""
        sel.close()
        if "daemon ready" not in line:
            raise ExamError(f"daemon: did not start ({line.strip() or 'no word in 30 s'}; see {state / 'daemon.log'})")
        log.info("%s", line.strip())
        yield bind, tele
    finally:
        if daemon is not None:
            _stop(daemon, group=False)
        _stop(scanner, group=True)


class Console:
    """The console's use of the bridge during the exam: requests, heartbeat, followed telemetry."""

    def __init__(self, bind: str, tele: str, keys: Path, t0: float) -> None:
        from scanner_bridge.client import BridgeClient

        self.client = BridgeClient(bind, keys, "console", tele)
        self.trace = Trace()
        self.t0 = t0

    def open(self) -> "Console":
        self.client.connect()
        self.client.subscribe()
        self.client.start_heartbeat()
        return self

    def close(self) -> None:
        self.client.close()

    def request(self, step: str, msg_type: str, body: dict | None = None) -> dict:
        from scanner_bridge.client import BridgeError, BridgeTimeout

        try:
            return self.client.request(msg_type, body or {}, timeout_s=5.0).body
        except BridgeError as exc:
            raise ExamError(f"{step}: the daemon refused '{msg_type}': {exc.reason}") from None
        except BridgeTimeout as exc:
            raise ExamError(f"{step}: no answer from the daemon to '{msg_type}' ({exc})") from None

    def follow(self, step: str, until: set[str], during: str) -> dict:
        """Record telemetry until the state, having been `during`, is in `until`; ExamError on fault, e-stop, timeout.

        Telemetry sent before the command took effect still shows the old state, so
        `until` counts only once `during` was seen (or a status request confirms it).
        """
        from scanner_bridge.client import BridgeTimeout

        start = time.monotonic()
        end, seen = start + MOVE_TIMEOUT_S, False
        while time.monotonic() < end:
            try:
                b = self.client.telemetry(timeout_s=1.0).body
            except BridgeTimeout:
                raise ExamError(f"{step}: telemetry stopped (daemon gone?)") from None
            if "table_height_mm" in b:
                tr = self.trace
                tr.t.append(time.monotonic() - self.t0)
                tr.height.append(b["table_height_mm"])
                tr.longitudinal.append(b["table_longitudinal_mm"])
                tr.state.append(b["state"])
                tr.scan_progress.append(b.get("scan_progress") or 0.0)
            if b["state"] in ("fault", "estop"):
                raise ExamError(f"{step}: the daemon went to '{b['state']}': {b.get('fault') or 'e-stop'}")
            seen = seen or b["state"] == during
            if not seen and time.monotonic() - start > 1.0:
                # A move too short to be seen moving: ask.
                seen = self.request(step, "status")["state"] in until
            if seen and b["state"] in until:
                return b
        raise ExamError(f"{step}: not done within {MOVE_TIMEOUT_S:.0f} s")

    def move_table(self, step: str, height: float, longitudinal: float) -> dict:
        self.request(step, "move_table", {"table_height_mm": height, "table_longitudinal_mm": longitudinal})
        return self.follow(step, {"idle", "positioned"}, "moving")


def _calibrate(con: Console, cfg: ExamConfig, folder: Path):
    """Drive the table through the session's positions, render the board where the table reports it, solve."""
    from calibration.board import BoardSpec
    from calibration.cli import SessionError, calibrate
    from calibration.solve import CalibrationError
    from calibration.store import load_calibration
    from positioning.capture import write_capture
    from sim.calibration import board_image, camera_to_scanner, render_view, sample_calibration

    scene = sample_calibration(cfg.seed, n_long=cfg.calibration_longs, n_height=1)
    longs = sorted({lo for _, lo in scene.table_positions})
    # Serpentine: one height change between rows, short longitudinal steps.
    positions = [(h, lo) for i, h in enumerate(cfg.calibration_heights) for lo in (longs if i % 2 == 0 else longs[::-1])]
    scene = dataclasses.replace(scene, table_positions=tuple(positions))
    spec, tex = BoardSpec(), board_image(BoardSpec())
    true_mount = camera_to_scanner(scene)
    rng = np.random.default_rng(cfg.seed + 17)
    folder.mkdir(parents=True, exist_ok=True)
    views = []
    for i, (h, lo) in enumerate(positions):
        st = con.move_table("calibration", h, lo)
        cap = render_view(scene, spec, st["table_height_mm"], st["table_longitudinal_mm"], true_mount, rng, tex)
        name = f"view-{i:02d}"
        write_capture(folder / name, cap)
        views.append(name)
    session = {"format": "ctpos-calibration-session", "version": 1, "camera_serial": scene.serial,
               "board": spec.to_json(), "views": views, "simulated": dataclasses.asdict(scene)}
    (folder / "session.json").write_text(json.dumps(session, indent=1) + "\n")
    try:
        code, report = calibrate(folder, cfg.out / "calibration.json")
    except (CalibrationError, SessionError) as exc:
        raise ExamError(f"calibration: {exc}") from None
    if code != 0:
        raise ExamError(f"calibration: the session did not pass ({'; '.join(report.get('failures', []))})")
    return scene, load_calibration(cfg.out / "calibration.json", expect_serial=scene.serial), report


def _capture(params, model, cal, serial: str, record_to: Path | None, name: str):
    """Simulate the scene, pass it through rs.software_device, and attach the solved calibration."""
    from positioning.capture import SceneState
    from sim.realsense import SimulatedSource
    from sim.simulate import simulate

    cap, truth = simulate(params, model)
    src = SimulatedSource([cap], serial=serial, record_to=record_to)
    src.start()
    try:
        frame = src.read()
    finally:
        src.stop()
    a, b = frame.camera, cal.intrinsics
    # librealsense carries intrinsics as float32: compare to a hundredth of a pixel.
    if (a.width, a.height) != (b.width, b.height) or max(abs(a.fx - b.fx), abs(a.fy - b.fy), abs(a.cx - b.cx),
                                                         abs(a.cy - b.cy)) > 0.01:
        raise ExamError(f"capture: camera {frame.serial}'s intrinsics differ from its calibration's; recalibrate")
    scene = SceneState(cal.camera_to_scanner, params.table_height_mm, params.table_longitudinal_mm)
    return frame.to_capture(scene, name=name), truth


def run_exam(cfg: ExamConfig) -> dict:
    """Run the whole exam; returns the summary (also written to cfg.out/summary.json)."""
    from positioning.bodymodel import load_body_model
    from positioning.capture import CaptureError, write_capture
    from positioning.cli import plan_from_capture
    from positioning.keypoints import load_keypoint_net
    from positioning.plan import PlanRefused, ScannerProfileError, load_protocol, patient_moved, scanner_spec
    from positioning.segment import SegmentationError, segment_patient
    from scanner_bridge.keys import generate
    from sim.calibration import camera_to_scanner, patient_on_mount
    from sim.exam_report import write_report
    from sim.scene import load_config, sample_scene, with_table_at

    t0 = time.monotonic()
    stages: dict[str, float] = {}
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    try:
        load_protocol(cfg.protocol)
    except PlanRefused as exc:
        raise ExamError(f"protocol: {exc}") from None

    def stage(name: str, since: float) -> float:
        now = time.monotonic()
        stages[name] = round(now - since, 2)
        log.info("%s done in %.1f s", name, now - since)
        return now

    model, net = load_body_model(), load_keypoint_net()
    t = stage("load models", t0)
    keys = generate(out / "keys", ["console"])
    summary: dict[str, Any] = {"seed": cfg.seed, "protocol": cfg.protocol, "stages_s": stages}
    with scanner_side(out / "bridge", keys) as (bind, tele):
        t = stage("start daemon", t)
        con = Console(bind, tele, keys, t0).open()
        try:
            try:  # the table the daemon drives, as its hello reports it: checked before anything moves
                limits = scanner_spec(con.request("hello", "hello").get("limits", {}), "the daemon's limits")
            except ScannerProfileError as exc:
                raise ExamError(f"hello: {exc}") from None
            scene, cal, cal_report = _calibrate(con, cfg, out / "calibration-session")
            summary["calibration"] = {"views": len(scene.table_positions),
                                      "reprojection_rms_px": cal_report.get("reprojection_rms_px"),
                                      "translation_error_mm": float(np.linalg.norm(
                                          cal.camera_to_scanner[:3, 3] - camera_to_scanner(scene)[:3, 3]))}
            t = stage("calibration", t)

            # The patient, drawn from the seed: an obese body unless overridden, under the calibrated camera.
            train = model.data.train
            pool = train["betas"][(train["bmi"] >= DEMO_BMI[0]) & (train["bmi"] < DEMO_BMI[1])]
            scene_cfg = {**load_config(None), **DEMO_PATIENT, **cfg.patient}
            params = patient_on_mount(sample_scene(cfg.seed, scene_cfg, pool), scene)
            st = con.move_table("loading position", params.table_height_mm, params.table_longitudinal_mm)
            params = with_table_at(params, st["table_height_mm"], st["table_longitudinal_mm"])
            capture, truth = _capture(params, model, cal, scene.serial, out / "capture.db3", f"exam-{cfg.seed}")
            write_capture(out / "capture", capture, truth)
            t = stage("patient capture", t)

            spec = dataclasses.replace(limits, bore_diameter_mm=params.bore_diameter_mm)  # the scene's bore
            try:
                plan, per = plan_from_capture(capture, cfg.protocol, model, net, spec)
            except (PlanRefused, SegmentationError, CaptureError) as exc:
                raise ExamError(f"plan: refused: {exc}") from None
            plan_json = plan.to_json()
            (out / "plan.json").write_text(json.dumps(plan_json, indent=1) + "\n")
            t = stage("perception and plan", t)

            # Check: a fresh capture just before motion; the patient must not have moved.
            # Same scene, fresh sensor noise (the noise draws from the scene seed; parity keeps the gown).
            check, _ = _capture(dataclasses.replace(params, seed=params.seed + 2), model, cal, scene.serial, None,
                                f"exam-{cfg.seed}-check")
            try:
                moved, how = patient_moved(per.segmentation.points_s, segment_patient(check).points_s)
            except SegmentationError as exc:
                raise ExamError(f"movement check: {exc}") from None
            if moved:
                raise ExamError(f"movement check: the patient moved since the plan's capture ({how}); re-plan")
            summary["movement_check"] = how
            t = stage("movement check", t)

            summary.update(_truth_comparison(plan_json, truth, cfg.protocol, params))
            if not cfg.simulated_technician:
                summary["outcome"] = "plan ready, awaiting the technician's approval (no table motion)"
                write_report(out, summary, capture, truth, per, plan_json, con.trace, model, spec, None)
                (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
                return summary

            # The technician (simulated): approves the plan as shown, sends it, confirms the room is clear.
            con.request("load plan", "load_plan", {"plan": plan_json})
            con.request("move to plan", "move_to_plan")
            positioned = con.follow("move to plan", {"positioned"}, "moving")
            t = stage("table to plan", t)
            con.request("scan", "start_scan", {"room_clear": True})
            done = con.follow("scan", {"scan_done"}, "scanning")
            t = stage("scan", t)
        finally:
            con.close()
    audit = _audit_rows(out / "bridge" / "audit.sqlite")
    summary["outcome"] = "scan done"
    summary["table_at_scan_start"] = {"table_height_mm": positioned["table_height_mm"],
                                      "table_longitudinal_mm": positioned["table_longitudinal_mm"]}
    summary["table_at_scan_end"] = {"table_height_mm": done["table_height_mm"],
                                    "table_longitudinal_mm": done["table_longitudinal_mm"]}
    ideal = summary["truth"]["ideal_table_height_mm"]
    # 'bore_compromise': how far the plan itself set the table off its ISO height to keep clear of the bore.
    summary["iso_error_mm"] = {"before": round(params.table_height_mm - ideal, 1),
                               "after": round(positioned["table_height_mm"] - ideal, 1),
                               "bore_compromise": round(plan_json["move_table_height_mm"]
                                                        - plan_json["table_height_mm"], 1)}
    write_report(out, summary, capture, truth, per, plan_json, con.trace, model, spec, audit)
    stage("report", t)
    summary["stages_s"]["total"] = round(time.monotonic() - t0, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _truth_comparison(plan: dict, truth: dict, protocol: str, params) -> dict:
    """The plan against the simulator's ground truth (table frame for the range)."""
    reg = truth["protocols"][protocol]
    hd = 1.0 if truth["patient_position"].startswith("H") else -1.0
    pr = plan["scan_range_scanner_mm"]
    return {"truth": {"patient_position": truth["patient_position"], "pose": truth["pose"],
                      "bmi": round(truth["bmi"], 1), "stature_mm": round(truth["stature_mm"]),
                      "ideal_table_height_mm": round(reg["ideal_table_height_mm"], 1),
                      "region_table_mm": {"cranial": round(reg["cranial_y_mm"] - params.table_longitudinal_mm, 1),
                                          "caudal": round(reg["caudal_y_mm"] - params.table_longitudinal_mm, 1)}},
            "plan_vs_truth": {"position_correct": plan["patient_position"] == truth["patient_position"],
                              "table_height_error_mm": round(plan["table_height_mm"] - reg["ideal_table_height_mm"], 1),
                              "overscan_cranial_mm": round((pr["cranial"] - reg["cranial_y_mm"]) * hd, 1),
                              "overscan_caudal_mm": round((reg["caudal_y_mm"] - pr["caudal"]) * hd, 1)}}


def _audit_rows(path: Path) -> list[dict]:
    from scanner_bridge.audit import AuditLog

    log_ = AuditLog(path).open()
    try:
        return [r for r in log_.rows() if r["kind"] in ("transition", "event", "request")
                and r["what"] != "heartbeat"]
    finally:
        log_.close()
