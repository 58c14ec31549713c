"""Train the depth keypoint network on simulated captures: one reproducible command, CPU only.

    python -m sim.keypoint_training --train 3000 --test 300 --epochs 12
    python -m sim.keypoint_training --epochs 6 --init OLD.pt --max-lr 1e-3   # fine-tune (v5 from v4, docs/perception.md)
    python -m sim.keypoint_training --train 1500 --positions 3 --epochs 6 --init v5.pt --max-lr 1e-3   # v6 from v5
    python -m sim.keypoint_training --train 2000 --skip 3000 --positions 3 --epochs 6 --init v6.pt --max-lr 1e-3
        # v7 from v6 on unseen patients (tried, not shipped: docs/perception.md)

1. Simulates captures across all poses, body types, blankets and camera mounts the
   simulator offers (training seeds and held-out seeds never overlap), segments each
   with the production code and cuts both views' height-map windows; the truth keypoints go
   into the same windows. Cached in ``--data``.
2. Trains ``positioning.keypoints.KeypointNet`` on both views with fresh noise (AdamW, heatmap BCE +
   height L1 + prone BCE + the keypoint-place losses; ``train``). Paired keypoints are labelled by side (+x_T / -x_T), so both
   augmentations, a half turn and a mirror across the table, swap the paired channels;
   neither changes supine/prone.
3. Reports PCK and errors on the held-out captures and writes the weights.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import torch

from positioning.keypoints import (DECODE_RADIUS, FLIP, HEIGHT_SCALE_MM, KEYPOINTS, WEIGHTS, WIN_X, WIN_Y,
                                   VIEWS, KeypointNet, Window, load_keypoint_net, position_from_sides, read_views,
                                   side_to_anatomy, view_inputs)
from positioning.segment import CELL_MM

log = logging.getLogger("ctpos.train_keypoints")
TRAIN_SEED0, TEST_SEED0 = 10_000_000, 20_000_000
# Weights of the keypoint-place losses, per cell (10 mm) of error; the heatmap loss is of order 0.01-0.05.
COORD_WEIGHT, AGREE_WEIGHT = 0.02, 0.05
_MODEL = None


def table_shifts(seed: int, positions: int) -> list[float]:
    """The table's moves (mm along it) a training patient is captured at: 0 first, then alternately towards and
    away from the gantry by 50-250 mm, drawn per patient (a console moves the table by any amount)."""
    rng = np.random.default_rng(seed)
    return [0.0] + [float((-1) ** i * rng.uniform(50.0, 250.0)) for i in range(positions - 1)]


def _sample(seed: int, positions: int = 1):
    """(views (P*2,2,256,64) float16, their windows' origins (P*2,2), cells (K,2) in the first view's window,
    heights (K,), position) for one simulated patient captured at ``positions`` table positions (the first as
    sampled; ``table_shifts``), or None. The patient moves with the table, so the truth on the table is one.
    The network trains on every window (``train``); evaluate() reads the first two, as detect_keypoints does."""
    global _MODEL
    from positioning.bodymodel import load_body_model
    from positioning.segment import SegmentationError, segment_patient
    from sim.scene import load_config, sample_scene, with_table_at
    from sim.simulate import simulate

    if _MODEL is None:
        _MODEL = load_body_model()
    p = sample_scene(seed, load_config(None), _MODEL.data.train["betas"])
    views, wins = [], []
    for k, dl in enumerate(table_shifts(seed, positions)):
        c, t = simulate(with_table_at(p, p.table_height_mm, p.table_longitudinal_mm + dl), _MODEL)
        try:
            s = segment_patient(c)
        except SegmentationError:
            return None
        v, w = view_inputs(s, c.scene.table_longitudinal_mm)
        views.append(v)
        wins += w
        if k == 0:
            cap, truth, seg = c, t, s
    views = np.concatenate(views)
    j = truth["joints_scanner_mm"]
    pts = np.array([j[n] for n in KEYPOINTS])
    xy_t = np.column_stack([pts[:, 0], pts[:, 1] - cap.scene.table_longitudinal_mm])
    cells = wins[0].to_cells(xy_t)
    return views.astype(np.float16), np.array([[w.x0, w.y0] for w in wins], np.float32), cells.astype(np.float32), \
        (pts[:, 2] - seg.support_z_s).astype(np.float32), truth["patient_position"]


def generate(seeds: list[int], out: Path, workers: int = 2, positions: int = 1) -> None:
    t = time.perf_counter()
    sample = functools.partial(_sample, positions=positions)
    if workers == 1:  # in this process: a fork of one that has run torch can hang on torch's thread pool
        rows = [r for r in map(sample, seeds) if r is not None]
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            rows = [r for r in pool.imap(sample, seeds, chunksize=8) if r is not None]
    np.savez_compressed(out, views=np.stack([r[0] for r in rows]), origins=np.stack([r[1] for r in rows]),
                        cells=np.stack([r[2] for r in rows]), heights=np.stack([r[3] for r in rows]),
                        position=np.array([r[4] for r in rows]))
    log.info("%d samples -> %s in %.0f s", len(rows), out, time.perf_counter() - t)


def _targets(cells: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """(B, K, 2) input-resolution cells -> (B, K, 128, 32) Gaussian heatmaps at half resolution."""
    c = (cells - 0.5) / 2.0
    ii = torch.arange(128, dtype=torch.float32)[None, None, :, None]
    jj = torch.arange(32, dtype=torch.float32)[None, None, None, :]
    d2 = (ii - c[..., 0, None, None]) ** 2 + (jj - c[..., 1, None, None]) ** 2
    return torch.exp(-d2 / (2 * sigma ** 2))


def side_labels(cells: np.ndarray, heights: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Anatomical (B, K, 2) cells and (B, K) heights -> the network's side-named order (+x_T side in "left_*")."""
    order = np.array([side_to_anatomy(str(p)) for p in positions])  # an involution: the same order goes back
    return np.take_along_axis(cells, order[..., None], 1), np.take_along_axis(heights, order, 1)


