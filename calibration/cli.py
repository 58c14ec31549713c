"""``ctpos calibrate``: solve a calibration session, or run the daily check."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("ctpos.calibrate")
EXIT_OK, EXIT_DRIFT_OR_FAIL, EXIT_ERROR = 0, 1, 2


class SessionError(Exception):
    """A calibration session folder is missing or malformed; one-line reason."""


def read_session(folder: Path):
    """(session.json contents, [(view name, Capture)]) of a session folder."""
    from calibration.board import BoardSpec
    from positioning.capture import read_capture

    meta_path = folder / "session.json"
    if not meta_path.is_file():
        raise SessionError(f"{folder}: not a calibration session (no session.json)")
    try:
        meta = json.loads(meta_path.read_text())
        board = BoardSpec.from_json(meta["board"])
        names = list(meta["views"])
    except (ValueError, KeyError, TypeError):
        raise SessionError(f"{meta_path}: malformed session description") from None
    return meta, board, [(n, read_capture(folder / n)) for n in names]


def calibrate(folder: Path, out: Path, force: bool = False) -> tuple[int, dict]:
    """Solve a session folder; save to out when it passes (or when forced). Returns (exit code, report)."""
    from calibration.solve import analyse_view, solve
    from calibration.store import Calibration, now_utc, save_calibration

    meta, board, caps = read_session(folder)
    rng = np.random.default_rng(0)
    views = [analyse_view(n, c, board, rng) for n, c in caps]
    cams = {c.camera for _, c in caps}
    if len(cams) != 1:
        raise SessionError(f"{folder}: views come from cameras with different intrinsics")
    cam = cams.pop()
    sol = solve(views, board, cam)
    report = dict(sol.report, rejected_views=sol.rejected_views, used_views=sol.used_views)
    if sol.passed or force:
        cal = Calibration(sol.camera_to_scanner, cam, str(meta.get("camera_serial", "")), now_utc(), board,
                          sol.board_yaw_deg,
                          [(c.scene.table_height_mm, c.scene.table_longitudinal_mm) for n, c in caps
                           if n in sol.used_views], report, forced=not sol.passed)
        save_calibration(out, cal)
        report["saved"] = str(out)
        return EXIT_OK, report
    report["saved"] = None
    return EXIT_DRIFT_OR_FAIL, report


def _print_report(r: dict) -> None:
    print(f"reprojection RMS      {r['reprojection_rms_px']:.3f} px   (limit {r['thresholds']['reprojection_rms_px']})")
    print(f"tabletop plane RMS    {r['plane_rms_mm']:.2f} mm   (limit {r['thresholds']['plane_rms_mm']})")
    for axis in ("horizontal", "vertical"):
        print(f"table displacement    {axis}: {r[f'displacement_{axis}_rms_mm']:.2f} mm RMS, "
              f"{r[f'displacement_{axis}_max_mm']:.2f} mm max (limit {r['thresholds'][f'displacement_{axis}_rms_mm']})")
    print(f"table axes            {r['axis_orthogonality_deg']:.3f} deg apart (90 +- {r['thresholds']['orthogonality_deg']})")
    print(f"board yaw in jig      {r['board_yaw_deg']:.3f} deg; views {r['views_used']}, corners {r['corners_used']}")
    for n, why in r.get("rejected_views", {}).items():
        print(f"rejected {n}: {why}")
    print(f"verdict               {r['verdict'].upper()}" + "".join(f"\n  - {f}" for f in r["failures"]))


def _main(args: argparse.Namespace) -> int:
    if args.check:
        from calibration.check import daily_check
        from calibration.store import load_calibration
        from positioning.capture import read_capture

        cal_file, capture = args.check
        cal = load_calibration(cal_file)
        rep = daily_check(read_capture(capture), cal)
        if args.json:
            print(json.dumps(rep.to_json(), indent=1))
        else:
            fmt = lambda v, u: "not measured" if v is None else f"{v:.2f} {u}"  # noqa: E731
            print(f"tabletop tilt   {fmt(rep.plane_tilt_deg, 'deg')}")
            print(f"tabletop height {fmt(rep.plane_offset_mm, 'mm')}")
            print(f"board shift     {fmt(rep.board_shift_mm, 'mm')} ({rep.board_corners} corners)")
            print("verdict         " + ("OK" if rep.ok else "DRIFT") + "".join(f"\n  - {w}" for w in rep.warnings))
        return EXIT_OK if rep.ok else EXIT_DRIFT_OR_FAIL
    if not args.session or not args.out:
        raise SessionError("give a session folder and --out FILE, or --check CALIBRATION CAPTURE")
    code, report = calibrate(Path(args.session), Path(args.out), args.force)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_report(report)
        print(f"saved to {report['saved']}" if report["saved"] else "NOT saved (use --force to save anyway)")
    return code


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="solve camera_to_scanner from a board session, or run the daily check")
    p.add_argument("session", nargs="?", help="calibration session folder (ctpos sim calibration writes one)")
    p.add_argument("--out", help="calibration file to write")
    p.add_argument("--force", action="store_true", help="save even when the quality checks fail")
    p.add_argument("--check", nargs=2, metavar=("CALIBRATION", "CAPTURE"), help="daily check of one capture")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_main)
