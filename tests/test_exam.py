"""The complete simulated exam (``ctpos demo``) on a small case: real daemon and scanner processes, real sockets."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sim.exam import ExamConfig, ExamError, run_exam


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention text (the exam's folder is in its children's arguments)."""
    found = []
    for p in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = p.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and "pytest" not in cmd:
            found.append(cmd)
    return found


def test_small_exam_runs_through_and_centres_the_patient(tmp_path):
    out = tmp_path / "exam"
    s = run_exam(ExamConfig(out=out, seed=1, simulated_technician=True))
    assert s["outcome"] == "scan done"
    assert s["plan_vs_truth"]["position_correct"]
    # Centring moved the region's centre from far off to near the isocentre (the accuracy table is in docs/),
    # apart from any offset the plan chose, with a warning, to keep the body clear of the bore.
    e = s["iso_error_mm"]
    assert abs(e["before"]) > 100 and abs(e["after"] - e["bore_compromise"]) < 20
    plan = json.loads((out / "plan.json").read_text())
    assert (e["bore_compromise"] != 0) == any(w["code"] == "ISO_COMPROMISED" for w in plan["warnings"])
    st = s["table_at_scan_start"]
    assert abs(st["table_height_mm"] - plan["move_table_height_mm"]) < 1.0
    assert abs(st["table_longitudinal_mm"] + plan["scan_range_table_mm"]["cranial"]) < 1.0
    assert abs(s["table_at_scan_end"]["table_longitudinal_mm"] + plan["scan_range_table_mm"]["caudal"]) < 1.0
    for f in ("report.md", "capture.png", "side.png", "telemetry.png", "audit.json", "calibration.json",
              "capture/depth.png", "capture.db3", "summary.json"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    audit = json.loads((out / "audit.json").read_text())
    assert any(r["kind"] == "transition" and r["what"] == "scanning->scan_done" for r in audit)
    assert "ISO-centring against the truth" in (out / "report.md").read_text()
    assert not processes_mentioning(str(out))


def test_a_failing_step_names_itself_and_stops_the_daemon(tmp_path):
    out = tmp_path / "exam"
    with pytest.raises(ExamError, match=r"^calibration: the daemon refused 'move_table': .*height 900\.0 mm"):
        run_exam(ExamConfig(out=out, seed=3, simulated_technician=True, calibration_heights=(900.0, 150.0)))
    assert not processes_mentioning(str(out))


def test_a_patient_who_would_not_clear_the_bore_is_refused_before_any_move(tmp_path):
    """Seed 5's obese patient, arms up, lies 59 mm off-centre: the true body comes within 6 mm of the wide bore at
    every table height (checked against the simulator's mesh). The plan is refused; the table never moves to it."""
    from scanner_bridge.audit import AuditLog

    out = tmp_path / "exam"
    with pytest.raises(ExamError, match=r"^plan: refused: the body would hit the bore \(\d+ mm beyond its wall\)"):
        run_exam(ExamConfig(out=out, seed=5, simulated_technician=True))
    assert not processes_mentioning(str(out))
    log_ = AuditLog(out / "bridge" / "audit.sqlite").open()
    try:
        assert not [r for r in log_.rows() if r["what"] in ("load_plan", "move_to_plan", "start_scan")]
    finally:
        log_.close()


def test_without_the_simulated_technician_nothing_moves_after_the_plan(tmp_path):
    out = tmp_path / "exam"
    s = run_exam(ExamConfig(out=out, seed=4))
    assert s["outcome"].startswith("plan ready") and "iso_error_mm" not in s
    assert (out / "plan.json").is_file() and (out / "report.md").is_file()
    assert not processes_mentioning(str(out))


def test_demo_cli_refuses_an_unknown_protocol_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ctpos", "demo", "--out", str(tmp_path / "r"), "--protocol", "knee"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "unknown protocol" in r.stderr
