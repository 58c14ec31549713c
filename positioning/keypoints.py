"""Depth keypoints: a compact network on the top-down height map of the segmented patient.

The input is camera-independent: the patient's measured surface in the table frame,
binned at 10 mm (positioning/segment.py), cut to a fixed window of 256 × 64 cells
(2.56 m along the table, ±320 mm across) centred on the patient. It shows no face
and works in the dark or under a thin blanket. Two channels: height above the
support (/300 mm) and occupancy.

The network (``KeypointNet``, ~0.38 M parameters) predicts, at half resolution, a
heatmap per keypoint and the keypoint's height above the support, and one global
supine/prone logit. Its paired channels are named by *side*, not anatomy: the
"left_*" channel is the limb on the +x_T side of the table, "right_*" the one on the
-x_T side. Which side a limb lies on is visible around it; which side is the
patient's left needs the whole body (head direction and supine/prone), so the
network answers that once, globally, and ``detect_keypoints`` turns sides into
anatomy (``side_to_anatomy``). (v1 predicted anatomical labels directly and swapped
limbs whose neighbourhood could not show which way the body pointed.)
Weights: positioning/data/keypoints_v6.pt, trained by ``python -m sim.keypoint_training``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from positioning.segment import CELL_MM, Segmentation, shifted_height_map

KEYPOINTS: tuple[str, ...] = (
    "head", "neck", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "pelvis", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)
FLIP = tuple(KEYPOINTS.index(n.replace("left", "#").replace("right", "left").replace("#", "right"))
             for n in KEYPOINTS)
WIN_Y, WIN_X = 256, 64  # cells along and across the table
HEIGHT_SCALE_MM = 300.0
# The flips of a window the network was trained on (sim/keypoint_training.py), as (rows reversed, columns
# reversed): as it is, mirrored across the table, turned end to end, and mirrored along it.
FLIPS = ((False, False), (False, True), (True, True), (True, False))
WEIGHTS = Path(__file__).parent / "data" / "keypoints_v6.pt"
# The views detect_keypoints averages: the height map on its own grid and on one moved half a cell along and across
# the table (which points share a cell, and so the sensor's noise the network sees, differs between the two), each
# through two of FLIPS that undo each other's bias (as it is with turned end to end; mirrored across with mirrored
# along). At the same four passes as one grid's four flips: 300 held-out windows 14.0 -> 13.2 mm (3D median); with a
# first version, 30 tuning patients with fresh sensor noise only: keypoints along the table 5.3-6.9 -> 4.0-5.6 mm
# (robust sd; docs/perception.md).
VIEWS = ((0.0, ((False, False), (True, True))), (CELL_MM / 2, ((False, True), (True, False))))
# Two views' keypoints further apart than this (mm, on the table) are not averaged: the surer one is taken.
VIEWS_AGREE_MM = 30.0
# Half-resolution cells (20 mm) around a heatmap's peak that its soft-argmax reads: v4 was trained to place its
# keypoints with this read-out (sim/keypoint_training.py). 300 held-out windows, v4: 3D median 12.5 mm read
# within 2 cells (v3's 5 x 5), 10.4 mm within 4 (docs/perception.md).
DECODE_RADIUS = 4
# A pelvis keypoint further than this (mm, on the table) from the hips' midpoint is replaced by it (pelvis_from_hips).
PELVIS_HIPS_MAX_MM = 100.0
# Patient positions that put the patient's left on the +x side of the table.
LEFT_AT_PLUS_X = {"HFS": True, "FFP": True, "FFS": False, "HFP": False}


@dataclass(frozen=True)
class Window:
    """Where a height-map window lies: cell (i, j) centre is at x_T = x0 + j*CELL, y_T = y0 + i*CELL."""

    x0: float
    y0: float

    def to_table(self, ij: np.ndarray) -> np.ndarray:
        """(..., 2) cell coordinates (row i along y, column j along x) -> (..., 2) (x_T, y_T) mm."""
        return np.stack([self.x0 + ij[..., 1] * CELL_MM, self.y0 + ij[..., 0] * CELL_MM], -1)

    def to_cells(self, xy_t: np.ndarray) -> np.ndarray:
        return np.stack([(xy_t[..., 1] - self.y0) / CELL_MM, (xy_t[..., 0] - self.x0) / CELL_MM], -1)


def window_input(heightmap: np.ndarray, origin_t: tuple[float, float]) -> tuple[np.ndarray, Window]:
    """(2, 256, 64) float32 network input and its window, centred on the patient's height map.

    heightmap (Hm, Wm) mm above the support, NaN = empty, with origin_t the (x_T, y_T) of cell [0, 0]'s centre
    (``Segmentation.heightmap``, or ``shifted_height_map``'s)."""
    hm = heightmap
    occ = np.isfinite(hm)
    rows = np.nonzero(occ.any(1))[0]
    centre_i = (rows.min() + rows.max()) / 2.0
    i0 = int(round(centre_i - WIN_Y / 2))
    j0 = int(round((hm.shape[1] - WIN_X) / 2))
    out = np.zeros((2, WIN_Y, WIN_X), np.float32)
    si, sj = max(i0, 0), max(j0, 0)
    ei, ej = min(i0 + WIN_Y, hm.shape[0]), min(j0 + WIN_X, hm.shape[1])
    patch = hm[si:ei, sj:ej]
    out[0, si - i0:ei - i0, sj - j0:ej - j0] = np.nan_to_num(patch / HEIGHT_SCALE_MM, nan=0.0)
    out[1, si - i0:ei - i0, sj - j0:ej - j0] = np.isfinite(patch)
    x0 = origin_t[0] + j0 * CELL_MM
    y0 = origin_t[1] + i0 * CELL_MM
    return out, Window(x0, y0)


def view_inputs(seg: Segmentation, table_longitudinal_mm: float) -> tuple[np.ndarray, list[Window]]:
    """(len(VIEWS), 2, 256, 64) float32: the patient's height-map window on each view's grid, and their windows."""
    xs, wins = [], []
    for shift, _ in VIEWS:
        hm, origin = (seg.heightmap, seg.heightmap_origin_t) if shift == 0 else \
            shifted_height_map(seg, table_longitudinal_mm, shift)
        x, win = window_input(hm, origin)
        xs.append(x)
        wins.append(win)
    return np.stack(xs), wins


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def side_to_anatomy(position: str) -> tuple[int, ...]:
    """Channel order that turns side-named keypoints into anatomical ones: anatomical[i] = side[order[i]]."""
    return tuple(range(len(KEYPOINTS))) if LEFT_AT_PLUS_X[position] else FLIP


class KeypointNet(nn.Module):
    """A small U-Net: (B, 2, 256, 64) -> heatmaps (B, K, 128, 32), heights (B, K, 128, 32), prone logit (B,).

    Paired channels are side-named (module docstring)."""

    def __init__(self, k: int = len(KEYPOINTS), w: int = 16) -> None:
        super().__init__()
        self.e1, self.e2, self.e3, self.e4 = _block(2, w), _block(w, 2 * w), _block(2 * w, 4 * w), _block(4 * w, 6 * w)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.d3, self.d2 = _block(6 * w + 4 * w, 4 * w), _block(4 * w + 2 * w, 2 * w)
        self.head = nn.Conv2d(2 * w, 2 * k, 1)
        # Supine or prone is a property of the whole body: pooled over the deepest features.
        self.prone = nn.Linear(2 * 6 * w, 1)
        self.k = k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        e1 = self.e1(x)  # 256x64
        e2 = self.e2(self.pool(e1))  # 128x32
        e3 = self.e3(self.pool(e2))  # 64x16
        e4 = self.e4(self.pool(e3))  # 32x8
        d3 = self.d3(torch.cat([self.up(e4), e3], 1))  # 64x16
        d2 = self.d2(torch.cat([self.up(d3), e2], 1))  # 128x32
        out = self.head(d2)
        pooled = torch.cat([e4.mean((2, 3)), e4.amax((2, 3))], 1)
        return out[:, : self.k], out[:, self.k:], self.prone(pooled)[:, 0]


@functools.lru_cache(maxsize=2)
def load_keypoint_net(path: Path = WEIGHTS) -> KeypointNet:
    net = KeypointNet()
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state["model"])
    net.eval()
    # Channels last: oneDNN's convolutions run faster on it (four windows, 2 threads: about 32-35 against 39 ms here).
    return net.to(memory_format=torch.channels_last)


