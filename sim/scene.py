"""Scene parameters of a simulated capture: what varies, in which ranges, and how it is drawn.

Every parameter can be fixed or ranged by a TOML config (``ctpos sim capture
--config FILE``): a number fixes it, a two-element list ``[lo, hi]`` draws it
uniformly, a list of strings draws one of them. Unknown keys are refused.
Drawing is deterministic for a seed (numpy's PCG64).
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

POSES = ("arms_down", "arms_up", "hands_on_belly", "knees_bent", "one_arm_up")
from positioning.poses import POSITIONS

# Default ranges: what a CT room sees. Lengths mm, angles degrees.
DEFAULTS: dict[str, Any] = {
    "patient_position": ["HFS", "HFS", "HFS", "FFS", "FFS", "HFP", "FFP"],
    "pose": ["arms_down", "arms_up", "arms_up", "hands_on_belly", "knees_bent"],
    "body_source": ["model"],  # "anny" draws bodies straight from anny (needs the 'anny' extra)
    "yaw_deg": [-10.0, 10.0],
    "lateral_offset_mm": [-80.0, 80.0],
    "head_gap_mm": [0.0, 200.0],  # from the table's head-end mark to the body's gantry-side end
    "table_height_mm": [120.0, 360.0],
    "table_longitudinal_mm": [-1300.0, -700.0],
    "camera_height_mm": [1400.0, 2200.0],  # optical centre above the tabletop
    "camera_tilt_deg": [-20.0, 20.0],  # optical axis towards (+) or away from the gantry
    "camera_roll_deg": [-3.0, 3.0],
    "camera_lateral_mm": [-120.0, 120.0],
    "camera_target_y_mm": [-1150.0, -850.0],  # y_T where the optical axis meets the table
    "fx": [415.0, 440.0],
    "principal_offset_px": [-6.0, 6.0],
    "noise_subpixel": [0.05, 0.10],  # stereo matching error, px (drives the z^2 axial noise)
    "noise_wave_mm": [0.5, 2.0],  # spatially correlated error, mm at 1 m (grows with z^2)
    "hole_fraction": [0.0, 0.03],
    "blanket": [False, False, True],
    "gown": [True, True, False],
    "skin_tone": [0.0, 1.0],
    "mattress_mm": [40.0, 70.0],
    "bore_diameter_mm": [700.0, 780.0],
    "sink_mm": [0.0, 15.0],  # the body into mattress and soft tissue; what would pass below is flattened
    # Last, and fixed by default, so that a config setting one size draws the same scenes as the defaults.
    "depth_resolution": "848x480",  # "WxH"; fx above is for 848 px wide and scales with the width (same field of view)
    "flying_fraction": 0.0,  # of the depth-edge pixels, those given a mixed depth instead of none (sim/render.py)
    "outlier_fraction": 0.0,  # of all pixels, those given a random depth over the sensor's range (sim/render.py)
    "head_pillow_mm": 0.0,  # a pillow under a supine patient's head, the neck bent to lie on it; 0: none
    "mattress_curve_mm": 0.0,  # the mattress top's rise at its long edges over its centre line (a curved tabletop)
    "roll_deg": 0.0,  # the patient rolled about its long axis towards its left side (90: lying on it, decubitus)
    "camera_pan_deg": 0.0,  # the optical axis tilted across the table (camera hung beside it); 0: in the y-z plane
    # Drawn only for body_source "anny", inside its phenotype (so it costs the other draws nothing):
    "anny_years": [12.0, 90.0],  # the anny body's age, years; children under 12 lie outside the model's bodies
}
WIDTH, HEIGHT = 848, 480  # RealSense D455 depth stream


class SceneConfigError(Exception):
    """A scene config file is unreadable or names an unknown parameter; one-line reason."""


@dataclass(frozen=True)
class SceneParams:
    """One drawn scene. Lengths mm, angles degrees (see DEFAULTS for meanings)."""

    seed: int
    patient_position: str
    pose: str
    body_source: str
    betas: tuple[float, ...]
    yaw_deg: float
    lateral_offset_mm: float
    head_gap_mm: float
    table_height_mm: float
    table_longitudinal_mm: float
    camera_height_mm: float
    camera_tilt_deg: float
    camera_roll_deg: float
    camera_lateral_mm: float
    camera_target_y_mm: float
    fx: float
    principal_offset_px: float
    noise_subpixel: float
    noise_wave_mm: float
    hole_fraction: float
    blanket: bool
    gown: bool
    skin_tone: float
    mattress_mm: float
    bore_diameter_mm: float
    sink_mm: float
    depth_resolution: str = "848x480"
    flying_fraction: float = 0.0
    outlier_fraction: float = 0.0
    head_pillow_mm: float = 0.0
    mattress_curve_mm: float = 0.0
    roll_deg: float = 0.0
    camera_pan_deg: float = 0.0
    pose_seed: int = 0
    source_body: int = -1  # index of the model's training body the shape was drawn around
    anny_phenotype: dict[str, float] = field(default_factory=dict)

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the depth image, px."""
        w, h = self.depth_resolution.split("x")
        return int(w), int(h)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = [round(b, 5) for b in self.betas]
        return d


