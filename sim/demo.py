"""``ctpos demo``: simulated captures of a few typical CT patients and a report of what they hold.

At this stage the demo shows the simulator's output: per capture, the depth and
colour images with the ground-truth landmarks and protocol range drawn on them,
and a JSON summary. The later issues extend it into a full exam.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("ctpos.demo")

# The demo's patients: one of each kind a reader should see.
DEMO_CASES = (
    {"patient_position": "HFS", "pose": "arms_up", "blanket": False},
    {"patient_position": "FFP", "pose": "arms_down", "blanket": False},
    {"patient_position": "HFS", "pose": "hands_on_belly", "blanket": True},
    {"patient_position": "FFS", "pose": "knees_bent", "blanket": False},
)
LANDMARK_COLOUR = "#ff3b30"


def draw_capture(path: Path, capture, truth: dict, protocol: str) -> None:
    """A PNG of depth and colour side by side, truth landmarks and the protocol's range drawn in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from positioning.frames import project

    m, cam = capture.scene.camera_to_scanner, capture.camera
    lm = truth["landmarks_scanner_mm"]
    names = list(lm)
    uv = project(np.array([lm[n] for n in names]), m, cam)
    reg = truth["protocols"][protocol]
    top_z = max(p[2] for p in lm.values())
    fig, axs = plt.subplots(1, 2, figsize=(17, 5.4))
    depth = capture.depth_mm()
    body = depth[depth > 0]
    axs[0].imshow(np.where(depth > 0, depth, np.nan), cmap="turbo", vmin=np.percentile(body, 1),
                  vmax=np.percentile(body, 60))
    axs[0].set_title("depth (mm along the optical axis; white = no data)")
    axs[1].imshow(capture.color)
    axs[1].set_title("colour (registered)")
    for ax in axs:
        for end, style in (("cranial_y_mm", "-"), ("caudal_y_mm", "--")):
            xs = np.linspace(-300, 300, 20)
            line = np.stack([xs, np.full_like(xs, reg[end]), np.full_like(xs, top_z)], 1)
            luv = project(line, m, cam)
            ax.plot(luv[:, 0], luv[:, 1], style, color="#ffd60a", lw=1.6)
        ax.scatter(uv[:, 0], uv[:, 1], s=18, c=LANDMARK_COLOUR, edgecolors="white", linewidths=0.6)
        for (u, v), n in zip(uv, names):
            ax.annotate(n, (u, v), fontsize=6.5, color="white", xytext=(3, -3), textcoords="offset points")
        ax.set_axis_off()
    fig.suptitle(f"{capture.name}: {truth['patient_position']}, {truth['pose'].replace('_', ' ')}, "
                 f"stature {truth['stature_mm']:.0f} mm, BMI {truth['bmi']:.1f}"
                 f"{', blanket' if truth['blanket'] else ''} — truth landmarks (red), {protocol} range (yellow: "
                 f"cranial solid, caudal dashed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(out: Path, seed: int, protocol: str) -> dict:
    from positioning.bodymodel import load_body_model
    from positioning.capture import write_capture
    from sim.cli import case_seed
    from sim.scene import load_config, sample_scene
    from sim.simulate import PROTOCOLS, simulate

    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    out.mkdir(parents=True, exist_ok=True)
    model = load_body_model()
    cfg = load_config(None)
    summary = {"seed": seed, "protocol": protocol, "cases": []}
    for i, fixed in enumerate(DEMO_CASES):
        t0 = time.perf_counter()
        params = sample_scene(case_seed(seed, i), {**cfg, **fixed}, model.data.train["betas"])
        capture, truth = simulate(params, model)
        folder = write_capture(out / "captures" / f"case-{i:02d}", capture, truth)
        png = out / f"case-{i:02d}.png"
        draw_capture(png, capture, truth, protocol)
        summary["cases"].append({
            "capture": str(folder.relative_to(out)), "image": png.name,
            "patient_position": truth["patient_position"], "pose": truth["pose"], "blanket": truth["blanket"],
            "stature_mm": round(truth["stature_mm"]), "bmi": round(truth["bmi"], 1),
            "table_height_mm": round(params.table_height_mm, 1),
            "ideal_table_height_mm": round(truth["protocols"][protocol]["ideal_table_height_mm"], 1),
            "valid_depth_fraction": round(float((capture.depth > 0).mean()), 3),
            "seconds": round(time.perf_counter() - t0, 2),
        })
        log.info("demo case %d done", i)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    s = run_demo(out, args.seed, args.protocol)
    for c in s["cases"]:
        print(f"  {c['image']}: {c['patient_position']} {c['pose']:15s} BMI {c['bmi']:5.1f}  table "
              f"{c['table_height_mm']:6.1f} mm -> ideal {c['ideal_table_height_mm']:6.1f} mm")
    print(f"report: {out.resolve()}/summary.json and {len(s['cases'])} images")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the headless simulated demo and write its report")
    p.add_argument("--out", default="demo-report", help="report folder")
    p.add_argument("--seed", type=int, default=7, help="chooses the patients")
    p.add_argument("--protocol", default="chest", help="protocol whose range is drawn")
    p.set_defaults(func=_main)
