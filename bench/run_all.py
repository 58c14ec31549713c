"""Run every benchmark in bench/ in turn and print their figures (the runs docs/ quotes)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
ANNY = str(HERE / "scenes" / "anny-bodies.toml")
NOISY = str(HERE / "scenes" / "noisy-camera.toml")
HIRES = str(HERE / "scenes" / "depth-1280x720.toml")
LORES = str(HERE / "scenes" / "depth-424x240.toml")
FLYING = str(HERE / "scenes" / "flying-pixels.toml")
OUTLIERS = str(HERE / "scenes" / "outliers.toml")


def scene_plan(scene: str, n: int, region: str = "chest") -> tuple[str, list[str]]:
    """planning.py's accuracy run alone (no three positions, no fresh processes) on bench/scenes/<scene>.toml."""
    return ("planning.py", ["--n", str(n), "--k", "0", "--runs", "0", "--protocol", region, "--scene-config",
                            str(HERE / "scenes" / f"{scene}.toml"), "--out", f"bench/out/planning-{scene}-{region}.json"])


# Beyond each script's defaults: the abdomen, bodies straight from anny, a worse camera, other depth sizes,
# mixed edge pixels and outliers, a thin and a thick mattress, the table moved into the gantry, a camera too
# close to see the whole patient, a narrower camera, a patient askew (docs/planning.md, docs/perception.md); the
# level check's false alarms and misses on those scenes; the held-out plans with a noiseless camera.
EXTRA = [
    ("planning.py", ["--protocol", "abdomen", "--runs", "0", "--out", "bench/out/planning-abdomen.json"]),
    ("planning.py", ["--n", "150", "--k", "0", "--runs", "0", "--scene-config", ANNY,
                     "--out", "bench/out/planning-anny-chest.json"]),
    ("planning.py", ["--n", "150", "--k", "0", "--runs", "0", "--protocol", "abdomen", "--scene-config", ANNY,
                     "--out", "bench/out/planning-anny-abdomen.json"]),
    ("perception.py", ["--n", "150", "--scene-config", ANNY, "--json", "bench/out/perception-anny.json"]),
    ("planning.py", ["--n", "150", "--k", "0", "--runs", "0", "--scene-config", NOISY,
                     "--out", "bench/out/planning-noisy-chest.json"]),
    ("planning.py", ["--n", "150", "--k", "0", "--runs", "0", "--protocol", "abdomen", "--scene-config", NOISY,
                     "--out", "bench/out/planning-noisy-abdomen.json"]),
    ("planning.py", ["--n", "150", "--k", "0", "--runs", "0", "--scene-config", HIRES,
                     "--out", "bench/out/planning-1280x720-chest.json"]),
    ("planning.py", ["--n", "150", "--k", "0", "--runs", "0", "--scene-config", LORES,
                     "--out", "bench/out/planning-424x240-chest.json"]),
    ("planning.py", ["--n", "150", "--k", "0", "--runs", "0", "--scene-config", FLYING,
                     "--out", "bench/out/planning-flying-chest.json"]),
    ("planning.py", ["--n", "150", "--k", "0", "--runs", "0", "--scene-config", OUTLIERS,
                     "--out", "bench/out/planning-outliers-chest.json"]),
] + [scene_plan(f"{m}-mattress", 100, region) for m in ("thin", "thick") for region in ("chest", "abdomen")] + [
    scene_plan("table-in-gantry", 12), scene_plan("camera-too-close", 16), scene_plan("narrow-camera", 24),
    scene_plan("patient-askew", 24),
] + [scene_plan(s, 100, region) for s in ("one-arm-up", "curved-mattress") for region in ("chest", "abdomen")] + [
    scene_plan("head-pillow", 100), scene_plan("head-pillow", 100, "head"),
    scene_plan("side-lying", 24), scene_plan("half-side", 24),
    scene_plan("children", 40), scene_plan("children", 40, "abdomen"),
    scene_plan("steep-camera", 60), scene_plan("steep-camera-away", 60), scene_plan("camera-beside", 60),
] + [scene_plan("noiseless-camera", 400, region) for region in ("chest", "abdomen")] + [
    ("planning.py", ["--n", "0", "--k", "120", "--runs", "0", "--protocol", region, "--scene-config",
                     str(HERE / "scenes" / "noiseless-camera.toml"),
                     "--out", f"bench/out/planning-noiseless-camera-positions-{region}.json"])
    for region in ("chest", "abdomen")
] + [
    ("level_check.py", ["--no-plan", "--errors", "0:0,1:0,3:0,0:3", "--scene-config", NOISY,
                        "--out", "bench/out/level-check-noisy.json"]),
] + [("level_check.py", ["--no-plan", "--errors", "0:0,3:0", "--scene-config", str(HERE / "scenes" / f"{c}.toml"),
                         "--out", f"bench/out/level-check-{c}.json"])
     for c in ("depth-424x240", "depth-1280x720", "flying-pixels", "outliers", "anny-bodies")] \
    + [("plot_iso.py", ["bench/out/planning.rows.json", "bench/out/planning-abdomen.rows.json",
                        "--label", "chest", "--label", "abdomen", "--plot", "docs/figures/iso-error.png"])]

# plot_iso.py reads the planning runs' rows, so it runs last (in EXTRA), not bare.
runs = [(s.name, []) for s in sorted(HERE.glob("*.py")) if s.name not in ("run_all.py", "plot_iso.py")] + EXTRA
for name, args in runs:
    print(f"== {name} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, str(HERE / name), *args], check=True)