def load_config(path: str | Path | None) -> dict[str, Any]:
    """The defaults overridden by a TOML file's keys (validated)."""
    cfg = dict(DEFAULTS)
    if path is None:
        return cfg
    p = Path(path)
    try:
        user = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise SceneConfigError(f"{p}: config file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SceneConfigError(f"{p}: not valid TOML ({exc})") from None
    unknown = sorted(set(user) - set(DEFAULTS))
    if unknown:
        raise SceneConfigError(f"{p}: unknown scene parameter(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
    for k, v in user.items():
        if k == "patient_position" and any(x not in POSITIONS for x in np.atleast_1d(v)):
            raise SceneConfigError(f"{p}: patient_position must be among {POSITIONS}")
        if k == "pose" and any(x not in POSES for x in np.atleast_1d(v)):
            raise SceneConfigError(f"{p}: pose must be among {POSES}")
        if k == "depth_resolution" and not all(re.fullmatch(r"[1-9]\d{1,3}x[1-9]\d{1,3}", str(x))
                                               for x in np.atleast_1d(v)):
            raise SceneConfigError(f"{p}: depth_resolution must be 'WIDTHxHEIGHT' in pixels, e.g. '1280x720'")
        if k in ("flying_fraction", "outlier_fraction") and not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1
                for x in (v if isinstance(v, list) else [v])):
            raise SceneConfigError(f"{p}: {k} must be a number from 0 to 1")
        for name, lo, hi, unit in (("head_pillow_mm", 0, 150, "mm"), ("mattress_curve_mm", 0, 100, "mm"),
                                   ("roll_deg", -90, 90, "degrees"), ("anny_years", 1, 90, "years"),
                                   ("camera_pan_deg", -45, 45, "degrees")):
            if k == name and not all(isinstance(x, (int, float)) and not isinstance(x, bool) and lo <= x <= hi
                                     for x in (v if isinstance(v, list) else [v])):
                raise SceneConfigError(f"{p}: {name} must be a number from {lo} to {hi} ({unit})")
        if k == "anny_years" and isinstance(v, list) and len(v) != 2:
            raise SceneConfigError(f"{p}: anny_years must be one age or a range [youngest, oldest] in years")
        cfg[k] = v
    return cfg


def _draw(rng: np.random.Generator, spec: Any) -> Any:
    if isinstance(spec, list):
        if len(spec) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in spec):
            return float(rng.uniform(spec[0], spec[1]))
        return spec[int(rng.integers(len(spec)))]
    return spec


def sample_scene(seed: int, cfg: dict[str, Any], train_betas: np.ndarray) -> SceneParams:
    """Draw one scene. Bodies: a training body of the shape space, jittered (0.15 sd per beta)."""
    rng = np.random.default_rng(seed)
    vals = {k: _draw(rng, cfg[k]) for k in DEFAULTS if k != "anny_years"}
    if vals["pose"] == "hands_on_belly" and vals["patient_position"].endswith("P"):
        vals["pose"] = "arms_up"  # lying prone, the hands cannot rest on the belly: prone patients raise the arms
    src = int(rng.integers(len(train_betas)))
    b = train_betas[src] + rng.normal(0, 0.15, train_betas.shape[1])
    phen = {}
    if vals["body_source"] == "anny":
        lo, hi = cfg["anny_years"] if isinstance(cfg["anny_years"], list) else (cfg["anny_years"],) * 2
        phen = {"years": float(rng.uniform(lo, hi)), "gender": float(rng.uniform(0, 1)),
                "height": float(rng.uniform(0, 1)), "muscle": float(rng.uniform(0, 1)),
                "proportions": float(rng.uniform(0, 1)),
                "weight": float(rng.uniform(0, 1) if rng.uniform() < 0.55 else rng.uniform(1, 2.2))}
    return SceneParams(seed=seed, betas=tuple(float(x) for x in b), pose_seed=int(rng.integers(2**31)), source_body=src,
                       anny_phenotype=phen, **{k: (bool(v) if k in ("blanket", "gown") else v)
                                               for k, v in vals.items()})


def with_table_at(p: SceneParams, height_mm: float, longitudinal_mm: float) -> SceneParams:
    """The same scene with the table (and the patient on it) moved; the ceiling camera stays where it is.

    The camera's parameters are relative to the table (height above the tabletop, target
    on the table), so they change by the table's motion; its pose in S does not.
    """
    import dataclasses
    import math

    dh, dl = height_mm - p.table_height_mm, longitudinal_mm - p.table_longitudinal_mm
    t, a = math.radians(p.camera_tilt_deg), math.radians(p.camera_pan_deg)
    tan_t, tan_a = math.tan(t) / math.cos(a), math.tan(a)  # the camera's offsets from its target per mm of height
    return dataclasses.replace(p, table_height_mm=float(height_mm), table_longitudinal_mm=float(longitudinal_mm),
                               camera_height_mm=p.camera_height_mm + dh,
                               camera_target_y_mm=p.camera_target_y_mm - dl + dh * tan_t,
                               camera_lateral_mm=p.camera_lateral_mm - dh * tan_a)
