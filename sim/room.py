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


def table_meshes(table_height: float, table_long: float, mattress_mm: float) -> list[Mesh]:
    """Tabletop and mattress at the given table state (frame S)."""
    off = np.array([0.0, table_long, -table_height])
    top = box([-TABLETOP_WIDTH / 2, TABLETOP_HEAD_Y_T - TABLETOP_LENGTH, -TABLETOP_THICKNESS],
              [TABLETOP_WIDTH / 2, TABLETOP_HEAD_Y_T, 0.0], "tabletop")
    mat = box([-MATTRESS_WIDTH / 2, MATTRESS_HEAD_Y_T - MATTRESS_LENGTH, 0.0],
              [MATTRESS_WIDTH / 2, MATTRESS_HEAD_Y_T, mattress_mm], "mattress")
    return [Mesh(m.vertices + off, m.faces, m.label) for m in (top, mat)]


def room_meshes(table_height: float, table_long: float, mattress_mm: float, bore_diameter: float) -> list[Mesh]:
    """Everything but the patient: floor, table pedestal, tabletop, mattress, gantry."""
    floor = box([-4000, -9000, FLOOR_Z - 10], [4000, 4000, FLOOR_Z], "floor")
    pedestal = box([-250, table_long - 1700, FLOOR_Z], [250, table_long - 500, -table_height - TABLETOP_THICKNESS - 120],
                   "pedestal")
    return [floor, pedestal, *table_meshes(table_height, table_long, mattress_mm), gantry(bore_diameter)]
