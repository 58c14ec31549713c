"""The simulated exam's report folder: figures, plan, telemetry, audit excerpt, and ``report.md`` tying them.

Figures (matplotlib, Agg):
- ``capture.png``: the capture's colour image with the fitted mesh, the plan's
  landmarks and scan range (solid) and the true region (dashed) drawn on it,
  projected with the *solved* calibration;
- ``side.png``: table, bore and body seen from the side before and after centring;
- ``telemetry.png``: table height and longitudinal position against time, by state.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PLAN_COLOUR, TRUTH_COLOUR, MESH_COLOUR = "#ffd60a", "#64d2ff", "#30d158"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_capture(path: Path, capture, truth: dict, per, plan: dict, protocol: str) -> None:
    """Colour image with the fitted mesh (green), plan landmarks (red), plan range (yellow), true range (blue)."""
    from positioning.frames import project

    plt = _plt()
    m, cam = capture.scene.camera_to_scanner, capture.camera
    fig, ax = plt.subplots(figsize=(12, 7))
    ax.imshow(capture.color)
    uv = project(per.vertices[::4].astype(np.float64), m, cam)
    ax.scatter(uv[:, 0], uv[:, 1], s=0.3, c=MESH_COLOUR, alpha=0.35, linewidths=0)
    lm = plan["landmarks_scanner_mm"]
    luv = project(np.array(list(lm.values()), float), m, cam)
    ax.scatter(luv[:, 0], luv[:, 1], s=22, c="#ff3b30", edgecolors="white", linewidths=0.6)
    for (u, v), n in zip(luv, lm):
        ax.annotate(n, (u, v), fontsize=7, color="white", xytext=(4, -4), textcoords="offset points")
    top_z = float(per.vertices[:, 2].max())
    reg = truth["protocols"][protocol]
    xs = np.linspace(-320, 320, 24)
    for y, colour, style in ((plan["scan_range_scanner_mm"]["cranial"], PLAN_COLOUR, "-"),
                             (plan["scan_range_scanner_mm"]["caudal"], PLAN_COLOUR, "-"),
                             (reg["cranial_y_mm"], TRUTH_COLOUR, "--"), (reg["caudal_y_mm"], TRUTH_COLOUR, "--")):
        line = project(np.stack([xs, np.full_like(xs, y), np.full_like(xs, top_z)], 1), m, cam)
        ax.plot(line[:, 0], line[:, 1], style, color=colour, lw=1.8)
    ax.set_xlim(0, cam.width)
    ax.set_ylim(cam.height, 0)
    ax.set_axis_off()
    ax.set_title(f"{plan['patient_position']} · fitted mesh (green), landmarks (red), planned {protocol} range "
                 f"(yellow), true region (blue, dashed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_side(path: Path, per, truth: dict, plan: dict, before: tuple[float, float], after: tuple[float, float] | None,
              protocol: str, bore_diameter_mm: float) -> None:
    """Side views (y, z in S) before and after centring: gantry and bore, tabletop, mattress, fitted body."""
    from matplotlib.patches import Rectangle

    from sim.room import GANTRY_DEPTH, GANTRY_FACE_Y, table_meshes

    plt = _plt()
    states = [("before: loading position", before)] + ([("after: at scan start", after)] if after else [])
    fig, axs = plt.subplots(len(states), 1, figsize=(13, 4.2 * len(states)), squeeze=False)
    centre_z0 = truth["protocols"][protocol]["ideal_table_height_mm"] - before[0]
    r = bore_diameter_mm / 2
    for ax, (title, (h, lo)) in zip(axs[:, 0], states):
        dz, dy = -(h - before[0]), lo - before[1]
        for z0, z1 in ((r, 900.0), (-900.0, -r)):
            ax.add_patch(Rectangle((GANTRY_FACE_Y, z0), GANTRY_DEPTH, z1 - z0, color="#8e8e93", alpha=0.5))
        for mesh, colour in zip(table_meshes(h, lo, truth["scene"]["mattress_mm"]), ("#636366", "#aeaeb2")):
            (y0, z0), (y1, z1) = mesh.vertices[:, 1:].min(0), mesh.vertices[:, 1:].max(0)
            ax.add_patch(Rectangle((y0, z0), y1 - y0, z1 - z0, color=colour))
        v = per.vertices[::3]
        ax.scatter(v[:, 1] + dy, v[:, 2] + dz, s=0.2, c=MESH_COLOUR, alpha=0.4, linewidths=0)
        for y in (plan["scan_range_scanner_mm"]["cranial"], plan["scan_range_scanner_mm"]["caudal"]):
            ax.axvline(y + dy, color=PLAN_COLOUR, lw=1.2)
        ax.axhline(0, color="k", lw=0.6, ls=":")
        ax.plot([0], [0], "k+", ms=14, mew=2)
        cz = centre_z0 + dz
        ax.plot([plan["scan_range_scanner_mm"]["cranial"] + dy], [cz], "o", color="#ff3b30")
        ax.set_title(f"{title} — table height {h:.1f} mm, longitudinal {lo:.1f} mm; true region centre "
                     f"{cz:+.1f} mm from the isocentre (red dot; + above)", fontsize=10)
        ax.set_xlim(-2900, 1200)
        ax.set_ylim(-700, 600)
        ax.set_aspect("equal")
        ax.set_xlabel("y_S (mm, + into the gantry)")
        ax.set_ylabel("z_S (mm, + up)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_telemetry(path: Path, trace) -> None:
    """Height and longitudinal position against time, shaded by the daemon's state."""
    plt = _plt()
    fig, axs = plt.subplots(2, 1, figsize=(12, 6), sharex=True)
    t = np.asarray(trace.t)
    for ax, ys, label in ((axs[0], trace.height, "table height (mm)"),
                          (axs[1], trace.longitudinal, "longitudinal (mm)")):
        ax.plot(t, ys, lw=1.2)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    colours = {"moving": "#ffd60a", "scanning": "#ff453a", "positioned": "#30d158", "scan_done": "#64d2ff"}
    start = 0
    for i in range(1, len(t) + 1):
        if i == len(t) or trace.state[i] != trace.state[start]:
            c = colours.get(trace.state[start])
            if c:
                for ax in axs:
                    ax.axvspan(t[start], t[i - 1], color=c, alpha=0.18, lw=0)
            start = i
    axs[1].set_xlabel("time since the exam started (s)")
    axs[0].set_title("telemetry as the console received it; shading: moving (yellow), positioned (green), "
                     "scanning (red), scan done (blue)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _md_table(rows: list[tuple[str, str]]) -> str:
    return "| | |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


def write_report(out: Path, summary: dict, capture, truth: dict, per, plan: dict, trace, model, spec,
                 audit: list[dict] | None) -> Path:
    """All report files and report.md; returns report.md's path."""
    protocol = summary["protocol"]
    draw_capture(out / "capture.png", capture, truth, per, plan, protocol)
    before = (capture.scene.table_height_mm, capture.scene.table_longitudinal_mm)
    after = None
    if "table_at_scan_start" in summary:
        a = summary["table_at_scan_start"]
        after = (a["table_height_mm"], a["table_longitudinal_mm"])
    draw_side(out / "side.png", per, truth, plan, before, after, protocol, spec.bore_diameter_mm)
    (out / "telemetry.json").write_text(json.dumps(trace.to_json()) + "\n")
    if trace.t:
        draw_telemetry(out / "telemetry.png", trace)
    if audit is not None:
        (out / "audit.json").write_text(json.dumps(audit, indent=1) + "\n")

    t, pv = summary["truth"], summary["plan_vs_truth"]
    lines = [f"# Simulated exam — seed {summary['seed']}, {protocol}", "",
             f"Outcome: **{summary['outcome']}**.", "",
             "## Patient (simulator's truth)", "",
             _md_table([("position", t["patient_position"]), ("pose", t["pose"]),
                        ("stature", f"{t['stature_mm']} mm"), ("BMI", str(t["bmi"]))]), "",
             "## Plan", "",
             _md_table([("position found", f"{plan['patient_position']} "
                                           f"({'correct' if pv['position_correct'] else 'WRONG'})"),
                        ("table height", f"{plan['table_height_mm']} mm (ideal {t['ideal_table_height_mm']} mm, "
                                         f"error {pv['table_height_error_mm']:+} mm)"),
                        ("scan range, table frame", f"{plan['scan_range_table_mm']['cranial']} to "
                                                   f"{plan['scan_range_table_mm']['caudal']} mm (true region "
                                                   f"{t['region_table_mm']['cranial']} to "
                                                   f"{t['region_table_mm']['caudal']} mm)"),
                        ("overscan", f"cranial {pv['overscan_cranial_mm']:+} mm, caudal "
                                     f"{pv['overscan_caudal_mm']:+} mm (negative: region cut)"),
                        ("water-equivalent diameter", f"{plan['water_equivalent_diameter_mm']} mm, SSDE factor "
                                                      f"{plan['ssde_conversion_factor']}"),
                        ("bore clearance", f"{plan['bore_clearance_mm']} mm"),
                        ("lateral offset (table cannot correct)", f"{plan['iso_offset_lateral_mm']} mm"),
                        ("warnings", "; ".join(w["message"] for w in plan["warnings"]) or "none"),
                        ("movement check", summary.get("movement_check", "-"))]), "",
             "![capture](capture.png)", ""]
    if "iso_error_mm" in summary:
        e = summary["iso_error_mm"]
        lines += ["## ISO-centring against the truth", "",
                  _md_table([("region centre from the isocentre, before", f"{e['before']:+} mm"),
                             ("after centring (at scan start)", f"{e['after']:+} mm"),
                             ("of which the plan set to keep clear of the bore", f"{e['bore_compromise']:+} mm")]),
                  ""]
    lines += ["![side view](side.png)", ""]
    if trace.t:
        lines += ["## Table telemetry", "", "![telemetry](telemetry.png)", "",
                  f"{len(trace.t)} telemetry messages followed; data in `telemetry.json`.", ""]
    if audit:
        lines += ["## Audit log excerpt (daemon's SQLite log, transitions and commands)", "",
                  "| seq | time (UTC) | kind | who | what | why |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['seq']} | {r['time'][11:23]} | {r['kind']} | {r['who']} | {r['what']} | {r['why'] or ''} |"
                  for r in audit]
        lines += ["", "Full log: `bridge/audit.sqlite`; excerpt in `audit.json`.", ""]
    cal = summary.get("calibration", {})
    lines += ["## Calibration (solved from this run's session, used for the plan)", "",
              _md_table([("views", str(cal.get("views"))),
                         ("reprojection RMS", f"{cal.get('reprojection_rms_px', float('nan')):.3f} px"),
                         ("camera position error vs the simulated mount",
                          f"{cal.get('translation_error_mm', float('nan')):.2f} mm")]), "",
              "## Time per stage (s)", "", _md_table([(k, f"{v:.2f}") for k, v in summary["stages_s"].items()]), "",
              f"Plan stage timings (ms): {json.dumps(plan['timing_ms'])}", "",
              "Files: `plan.json` (CONVENTIONS.md plan), `capture/` (capture folder with truth), `capture.db3` "
              "(the librealsense recording of the frame), `calibration.json`, `calibration-session/`, "
              "`bridge/` (daemon and simulator logs, audit log), `summary.json`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
