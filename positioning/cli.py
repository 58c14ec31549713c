"""``ctpos fit``: the fitted body of one capture, as JSON (and optionally the mesh as PLY)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _fit(args: argparse.Namespace) -> int:
    from positioning.bodymodel import load_body_model
    from positioning.capture import read_capture
    from positioning.perceive import perceive
    from positioning.skeleton import JOINT_NAMES

    t0 = time.perf_counter()
    cap = read_capture(Path(args.case))
    model = load_body_model()
    t1 = time.perf_counter()
    p = perceive(cap, model, use_keypoints=not args.no_keypoints)
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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fit the body model to the patient in one capture folder")
    p.add_argument("case", help="capture folder (CONVENTIONS.md)")
    p.add_argument("--json", action="store_true", help="one line of JSON")
    p.add_argument("--mesh", help="write the fitted mesh to this .ply file")
    p.add_argument("--no-keypoints", action="store_true", help="fit to depth alone (no keypoint network)")
    p.set_defaults(func=_fit)
