"""``ctpos sim``: write simulated capture folders (CONVENTIONS.md) with their ground truth."""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

log = logging.getLogger("ctpos.sim")


def case_seed(seed: int, i: int) -> int:
    """The scene seed of case i of a run: stable, distinct across (seed, i)."""
    return int(seed) * 100_003 + int(i)


def write_captures(out: Path, n: int, seed: int, config: Path | None = None) -> list[Path]:
    """Simulate n captures into out/case-XXXX; returns their folders. Deterministic for (seed, config)."""
    from positioning.bodymodel import load_body_model
    from positioning.capture import write_capture
    from sim.scene import load_config, sample_scene
    from sim.simulate import simulate

    cfg = load_config(config)
    model = load_body_model()
    out.mkdir(parents=True, exist_ok=True)
    folders = []
    t0 = time.perf_counter()
    for i in range(n):
        params = sample_scene(case_seed(seed, i), cfg, model.data.train["betas"])
        capture, truth = simulate(params, model)
        folders.append(write_capture(out / f"case-{i:04d}", capture, truth))
        log.info("case %d: %s %s", i, params.patient_position, params.pose)
    dt = time.perf_counter() - t0
    (out / "index.json").write_text(json.dumps({"seed": seed, "n": n, "config": str(config) if config else None,
                                                "cases": [f.name for f in folders], "seconds": dt}, indent=1) + "\n")
    return folders


def _capture(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    folders = write_captures(Path(args.out), args.n, args.seed, Path(args.config) if args.config else None)
    dt = time.perf_counter() - t0
    print(f"wrote {len(folders)} captures to {args.out} in {dt:.1f} s ({len(folders) / dt:.2f} captures/s)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sim", help="simulate RGB-D captures of patients on the CT table")
    s = p.add_subparsers(dest="sim_command", metavar="WHAT", required=True)
    c = s.add_parser("capture", help="write N capture folders")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--n", type=int, default=1, help="number of captures")
    c.add_argument("--seed", type=int, default=0, help="random seed (same seed, same captures)")
    c.add_argument("--config", help="TOML file fixing or ranging scene parameters (docs/simulator.md)")
    c.set_defaults(func=_capture)