def _augment(x, cells, heights, rng, group: int = 1):
    """A half turn (rows and columns reversed) and/or a mirror across the table (columns reversed).

    Either puts each limb on the other side, so the side-named pairs swap; supine/prone is unchanged.
    Cell coordinates count from the first cell's centre, so reversing n cells maps c to n - 1 - c.
    (v2's weights were trained with n - c: a flipped window's labels a cell off; docs/perception.md.)
    group: each run of this many consecutive windows (one scene's views) is flipped alike."""
    x, cells, heights = x.clone(), cells.clone(), heights.clone()
    for b in range(x.shape[0]):
        if b % group == 0:
            turn, mirror = rng.uniform() < 0.5, rng.uniform() < 0.5
        if turn:
            x[b] = torch.flip(x[b], (1, 2))
            cells[b, :, 0] = WIN_Y - 1 - cells[b, :, 0]
            cells[b, :, 1] = WIN_X - 1 - cells[b, :, 1]
            cells[b], heights[b] = cells[b, list(FLIP)], heights[b, list(FLIP)]
        if mirror:
            x[b] = torch.flip(x[b], (2,))
            cells[b, :, 1] = WIN_X - 1 - cells[b, :, 1]
            cells[b], heights[b] = cells[b, list(FLIP)], heights[b, list(FLIP)]
    return x, cells, heights


