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


def _calibration(args: argparse.Namespace) -> int:
    import dataclasses

    from sim.calibration import sample_calibration, write_session

    scene = sample_calibration(args.seed, n_long=args.longitudinal, n_height=args.heights)
    if args.no_board:
        scene = dataclasses.replace(scene, board=False)
    if args.board_off_table:
        # Half the board's width over the tabletop's edge.
        scene = dataclasses.replace(scene, board_offset_t_mm=(260.0, 0.0, 0.0))
    if args.bad_reading is not None:
        scene = dataclasses.replace(scene, bad_reading=(int(args.bad_reading[0]), args.bad_reading[1]))
    write_session(Path(args.out), scene)
    print(f"wrote a calibration session of {len(scene.table_positions)} views to {args.out}")
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
    k = s.add_parser("calibration", help="write a calibration session: the board at several table positions")
    k.add_argument("--out", required=True)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--longitudinal", type=int, default=5, help="number of longitudinal table positions")
    k.add_argument("--heights", type=int, default=3, help="number of table heights")
    k.add_argument("--no-board", action="store_true", help="leave the board out (a refused session)")
    k.add_argument("--board-off-table", action="store_true", help="board half over the table edge (refused)")
    k.add_argument("--bad-reading", nargs=2, type=float, metavar=("VIEW", "MM"),
                   help="add MM to the recorded table height of view VIEW (refused or rejected)")
    k.set_defaults(func=_calibration)
