"""``ctpos fit``: the fitted body of one capture, as JSON (and optionally the mesh as PLY)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def fit_capture(folder: Path, model=None):
    """Read, segment and fit one capture folder. Returns (Segmentation, FitResult, timing_ms)."""
    from positioning.bodymodel import load_body_model
    from positioning.capture import read_capture
    from positioning.fit import fit_body
    from positioning.segment import segment_patient

    timing = {}
    t = time.perf_counter()
    cap = read_capture(folder)
    timing["read"] = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    model = model or load_body_model()
    timing["model"] = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    seg = segment_patient(cap)
    timing["segment"] = (time.perf_counter() - t) * 1000
    res = fit_body(model, seg.points_s, seg.support_z_s)
    timing.update(res.timing_ms)
    return cap, seg, res, model, timing


def _fit(args: argparse.Namespace) -> int:
    from positioning.skeleton import JOINT_NAMES

    t0 = time.perf_counter()
    cap, seg, res, model, timing = fit_capture(Path(args.case))
    if args.mesh:
        import open3d as o3d

        mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(res.vertices.astype(np.float64)),
                                         o3d.utility.Vector3iVector(model.faces.astype(np.int32)))
        mesh.compute_vertex_normals()
        if not o3d.io.write_triangle_mesh(str(args.mesh), mesh):
            raise OSError(f"{args.mesh}: cannot write the mesh")
    timing["total"] = (time.perf_counter() - t0) * 1000
    out = {
        "patient_position": res.patient_position,
        "position_confidence": float(np.clip(res.position_margin, 0, 1)),
        "arms": res.arms,
        "joints_scanner_mm": {n: [round(float(x), 1) for x in res.joints[i]] for i, n in enumerate(JOINT_NAMES)},
        "joint_confidence": {n: round(float(c), 3) for n, c in zip(JOINT_NAMES, res.joint_confidence)},
        "betas": [round(float(b), 4) for b in res.betas],
        "residual_mm": round(res.residual_mm, 2),
        "support_z_scanner_mm": round(seg.support_z_s, 1),
        "objects": [{"centre_scanner_mm": o.centre.round(1).tolist(), "area_m2": round(o.area_m2, 4)}
                    for o in seg.objects],
        "warnings": seg.warnings,
        "hypothesis_costs": {k: round(v, 5) for k, v in res.costs.items()},
        "timing_ms": {k: round(v, 1) for k, v in timing.items()},
    }
    print(json.dumps(out, indent=None if args.json else 1))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fit the body model to the patient in one capture folder")
    p.add_argument("case", help="capture folder (CONVENTIONS.md)")
    p.add_argument("--json", action="store_true", help="one line of JSON")
    p.add_argument("--mesh", help="write the fitted mesh to this .ply file")
    p.set_defaults(func=_fit)