def decode_heatmaps(heat: torch.Tensor, height: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(K, H, W) logits -> cell coordinates (K, 2) at input resolution, heights (K,) in mm, confidences (K,).

    Soft-argmax within DECODE_RADIUS half-resolution cells of each peak; confidence is the peak's sigmoid.
    """
    k, h, w = heat.shape
    flat = heat.reshape(k, -1)
    peak = flat.argmax(1)
    pi, pj = (peak // w).numpy(), (peak % w).numpy()
    prob = torch.sigmoid(heat).numpy()
    coords = np.zeros((k, 2))
    hts = np.zeros(k)
    r = DECODE_RADIUS
    for n in range(k):
        i0, i1 = max(pi[n] - r, 0), min(pi[n] + r + 1, h)
        j0, j1 = max(pj[n] - r, 0), min(pj[n] + r + 1, w)
        p = prob[n, i0:i1, j0:j1]
        ii, jj = np.mgrid[i0:i1, j0:j1]
        s = p.sum() + 1e-9
        coords[n] = [(ii * p).sum() / s, (jj * p).sum() / s]
        hts[n] = float(height[n, pi[n], pj[n]]) * HEIGHT_SCALE_MM
    # Half-resolution cell (i, j) covers input cells 2i..2i+1: its centre is at 2i + 0.5.
    return coords * 2 + 0.5, hts, prob[np.arange(k), pi, pj]


# The keypoints above and below the waist (arms left out: raised, the wrists lie beyond the head).
UPPER, LOWER = ("head", "neck", "left_shoulder", "right_shoulder"), \
    ("pelvis", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle")


def position_from_sides(y: np.ndarray, prone_probability: float) -> str:
    """DICOM position: head towards +y (into the gantry) or not, then supine or prone.

    y: (K,) each keypoint's place along the table (any frame whose y is S's direction), KEYPOINTS order. The head's
    direction is the median of the UPPER keypoints' against the LOWER ones', so that no one keypoint turns the
    patient end to end (a head peak found at the feet would, compared with the pelvis alone).
    """
    k = {n: i for i, n in enumerate(KEYPOINTS)}
    upper, lower = np.median(y[[k[n] for n in UPPER]]), np.median(y[[k[n] for n in LOWER]])
    return ("HF" if upper > lower else "FF") + ("P" if prone_probability > 0.5 else "S")


@dataclass(frozen=True)
class Keypoints:
    """Anatomical keypoints in S: points (K, 3) mm, confidence (K,) 0..1, names KEYPOINTS.

    position: DICOM code from the head direction (position_from_sides) and the prone output;
    prone_probability: the network's belief that the patient lies prone.
    """

    points_s: np.ndarray
    confidence: np.ndarray
    position: str
    prone_probability: float


def predict(net: KeypointNet, x: torch.Tensor, flips: list[tuple[tuple[bool, bool], ...]] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The network on windows x (B, 2, 256, 64), each output the mean over the window's flips, in one batch.

    flips: per window, the flips to average (all of FLIPS for every window unless told).
    Returns heatmap logits (B, K, 128, 32), heights (B, K, 128, 32) (/ HEIGHT_SCALE_MM) and prone logits (B,),
    side-named like the network's. Each flipped pass is flipped back (and its sides swapped where the flip
    mirrors across the table) before the mean. The network was trained on all four flips, so each is as
    likely an input as the window itself; the mean of the four is steadier than any one and cancels whatever
    a single pass gets wrong in a direction a flip reverses (docs/perception.md: v2's 5 mm shift across
    the table, learnt from flipped training windows whose labels lay a cell off).
    """
    flips = flips or [FLIPS] * x.shape[0]
    runs = [(b, [d for d, f in ((1, r), (2, c)) if f], c) for b, fl in enumerate(flips) for r, c in fl]
    xs = torch.stack([x[b].flip(d) if d else x[b] for b, d, _ in runs])
    with torch.no_grad():
        heat, height, prone = net(xs.contiguous(memory_format=torch.channels_last))
    heats, heights = [], []
    for n, (_, d, across) in enumerate(runs):
        h, e = heat[n], height[n]
        if d:
            h, e = h.flip(d), e.flip(d)
        if across:  # mirrored across the table: each limb lay on the other side
            h, e = h[list(FLIP)], e[list(FLIP)]
        heats.append(h)
        heights.append(e)
    # Each window's passes are consecutive in runs: the mean over each window's slice.
    ends = np.cumsum([0] + [len(fl) for fl in flips])

    def per_window(t: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([torch.stack(t[i:j]).mean(0) for i, j in zip(ends, ends[1:])])

    return per_window(heats), per_window(heights), per_window(list(prone))


def combine_views(xy_t: np.ndarray, heights: np.ndarray, conf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two views' keypoints -> one: (2, K, 2) (x_T, y_T) mm, (2, K) heights mm, (2, K) confidences -> (K, 2), (K,), (K,).

    Each keypoint is the views' mean where they lie within VIEWS_AGREE_MM on the table, else the surer view's (a
    peak that jumped to another limb in one view must not pull the mean half-way); its confidence is the mean.
    """
    agree = np.linalg.norm(xy_t[0] - xy_t[1], axis=1) <= VIEWS_AGREE_MM
    surer = np.argmax(conf, 0)
    k = np.arange(xy_t.shape[1])
    return (np.where(agree[:, None], xy_t.mean(0), xy_t[surer, k]), np.where(agree, heights.mean(0), heights[surer, k]),
            conf.mean(0))


def pelvis_from_hips(xy_t: np.ndarray, heights: np.ndarray, conf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(K, 2) mm, (K,) mm, (K,) keypoints -> the same, the pelvis put at the hips' midpoint where it lies further
    than PELVIS_HIPS_MAX_MM from it (its confidence then the lower hip's).

    The pelvis joint lies between the hips in every body (26 mm at most from their midpoint in 300 held-out captures);
    a pelvis peak elsewhere is the network's error, and one 420 mm up the trunk dragged a whole fit there (tuning
    seed 50,000,082, v4; docs/perception.md)."""
    k = {n: i for i, n in enumerate(KEYPOINTS)}
    hips = [k["left_hip"], k["right_hip"]]
    mid = xy_t[hips].mean(0)
    if np.linalg.norm(xy_t[k["pelvis"]] - mid) <= PELVIS_HIPS_MAX_MM:
        return xy_t, heights, conf
    xy_t, heights, conf = xy_t.copy(), heights.copy(), conf.copy()
    xy_t[k["pelvis"]], heights[k["pelvis"]], conf[k["pelvis"]] = mid, heights[hips].mean(), conf[hips].min()
    return xy_t, heights, conf


def read_views(net: KeypointNet, xs: np.ndarray, windows: list[Window]) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """The network on each view's window (xs (len(VIEWS), 2, 256, 64), ``view_inputs``) through the view's flips.

    Returns side-named keypoints (``combine_views``, then ``pelvis_from_hips``): (K, 2) (x_T, y_T) mm,
    (K,) heights above the support mm, (K,) confidences; and the prone probability (of the views' mean logit).
    """
    heat, height, prone = predict(net, torch.as_tensor(xs), [flips for _, flips in VIEWS])
    xy, hts, conf = [], [], []
    for v, win in enumerate(windows):
        cells, h, c = decode_heatmaps(heat[v], height[v])
        xy.append(win.to_table(cells))
        hts.append(h)
        conf.append(c)
    return (*pelvis_from_hips(*combine_views(np.array(xy), np.array(hts), np.array(conf))),
            float(torch.sigmoid(prone.mean())))


def detect_keypoints(seg: Segmentation, table_height_mm: float, table_longitudinal_mm: float,
                     net: KeypointNet | None = None) -> Keypoints:
    """Run the network on a segmented capture's VIEWS; anatomical keypoints in S (mm) and the patient position."""
    net = net or load_keypoint_net()
    xs, wins = view_inputs(seg, table_longitudinal_mm)
    xy_t, hts, conf, p_prone = read_views(net, xs, wins)
    position = position_from_sides(xy_t[:, 1], p_prone)
    order = list(side_to_anatomy(position))
    xy_t, hts, conf = xy_t[order], hts[order], conf[order]
    z_s = seg.support_z_at(xy_t[:, 0]) + hts  # x_T = x_S
    pts = np.column_stack([xy_t[:, 0], xy_t[:, 1] + table_longitudinal_mm, z_s])
    return Keypoints(pts, conf, position, p_prone)
