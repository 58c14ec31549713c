"""Shared fixtures: the embedded body model and a few simulated captures (made once per session)."""
from __future__ import annotations

import os

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
