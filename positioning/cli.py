"""``ctpos fit``, ``ctpos plan`` and ``ctpos eval``: the fitted body, the scan plan, and plans against truth."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pickle
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where used: a subcommand's start-up loads only what it runs
    from positioning.capture import Capture
    from positioning.segment import Segmentation

log = logging.getLogger(__name__)


def _fit(args: argparse.Namespace) -> int:
    from positioning.bodymodel import load_body_model
    from positioning.capture import read_capture
    from positioning.perceive import perceive
    from positioning.skeleton import JOINT_NAMES

    t0 = time.perf_counter()
    cap = read_capture(Path(args.case))
    model = load_body_model()
    t1 = time.perf_counter()
    p = perceive(cap, model, use_keypoints=not args.no_keypoints, colour=args.colour)
    timing = {"read_and_load": (t1 - t0) * 1000, **p.timing_ms}
    if args.mesh:
        import open3d as o3d

        mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(p.vertices.astype(np.float64)),
                                         o3d.utility.Vector3iVector(model.faces.astype(np.int32)))
        mesh.compute_vertex_normals()
        if not o3d.io.write_triangle_mesh(str(args.mesh), mesh):
            raise OSError(f"{args.mesh}: cannot write the mesh")
    timing["total"] = (time.perf_counter() - t0) * 1000
    out = {
        "patient_position": p.patient_position,
        "position_confidence": round(p.position_confidence, 3),
        "joints_scanner_mm": {n: [round(float(x), 1) for x in p.joints[i]] for i, n in enumerate(JOINT_NAMES)},
        "joint_confidence": {n: round(float(c), 3) for n, c in zip(JOINT_NAMES, p.joint_confidence)},
        "betas": [round(float(b), 4) for b in p.fit.betas],
        "residual_mm": round(p.residual_mm, 2),
        "support_z_scanner_mm": round(p.segmentation.support_z_s, 1),
        "objects": [{"centre_scanner_mm": o.centre.round(1).tolist(), "area_m2": round(o.area_m2, 4)}
                    for o in p.segmentation.objects],
        "warnings": p.segmentation.warnings,
        "timing_ms": {k: round(v, 1) for k, v in timing.items()},
    }
    print(json.dumps(out, indent=None if args.json else 1))
    return 0


class SegmentationAhead:
    """A capture's segmentation made in a forked child process while this one goes on.

    A fresh ``ctpos plan`` spends about 0.65 s importing torch on one core while the other idles; segmentation
    needs only numpy and OpenCV, imported before the fork, so it runs beside the import (docs/planning.md,
    "Time"). ``result()`` waits for the child: (Segmentation, the ms it took), or the child's SegmentationError
    raised here. A child that cannot start (no processes or pipes left) or ends without either (killed, or a
    bug of ours) costs only time: the capture is segmented here instead, and that is logged. A context manager:
    leaving it ends a child whose result was never asked for.
    """

    def __init__(self, capture: Capture) -> None:
        self._capture = capture
        self._pid: int | None = None
        self._read_fd: int | None = None

    def __enter__(self) -> SegmentationAhead:
        from positioning.segment import SegmentationError, segment_patient

        try:
            r, w = os.pipe()
        except OSError as exc:
            log.warning("no pipe for the segmentation's child process (%s): it will be made here", exc)
            return self
        try:
            pid = os.fork()
        except OSError as exc:
            log.warning("no child process for the segmentation (%s): it will be made here", exc)
            os.close(r)
            os.close(w)
            return self
        if pid == 0:  # the child: segment, send, and end before anything of the parent's can run here
            try:
                os.close(r)
                t = time.perf_counter()
                try:
                    out = ("ok", segment_patient(self._capture), (time.perf_counter() - t) * 1000)
                except SegmentationError as exc:
                    out = ("refused", exc, 0.0)
                with os.fdopen(w, "wb") as f:
                    pickle.dump(out, f, protocol=pickle.HIGHEST_PROTOCOL)
            finally:
                os._exit(0)
        os.close(w)
        self._pid, self._read_fd = pid, r
        return self

    def result(self) -> tuple[Segmentation, float]:
        from positioning.segment import segment_patient

        if self._read_fd is not None:
            try:
                with os.fdopen(self._read_fd, "rb") as f:
                    self._read_fd = None
                    kind, value, ms = pickle.load(f)  # from our own child, through our own pipe
            except (EOFError, OSError, pickle.UnpicklingError) as exc:
                log.warning("the segmentation's child process gave no result (%s): segmented here", exc)
            else:
                if kind == "refused":
                    raise value
                return value, ms
            finally:
                self._reap()
        t = time.perf_counter()
        return segment_patient(self._capture), (time.perf_counter() - t) * 1000

    def _reap(self) -> None:
        if self._read_fd is not None:
            os.close(self._read_fd)
            self._read_fd = None
        if self._pid is not None:
            if os.waitpid(self._pid, os.WNOHANG) == (0, 0):
                os.kill(self._pid, signal.SIGKILL)
                os.waitpid(self._pid, 0)
            self._pid = None

    def __exit__(self, *exc) -> None:
        self._reap()


def plan_capture(folder: Path, protocol: str, model=None, net=None, spec=None, segment_ahead: bool = False):
    """Read, perceive and plan one capture folder: (Plan, Perception). Raises typed errors with one line.

    segment_ahead: segment in a child process while this one imports torch and loads the models
    (``SegmentationAhead``): for a fresh process that plans one capture, ``ctpos plan``.
    """
    from positioning.capture import read_capture

    t0 = time.perf_counter()
    cap = read_capture(folder, colour=False)  # the plan is made from depth
    read_ms = (time.perf_counter() - t0) * 1000
    if not segment_ahead:
        return plan_from_capture(cap, protocol, model, net, spec, read_ms)
    with SegmentationAhead(cap) as ahead:
        return plan_from_capture(cap, protocol, model, net, spec, read_ms, segmentation=ahead.result)


def forearms(per) -> np.ndarray:
    """(K, 2, 3) elbow-wrist segments in S (mm): the fitted body's, and the keypoints' where confident."""
    from positioning.keypoints import KEYPOINTS
    from positioning.skeleton import JOINT_INDEX

    segs = [[per.joints[JOINT_INDEX[f"{s}_elbow"]], per.joints[JOINT_INDEX[f"{s}_wrist"]]] for s in ("left", "right")]
    if per.keypoints is not None:
        kp = per.keypoints
        for s in ("left", "right"):
            e, w = KEYPOINTS.index(f"{s}_elbow"), KEYPOINTS.index(f"{s}_wrist")
            if min(kp.confidence[e], kp.confidence[w]) > 0.3:
                segs.append([kp.points_s[e], kp.points_s[w]])
    return np.asarray(segs, dtype=np.float64)


def plan_from_capture(cap, protocol: str, model=None, net=None, spec=None, read_ms: float = 0.0, warm=None,
                      segmentation: Callable[[], tuple[Segmentation, float]] | None = None):
    """Perceive and plan one Capture already in memory: (Plan, Perception), timings per stage in the plan.

    warm: the Perception of an earlier frame of the same patient (a running console re-planning), to start the fit from.
    segmentation: called once the models are loaded, it gives the capture's (Segmentation, ms) made elsewhere
    (``SegmentationAhead.result``); None segments in turn.
    """
    from positioning.bodymodel import built_statures_mm, load_body_model, rest_stature_mm
    from positioning.perceive import perceive
    from positioning.plan import ScannerSpec, fitted_body_warnings, load_protocol, make_plan, mount_warnings

    t0 = time.perf_counter()
    proto = load_protocol(protocol)
    model = model or load_body_model()
    t1 = time.perf_counter()
    per = perceive(cap, model, net, warm=warm, segmentation=segmentation() if segmentation else None)
    t2 = time.perf_counter()
    seg = per.segmentation
    warnings = list(seg.warnings) + mount_warnings(cap.scene.camera_to_scanner) + fitted_body_warnings(
        rest_stature_mm(model.data, per.fit.betas), built_statures_mm(model.data), per.vertices, seg.on_table_s,
        seg.off_image_s)
    plan = make_plan(proto, per.vertices, per.joints, per.fit.landmarks, model.data.weights.argmax(1), model.faces,
                     per.patient_position, per.position_confidence, per.residual_mm, seg.points_s, seg.support_z_s,
                     cap.scene.table_height_mm, cap.scene.table_longitudinal_mm, spec or ScannerSpec(), warnings,
                     forearms(per), np.concatenate([seg.on_table_s, seg.hidden_s]), seg.off_image_s)
    t3 = time.perf_counter()
    timing = {"read_and_load": read_ms + (t1 - t0) * 1000, **per.timing_ms, "plan": (t3 - t2) * 1000,
              "total": read_ms + (t3 - t0) * 1000}
    return dataclasses.replace(plan, timing_ms=timing), per


def _scanner(args: argparse.Namespace):
    """The ScannerSpec a command plans against: --scanner's profile, else $CTPOS_SCANNER's (a site sets it once, as
    $CTPOS_PROTOCOLS), else the scanner simulator's; --bore-mm wins over the bore of each."""
    from positioning.plan import ScannerSpec, load_scanner_profile

    given = {} if args.bore_mm is None else {"bore_diameter_mm": args.bore_mm}
    profile = args.scanner or os.environ.get("CTPOS_SCANNER")
    if profile:
        return load_scanner_profile(profile, **given)
    return dataclasses.replace(ScannerSpec(), **given)