def _smooth(rng, cells: int) -> torch.Tensor:
    """(256, 64) zero-mean, unit-sd random field, smooth over about ``cells`` cells."""
    small = torch.as_tensor(rng.normal(size=(1, 1, WIN_Y // cells + 2, WIN_X // cells + 2)), dtype=torch.float32)
    f = torch.nn.functional.interpolate(small, size=(WIN_Y, WIN_X), mode="bicubic", align_corners=False)[0, 0]
    return (f - f.mean()) / (f.std() + 1e-6)


def renoise(x: torch.Tensor, rng) -> torch.Tensor:
    """(B, 2, 256, 64) windows with fresh sensor-like noise on the body's cells, each window its own draw.

    A smooth field (sd 0-6 mm, over 80-320 mm: a stereo camera's correlated depth error at 1.4-2.2 m), per-cell
    noise (sd 0-2 mm) and holes (up to 4 % of the body's cells, in blobs). The captures already carry one draw
    of the simulator's noise; a network that saw only that one learnt keypoints that move with it (fresh noise
    moved trunk keypoints 4.6 mm, 3.3 mm without the correlated field: docs/perception.md). The draws are
    deliberately not the simulator's own model, so the network does not learn one generator's texture.
    """
    x = x.clone()
    for b in range(x.shape[0]):
        occ = x[b, 1] > 0
        if not occ.any():
            continue
        bump = _smooth(rng, int(rng.choice([8, 16, 32]))) * rng.uniform(0, 6.0)
        bump = bump + torch.as_tensor(rng.normal(size=(WIN_Y, WIN_X)), dtype=torch.float32) * rng.uniform(0, 2.0)
        x[b, 0] = torch.where(occ, (x[b, 0] + bump / HEIGHT_SCALE_MM).clamp(min=0), x[b, 0])
        frac = rng.uniform(0, 0.04)
        if frac > 0:
            field = _smooth(rng, 4)
            hole = occ & (field > torch.quantile(field[occ], 1 - frac))
            x[b, :, hole] = 0.0
    return x


def _local_soft_argmax(heat: torch.Tensor, cells: torch.Tensor, radius: int = DECODE_RADIUS) -> torch.Tensor:
    """(B, K, 128, 32) logits, (B, K, 2) input-resolution target cells -> (B, K, 2) input-resolution cells:
    the sigmoid-weighted mean within ``radius`` half-resolution cells of each target (differentiable;
    decode_heatmaps reads the same neighbourhood around the peak)."""
    c = (cells - 0.5) / 2.0
    ii = torch.arange(128, dtype=torch.float32)[None, None, :, None]
    jj = torch.arange(32, dtype=torch.float32)[None, None, None, :]
    near = ((ii - c[..., 0, None, None]).abs() <= radius) & ((jj - c[..., 1, None, None]).abs() <= radius)
    p = torch.sigmoid(heat) * near
    s = p.sum((2, 3)).clamp(min=1e-6)
    return torch.stack([(p * ii).sum((2, 3)) / s, (p * jj).sum((2, 3)) / s], -1) * 2.0 + 0.5


def view_cells(cells: np.ndarray, origins: np.ndarray) -> np.ndarray:
    """(N, K, 2) cells in each capture's first view's window, (N, V, 2) windows' (x0, y0) -> (N, V, K, 2)
    cells in every view's window (the same points on the table)."""
    shift = (origins[:, :1] - origins)[..., ::-1] / CELL_MM  # (N, V, 2) rows, columns
    return cells[:, None] + shift[:, :, None]


def read_position(net: KeypointNet, data: dict, n: int, k: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """Patient n's k-th table position read as detect_keypoints reads a capture (its VIEWS' windows): anatomical
    keypoints (K, 2) mm on the table, their heights (K,) mm over the support, and the patient position."""
    v = len(VIEWS)
    wins = [Window(float(x0), float(y0)) for x0, y0 in data["origins"][n][k * v:(k + 1) * v]]
    xy_t, hts, _, p_prone = read_views(net, data["views"][n][k * v:(k + 1) * v].astype(np.float32), wins)
    pos = position_from_sides(xy_t[:, 1], p_prone)
    order = list(side_to_anatomy(pos))
    return xy_t[order], hts[order], pos


def truth_on_table(data: dict, n: int) -> np.ndarray:
    """(K, 2) mm: patient n's anatomical keypoints on the table (one for every table position)."""
    return Window(*map(float, data["origins"][n][0])).to_table(data["cells"][n])


def evaluate(net: KeypointNet, data: dict) -> dict:
    """Errors on held-out captures as detect_keypoints reads them: both views (positioning/keypoints.py VIEWS);
    of a patient captured at several table positions, the first."""
    net.eval()
    errs, herrs, pos_ok = [], [], []
    for n in range(len(data["views"])):
        xy_t, hts, pos = read_position(net, data, n)
        errs.append(np.linalg.norm(xy_t - truth_on_table(data, n), axis=1))
        herrs.append(np.abs(hts - data["heights"][n]))
        pos_ok.append(pos == data["position"][n])
    e, h = np.array(errs), np.array(herrs)
    e3 = np.sqrt(e ** 2 + h ** 2)
    return {"n": int(len(e)), "pck_50mm": float((e < 50).mean()), "pck_100mm": float((e < 100).mean()),
            "error_2d_mm_median": float(np.median(e)), "error_2d_mm_p95": float(np.percentile(e, 95)),
            "error_3d_mm_median": float(np.median(e3)), "error_3d_mm_p95": float(np.percentile(e3, 95)),
            "position_accuracy": float(np.mean(pos_ok)),
            "per_keypoint_3d_median_mm": {n: float(np.median(e3[:, i])) for i, n in enumerate(KEYPOINTS)}}


def train(train_npz: Path, test_npz: Path, out: Path, epochs: int, seed: int = 0, init: Path | None = None,
          max_lr: float = 3e-3) -> dict:
    """Each step takes 32 windows: whole patients, each with both views (VIEWS' grids: which points share a cell
    differs) of every table position it was captured at (``generate``'s ``positions``), each window with its own
    fresh noise (``renoise``) and a patient's windows flipped alike. Besides the heatmap, height and prone losses, a
    keypoint read from the heatmap (``_local_soft_argmax``) is pulled to its truth (COORD_WEIGHT) and towards the
    same place on the table in the patient's other windows (AGREE_WEIGHT): what the keypoints must not follow is
    the noise, the grid and the camera's view of a patient the table has moved, as the same patient at three
    table positions shows (docs/planning.md).

    init: weights to start from (fine-tuning an earlier network on a changed simulator, with a lower max_lr)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tr, te = dict(np.load(train_npz)), dict(np.load(test_npz))
    n_views = tr["views"].shape[1]
    x_all = torch.as_tensor(tr["views"].astype(np.float32))  # (N, V, 2, 256, 64)
    cells, heights = side_labels(tr["cells"], tr["heights"], tr["position"])
    c_all = torch.as_tensor(view_cells(cells, tr["origins"]).astype(np.float32))  # (N, V, K, 2)
    h_all = torch.as_tensor(heights / HEIGHT_SCALE_MM)
    p_all = torch.as_tensor(np.char.endswith(tr["position"].astype(str), "P").astype(np.float32))
    net = load_keypoint_net(init) if init is not None else KeypointNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    per_step = 32 // n_views
    steps = epochs * ((len(x_all) + per_step - 1) // per_step)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps)
    bce = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(20.0))
    t0 = time.perf_counter()
    for ep in range(epochs):
        net.train()
        perm = torch.as_tensor(rng.permutation(len(x_all)))
        tot = 0.0
        for b in range(0, len(perm), per_step):
            idx = perm[b:b + per_step]
            m = len(idx) * n_views  # windows, a capture's views consecutive
            x, c, h = _augment(x_all[idx].reshape(m, 2, WIN_Y, WIN_X), c_all[idx].reshape(m, len(KEYPOINTS), 2),
                               h_all[idx].repeat_interleave(n_views, 0), rng, group=n_views)
            heat, height, prone = net(renoise(x, rng))
            tgt = _targets(c)
            # Height is learned at (and around) each keypoint's true place.
            w = (tgt > 0.3).float()
            l_h = ((height - h[..., None, None]).abs() * w).sum() / w.sum().clamp(min=1)
            inside = ((c[..., 0] >= 0) & (c[..., 0] < WIN_Y) & (c[..., 1] >= 0) & (c[..., 1] < WIN_X)).float()
            off = (_local_soft_argmax(heat, c) - c).reshape(len(idx), n_views, len(KEYPOINTS), 2)
            both = inside.reshape(len(idx), n_views, len(KEYPOINTS)).prod(1)
            l_c = (off.abs().sum(-1) * inside.reshape(off.shape[:3])).sum() / inside.sum().clamp(min=1)
            # Per pair of windows, so a patient captured at three positions (six windows) weighs as one with two.
            l_a = ((off - off.mean(1, keepdim=True)).abs().sum(-1).mean(1) * 2 * both).sum() / both.sum().clamp(min=1)
            loss = bce(heat, tgt) + l_h + COORD_WEIGHT * l_c + AGREE_WEIGHT * l_a + \
                0.5 * torch.nn.functional.binary_cross_entropy_with_logits(prone, p_all[idx].repeat_interleave(n_views))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
        log.info("epoch %d/%d loss %.4f (%.0f s)", ep + 1, epochs, tot / len(perm), time.perf_counter() - t0)
    report = evaluate(net, te)
    report.update(train_samples=int(len(x_all)), epochs=epochs, train_seconds=time.perf_counter() - t0,
                  parameters=int(sum(p.numel() for p in net.parameters())))
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": net.state_dict(), "keypoints": list(KEYPOINTS), "report": report}, out)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--skip", type=int, default=0,
                    help="start after the first SKIP training seeds: patients no earlier network saw")
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--data", type=Path, default=Path("bench/out/keypoint-data"))
    ap.add_argument("--out", type=Path, default=WEIGHTS)
    ap.add_argument("--report", type=Path, default=Path("docs/keypoints-report.json"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--positions", type=int, default=1,
                    help="capture each training patient at this many table positions (table_shifts)")
    ap.add_argument("--init", type=Path, help="start from these weights instead of a fresh network (fine-tuning)")
    ap.add_argument("--max-lr", type=float, default=3e-3, help="the one-cycle schedule's peak learning rate")
    ap.add_argument("--evaluate", action="store_true",
                    help="no training: evaluate the weights in --out on the test captures, as detect_keypoints runs")
    args = ap.parse_args(argv)
    if not 0 <= args.skip <= TEST_SEED0 - TRAIN_SEED0 - args.train:
        ap.error(f"--skip {args.skip}: the training seeds must stay below the held-out ones ({TEST_SEED0:,})")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.data.mkdir(parents=True, exist_ok=True)
    at = "" if args.positions == 1 else f"-x{args.positions}"
    after = "" if not args.skip else f"-after{args.skip}"
    tr = args.data / f"train-{args.train}{at}{after}-views.npz"
    te = args.data / f"test-{args.test}-views.npz"
    if not tr.exists() and not args.evaluate:
        generate([TRAIN_SEED0 + args.skip + i for i in range(args.train)], tr, args.workers, args.positions)
    if not te.exists():
        generate([TEST_SEED0 + i for i in range(args.test)], te, args.workers)
    if args.evaluate:
        trained = torch.load(args.out, map_location="cpu", weights_only=True)["report"]
        report = {**{k: trained[k] for k in ("train_samples", "epochs", "train_seconds", "parameters") if k in trained},
                  **evaluate(load_keypoint_net(args.out), dict(np.load(te)))}
    else:
        report = train(tr, te, args.out, args.epochs, init=args.init, max_lr=args.max_lr)
    args.report.write_text(json.dumps(report, indent=1) + "\n")
    log.info("%s", json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
