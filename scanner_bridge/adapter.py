"""The scanner adapter interface: what the daemon needs from a scanner, whoever makes it.

A vendor adapter implements ``ScannerAdapter``; ``tests/test_adapter_conformance.py``
is the suite every adapter must pass. The daemon receives its adapter by
injection; nothing here is global.

Table state uses CONVENTIONS.md's two numbers (mm): ``table_height_mm`` (DICOM
Table Height, below the isocenter) and ``table_longitudinal_mm`` (y_S of the
table frame's origin).
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field


class AdapterError(Exception):
    """The scanner refused or failed a request; one-line reason."""


class LimitError(AdapterError):
    """A target outside the table's travel or the bore's safe band; checked before any motion."""


class LinkError(AdapterError):
    """The scanner does not answer."""


@dataclass(frozen=True)
class TableLimits:
    """Travel, speeds and the bore's safe band (mm, mm/s, mm/s^2)."""

    height_min_mm: float = 80.0
    height_max_mm: float = 480.0
    longitudinal_min_mm: float = -1800.0
    longitudinal_max_mm: float = 2000.0
    height_speed_mm_s: float = 25.0
    longitudinal_speed_mm_s: float = 150.0
    height_accel_mm_s2: float = 100.0
    longitudinal_accel_mm_s2: float = 300.0
    # The tabletop enters the gantry beyond this longitudinal position...
    bore_entry_longitudinal_mm: float = -500.0
    # ...and may only do so with its height in this band (clears the bore's lower edge).
    bore_height_min_mm: float = 80.0
    bore_height_max_mm: float = 280.0
    scan_speed_mm_s: float = 40.0

    def check_target(self, height: float, longitudinal: float) -> None:
        """Raise LimitError unless (height, longitudinal) is a legal resting place."""
        if not self.height_min_mm <= height <= self.height_max_mm:
            raise LimitError(f"table height {height:.1f} mm outside {self.height_min_mm:.0f}-"
                             f"{self.height_max_mm:.0f} mm")
        if not self.longitudinal_min_mm <= longitudinal <= self.longitudinal_max_mm:
            raise LimitError(f"longitudinal position {longitudinal:.1f} mm outside {self.longitudinal_min_mm:.0f}-"
                             f"{self.longitudinal_max_mm:.0f} mm")
        if self.in_bore(longitudinal) and not self.height_safe_in_bore(height):
            raise LimitError(f"table height {height:.1f} mm is outside the bore's safe band "
                             f"{self.bore_height_min_mm:.0f}-{self.bore_height_max_mm:.0f} mm")

    def in_bore(self, longitudinal: float) -> bool:
        return longitudinal > self.bore_entry_longitudinal_mm

    def height_safe_in_bore(self, height: float) -> bool:
        return self.bore_height_min_mm <= height <= self.bore_height_max_mm

    def travel_time_s(self, dh: float, dl: float) -> float:
        """Time of a trapezoidal move of the slower axis (axes move together)."""
        def axis(d: float, v: float, a: float) -> float:
            d = abs(d)
            return 2 * (d / a) ** 0.5 if d < v * v / a else d / v + v / a
        return max(axis(dh, self.height_speed_mm_s, self.height_accel_mm_s2),
                   axis(dl, self.longitudinal_speed_mm_s, self.longitudinal_accel_mm_s2))

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ScannerStatus:
    """One reading of the scanner. Positions mm, velocities mm/s, progress 0..1.

    time: when the encoders were sampled, on the scanner's clock (s). The daemon
    judges encoder jumps against it, so a reply delayed in transit or a scanner
    process briefly starved of CPU does not read as a jump.
    """

    table_height_mm: float
    table_longitudinal_mm: float
    height_velocity_mm_s: float
    longitudinal_velocity_mm_s: float
    moving: bool
    scanning: bool
    scan_progress: float
    faults: tuple[str, ...] = ()
    time: float = field(default_factory=time.time)


@dataclass
class MoveStatus:
    """A commanded move: its target, and the deadline by which it must have arrived (unix s)."""

    table_height_mm: float
    table_longitudinal_mm: float
    deadline: float
    done: bool = False
    success: bool = False
    reason: str = ""

    def arrived(self, status: ScannerStatus, tol_mm: float = 0.5) -> bool:
        return (not status.moving and abs(status.table_height_mm - self.table_height_mm) <= tol_mm
                and abs(status.table_longitudinal_mm - self.table_longitudinal_mm) <= tol_mm)

    def finish(self, success: bool, reason: str = "") -> None:
        self.done, self.success, self.reason = True, success, reason


class ScannerAdapter(ABC):
    """What the daemon drives. Every call returns promptly; motion happens on the scanner."""

    @abstractmethod
    def connect(self) -> None:
        """Open the link (no motion)."""

    @abstractmethod
    def limits(self) -> TableLimits: ...

    @abstractmethod
    def status(self) -> ScannerStatus:
        """Read the true table position, motion and faults. Also keeps the scanner's watchdog fed."""

    @abstractmethod
    def move(self, table_height_mm: float, table_longitudinal_mm: float) -> MoveStatus:
        """Start a move; limits are checked first (LimitError, no motion). Returns its status with a deadline."""

    @abstractmethod
    def stop(self) -> None:
        """Stop all motion now (and any scan's motion)."""

    @abstractmethod
    def start_scan(self, end_longitudinal_mm: float) -> None:
        """Start the exposure, moving the table to end_longitudinal_mm at the scan speed."""

    @abstractmethod
    def abort_scan(self) -> None: ...

    @abstractmethod
    def reset_faults(self) -> None:
        """Acknowledge the scanner's latched faults (after the operator has dealt with the cause)."""

    @abstractmethod
    def close(self) -> None: ...
