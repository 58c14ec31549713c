"""The CT room as triangle meshes in frame S (mm): floor, table, mattress, gantry with its bore.

Sizes are those of a typical CT (documented in docs/simulator.md). The table
frame T is CONVENTIONS.md's: origin on the tabletop's top surface, centre line,
head-end reference mark; p_S = p_T + (0, table_longitudinal_mm, -table_height_mm).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TABLETOP_WIDTH = 520.0
TABLETOP_HEAD_Y_T = 80.0  # the tabletop runs past its head mark by this much
TABLETOP_LENGTH = 2230.0
TABLETOP_THICKNESS = 50.0
MATTRESS_WIDTH = 480.0
MATTRESS_HEAD_Y_T = 40.0
MATTRESS_LENGTH = 2120.0
GANTRY_FACE_Y = -420.0  # gantry-side face of the housing; the isocenter is inside
GANTRY_DEPTH = 840.0
GANTRY_HALF_SIZE = 1050.0
FLOOR_Z = -1080.0  # isocenter height above the floor


@dataclass(frozen=True)
class Mesh:
    """Triangles in S: vertices (N, 3) float64 mm, faces (M, 3) int32, one label for shading and truth."""

    vertices: np.ndarray
    faces: np.ndarray
    label: str


def box(lo, hi, label: str) -> Mesh:
    """An axis-aligned box between corners lo and hi (mm, S)."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    c = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], float)
    v = lo + c * (hi - lo)
    f = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                  [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]], np.int32)
    return Mesh(v, f, label)


def gantry(bore_diameter: float, n: int = 96) -> Mesh:
    """The housing's front and back faces (square with a round hole) and the bore's inner wall."""
    r, h = bore_diameter / 2.0, GANTRY_HALF_SIZE
    ang = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ring = np.stack([r * np.cos(ang), r * np.sin(ang)], 1)
    # Each inner ring point is joined to its ray's hit on the outer square.
    outer = ring / np.abs(ring).max(1, keepdims=True) * h
    verts, faces = [], []
    for y in (GANTRY_FACE_Y, GANTRY_FACE_Y + GANTRY_DEPTH):
        base = sum(len(x) for x in verts)
        verts.append(np.column_stack([ring[:, 0], np.full(n, y), ring[:, 1]]))
        verts.append(np.column_stack([outer[:, 0], np.full(n, y), outer[:, 1]]))
        i = np.arange(n)
        j = (i + 1) % n
        faces += [np.column_stack([base + i, base + n + i, base + n + j]), np.column_stack([base + i, base + n + j, base + j])]
    # Bore wall between the two inner rings (indices 0..n-1 and 2n..3n-1).
    i = np.arange(n)
    j = (i + 1) % n
    faces += [np.column_stack([i, 2 * n + i, 2 * n + j]), np.column_stack([i, 2 * n + j, j])]
    return Mesh(np.concatenate(verts), np.concatenate(faces).astype(np.int32), "gantry")


def mattress_top_t(x_t, mattress_mm: float, curve_mm: float = 0.0):
    """z_T (mm) of the mattress's top at x_T: mattress_mm on the centre line, rising by curve_mm at its long edges
    (a parabola across, as on a curved tabletop; flat when curve_mm is 0)."""
    return mattress_mm + curve_mm * (2.0 * np.asarray(x_t, float) / MATTRESS_WIDTH) ** 2


def mattress(mattress_mm: float, curve_mm: float = 0.0, n: int = 24) -> Mesh:
    """The mattress in frame T: flat below, its top ``mattress_top_t`` across in n strips, the same along its length."""
    x = np.linspace(-MATTRESS_WIDTH / 2, MATTRESS_WIDTH / 2, n + 1)
    y0, y1 = MATTRESS_HEAD_Y_T - MATTRESS_LENGTH, MATTRESS_HEAD_Y_T
    z = mattress_top_t(x, mattress_mm, curve_mm)
    # Vertices: top at y0, top at y1, bottom at y0, bottom at y1 (each n + 1 across).
    v = np.concatenate([np.column_stack([x, np.full_like(x, y), zz]) for y, zz in
                        ((y0, z), (y1, z), (y0, 0 * z), (y1, 0 * z))])
    m = n + 1
    i = np.arange(n)
    faces = []
    for a, b in ((0, m), (2 * m, 3 * m), (0, 2 * m), (m, 3 * m)):  # top, bottom, the two ends
        faces += [np.column_stack([a + i, b + i, b + i + 1]), np.column_stack([a + i, b + i + 1, a + i + 1])]
    for c in (0, n):  # the long sides
        faces.append(np.array([[c, m + c, 3 * m + c], [c, 3 * m + c, 2 * m + c]]))
    return Mesh(v, np.concatenate(faces).astype(np.int32), "mattress")


def table_meshes(table_height: float, table_long: float, mattress_mm: float, curve_mm: float = 0.0) -> list[Mesh]:
    """Tabletop and mattress at the given table state (frame S)."""
    off = np.array([0.0, table_long, -table_height])
    top = box([-TABLETOP_WIDTH / 2, TABLETOP_HEAD_Y_T - TABLETOP_LENGTH, -TABLETOP_THICKNESS],
              [TABLETOP_WIDTH / 2, TABLETOP_HEAD_Y_T, 0.0], "tabletop")
    mat = mattress(mattress_mm, curve_mm) if curve_mm else box(
        [-MATTRESS_WIDTH / 2, MATTRESS_HEAD_Y_T - MATTRESS_LENGTH, 0.0],
        [MATTRESS_WIDTH / 2, MATTRESS_HEAD_Y_T, mattress_mm], "mattress")
    return [Mesh(m.vertices + off, m.faces, m.label) for m in (top, mat)]


def room_meshes(table_height: float, table_long: float, mattress_mm: float, bore_diameter: float,
                mattress_curve_mm: float = 0.0) -> list[Mesh]:
    """Everything but the patient: floor, table pedestal, tabletop, mattress, gantry."""
    floor = box([-4000, -9000, FLOOR_Z - 10], [4000, 4000, FLOOR_Z], "floor")
    pedestal = box([-250, table_long - 1700, FLOOR_Z], [250, table_long - 500, -table_height - TABLETOP_THICKNESS - 120],
                   "pedestal")
    return [floor, pedestal, *table_meshes(table_height, table_long, mattress_mm, mattress_curve_mm),
            gantry(bore_diameter)]
