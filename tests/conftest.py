"""Shared fixtures: the embedded body model, a few simulated captures (made once per session), a coarse mesh."""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture(scope="session")
def body_model():
    from positioning.bodymodel import load_body_model

    return load_body_model()


@pytest.fixture(scope="session")
def keypoint_net():
    from positioning.keypoints import load_keypoint_net

    return load_keypoint_net()


@pytest.fixture(scope="session")
def sim_cases(tmp_path_factory, body_model):
    """Three simulated capture folders: HFS arms up, FFP arms down, HFS knees bent with a blanket."""
    from positioning.capture import write_capture
    from sim.scene import load_config, sample_scene
    from sim.simulate import simulate

    root = tmp_path_factory.mktemp("cases")
    cfg = load_config(None)
    fixed = [{"patient_position": "HFS", "pose": "arms_up", "blanket": False},
             {"patient_position": "FFP", "pose": "arms_down", "blanket": False},
             {"patient_position": "HFS", "pose": "knees_bent", "blanket": True}]
    out = []
    for i, f in enumerate(fixed):
        p = sample_scene(1000 + i, {**cfg, **f}, body_model.data.train["betas"])
        cap, truth = simulate(p, body_model)
        out.append(write_capture(root / f"case-{i}", cap, truth))
    return out


@pytest.fixture
def coarse_trunk():
    """A trunk whose vertex rows lie 36 mm apart along y (an obese body's are 30-38 mm, wider than the 30 mm ISO
    slab), 300 mm wide, its back at z = -100 mm and its front rising from 100 mm (rows at y = 0 and 72) to a
    crest of 130 mm (the row at y = 36), with a forearm (three vertices at z = 170 mm, y = 10-30) over it:
    (vertices (V, 3) mm, faces (F, 3), trunk (V,) bool)."""
    ring = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    rows = [(0.0, 100.0), (36.0, 130.0), (72.0, 100.0)]  # (y, the front's height over the trunk's middle), mm
    v = np.concatenate([np.stack([150 * np.cos(ring), np.full(24, y), np.where(np.sin(ring) > 0, top, 100.0)
                                  * np.sin(ring)], 1) for y, top in rows])
    faces = [f for r in range(2) for i in range(24) for f in (
        (r * 24 + i, r * 24 + (i + 1) % 24, (r + 1) * 24 + i),
        (r * 24 + (i + 1) % 24, (r + 1) * 24 + (i + 1) % 24, (r + 1) * 24 + i))]
    v = np.concatenate([v, [[-40.0, 10.0, 170.0], [40.0, 10.0, 170.0], [0.0, 30.0, 170.0]]])
    return v, np.array(faces + [(72, 73, 74)]), np.arange(len(v)) < 72
