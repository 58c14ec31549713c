"""The calibration target: a ChArUco board (OpenCV's cv2.aruco) in a jig on the tabletop.

The jig fixes where the board lies in the table frame T (CONVENTIONS.md): flat,
centred on the table's centre line, its first row of squares along +y_T (towards
the gantry). The camera cannot see the table's head mark, so this known placement
is what ties the camera to the table origin.

Board frame B is OpenCV's ChArUco frame: origin at the board's top-left chessboard
corner, x along the squares_x direction, y along squares_y, z = x × y (into the
table when the board lies face up).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class BoardSpec:
    """A ChArUco board. Lengths mm. origin_t_mm: the board origin in T when in the jig."""

    # 600 x 400 mm: squares large enough to decode from 2.2 m at 848 x 480.
    squares_x: int = 6
    squares_y: int = 4
    square_mm: float = 100.0
    marker_mm: float = 75.0
    dictionary: str = "DICT_4X4_50"
    thickness_mm: float = 4.0
    origin_t_mm: tuple[float, float, float] = (-200.0, -1250.0, 4.0)

    @property
    def width_mm(self) -> float:
        return self.squares_x * self.square_mm

    @property
    def height_mm(self) -> float:
        return self.squares_y * self.square_mm

    def to_json(self) -> dict:
        d = asdict(self)
        d["origin_t_mm"] = list(self.origin_t_mm)
        return d

    @staticmethod
    def from_json(d: dict) -> "BoardSpec":
        d = dict(d)
        d["origin_t_mm"] = tuple(d["origin_t_mm"])
        return BoardSpec(**d)

    def cv_board(self):
        """The cv2.aruco.CharucoBoard (lengths in mm)."""
        import cv2

        dictionary = cv2.aruco.getPredefinedDictionary(getattr(cv2.aruco, self.dictionary))
        return cv2.aruco.CharucoBoard((self.squares_x, self.squares_y), self.square_mm, self.marker_mm, dictionary)

    def board_to_table(self) -> np.ndarray:
        """(4, 4) pose of B in T for a board in the jig: x_B -> +y_T, y_B -> +x_T, z_B -> -z_T."""
        m = np.eye(4)
        m[:3, :3] = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
        m[:3, 3] = self.origin_t_mm
        return m

    def corner_points(self) -> np.ndarray:
        """(N, 3) chessboard inner corners in B, mm, in OpenCV's id order."""
        return np.asarray(self.cv_board().getChessboardCorners(), dtype=np.float64)


def table_pose(table_height_mm: float, table_longitudinal_mm: float) -> np.ndarray:
    """(4, 4) pose of T in S at a table state: a pure translation (CONVENTIONS.md)."""
    m = np.eye(4)
    m[:3, 3] = [0.0, table_longitudinal_mm, -table_height_mm]
    return m
