"""Exact nearest neighbours through OpenCV's FLANN (one k-d tree, searched without limit). Pure.

OpenCV is loaded by every plan already; scipy.spatial, whose cKDTree did this before, took
about 150 ms of a fresh ``ctpos plan``'s imports (docs/planning.md, "Time").
"""
from __future__ import annotations

import cv2
import numpy as np

_KDTREE_SINGLE_INDEX = 4  # FLANN's exact k-d tree (cv2 exposes no name for it)
_BUILD = {"algorithm": _KDTREE_SINGLE_INDEX, "leaf_max_size": 10}
_EXACT = {"checks": -1, "eps": 0.0}  # unlimited checks, no approximation: the true nearest


class NearestIndex:
    """Points to search, (N, D) in any float unit; held as float32 (FLANN's type).

    Building it and one query of as many points took 0.54 ms for 1,500 in 3D on this
    machine (scipy's cKDTree 0.86 ms).
    """

    def __init__(self, data: np.ndarray) -> None:
        self._data = np.ascontiguousarray(data, dtype=np.float32)  # FLANN reads it; keep it alive
        self._index = cv2.flann_Index(self._data, _BUILD) if len(self._data) else None

    def query(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Each query's k nearest points: distances (Q,) float, same unit, and indices (Q,) int;
        (Q, k) each when k > 1, nearest first. Neighbours the set does not have (k > N) are at
        inf with index N, as scipy's cKDTree reports them."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        n = len(self._data)
        kk = min(k, n)
        dist = np.full((len(q), k), np.inf)
        idx = np.full((len(q), k), n, dtype=np.int64)
        if kk and len(q):
            i, d2 = self._index.knnSearch(q, kk, params=_EXACT)
            dist[:, :kk] = np.sqrt(d2)  # FLANN's L2 distance is squared
            idx[:, :kk] = i
        return (dist[:, 0], idx[:, 0]) if k == 1 else (dist, idx)