def _scanner_arguments(p: argparse.ArgumentParser, bore_help: str) -> None:
    p.add_argument("--scanner", metavar="FILE", help="scanner profile TOML: the table's travel and the bore "
                                                     "(docs/planning.md; default: $CTPOS_SCANNER, else the "
                                                     "scanner simulator's)")
    p.add_argument("--bore-mm", type=float, help=bore_help)


def _plan(args: argparse.Namespace) -> int:
    spec = _scanner(args)
    plan, _ = plan_capture(Path(args.case), args.protocol, spec=spec, segment_ahead=hasattr(os, "fork"))
    print(json.dumps(plan.to_json(), indent=None if args.json else 1))
    return 0


def register_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="plan a scan from one capture folder (prints the plan JSON)")
    p.add_argument("case", help="capture folder (CONVENTIONS.md)")
    p.add_argument("--protocol", required=True, help="chest, abdomen, chest_abdomen_pelvis, head, whole_body, ...")
    p.add_argument("--json", action="store_true", help="one line of JSON")
    _scanner_arguments(p, "bore diameter of the scanner, mm (700 unless the profile says)")
    p.set_defaults(func=_plan)


def _eval(args: argparse.Namespace) -> int:
    """Plan every capture folder under DIR and compare each plan with its truth.json, where it has one.

    Exit 0 when every capture was planned or refused with its reason; 1 when one failed unexpectedly (its
    reason printed, the rest still evaluated).
    """
    from positioning.bodymodel import load_body_model
    from positioning.capture import CaptureError, read_truth
    from positioning.evaluate import compare, finite_number, summarise
    from positioning.keypoints import load_keypoint_net
    from positioning.plan import PlanRefused
    from positioning.segment import SegmentationError

    root = Path(args.dir)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    # A capture folder is any folder holding one of a capture's files: one missing its depth is still a
    # capture, refused with its reason, not skipped.
    cases = sorted({p.parent for name in ("depth.png", "camera.json", "scene.json", "truth.json")
                    for p in root.rglob(name)})
    if not cases:
        raise ValueError(f"{root}: no capture folders (CONVENTIONS.md) under it")
    scanner = _scanner(args)
    model, net = load_body_model(), load_keypoint_net()
    rows, comparisons, failed = [], [], 0
    for case in cases:
        name = str(case.relative_to(root)) if case != root else case.name
        try:
            truth, truth_note = read_truth(case), None
        except CaptureError as exc:  # the capture is still planned; only the comparison is lost
            truth, truth_note = {}, f"not compared ({exc})"
        scene = truth.get("scene") if isinstance(truth.get("scene"), dict) else {}
        bore = finite_number(scene.get("bore_diameter_mm"))
        # The simulated scanner's own bore where the truth gives it (a real site configures its scanner's).
        spec = dataclasses.replace(scanner, bore_diameter_mm=bore) if bore and bore > 0 else scanner
        try:
            plan, _ = plan_capture(case, args.protocol, model, net, spec)
        except (PlanRefused, SegmentationError, CaptureError) as exc:
            rows.append({"case": name, "refused": str(exc)})
            continue
        except Exception as exc:  # one capture's failure must not lose the others' results
            log.debug("%s failed", case, exc_info=True)
            failed += 1
            rows.append({"case": name, "failed": f"{type(exc).__name__}: {exc}"})
            continue
        c = compare(plan.to_json(), truth, args.protocol)
        comparisons.append(c)
        rows.append({"case": name, **c.to_json(), "ms": round(float(plan.timing_ms["total"]), 1),
                     **({"truth": truth_note} if truth_note else {})})
    refused = sum("refused" in r for r in rows)
    print(f"protocol {args.protocol}: {len(rows)} captures, {refused} refused, {failed} failed")
    for line in summarise(comparisons):
        print(line)
    if comparisons:
        print(f"plan time in process: median {np.median([r['ms'] for r in rows if 'ms' in r]):.0f} ms")
    for r in rows:
        for key in ("refused", "failed", "truth"):
            if key in r:
                print(f"{key} {r['case']}: {r[key]}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if failed else 0


def register_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="plan every capture under a folder and compare with its truth.json")
    p.add_argument("dir", help="folder of capture folders (CONVENTIONS.md), with truth.json where known")
    p.add_argument("--protocol", required=True)
    _scanner_arguments(p, "bore diameter, mm, for captures whose truth.json does not give their scanner's")
    p.add_argument("--json-out", help="write per-capture results here")
    p.set_defaults(func=_eval)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fit the body model to the patient in one capture folder")
    p.add_argument("case", help="capture folder (CONVENTIONS.md)")
    p.add_argument("--json", action="store_true", help="one line of JSON")
    p.add_argument("--mesh", help="write the fitted mesh to this .ply file")
    p.add_argument("--no-keypoints", action="store_true", help="fit to depth alone (no keypoint network)")
    p.add_argument("--colour", action="store_true",
                   help="also MediaPipe Pose on the colour image, fused with the depth keypoints (optional extra)")
    p.set_defaults(func=_fit)
