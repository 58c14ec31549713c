"""Scan planning from the fitted body: range, ISO-centre table height, size for dose, safety. Pure.

Protocols are data (positioning/protocols/*.toml, or a folder named by
$CTPOS_PROTOCOLS); each names the anatomical level of its cranial and caudal
ends (positioning/anatomy.py, plus "vertex", "skull_base", "soles") with margins.

The plan's numbers follow CONVENTIONS.md ("Plan"). Warnings carry a code and a
sentence; problems that make a plan unsafe or meaningless raise PlanRefused.
"""
from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

from positioning.nearest import NearestIndex
from positioning.skeleton import ARM_JOINTS, JOINT_INDEX, JOINT_NAMES, LANDMARK_JOINTS

PROTOCOL_DIR = Path(__file__).parent / "protocols"
SLAB_HALF_MM = 15.0
# The measured front of the ISO slab: the fitted front's highest point moved by the median height of the
# measured trunk points over the fitted front's top band (its surface within TOP_BAND_MM of its highest point,
# each point against the band's surface point nearest it seen from above, within BAND_XY_MM). A median over many
# points: a noisy sensor's outliers or a few stray points do not move it, where the highest of a few would.
# At least MIN_SLAB_POINTS points over the trunk's middle (MIDDLE_FRACTION of its width either side of its
# centre: the flanks hold no top and may hold an arm); else the fitted front stands in.
TOP_BAND_MM, BAND_XY_MM, MIN_SLAB_POINTS, MIDDLE_FRACTION = 20.0, 10.0, 20, 0.35
# Planes (mm apart along the table) on which the slab reads the fitted surface between its vertices: the top band
# then has a surface point within BAND_XY_MM of every measured point over it (surface_samples).
SURFACE_STEP_MM = 5.0
# A patient running off the camera's image: at least this many of its points at the image's edge. Within
# OFF_IMAGE_NEAR_MM (along the table) of the planned range the plan is refused: the camera 0.85-1.0 m over the
# table, 6 of 8 chest plans cut 0-130 mm from their range missed the apex (by up to 118 mm) or turned the patient,
# and the 6 cut 183 mm or more from it were right (docs/planning.md, "A patient running off the image").
OFF_IMAGE_POINTS, OFF_IMAGE_NEAR_MM = 20, 200.0
# A fitted body shorter than this (standing height, mm) is refused: the body model is built from adults and
# teenagers, and of children under 1.1 m (anny, 3-11 years) 5 of 6 chest plans were wrong: 14-18 mm off, the
# patient turned, or the lungs' base missed by 44 mm (docs/planning.md, "Children"). Outside the statures the
# model was built from, widened by STATURE_TOLERANCE_MM (the held-out captures' jittered bodies reach that
# far), a plan is warned.
MIN_STATURE_MM, STATURE_TOLERANCE_MM = 1100.0, 50.0
# The fitted body reaching this far (mm, along the table) beyond everything measured of the patient is a fit
# gone wrong at that end: straight legs fitted to bent knees, an adult body fitted to a small child. Where the
# fit was right and the patient within the image, it reached at most 76 mm past it, over 200 captures (default,
# anny, children; docs/planning.md, "Children").
BEYOND_PATIENT_MM = 150.0
# The camera mounts ctpos is measured on: the optical axis up to 20 degrees off the vertical along the table
# (the default scenes) and 25 across (bench/scenes/camera-beside.toml). Steeper along, the keypoints slide
# away from the gantry: at 25-35 degrees the chest's ranges moved about 10 mm and 11-14 % missed the lungs
# (docs/planning.md, "Other camera mounts"). A degree beyond is a calibration's error, not another mount.
MOUNT_MEASURED_DEG = {"along": 20.0, "across": 25.0}
MOUNT_SLACK_DEG = 1.0
# What a refusal for the bore calls each part of the body, by the joint that mainly moves it (the patient's own
# left and right): what a technician, or the voice prompt to the patient, asks to move. A measured point is the
# part of the fitted body within PART_REACH_MM of it; farther, "something beside" that part (a hand beyond the
# table's edge that the fit did not follow: 66-220 mm from the fitted body in three simulated refusals; a pillow;
# cloth).
PART_NAMES = {"pelvis": "hips", "left_hip": "left thigh", "right_hip": "right thigh", "spine1": "belly",
              "left_knee": "left lower leg", "right_knee": "right lower leg", "spine2": "trunk",
              "left_ankle": "left foot", "right_ankle": "right foot", "spine3": "chest", "left_foot": "left foot",
              "right_foot": "right foot", "neck": "neck", "left_collar": "left shoulder",
              "right_collar": "right shoulder", "head": "head", "left_shoulder": "left upper arm",
              "right_shoulder": "right upper arm", "left_elbow": "left forearm", "right_elbow": "right forearm",
              "left_wrist": "left hand", "right_wrist": "right hand", "left_hand": "left hand",
              "right_hand": "right hand"}
PART_REACH_MM = 50.0
# Forearms and hands resting on the body are not its front: points within this
# top-down distance of an elbow-wrist segment, or of the hand beyond the wrist (the
# forearm's line continued by a hand's length), are left out of the slab's front.
FOREARM_RADIUS_MM, HAND_LENGTH_MM = 60.0, 200.0
# A fitted back within the first distance (mm) of the mattress top rests on it, beyond the second it stands clear;
# in between the underside rises from the mattress to the fitted back in proportion, so that a millimetre's change
# of the fit cannot move the table by half the gap (a single threshold did: 8 mm, docs/planning.md).
BACK_CONTACT_MM = (10.0, 20.0)
# A measured point belongs to the trunk's front when it lies this close to the fitted trunk.
TRUNK_SURFACE_MM = 30.0
# An ISO slab whose body is mostly skinned to these lies on the head (slab_section's head rule).
HEAD_JOINTS = (JOINT_INDEX["neck"], JOINT_INDEX["head"])
LEVELS = ("lung_apex", "lung_base", "diaphragm_dome", "iliac_crest", "symphysis", "vertex", "skull_base", "soles")


class PlanRefused(Exception):
    """No safe, meaningful plan can be made; the message says why in one line. code: machine-readable."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str
    cranial_level: str
    cranial_margin_mm: float
    caudal_level: str
    caudal_margin_mm: float
    phantom_cm: int


@dataclass(frozen=True)
class ScannerSpec:
    """What the plan must fit: table travel (CONVENTIONS semantics, mm) and the bore.

    height_min/max_mm: the heights at which the tabletop may enter the bore (the
    daemon's TableLimits bore band); the plan's height is always an in-bore height.
    The defaults are the scanner simulator's; a site's come from its profile (scanner_spec).
    """

    height_min_mm: float = 80.0
    height_max_mm: float = 280.0
    longitudinal_min_mm: float = -1800.0
    longitudinal_max_mm: float = 2000.0
    bore_diameter_mm: float = 700.0
    clearance_margin_mm: float = 20.0
    gantry_face_y_mm: float = -420.0  # y_S of the gantry housing's table-side face; beyond it is the bore


class ScannerProfileError(ValueError):
    """A scanner profile, or a daemon's limits, that cannot describe a scanner; the message says why in one line."""


# What the plan must fit, under the names the daemon's TableLimits gives them in its `hello` reply
# (docs/bridge-protocol.md): the heights at which the tabletop may enter the bore and the longitudinal travel.
TABLE_LIMIT_KEYS = {"bore_height_min_mm": "height_min_mm", "bore_height_max_mm": "height_max_mm",
                    "longitudinal_min_mm": "longitudinal_min_mm", "longitudinal_max_mm": "longitudinal_max_mm"}
BORE_KEYS = ("bore_diameter_mm", "clearance_margin_mm", "gantry_face_y_mm")


def scanner_spec(limits: Mapping[str, Any], source: str, **given: float) -> ScannerSpec:
    """The ScannerSpec of a scanner profile or of the daemon's `hello` limits. All lengths mm, frame S.

    limits: the four TABLE_LIMIT_KEYS, all required (a plan checked against a guessed table is not checked), and
    the bore's geometry (BORE_KEYS) where known; other keys (speeds, the daemon's own travel) are not the plan's
    and are left. given: BORE_KEYS values that win over limits' (a command line's --bore-mm); what neither gives
    is ScannerSpec's default. source: named in the error. Raises ScannerProfileError.
    """
    missing = [k for k in TABLE_LIMIT_KEYS if k not in limits]
    if missing:
        raise ScannerProfileError(f"{source}: {', '.join(missing)} missing (the table's travel must be given)")
    values = {TABLE_LIMIT_KEYS[k]: limits[k] for k in TABLE_LIMIT_KEYS}
    values.update({k: limits[k] for k in BORE_KEYS if k in limits})
    values.update(given)
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ScannerProfileError(f"{source}: {k} must be a finite number of mm, got {v!r}")
    spec = ScannerSpec(**{k: float(v) for k, v in values.items()})
    if not (spec.height_min_mm < spec.height_max_mm and spec.longitudinal_min_mm < spec.longitudinal_max_mm):
        raise ScannerProfileError(f"{source}: each minimum must be below its maximum")
    if not (spec.bore_diameter_mm > 2 * spec.clearance_margin_mm and spec.clearance_margin_mm >= 0):
        raise ScannerProfileError(f"{source}: the bore ({spec.bore_diameter_mm:.0f} mm) must be wider than twice "
                                  f"a non-negative clearance margin ({spec.clearance_margin_mm:.0f} mm)")
    return spec


def load_scanner_profile(path: str | Path, **given: float) -> ScannerSpec:
    """A scanner profile TOML file (docs/planning.md, "The scanner the plan fits"): scanner_spec over its keys."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise ScannerProfileError(f"{path}: scanner profile not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ScannerProfileError(f"{path}: not a readable scanner profile ({exc})") from None
    return scanner_spec(doc, str(path), **given)


@dataclass(frozen=True)
class Plan:
    """A scan plan in CONVENTIONS.md terms (all mm, frame S at capture unless said)."""

    protocol: str
    patient_position: str
    table_height_mm: float
    body_thickness_mm: float
    body_width_mm: float
    iso_offset_lateral_mm: float
    scan_range_scanner_mm: dict[str, float]
    scan_range_table_mm: dict[str, float]
    landmarks_scanner_mm: dict[str, list[float]]
    confidence: float
    water_equivalent_diameter_mm: float
    ssde_conversion_factor: float
    bore_clearance_mm: float
    move_table_height_mm: float
    warnings: list[dict[str, str]] = field(default_factory=list)
    timing_ms: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        r = lambda v: round(float(v), 1)  # noqa: E731
        return {
            "protocol": self.protocol, "patient_position": self.patient_position,
            "table_height_mm": r(self.table_height_mm), "body_thickness_mm": r(self.body_thickness_mm),
            "iso_offset_lateral_mm": r(self.iso_offset_lateral_mm),
            "scan_range_scanner_mm": {k: r(v) for k, v in self.scan_range_scanner_mm.items()},
            "scan_range_table_mm": {k: r(v) for k, v in self.scan_range_table_mm.items()},
            "landmarks_scanner_mm": {k: [r(x) for x in v] for k, v in self.landmarks_scanner_mm.items()},
            "confidence": round(float(self.confidence), 3), "warnings": self.warnings,
            "timing_ms": {k: r(v) for k, v in self.timing_ms.items()},
            "body_width_mm": r(self.body_width_mm),
            "water_equivalent_diameter_mm": r(self.water_equivalent_diameter_mm),
            "ssde_conversion_factor": round(float(self.ssde_conversion_factor), 3),
            "bore_clearance_mm": r(self.bore_clearance_mm),
            "move_table_height_mm": r(self.move_table_height_mm),
        }


def load_protocol(name: str, folder: str | Path | None = None) -> Protocol:
    """A protocol by name from $CTPOS_PROTOCOLS (if set) or the built-in folder; PlanRefused if unknown or bad."""
    folders = [Path(folder)] if folder else ([Path(os.environ["CTPOS_PROTOCOLS"])] if os.environ.get(
        "CTPOS_PROTOCOLS") else []) + [PROTOCOL_DIR]
    for f in folders:
        path = f / f"{name}.toml"
        if path.is_file():
            try:
                d = tomllib.loads(path.read_text())
                p = Protocol(d["name"], d.get("description", ""), d["cranial"]["level"],
                             float(d["cranial"]["margin_mm"]), d["caudal"]["level"], float(d["caudal"]["margin_mm"]),
                             int(d.get("phantom_cm", 32)))
            except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
                raise PlanRefused("PROTOCOL_INVALID", f"{path}: not a valid protocol ({exc})") from None
            for lv in (p.cranial_level, p.caudal_level):
                if lv not in LEVELS:
                    raise PlanRefused("PROTOCOL_INVALID", f"{path}: unknown level {lv!r}; known: {', '.join(LEVELS)}")
            return p
    known = sorted({q.stem for f in folders if f.is_dir() for q in f.glob("*.toml")})
    raise PlanRefused("PROTOCOL_UNKNOWN", f"unknown protocol {name!r}; known: {', '.join(known)}")


def ssde_factor(d_cm: float, phantom_cm: int) -> float:
    """AAPM Report 204 conversion factor from CTDIvol to SSDE for an effective diameter (cm)."""
    if phantom_cm == 16:
        return 1.874799 * math.exp(-0.03871313 * d_cm)
    return 3.704369 * math.exp(-0.03671937 * d_cm)


def level_y(name: str, landmarks: dict[str, np.ndarray], vertices: np.ndarray, head_dir: float) -> float:
    """y_S (mm) of a named level on the fitted body."""
    if name == "skull_base":  # 15 mm caudal of the ear canals (docs/anatomy.md)
        return float(0.5 * (landmarks["rear"][1] + landmarks["lear"][1]) - 15.0 * head_dir)
    if name == "soles":
        return float(vertices[:, 1].min() if head_dir > 0 else vertices[:, 1].max())
    return float(landmarks[name][1])


def fitted_body_warnings(stature_mm: float, built_statures_mm: tuple[float, float] | None, vertices: np.ndarray,
                         measured: np.ndarray, off_image: np.ndarray | None = None) -> list[dict[str, str]]:
    """Warnings on the fitted body as a whole; PlanRefused for a body the model cannot describe.

    stature_mm: the fitted body's standing height; built_statures_mm: (shortest, tallest) of the bodies the
    model was built from (bodymodel.built_statures_mm), None when the model does not say. vertices (V, 3):
    the fitted body; measured (N, 3): everything measured at body height on the table (Segmentation.on_table_s:
    a blanket's low tail over the feet is not the patient's segmented surface, but the feet are under it);
    off_image (K, 3): the patient's points at the image's edge: mm, frame S.
    """
    if stature_mm < MIN_STATURE_MM:
        raise PlanRefused("PATIENT_TOO_SMALL", f"the patient measures about {stature_mm / 1000:.2f} m: the body model, "
                                               f"built from people {_statures(built_statures_mm)}, does not describe "
                                               f"a small child; position the patient by hand")
    warnings = []
    if built_statures_mm is not None and not (built_statures_mm[0] - STATURE_TOLERANCE_MM <= stature_mm
                                              <= built_statures_mm[1] + STATURE_TOLERANCE_MM):
        warnings.append({"code": "STATURE_OUTSIDE_MODEL",
                         "message": f"the patient measures about {stature_mm / 1000:.2f} m, outside the "
                                    f"{_statures(built_statures_mm)} of the bodies the model was built from: check "
                                    f"the range and the table height on the lasers"})
    lo, hi = np.percentile(measured[:, 1], [0.1, 99.9])  # not a stray speck's
    edge_y = np.zeros(0) if off_image is None or len(off_image) < OFF_IMAGE_POINTS else off_image[:, 1]
    for side, excess, end in (("towards the gantry", float(vertices[:, 1].max() - hi), hi),
                              ("away from the gantry", float(lo - vertices[:, 1].min()), lo)):
        # Where the patient runs off the image, the body goes on past the last measured point.
        if excess > BEYOND_PATIENT_MM and not np.any(np.abs(edge_y - end) < BEYOND_PATIENT_MM):
            warnings.append({"code": "FIT_BEYOND_PATIENT",
                             "message": f"the fitted body reaches {excess:.0f} mm past the patient {side}: the fit "
                                        f"is wrong at that end (bent knees? a small child?); check the range on the "
                                        f"image"})
    return warnings


def mount_warnings(camera_to_scanner: np.ndarray) -> list[dict[str, str]]:
    """CAMERA_MOUNT_UNMEASURED when the camera's optical axis is tilted further off the vertical, along or
    across the table, than the mounts ctpos is measured on (MOUNT_MEASURED_DEG). camera_to_scanner (4, 4): C to S."""
    axis = np.asarray(camera_to_scanner, float)[:3, 2]
    axis = axis / np.linalg.norm(axis)
    # The axis's elevation out of the table's cross-section, and its turn across the table within it.
    tilt = {"along": math.degrees(math.asin(float(np.clip(axis[1], -1.0, 1.0)))),
            "across": math.degrees(math.atan2(-axis[0], -axis[2]))}
    return [{"code": "CAMERA_MOUNT_UNMEASURED",
             "message": f"the camera looks {abs(tilt[k]):.0f} deg off the vertical {k} the table; ctpos is measured "
                        f"on mounts up to {lim:.0f} deg: check the range and the table height on the lasers"}
            for k, lim in MOUNT_MEASURED_DEG.items() if abs(tilt[k]) > lim + MOUNT_SLACK_DEG]


def _statures(built: tuple[float, float] | None) -> str:
    return "of adult size" if built is None else f"{built[0] / 1000:.2f}-{built[1] / 1000:.2f} m tall"


def make_plan(protocol: Protocol, vertices: np.ndarray, joints: np.ndarray, landmarks: dict[str, np.ndarray],
              dominant_joint: np.ndarray, faces: np.ndarray, patient_position: str, position_confidence: float,
              residual_mm: float, observed_points: np.ndarray, support_z_mm: float, table_height_mm: float,
              table_longitudinal_mm: float, spec: ScannerSpec = ScannerSpec(),
              extra_warnings: list[dict[str, str]] | None = None, forearms: np.ndarray | None = None,
              on_table: np.ndarray | None = None, off_image: np.ndarray | None = None) -> Plan:
    """The plan for one fitted body.

    vertices (V, 3), joints (24, 3), landmarks {name: (3,)}, observed_points (N, 3)
    (the segmented body's measured surface), support_z_mm (the mattress top's z):
    mm, frame S at capture; dominant_joint (V,): each vertex's main skinning joint
    (arms are left out of the ISO-centre slab); faces (F, 3): the mesh's triangles.
    Table state as in the capture.
    forearms: (K, 2, 3) elbow-wrist segments, mm, frame S (the keypoints' and the
    fit's), whose points are not the body's front; the fitted joints' when None.
    on_table: (M, 3) mm, frame S: everything measured at body height on and beside
    the table and the hidden ends of the camera rays through it (Segmentation.on_table_s
    and .hidden_s), which the bore check counts as well; observed_points when None.
    off_image: (K, 3) mm, frame S: the patient's points at the image's edge, where the
    body runs off it (Segmentation.off_image_s); near the range it refuses, elsewhere it warns.
    """
    head_dir = 1.0 if patient_position.startswith("H") else -1.0
    warnings = list(extra_warnings or [])
    cr0 = level_y(protocol.cranial_level, landmarks, vertices, head_dir)
    ca0 = level_y(protocol.caudal_level, landmarks, vertices, head_dir)
    cr, ca = cr0 + head_dir * protocol.cranial_margin_mm, ca0 - head_dir * protocol.caudal_margin_mm

    # The region must be in view: observed body points must reach both of its ends.
    oy = observed_points[:, 1]
    lo, hi = np.percentile(oy, 0.1), np.percentile(oy, 99.9)
    for end, y in (("cranial", cr0), ("caudal", ca0)):
        if not lo - 50.0 <= y <= hi + 50.0:
            raise PlanRefused("REGION_NOT_VISIBLE", f"the {protocol.name} region's {end} end is outside the "
                                                    f"camera's view of the patient")

    if off_image is not None and len(off_image) >= OFF_IMAGE_POINTS:
        # What runs off the image near the range may be the region's end, or the head and shoulders that place it.
        lo, hi = min(cr, ca), max(cr, ca)
        gap = float(np.abs(off_image[:, 1] - np.clip(off_image[:, 1], lo, hi)).min())
        if gap < OFF_IMAGE_NEAR_MM:
            raise PlanRefused("REGION_NOT_VISIBLE", f"the patient runs off the camera's image {gap:.0f} mm from the "
                                                    f"{protocol.name} range: move the patient or the table into the "
                                                    f"camera's view and capture again")
        warnings.append({"code": "PATIENT_OFF_IMAGE", "message": "part of the patient is off the camera's image; the "
                                                                 "bore check cannot count it: watch it as the table "
                                                                 "moves in"})

    # Clip to what the table can bring to the isocenter: y_T in [-long_max, -long_min].
    to_t = -table_longitudinal_mm
    reach = (-spec.longitudinal_max_mm - to_t, -spec.longitudinal_min_mm - to_t)  # in S at capture
    clipped = {}
    for end, y in (("cranial", cr), ("caudal", ca)):
        yc = float(np.clip(y, *reach))
        if abs(yc - y) > 0.5:
            warnings.append({"code": "RANGE_CLIPPED", "message": f"the {end} end is {abs(yc - y):.0f} mm beyond "
                                                                  f"the table's travel; the scan is cut there"})
        clipped[end] = yc

    # ISO centre: the AP middle of the trunk (arms out) in a slab at the region's centre.
    yc = 0.5 * (clipped["cranial"] + clipped["caudal"])
    trunk = ~np.isin(dominant_joint, list(ARM_JOINTS))
    if forearms is None:
        forearms = np.array([[joints[JOINT_INDEX[f"{s}_elbow"]], joints[JOINT_INDEX[f"{s}_wrist"]]]
                             for s in ("left", "right")])
    slab = observed_points[np.abs(observed_points[:, 1] - yc) < SLAB_HALF_MM]  # the only points slab_section reads
    sec = slab_section(vertices, faces, trunk, slab[~near_forearms(slab, forearms)], support_z_mm, yc,
                       prone=patient_position.endswith("P"), head_part=np.isin(dominant_joint, HEAD_JOINTS))
    if sec is None:
        raise PlanRefused("REGION_EMPTY", "the fitted body has no cross-section at the region's centre")
    top, bottom, x_c, lat, mesh_top, measured, on_head = sec
    if not measured:
        # The fitted front under a covering hand is the shape model's guess, off by up to 30 mm either way
        # on tuning captures (docs/planning.md); the technician can have the hands moved and capture again.
        warnings.append({"code": "ISO_FRONT_HIDDEN", "message": f"the body's surface at the {protocol.name}'s centre "
                                                                 f"is hidden (hands or forearms over it): its table "
                                                                 f"height is the fitted body's guess; move the hands "
                                                                 f"and capture again"})
    elif abs(mesh_top - top) > 15.0:
        warnings.append({"code": "MESH_DEPTH_DISAGREE", "message": f"the fitted body's front is {mesh_top - top:+.0f} "
                                                                    f"mm off the measured surface at the ISO slab"})
    if on_head:
        # Held out, head plans' ISO height is 4.3 / 15.7 mm off (median / p95; prone 11 / 23 mm, on an 80 mm pillow
        # 6.4 / 23 mm) against the chest's 1.7 / 7.3 (docs/planning.md): a first setting, not a measurement.
        warnings.append({"code": "ISO_HEAD_UNDERSIDE_UNSEEN", "message": "the head's underside is unseen (a pillow, "
                                                                         "a head holder or the arms may hold it up): "
                                                                         "its table height is the fitted head's "
                                                                         "guess; check it on the lasers"})
    ap = top - bottom
    iso_height = table_height_mm + 0.5 * (top + bottom)
    if not spec.height_min_mm <= iso_height <= spec.height_max_mm:
        raise PlanRefused("TABLE_HEIGHT_OUT_OF_RANGE", f"the ISO-centre table height {iso_height:.0f} mm is outside "
                                                       f"the table's {spec.height_min_mm:.0f}-{spec.height_max_mm:.0f} mm")
    try:
        # The measured surface counts as much as the fitted body: whatever the camera saw
        # on the table (a bent knee, a hand over the edge, a pillow) enters the bore.
        measured = observed_points if on_table is None else on_table
        in_bore = np.concatenate([vertices, measured])
        names = partial(part_names, vertices=vertices, dominant_joint=dominant_joint, measured=measured)
        move_height, clearance = bore_safe_height(in_bore, iso_height, table_height_mm, clipped, spec, names)
    except PlanRefused as exc:
        if abs(x_c) > 30.0:  # the commonest cure: the patient moves to the table's middle
            raise PlanRefused(exc.code, f"{exc}; the patient lies {x_c:+.0f} mm off-centre") from None
        raise
    if abs(move_height - iso_height) > 0.5:
        # Which part is in the way: moving it may let the table stay at the ISO height.
        where = bore_parts(in_bore, iso_height, table_height_mm, clipped, spec, names)
        warnings.append({"code": "ISO_COMPROMISED", "message": f"table set {move_height - iso_height:+.0f} mm from the "
                                                                f"ISO-centre height to keep {spec.clearance_margin_mm:.0f} "
                                                                f"mm from the bore{where}"})
    if abs(x_c) > 30.0:
        warnings.append({"code": "LATERAL_OFFSET", "message": f"the patient lies {x_c:+.0f} mm off the isocenter "
                                                               f"laterally; the table cannot correct it"})
    confidence = float(np.clip(position_confidence, 0, 1) * math.exp(-max(residual_mm - 5.0, 0.0) / 20.0))
    if confidence < 0.3:
        warnings.append({"code": "LOW_CONFIDENCE", "message": f"confidence {confidence:.2f}: check the patient "
                                                               f"position and range on the image"})
    d_eff = math.sqrt(ap * lat)
    lm = {"vertex": landmarks["vertex"].tolist()}
    lm.update({k: joints[JOINT_INDEX[j]].tolist() for k, j in LANDMARK_JOINTS.items()})
    return Plan(protocol.name, patient_position, iso_height, ap, lat, x_c,
                {"cranial": clipped["cranial"], "caudal": clipped["caudal"]},
                {"cranial": clipped["cranial"] - table_longitudinal_mm, "caudal": clipped["caudal"] - table_longitudinal_mm},
                lm, confidence, d_eff, ssde_factor(d_eff / 10.0, protocol.phantom_cm), clearance, move_height,
                warnings)


def near_forearms(points: np.ndarray, forearms: np.ndarray) -> np.ndarray:
    """(N,) bool: points (N, 3) over a forearm or a hand, seen from above.

    forearms: (K, 2, 3) elbow-wrist segments, mm, frame S. A point is over the forearm
    within FOREARM_RADIUS_MM of the segment, over the hand within as much of the segment's
    continuation by HAND_LENGTH_MM beyond the wrist (a resting hand lies about in line
    with its forearm; a disc around the wrist wide enough for any hand direction would
    swallow the chest whenever the hands rest on the belly).
    """
    out = np.zeros(len(points), bool)
    xy = points[:, :2]
    for elbow, wrist in forearms[:, :, :2]:
        d = wrist - elbow
        tip = wrist + HAND_LENGTH_MM * d / max(float(np.linalg.norm(d)), 1e-6)
        for a, b in ((elbow, wrist), (wrist, tip)):
            u = b - a
            t = np.clip((xy - a) @ u / max(float(u @ u), 1e-6), 0.0, 1.0)
            out |= np.linalg.norm(xy - (a + t[:, None] * u), axis=1) < FOREARM_RADIUS_MM
    return out


class SlabSection(NamedTuple):
    """The trunk's cross-section in the ISO slab, mm, frame S: z of its front (top) and underside (bottom), x of its
    middle and its width, the fitted front's z, whether the front was measured (else the fitted one stands in), and
    whether the slab lies on the head (its underside then hangs from the front by the fitted head's depth)."""
    top: float
    bottom: float
    x_centre: float
    width: float
    mesh_top: float
    front_measured: bool
    on_head: bool


def surface_samples(vertices: np.ndarray, faces: np.ndarray, planes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points on a mesh's surface between the first and the last of ``planes``, and the vertex each comes from.

    vertices (V, 3) mm, frame S; faces (F, 3); planes (P,) ascending y, mm. Returns (N, 3) points, mm, frame S: the
    faces' vertices between the outer planes and where the triangles' edges cross each plane y = planes[k] (a
    crossing carries its edge's lower-numbered vertex), and (N,) those vertex indices. A mesh is linear between its
    vertices, so within any two of the planes the highest, lowest and outermost of these points are the surface's
    own; the vertices alone miss them where they lie far apart (an obese trunk's rows 30-38 mm apart, wider than
    the ISO slab: docs/planning.md, "The fitted surface between its vertices").
    """
    y_lo, y_hi = float(planes[0]), float(planes[-1])
    y = vertices[:, 1]
    fy = y[faces]
    f = faces[(fy.min(1) <= y_hi) & (fy.max(1) >= y_lo)]
    e = np.unique(np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [0, 2]]]), axis=1), axis=0)
    a, b = vertices[e[:, 0]], vertices[e[:, 1]]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (planes[None, :] - a[:, 1:2]) / (b[:, 1:2] - a[:, 1:2])  # (E, P); an edge across the table crosses none
    ei, pi = np.nonzero((t >= 0.0) & (t <= 1.0))
    crossings = a[ei] + t[ei, pi, None] * (b[ei] - a[ei])
    used = np.unique(f)  # only the vertices of the faces given: the trunk's, not an arm's lying beside it
    inside = used[(y[used] >= y_lo) & (y[used] <= y_hi)]
    return np.concatenate([vertices[inside], crossings]), np.concatenate([inside, e[ei, 0]])


def slab_section(vertices: np.ndarray, faces: np.ndarray, trunk: np.ndarray, observed_points: np.ndarray,
                 support_z_mm: float, y_c: float, prone: bool = False,
                 head_part: np.ndarray | None = None) -> SlabSection | None:
    """The trunk's cross-section in the slab |y - y_c| <= SLAB_HALF_MM.

    vertices (V, 3) and observed_points (N, 3): mm, frame S; faces (F, 3) the mesh's triangles; trunk (V,) bool
    (arms out); head_part (V,) bool: the vertices skinned mostly to the neck and head. The fitted surface is read
    between its vertices too (surface_samples, planes SURFACE_STEP_MM apart).
    The front (top) is measured: the fitted front's top plus the median height of the
    observed points above the fitted front's top band, over the points in the slab and
    the trunk's middle whose nearest fitted vertex is trunk and within TRUNK_SURFACE_MM
    (TOP_BAND_MM, BAND_XY_MM; the caller leaves out the forearms and hands,
    ``near_forearms``). The camera cannot see the underside. Supine, it is the
    fitted trunk's back where that stands clear of the mattress (the hollow of the
    lower back), and the mattress top where the fitted back comes within
    BACK_CONTACT_MM[0] of it (the back rests there; mattress and soft tissue give);
    between the two distances, the fitted back's height above the mattress scaled
    from 0 to 1 (continuous in the fit).
    Prone, the front bears the weight: chest, belly and pelvis lie on the mattress,
    so the bottom is the mattress top (a fitted front is not trusted to float above
    it; docs/planning.md). On the head (most of the slab's vertices in head_part)
    nothing says where its back lies: a pillow, a head holder, a prone patient's
    arms or the neck may hold it clear of the mattress, so the bottom is the
    measured front less the fitted head's depth. Without enough measured
    trunk points the fitted front stands in (front_measured False). None when the
    fitted trunk has no cross-section there.
    """
    # Planes SURFACE_STEP_MM apart over the slab and the band's reach beyond it, and the slab's own two faces.
    reach = SLAB_HALF_MM + BAND_XY_MM
    planes = np.union1d(np.arange(-reach, reach + 1e-9, SURFACE_STEP_MM), [-SLAB_HALF_MM, SLAB_HALF_MM]) + y_c
    surf, src = surface_samples(vertices, faces[trunk[faces].all(1)], planes)
    in_slab = np.abs(surf[:, 1] - y_c) <= SLAB_HALF_MM + 1e-6  # a crossing of a slab face, give or take rounding
    s = surf[in_slab]
    if len(s) < 10:
        return None
    mesh_top = float(s[:, 2].max())
    back = float(s[:, 2].min())
    rests, clear = BACK_CONTACT_MM
    gap = back - support_z_mm
    lift = gap * float(np.clip((gap - rests) / (clear - rests), 0.0, 1.0))  # 0 below rests, gap from clear
    bottom = support_z_mm if prone else support_z_mm + lift
    x_c, lat = 0.5 * float(s[:, 0].max() + s[:, 0].min()), float(s[:, 0].max() - s[:, 0].min())
    near = (np.abs(vertices[:, 1] - y_c) < SLAB_HALF_MM + 60.0)
    cand = observed_points[(np.abs(observed_points[:, 1] - y_c) < SLAB_HALF_MM)
                           & (np.abs(observed_points[:, 0] - x_c) < MIDDLE_FRACTION * lat)]
    top, measured = mesh_top, False
    if near.sum() and len(cand) > MIN_SLAB_POINTS:
        dist, nn = NearestIndex(vertices[near]).query(cand)
        own = cand[trunk[near][nn] & (dist < TRUNK_SURFACE_MM)]
        band = surf[surf[:, 2] > mesh_top - TOP_BAND_MM]
        d_xy, k = NearestIndex(band[:, :2]).query(own[:, :2])
        over = d_xy < BAND_XY_MM
        if over.sum() > MIN_SLAB_POINTS:
            top, measured = mesh_top + float(np.median(own[over, 2] - band[k[over], 2])), True
    on_head = head_part is not None and head_part[src[in_slab]].mean() > 0.5
    if on_head:
        bottom = top - (mesh_top - back)
    return SlabSection(top, bottom, x_c, lat, mesh_top, measured, on_head)


def bore_safe_height(vertices: np.ndarray, iso_height: float, table_height_mm: float, range_s: dict[str, float],
                     spec: ScannerSpec, names: Callable[[np.ndarray], list[tuple[str, bool]]] | None = None
                     ) -> tuple[float, float]:
    """(table height, bore clearance mm): the ISO height if the body clears the bore there, else the nearest that does.

    vertices: (V, 3) mm, frame S at capture: the fitted body and the measured surface. Only the part of the body that reaches the gantry during the move and the scan
    counts (vertices (V, 3) mm, frame S at capture; range_s the scan's ends in S at
    capture). Raises PlanRefused when no reachable height clears the bore by the margin, naming where the body
    is inside it (bore_parts, given names).
    """
    passing = vertices[_reaching_gantry(vertices, range_s, spec)]
    if len(passing) == 0:
        return iso_height, spec.bore_diameter_mm / 2.0
    import cv2

    r_bore = spec.bore_diameter_mm / 2.0
    # The distance from the bore's axis is convex in (x, z): its maximum over the points is at a corner of their
    # cross-section's convex hull, at every table height. The hull's few corners stand in for all the points.
    xz = cv2.convexHull(passing[:, [0, 2]].astype(np.float32)).reshape(-1, 2).astype(np.float64)
    heights = np.concatenate([[iso_height], np.arange(spec.height_min_mm, spec.height_max_mm + 0.5, 1.0)])
    # A higher table height lowers the body: z at height h is z + (table_height_mm - h).
    z = xz[None, :, 1] + (table_height_mm - heights)[:, None]
    clear = r_bore - np.sqrt((xz[None, :, 0] ** 2 + z ** 2).max(1))
    if clear[0] >= spec.clearance_margin_mm:
        return iso_height, float(clear[0])
    ok = np.flatnonzero(clear[1:] >= spec.clearance_margin_mm)
    if len(ok) == 0:
        # A technician reads this: a negative clearance is a collision, said so, not "within -39 mm".
        where = "" if names is None else bore_parts(vertices, iso_height, table_height_mm, range_s, spec, names)
        at_iso = (f"the body comes within {clear[0]:.0f} mm of the bore" if clear[0] >= 0 else
                  f"the body would hit the bore ({-clear[0]:.0f} mm beyond its wall)")
        raise PlanRefused("BORE_COLLISION", f"{at_iso} at the ISO height{where} and no table height keeps "
                                            f"{spec.clearance_margin_mm:.0f} mm: reposition the arms or the patient")
    best = ok[np.argmin(np.abs(heights[1:][ok] - iso_height))]
    return float(heights[1 + best]), float(clear[1 + best])


def _reaching_gantry(points: np.ndarray, range_s: dict[str, float], spec: ScannerSpec) -> np.ndarray:
    """Indices of the points (N, 3) mm, frame S at capture, that pass the gantry's face during the move and the scan."""
    advance = max(-range_s["cranial"], -range_s["caudal"])  # furthest table advance, mm along +y
    return np.flatnonzero(points[:, 1] + advance >= spec.gantry_face_y_mm)


def bore_parts(points: np.ndarray, iso_height: float, table_height_mm: float, range_s: dict[str, float],
               spec: ScannerSpec, names: Callable[[np.ndarray], list[tuple[str, bool]]]) -> str:
    """Where the body is inside the bore's margin at the ISO height, in words: " (at the left hand and at something
    beside the left thigh)", the first two parts worst first; "" when it is nowhere.

    points (N, 3) mm, frame S at capture, as bore_safe_height's; names: (part, only beside it) of each point by
    index (part_names). A part is said as itself where any of its points is on the fit, else as what is beside it.
    """
    keep = _reaching_gantry(points, range_s, spec)
    c = spec.bore_diameter_mm / 2.0 - np.hypot(points[keep, 0], points[keep, 2] + (table_height_mm - iso_height))
    inside = np.flatnonzero(c < spec.clearance_margin_mm)
    only_beside: dict[str, bool] = {}
    for part, beside in names(keep[inside[np.argsort(c[inside])]]):
        only_beside[part] = only_beside.get(part, True) and beside
    said = [("something beside the " if b else "the ") + k for k, b in list(only_beside.items())[:2]]
    return " (at " + " and at ".join(said) + ")" if said else ""


def part_names(index: np.ndarray, vertices: np.ndarray, dominant_joint: np.ndarray,
               measured: np.ndarray) -> list[tuple[str, bool]]:
    """Where each point is on the body, for points indexed into [vertices; measured]: (part, beside) each.

    vertices (V, 3) and measured (M, 3): mm, frame S; dominant_joint (V,) each vertex's main skinning joint. The
    part (PART_NAMES, "left hand") is the nearest fitted vertex's; beside is True for a measured point farther than
    PART_REACH_MM from the fitted body.
    """
    index = np.asarray(index, dtype=np.int64)
    v = len(vertices)
    near = np.zeros(len(index))
    nearest = np.where(index < v, index, 0)
    m = index >= v
    if m.any():
        near[m], nearest[m] = NearestIndex(vertices).query(measured[index[m] - v])
    return [(PART_NAMES[JOINT_NAMES[dominant_joint[j]]], bool(d > PART_REACH_MM)) for d, j in zip(near, nearest)]


def patient_moved(plan_points: np.ndarray, new_points: np.ndarray, shift_mm: float = 10.0, turn_deg: float = 2.0,
                  far_mm: float = 25.0, far_fraction: float = 0.05) -> tuple[bool, str]:
    """Has the patient moved since the plan's capture? (moved, one-line description).

    Measurement against measurement: the new capture's body points (N, 3) are
    registered to the plan capture's (M, 3) (both mm, frame S, same table state)
    with Open3D's point-to-plane ICP. A rigid shift or turn of the whole body shows
    in the transform (a slide along the body moves the head, feet and arms); a limb
    moved shows as a share of points left far from the old surface after alignment.
    The fitted mesh is not used: its own fit error would read as motion.
    """
    import open3d as o3d

    target = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(plan_points.astype(np.float64)))
    target.estimate_normals(o3d.geometry.KDTreeSearchParamKNN(20))
    target.orient_normals_towards_camera_location(np.array([0.0, 0.0, 5000.0]))
    source = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(new_points.astype(np.float64)))
    reg = o3d.pipelines.registration.registration_icp(
        source, target, 60.0, np.eye(4), o3d.pipelines.registration.TransformationEstimationPointToPlane(),
        o3d.pipelines.registration.ICPConvergenceCriteria(max_iteration=60))
    t = reg.transformation
    shift = float(np.linalg.norm(t[:3, 3] + t[:3, :3] @ new_points.mean(0) - new_points.mean(0)))
    turn = float(np.degrees(np.arccos(np.clip((np.trace(t[:3, :3]) - 1) / 2, -1, 1))))
    far = float(np.mean(np.asarray(source.transform(t).compute_point_cloud_distance(target)) > far_mm))
    moved = shift > shift_mm or turn > turn_deg or far > far_fraction
    return moved, f"body shifted {shift:.0f} mm, turned {turn:.1f} deg, {far * 100:.0f} % of the surface moved"
