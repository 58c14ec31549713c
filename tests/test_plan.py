"""Planning: protocols, the plan's geometry and refusals, and `ctpos plan` / `ctpos eval` as a user runs them."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from positioning.plan import (PlanRefused, ScannerProfileError, ScannerSpec, load_protocol, load_scanner_profile,
                              make_plan, scanner_spec, ssde_factor)
from positioning.poses import POSITION_ROTATIONS, canonical_pose
from positioning.skeleton import ARM_JOINTS, JOINT_INDEX, NUM_JOINTS

REQUIRED = {"protocol", "patient_position", "table_height_mm", "body_thickness_mm", "iso_offset_lateral_mm",
            "scan_range_scanner_mm", "scan_range_table_mm", "landmarks_scanner_mm", "confidence", "warnings",
            "timing_ms"}


def test_protocols_are_data_and_user_extendable(tmp_path, monkeypatch):
    for name in ("chest", "abdomen", "chest_abdomen_pelvis", "head", "whole_body"):
        assert load_protocol(name).name == name
    with pytest.raises(PlanRefused, match="unknown protocol 'spine'"):
        load_protocol("spine")
    (tmp_path / "spine.toml").write_text('name = "spine"\ncranial = { level = "lung_apex", margin_mm = 5 }\n'
                                         'caudal = { level = "symphysis", margin_mm = 5 }\n')
    (tmp_path / "bad.toml").write_text('name = "bad"\ncranial = { level = "knee", margin_mm = 5 }\n'
                                       'caudal = { level = "soles", margin_mm = 5 }\n')
    monkeypatch.setenv("CTPOS_PROTOCOLS", str(tmp_path))
    assert load_protocol("spine").caudal_level == "symphysis"
    with pytest.raises(PlanRefused, match="unknown level 'knee'"):
        load_protocol("bad")


def test_ssde_factor_matches_aapm_204():
    assert abs(ssde_factor(20.0, 32) - 1.78) < 0.03  # Report 204, 32 cm phantom
    assert abs(ssde_factor(30.0, 32) - 1.23) < 0.03
    assert abs(ssde_factor(15.0, 16) - 1.05) < 0.03  # 16 cm phantom


def _body(model, position, long_mm=-1000.0, height_mm=250.0, arms="down"):
    """A model body lying on a 60 mm mattress: (vertices, joints, landmarks, dominant joint, points) in S."""
    from positioning.anatomy import posed_levels
    from smplx.lbs import batch_rigid_transform, batch_rodrigues

    pose = torch.as_tensor(canonical_pose(arms), dtype=torch.float32)
    out = model.layer(betas=torch.zeros(1, 16), body_pose=pose[1:].reshape(1, -1))
    r = POSITION_ROTATIONS[position]
    v = out.vertices[0].detach().numpy().astype(float) @ r.T * 1000
    j = out.joints[0].detach().numpy().astype(float) @ r.T * 1000
    v_sh = model.layer.v_template.numpy()
    rest_j = model.data.J_regressor @ v_sh
    rot = batch_rodrigues(pose.double()).reshape(1, NUM_JOINTS, 3, 3)
    _, rel = batch_rigid_transform(rot, torch.as_tensor(rest_j[None], dtype=torch.float64),
                                   torch.as_tensor(np.array(model.layer.parents)), dtype=torch.float64)
    lv = {k: p @ r.T * 1000 for k, p in posed_levels(rest_j, rel[0].numpy()).items()}
    lv["vertex"] = v[model.landmark_vertex_ids["vertex"]]
    lv.update({n: j[24 + i] for i, n in enumerate(("nose", "reye", "leye", "rear", "lear"))})
    shift = np.array([0.0, long_mm - 300.0 - v[:, 1].max(), 60.0 - height_mm - v[:, 2].min()])
    v, j = v + shift, j[:24] + shift
    lv = {k: p + shift for k, p in lv.items()}
    return v, j, lv, model.data.weights.argmax(1), _seen_from_above(v, model.faces, 60.0 - height_mm)


def _seen_from_above(v, faces, support_z, cell=6.0):
    """What a ceiling camera and segmentation keep: the mesh's top surface (6 points sampled on each
    triangle, the highest per 6 mm cell), 25 mm and more above the mattress."""
    w = np.random.default_rng(0).dirichlet(np.ones(3), size=(len(faces), 6))
    p = np.einsum("fsk,fkc->fsc", w, v[faces]).reshape(-1, 3)
    key = np.floor(p[:, :2] / cell).astype(np.int64)
    order = np.lexsort((-p[:, 2], key[:, 1], key[:, 0]))
    first = np.ones(len(order), bool)
    first[1:] = np.any(np.diff(key[order], axis=0) != 0, axis=1)
    top = p[order[first]]
    return top[top[:, 2] > support_z + 25.0]


@pytest.mark.parametrize("position", ["HFS", "FFS", "HFP", "FFP"])
def test_chest_plan_geometry(body_model, position):
    v, j, lv, dom, pts = _body(body_model, position)
    fc = body_model.faces
    chest = load_protocol("chest")
    p = make_plan(chest, v, j, lv, dom, fc, position, 0.9, 5.0, pts, -190.0, 250.0, -1000.0)
    hd = 1 if position.startswith("H") else -1
    # Each end lies its margin beyond its level, the cranial one towards the head; the range is an adult's lungs.
    assert (p.scan_range_scanner_mm["cranial"] - lv["lung_apex"][1]) * hd == pytest.approx(chest.cranial_margin_mm)
    assert (lv["lung_base"][1] - p.scan_range_scanner_mm["caudal"]) * hd == pytest.approx(chest.caudal_margin_mm)
    assert 200 < abs(lv["lung_apex"][1] - lv["lung_base"][1]) < 360
    assert p.scan_range_table_mm["cranial"] == pytest.approx(p.scan_range_scanner_mm["cranial"] + 1000.0)
    # The ISO height brings the chest's AP middle to z = 0 (the measured front is the mesh's
    # highest vertex moved by the median height of the seen surface over the mesh's top band;
    # the underside is the fitted back, or the mattress top when prone or when the back
    # comes within 10 mm of it, rising from one to the other up to 20 mm).
    yc = np.mean(list(p.scan_range_scanner_mm.values()))
    s = v[(np.abs(v[:, 1] - yc) < 15) & ~np.isin(dom, [16, 17, 18, 19, 20, 21, 22, 23])]
    gap = s[:, 2].min() + 190.0
    bottom = -190.0 + (0.0 if position.endswith("P") else max(gap, 0) * np.clip((gap - 10) / 10, 0, 1))
    assert 0.5 * (s[:, 2].max() + bottom) + (250.0 - p.table_height_mm) == pytest.approx(0.0, abs=2.0)
    assert 150 < p.body_thickness_mm < 340 and 0.8 < p.ssde_conversion_factor < 2.5  # (prone: up to the mattress)
    assert p.bore_clearance_mm > 20 and set(p.to_json()) >= REQUIRED


def test_iso_height_follows_the_measured_front_not_the_fit(body_model):
    """The fitted front 20 mm low (a fit error): the measured surface wins, half of it moves the ISO, and it is flagged."""
    v, j, lv, dom, pts = _body(body_model, "HFS")
    fc = body_model.faces
    base = make_plan(load_protocol("chest"), v, j, lv, dom, fc, "HFS", 0.9, 5.0, pts, -190.0, 250.0, -1000.0)
    raised = pts + np.array([0.0, 0.0, 20.0])
    p = make_plan(load_protocol("chest"), v, j, lv, dom, fc, "HFS", 0.9, 5.0, raised, -190.0, 250.0, -1000.0)
    assert p.table_height_mm - base.table_height_mm == pytest.approx(10.0, abs=0.5)
    assert p.body_thickness_mm - base.body_thickness_mm == pytest.approx(20.0, abs=0.5)
    assert any(w["code"] == "MESH_DEPTH_DISAGREE" for w in p.warnings)
    assert not any(w["code"] == "MESH_DEPTH_DISAGREE" for w in base.warnings)


def test_hands_on_the_chest_are_not_its_front(body_model):
    """A hand held 100 mm over the chest, where the keypoints put the wrist: left out, the ISO height stays."""
    v, j, lv, dom, pts = _body(body_model, "HFS")
    fc = body_model.faces
    chest = load_protocol("chest")
    base = make_plan(chest, v, j, lv, dom, fc, "HFS", 0.9, 5.0, pts, -190.0, 250.0, -1000.0)
    yc = np.mean(list(base.scan_range_scanner_mm.values()))
    top = pts[np.abs(pts[:, 1] - yc) < 15, 2].max()
    g = np.mgrid[-60:60:6.0, -60:60:6.0].reshape(2, -1).T
    hand = np.column_stack([g[:, 0], yc + g[:, 1], np.full(len(g), top + 100.0)])
    seen = np.concatenate([pts[~((np.abs(pts[:, 0]) < 60) & (np.abs(pts[:, 1] - yc) < 60))], hand])
    wrist = np.array([0.0, yc - 40.0, top + 90.0])
    forearm = np.array([[[150.0, yc - 200.0, top], wrist]])
    p = make_plan(chest, v, j, lv, dom, fc, "HFS", 0.9, 5.0, seen, -190.0, 250.0, -1000.0, forearms=forearm)
    assert p.table_height_mm == pytest.approx(base.table_height_mm, abs=3.0)
    fooled = make_plan(chest, v, j, lv, dom, fc, "HFS", 0.9, 5.0, seen, -190.0, 250.0, -1000.0,
                       forearms=np.zeros((0, 2, 3)))  # nobody said where the hand is: still not trunk (too far above it)
    assert fooled.table_height_mm == pytest.approx(base.table_height_mm, abs=3.0)


def test_a_forearm_and_hand_across_the_chest_are_not_its_front(body_model):
    """A forearm and its hand lying across the chest's ISO slab (20 mm over it, near enough to pass for trunk),
    where the keypoints put elbow and wrist: left out (the hand along the forearm's line beyond the wrist), the
    ISO height stays. Told of no forearm, they are taken for the chest's front and lift the ISO height."""
    v, j, lv, dom, pts = _body(body_model, "HFS")
    fc = body_model.faces
    chest = load_protocol("chest")
    base = make_plan(chest, v, j, lv, dom, fc, "HFS", 0.9, 5.0, pts, -190.0, 250.0, -1000.0)
    yc = np.mean(list(base.scan_range_scanner_mm.values()))
    z = pts[:, 2].max()
    across = (np.abs(pts[:, 1] - yc) < 40) & (pts[:, 0] > -250.0) & (pts[:, 0] < 140.0)
    seen = np.concatenate([pts[~across], pts[across] + [0.0, 0.0, 20.0]])
    forearm = np.array([[[-250.0, yc, z], [-60.0, yc, z]]])  # the hand runs on from the wrist to x = +140
    p = make_plan(chest, v, j, lv, dom, fc, "HFS", 0.9, 5.0, seen, -190.0, 250.0, -1000.0, forearms=forearm)
    assert p.table_height_mm == pytest.approx(base.table_height_mm, abs=2.0)
    fooled = make_plan(chest, v, j, lv, dom, fc, "HFS", 0.9, 5.0, seen, -190.0, 250.0, -1000.0,
                       forearms=np.zeros((0, 2, 3)))
    assert fooled.table_height_mm > base.table_height_mm + 8.0


def test_hands_on_the_belly_leave_the_chest_front_measured(body_model):
    """Wrists 110 mm caudal of the chest's ISO slab, the hands pointing across the belly: the chest's front is
    still measured (a 20 mm higher measured surface moves the ISO height 10 mm), not replaced by the fitted one."""
    v, j, lv, dom, pts = _body(body_model, "HFS")
    fc = body_model.faces
    chest = load_protocol("chest")
    base = make_plan(chest, v, j, lv, dom, fc, "HFS", 0.9, 5.0, pts, -190.0, 250.0, -1000.0)
    yc = np.mean(list(base.scan_range_scanner_mm.values()))
    z = pts[:, 2].max()
    forearms = np.array([[[sx * 200.0, yc - 140.0, z], [sx * 30.0, yc - 110.0, z]] for sx in (-1.0, 1.0)])
    still = make_plan(chest, v, j, lv, dom, fc, "HFS", 0.9, 5.0, pts, -190.0, 250.0, -1000.0, forearms=forearms)
    raised = make_plan(chest, v, j, lv, dom, fc, "HFS", 0.9, 5.0, pts + [0.0, 0.0, 20.0], -190.0, 250.0, -1000.0,
                       forearms=forearms)
    assert still.table_height_mm == pytest.approx(base.table_height_mm, abs=0.5)
    assert raised.table_height_mm - still.table_height_mm == pytest.approx(10.0, abs=0.5)


def test_a_front_hidden_by_the_hands_is_flagged_not_silent(body_model):
    """Hands clasped 40 mm over the whole middle of the chest's ISO slab, where the keypoints put both forearms:
    no measured front is left, the fitted one stands in, and the plan says so (ISO_FRONT_HIDDEN)."""
    v, j, lv, dom, pts = _body(body_model, "HFS")
    fc = body_model.faces
    chest = load_protocol("chest")
    base = make_plan(chest, v, j, lv, dom, fc, "HFS", 0.9, 5.0, pts, -190.0, 250.0, -1000.0)
    yc = np.mean(list(base.scan_range_scanner_mm.values()))
    under = (np.abs(pts[:, 1] - yc) < 70) & (np.abs(pts[:, 0]) < 150)
    z = pts[under, 2].max()
    g = np.mgrid[-150:150:6.0, -70:70:6.0].reshape(2, -1).T
    hands = np.column_stack([g[:, 0], yc + g[:, 1], np.full(len(g), z + 40.0)])
    forearms = np.array([[[sx * 280.0, yc - 60.0, z], [sx * 120.0, yc, z + 40.0]] for sx in (-1.0, 1.0)])
    p = make_plan(chest, v, j, lv, dom, fc, "HFS", 0.9, 5.0, np.concatenate([pts[~under], hands]), -190.0, 250.0,
                  -1000.0, forearms=forearms)
    assert [w["code"] for w in p.warnings] == ["ISO_FRONT_HIDDEN"]
    assert "hidden (hands or forearms over it)" in p.warnings[0]["message"]
    assert not base.warnings


def test_bore_check_counts_what_the_camera_saw_beside_the_body(body_model):
    """A hand hanging over the table's edge, seen but not fitted, makes the plan unsafe."""
    v, j, lv, dom, pts = _body(body_model, "HFS")
    fc = body_model.faces
    chest = load_protocol("chest")
    spec = ScannerSpec(bore_diameter_mm=760.0)
    make_plan(chest, v, j, lv, dom, fc, "HFS", 0.9, 5.0, pts, -190.0, 250.0, -1000.0, spec)  # clears
    yc = np.mean(j[[JOINT_INDEX["left_hip"], JOINT_INDEX["right_hip"]], 1])
    g = np.mgrid[-40:40:5.0, -40:40:5.0].reshape(2, -1).T
    hand = np.column_stack([-400.0 + g[:, 0], yc + g[:, 1], np.full(len(g), -100.0)])
    with pytest.raises(PlanRefused, match="bore"):
        make_plan(chest, v, j, lv, dom, fc, "HFS", 0.9, 5.0, pts, -190.0, 250.0, -1000.0, spec,
                  on_table=np.concatenate([pts, hand]))


def test_bore_check_counts_what_the_camera_could_not_see_below_a_flank(body_model):
    """An obese flank seen from above at its widest: below it the camera sees nothing, and the body may bulge
    further out along the camera's rays. A bore that clears what was seen by just the margin is not enough."""
    from positioning.segment import hidden_ends

    v, j, lv, dom, pts = _body(body_model, "HFS")
    fc = body_model.faces
    chest = load_protocol("chest")
    yc = np.mean(j[[JOINT_INDEX["left_hip"], JOINT_INDEX["neck"]], 1])
    ys = np.arange(yc - 200.0, yc + 200.0, 5.0)
    flank = np.column_stack([np.full(len(ys), -320.0), ys, np.full(len(ys), -60.0)])  # 130 mm above the mattress
    seen = np.concatenate([pts, flank])
    iso = make_plan(chest, v, j, lv, dom, fc, "HFS", 0.9, 5.0, pts, -190.0, 250.0, -1000.0,
                    ScannerSpec(bore_diameter_mm=2000.0), on_table=seen).table_height_mm
    everything = np.concatenate([v, seen])
    reach = np.sqrt(everything[:, 0] ** 2 + (everything[:, 2] + 250.0 - iso) ** 2).max()
    spec = ScannerSpec(bore_diameter_mm=2 * (reach + 20.0 + 1.0))  # what was seen clears by the margin + 1 mm
    plan = make_plan(chest, v, j, lv, dom, fc, "HFS", 0.9, 5.0, pts, -190.0, 250.0, -1000.0, spec, on_table=seen)
    assert plan.move_table_height_mm == pytest.approx(iso) and not plan.warnings
    cam = np.array([0.0, yc, 1500.0])
    to_floor = hidden_ends(flank, cam, -190.0 + 25.0, depth_mm=1000.0)
    assert np.allclose(to_floor[:, 0], -320.0 * 1665.0 / 1560.0) and np.allclose(to_floor[:, 2], -165.0)
    hidden = hidden_ends(flank, cam, -190.0 + 25.0)  # HIDDEN_DEPTH_MM below the flank
    assert np.allclose(hidden[:, 0], -320.0 * 1600.0 / 1560.0) and np.allclose(hidden[:, 2], -100.0)
    try:
        safer = make_plan(chest, v, j, lv, dom, fc, "HFS", 0.9, 5.0, pts, -190.0, 250.0, -1000.0, spec,
                          on_table=np.concatenate([seen, hidden]))
        compromise = next(w["message"] for w in safer.warnings if w["code"] == "ISO_COMPROMISED")
        assert "from the bore (at " in compromise and "something beside the " in compromise  # the flank: not the fit
    except PlanRefused as exc:
        assert exc.code == "BORE_COLLISION" and "at the ISO height (at " in str(exc) and "something beside" in str(exc)


def _fitted_back(v, faces, dom, yc):
    """The fitted trunk's lowest surface point in the ISO slab at yc (mm, frame S), as the planner reads it."""
    from positioning.plan import SLAB_HALF_MM, surface_samples

    trunk = ~np.isin(dom, list(ARM_JOINTS))
    return surface_samples(v, faces[trunk[faces].all(1)], yc + np.array([-SLAB_HALF_MM, SLAB_HALF_MM]))[0][:, 2].min()

def test_iso_bottom_never_below_the_mattress(body_model):
    v, j, lv, dom, pts = _body(body_model, "HFS")
    fc = body_model.faces
    chest = load_protocol("chest")
    yc = np.mean(list(make_plan(chest, v, j, lv, dom, fc, "HFS", 0.9, 5.0, pts, -190.0, 250.0, -1000.0)
                      .scan_range_scanner_mm.values()))
    back = _fitted_back(v, fc, dom, yc)
    base = make_plan(chest, v, j, lv, dom, fc, "HFS", 0.9, 5.0, pts, back, 250.0, -1000.0)  # the back on the mattress
    sunk = make_plan(chest, v - [0.0, 0.0, 10.0], j, lv, dom, fc, "HFS", 0.9, 5.0, pts, back, 250.0, -1000.0)
    # A fit 10 mm into the mattress: its back is cut at the mattress top, the ISO height stays.
    assert sunk.table_height_mm == pytest.approx(base.table_height_mm, abs=0.5)


def test_the_slab_reads_the_fitted_surface_between_vertex_rows(coarse_trunk):
    """Between two of the coarse trunk's vertex rows the slab's front and back are the surface's (linear between
    the vertices), not those of whichever vertices fall in the slab, or none; a forearm over it is not trunk."""
    from positioning.plan import slab_section

    v, faces, trunk = coarse_trunk
    none = np.zeros((0, 3))
    between = slab_section(v, faces, trunk, none, -150.0, 18.0)  # the slab 3-33 mm: no vertex in it
    assert between is not None and not between.front_measured
    assert between.top == pytest.approx(100.0 + 30.0 * 33.0 / 36.0, abs=0.01)  # the surface at the slab's edge
    assert between.bottom == pytest.approx(-100.0, abs=0.01)  # the fitted back, 50 mm over the mattress
    on_crest = slab_section(v, faces, trunk, none, -150.0, 30.0)
    assert on_crest.top == pytest.approx(130.0, abs=0.01) and on_crest.width == pytest.approx(300.0, abs=0.01)

def test_underside_rises_from_the_mattress_to_the_fitted_back_without_a_step(body_model):
    """The fitted back 0-30 mm over the mattress: the mattress up to 10 mm, the back from 20 mm, and no jump
    between (a single threshold moved the table by half the gap when the fit crossed it)."""
    v, j, lv, dom, pts = _body(body_model, "HFS")
    fc = body_model.faces
    chest = load_protocol("chest")
    yc = np.mean(list(make_plan(chest, v, j, lv, dom, fc, "HFS", 0.9, 5.0, pts, -190.0, 250.0, -1000.0)
                      .scan_range_scanner_mm.values()))
    back = _fitted_back(v, fc, dom, yc)
    gaps = np.arange(0.0, 30.01, 0.5)
    h = np.array([make_plan(chest, v, j, lv, dom, fc, "HFS", 0.9, 5.0, pts, back - g, 250.0, -1000.0).table_height_mm
                  for g in gaps])
    on_mattress, clear = gaps <= 10.0, gaps >= 20.0
    assert np.allclose(h[on_mattress], h[0] - gaps[on_mattress] / 2, atol=0.01)  # bottom = the mattress top
    assert np.allclose(h[clear], h[-1], atol=0.01)  # bottom = the fitted back
    assert np.abs(np.diff(h)).max() <= 0.5 + 1e-6  # at most a millimetre per millimetre of gap


def test_the_heads_underside_hangs_from_its_measured_front(body_model):
    """A head may rest on a pillow, a head holder, a prone patient's arms, or be held by the neck: nothing the camera
    sees says where its back lies, so its ISO height is the measured front less half the fitted head's depth, wherever
    the mattress lies (before, the mattress rule or the supine ramp: 12.0 / 40.6 mm median / p95 on 17 prone head
    tuning plans, now 11.5 / 18.3; supine 5.1 / 15.5 -> 3.6 / 10.1 on 50; docs/planning.md)."""
    head = load_protocol("head")
    for position in ("HFS", "HFP"):
        v, j, lv, dom, pts = _body(body_model, position)
        fc = body_model.faces
        plans = [make_plan(head, v, j, lv, dom, fc, position, 0.9, 5.0, pts, -190.0 - g, 250.0, -1000.0)
                 for g in (0.0, 15.0, 40.0)]
        heights = [p.table_height_mm for p in plans]
        assert max(heights) - min(heights) < 0.01, (position, heights)
        yc = np.mean(list(plans[0].scan_range_scanner_mm.values()))
        s = v[(np.abs(v[:, 1] - yc) < 15) & ~np.isin(dom, list(ARM_JOINTS))]
        assert abs(plans[0].body_thickness_mm - np.ptp(s[:, 2])) < 1.0  # the fitted head's own depth
        # A guess is said as one (held out 4.3 / 15.7 mm off against the chest's 1.7 / 7.3); the chest's is measured.
        assert all("ISO_HEAD_UNDERSIDE_UNSEEN" in [w["code"] for w in p.warnings] for p in plans)
        chest = make_plan(load_protocol("chest"), v, j, lv, dom, fc, position, 0.9, 5.0, pts, -190.0, 250.0, -1000.0)
        assert "ISO_HEAD_UNDERSIDE_UNSEEN" not in [w["code"] for w in chest.warnings]


def test_range_beyond_table_travel_is_clipped_with_a_warning(body_model):
    v, j, lv, dom, pts = _body(body_model, "FFS", long_mm=-1000.0)
    fc = body_model.faces
    spec = ScannerSpec(longitudinal_min_mm=-1000.0)  # cannot bring the head end in far enough
    p = make_plan(load_protocol("whole_body"), v, j, lv, dom, fc, "FFS", 0.9, 5.0, pts, -190.0, 250.0, -1000.0, spec)
    assert any(w["code"] == "RANGE_CLIPPED" for w in p.warnings)


@pytest.mark.parametrize("spec, code", [(ScannerSpec(bore_diameter_mm=450.0), "bore"),
                                        (ScannerSpec(height_max_mm=150.0), "outside the table")])
def test_unsafe_plans_are_refused(body_model, spec, code):
    v, j, lv, dom, pts = _body(body_model, "HFS", arms="up")
    fc = body_model.faces
    with pytest.raises(PlanRefused, match=code):
        make_plan(load_protocol("chest"), v, j, lv, dom, fc, "HFS", 0.9, 5.0, pts, -190.0, 250.0, -1000.0, spec)


def test_a_bore_refusal_names_where_the_body_would_hit(body_model):
    """A technician, or the voice prompt to the patient, needs to know what to move: the refusal names the first
    two parts inside the margin at the ISO height, a measured point far from the fitted body as something beside the
    part nearest it (a hand hanging over the table's edge that the fit did not follow)."""
    from positioning.plan import part_names

    v, j, lv, dom, pts = _body(body_model, "HFS")
    fc = body_model.faces
    chest = load_protocol("chest")
    wrist = j[JOINT_INDEX["right_wrist"]]
    # Arms at the sides clear a 700 mm bore; a 420 mm one takes them first.
    with pytest.raises(PlanRefused, match=r"at the ISO height \(at the (left|right) (hand|forearm|upper arm)"):
        make_plan(chest, v, j, lv, dom, fc, "HFS", 0.9, 5.0, pts, -190.0, 250.0, -1000.0,
                  ScannerSpec(bore_diameter_mm=420.0))
    noise = np.random.default_rng(0).normal(0, 5, (50, 3))
    hanging = wrist + np.array([np.sign(wrist[0]) * 150.0, 0.0, -100.0]) + noise
    with pytest.raises(PlanRefused, match=r"\(at something beside the right (hand|forearm)"):
        make_plan(chest, v, j, lv, dom, fc, "HFS", 0.9, 5.0, np.concatenate([pts, hanging]), -190.0, 250.0, -1000.0)
    assert part_names(np.array([len(v)]), v, dom, v[[123]]) == part_names(np.array([123]), v, dom, v)
    # Where another height clears, the compromise says what is in the way: moving it keeps the ISO height.
    base = make_plan(chest, v, j, lv, dom, fc, "HFS", 0.9, 5.0, pts, -190.0, 250.0, -1000.0)
    yc = np.mean(list(base.scan_range_scanner_mm.values()))
    # 335 mm over the isocenter at the ISO height: inside the 700 mm bore's 20 mm margin, over the chest.
    above = np.array([0.0, yc, 335.0 - (250.0 - base.table_height_mm)]) + noise[:30] * 0.6
    plan = make_plan(chest, v, j, lv, dom, fc, "HFS", 0.9, 5.0, np.concatenate([pts, above]), -190.0, 250.0, -1000.0)
    moved = plan.move_table_height_mm - plan.table_height_mm
    assert [w["message"] for w in plan.warnings if w["code"] == "ISO_COMPROMISED"] == [
        f"table set {moved:+.0f} mm from the ISO-centre height to keep 20 mm from the bore "
        f"(at something beside the chest)"]


def test_region_out_of_view_is_refused(body_model):
    v, j, lv, dom, pts = _body(body_model, "HFS")
    fc = body_model.faces
    legs_only = pts[pts[:, 1] < j[0, 1]]  # the camera saw only the legs
    with pytest.raises(PlanRefused, match="outside the camera's view"):
        make_plan(load_protocol("head"), v, j, lv, dom, fc, "HFS", 0.9, 5.0, legs_only, -190.0, 250.0, -1000.0)


def test_a_patient_off_the_image_near_the_range_is_refused_and_elsewhere_warned(body_model):
    """The body runs off the camera's image: through the head, 100 mm beyond the chest's range, the plan is
    refused; at the feet the plan stands, warned that the bore check cannot count what is off the image."""
    v, j, lv, dom, pts = _body(body_model, "HFS")
    fc = body_model.faces
    chest = load_protocol("chest")
    plan = make_plan(chest, v, j, lv, dom, fc, "HFS", 0.9, 5.0, pts, -190.0, 250.0, -1000.0)
    head = pts[np.abs(pts[:, 1] - plan.scan_range_scanner_mm["cranial"] - 100.0) < 8.0]
    feet = pts[pts[:, 1] < pts[:, 1].min() + 5.0]
    with pytest.raises(PlanRefused, match=r"runs off the camera's image \d+ mm from the chest range") as err:
        make_plan(chest, v, j, lv, dom, fc, "HFS", 0.9, 5.0, pts, -190.0, 250.0, -1000.0, off_image=head[:40])
    assert err.value.code == "REGION_NOT_VISIBLE"
    warned = make_plan(chest, v, j, lv, dom, fc, "HFS", 0.9, 5.0, pts, -190.0, 250.0, -1000.0, off_image=feet[:40])
    assert [w["code"] for w in warned.warnings] == [w["code"] for w in plan.warnings] + ["PATIENT_OFF_IMAGE"]
    assert warned.table_height_mm == plan.table_height_mm
    # A few pixels at the edge (a fingertip) are not a body running off the image.
    assert make_plan(chest, v, j, lv, dom, fc, "HFS", 0.9, 5.0, pts, -190.0, 250.0, -1000.0,
                     off_image=head[:5]).warnings == plan.warnings


def test_a_camera_too_close_to_see_the_head_refuses_the_chest(body_model, keypoint_net):
    """A camera 0.88 m over the table cuts the head of a head-first patient off the image's gantry side: the
    chest's plan is refused (planned, its range stopped 118 mm short of the lungs' apex). Which of the two rules
    says so first (the body running off the image near the range, or the range's end past what the camera saw of
    the patient) depends on where the fit puts the apex."""
    from positioning.cli import plan_from_capture
    from sim.scene import load_config, sample_scene
    from sim.simulate import simulate

    cfg = {**load_config(None), "camera_height_mm": [850.0, 1000.0], "bore_diameter_mm": 850.0}
    p = sample_scene(40_000_004, cfg, body_model.data.train["betas"])
    assert p.patient_position == "HFS" and p.camera_height_mm < 900.0
    cap, _ = simulate(p, body_model)
    with pytest.raises(PlanRefused, match="runs off the camera's image 0 mm from the chest range|"
                                          "chest region's cranial end is outside the camera's view") as err:
        plan_from_capture(cap, "chest", body_model, keypoint_net, ScannerSpec(bore_diameter_mm=850.0))
    assert err.value.code == "REGION_NOT_VISIBLE"


def test_the_fitted_bodys_stature_is_measured_as_the_models_bodies_were(body_model):
    from positioning.bodymodel import built_statures_mm, rest_stature_mm

    d = body_model.data
    for i in (0, 17, 311):  # within what keeping 16 shape coefficients of each built body loses
        assert abs(rest_stature_mm(d, d.train["betas"][i]) - d.train["stature_m"][i] * 1000) < 3.0
    lo, hi = built_statures_mm(d)
    assert 1400 < lo < 1500 and 2000 < hi < 2100


def test_a_small_child_is_refused_and_a_stature_outside_the_models_warned(body_model):
    from positioning.plan import fitted_body_warnings

    v, j, lv, dom, pts = _body(body_model, "HFS")
    fc = body_model.faces
    with pytest.raises(PlanRefused, match=r"measures about 0.95 m: .* does not describe a small child") as err:
        fitted_body_warnings(950.0, (1452.0, 2050.0), v, pts)
    assert err.value.code == "PATIENT_TOO_SMALL"
    assert fitted_body_warnings(1700.0, (1452.0, 2050.0), v, pts) == []
    for stature in (1300.0, 2200.0):
        (w,) = fitted_body_warnings(stature, (1452.0, 2050.0), v, pts)
        assert w["code"] == "STATURE_OUTSIDE_MODEL" and "1.45-2.05 m" in w["message"]


def test_a_fitted_body_reaching_past_the_measured_patient_is_warned(body_model):
    """Straight legs fitted to bent knees reach past the feet the camera saw: warned; unless the patient runs
    off the image there, where the body goes on unseen."""
    from positioning.plan import fitted_body_warnings

    v, j, lv, dom, pts = _body(body_model, "HFS")
    fc = body_model.faces
    assert fitted_body_warnings(1700.0, None, v, pts) == []
    short = pts[pts[:, 1] > pts[:, 1].min() + 300.0]  # no measured point over the last 300 mm of the legs
    (w,) = fitted_body_warnings(1700.0, None, v, short)
    assert w["code"] == "FIT_BEYOND_PATIENT" and "away from the gantry" in w["message"]
    edge = short[short[:, 1] < short[:, 1].min() + 5.0][:40]
    assert fitted_body_warnings(1700.0, None, v, short, off_image=edge) == []


@pytest.mark.slow
def test_a_child_under_1_1_m_is_refused(body_model, keypoint_net):
    """A 1.0 m child (anny, 8 years), arms up: planned before, 17.6 mm off the ISO height with no warning."""
    pytest.importorskip("anny")
    from positioning.cli import plan_from_capture
    from sim.scene import load_config, sample_scene
    from sim.simulate import simulate

    p = sample_scene(40_000_018, load_config(Path(__file__).parents[1] / "bench/scenes/children.toml"),
                     body_model.data.train["betas"])
    cap, truth = simulate(p, body_model)
    assert truth["stature_mm"] < 1000.0
    with pytest.raises(PlanRefused, match="does not describe a small child") as err:
        plan_from_capture(cap, "chest", body_model, keypoint_net, ScannerSpec(bore_diameter_mm=850.0))
    assert err.value.code == "PATIENT_TOO_SMALL"


@pytest.mark.parametrize("tilt, pan, warned", [(0.0, 0.0, []), (20.0, 0.0, []), (-20.0, 25.0, []),
                                               (30.0, 0.0, ["along"]), (-24.0, 0.0, ["along"]),
                                               (10.0, -30.0, ["across"]), (35.0, 35.0, ["along", "across"])])
def test_a_camera_mounted_beyond_the_measured_mounts_is_warned(tilt, pan, warned):
    from positioning.plan import mount_warnings
    from sim.simulate import camera_pose

    w = mount_warnings(camera_pose(1800.0, tilt, 2.0, 60.0, -1000.0, 200.0, -1000.0, pan))
    assert [x["code"] for x in w] == ["CAMERA_MOUNT_UNMEASURED"] * len(warned)
    assert [x["message"].split(" the table")[0].split()[-1] for x in w] == warned


def test_a_steep_cameras_plan_says_so(body_model, keypoint_net):
    """A camera 30 deg along the table: the keypoints slide about 10 mm away from the gantry (docs/planning.md)."""
    from positioning.cli import plan_from_capture
    from sim.scene import load_config, sample_scene
    from sim.simulate import simulate

    p = sample_scene(40_000_010, {**load_config(None), "camera_tilt_deg": 30.0, "bore_diameter_mm": 850.0},
                     body_model.data.train["betas"])
    plan, _ = plan_from_capture(simulate(p, body_model)[0], "chest", body_model, keypoint_net,
                                ScannerSpec(bore_diameter_mm=850.0))
    assert "CAMERA_MOUNT_UNMEASURED" in [w["code"] for w in plan.warnings]


def test_patient_moved_is_detected(body_model):
    from positioning.plan import patient_moved

    v, j, lv, dom, pts = _body(body_model, "HFS")
    fc = body_model.faces
    rng = np.random.default_rng(0)
    noisy = pts + rng.normal(0, 3.0, pts.shape)
    assert patient_moved(pts, noisy)[0] is False
    moved, why = patient_moved(pts, noisy + np.array([0.0, 40.0, 0.0]))  # slid 4 cm
    assert moved and "shifted" in why
    c, s_ = np.cos(np.radians(4)), np.sin(np.radians(4))
    centre = pts.mean(0)
    turned = (noisy - centre) @ np.array([[c, -s_, 0], [s_, c, 0], [0, 0, 1]]).T + centre
    assert patient_moved(pts, turned)[0] is True
    # One forearm lifted 60 mm: the body as a whole stays, a share of its surface does not.
    arm = np.isin(dom, [JOINT_INDEX["left_wrist"], JOINT_INDEX["left_elbow"], JOINT_INDEX["left_hand"]])
    lifted = v + np.where(arm[:, None], [0.0, 0.0, 60.0], 0.0)
    top = lifted[lifted[:, 2] > pts[:, 2].min()]
    moved, why = patient_moved(pts, top)
    assert moved and "surface moved" in why


def test_two_captures_of_a_still_patient_are_not_motion(body_model):
    """Fresh sensor noise on the same scene (what the exam's second capture sees) is not motion."""
    from positioning.plan import patient_moved
    from positioning.segment import segment_patient
    from sim.scene import load_config, sample_scene
    from sim.simulate import simulate

    p = sample_scene(21, {**load_config(None), "pose": "arms_up"}, body_model.data.train["betas"])
    a = segment_patient(simulate(p, body_model)[0]).points_s
    b = segment_patient(simulate(dataclasses.replace(p, seed=p.seed + 2), body_model)[0]).points_s
    moved, why = patient_moved(a, b)
    assert not moved, why


def ctpos(*args):
    return subprocess.run([sys.executable, "-m", "ctpos", *args], capture_output=True, text=True, timeout=300)


def test_ctpos_plan_prints_the_conventions_json(sim_cases):
    r = ctpos("plan", str(sim_cases[0]), "--protocol", "chest", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert REQUIRED <= set(plan) and r.stdout.count("\n") == 1
    for k in ("vertex", "neck", "shoulder_left", "shoulder_right", "hip_left", "hip_right", "knee_left",
              "knee_right", "ankle_left", "ankle_right"):
        assert len(plan["landmarks_scanner_mm"][k]) == 3
    assert all({"code", "message"} <= set(w) for w in plan["warnings"])


def test_ctpos_plan_output_survives_the_fast_exit(sim_cases, tmp_path):
    """`ctpos plan` ends without the interpreter's teardown: its JSON must still reach a file (block-buffered,
    unlike a terminal) whole."""
    out = tmp_path / "plan.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as a site's shell has it
    with out.open("w") as f:
        r = subprocess.run([sys.executable, "-m", "ctpos", "plan", str(sim_cases[0]), "--protocol", "chest", "--json"],
                           stdout=f, stderr=subprocess.PIPE, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert REQUIRED <= set(json.loads(out.read_text()))


def test_ctpos_plan_is_the_in_process_plan(sim_cases, body_model, keypoint_net):
    """`ctpos plan` segments in a child process while it loads torch: its plan must be the one made in turn."""
    from positioning.cli import plan_capture

    r = ctpos("plan", str(sim_cases[0]), "--protocol", "chest", "--json")
    assert r.returncode == 0, r.stderr
    cli = json.loads(r.stdout)
    here = plan_capture(sim_cases[0], "chest", body_model, keypoint_net)[0].to_json()
    assert {k: v for k, v in cli.items() if k != "timing_ms"} == {k: v for k, v in here.items() if k != "timing_ms"}
    assert set(cli["timing_ms"]) == set(here["timing_ms"])


SIMULATOR_PROFILE = Path(__file__).parents[1] / "positioning" / "scanners" / "simulator.toml"


def _profile(path, **values):
    """A scanner profile: the shipped simulator's with some values replaced (None leaves a key out)."""
    import tomllib

    doc = {**tomllib.loads(SIMULATOR_PROFILE.read_text()), **values}
    path.write_text("".join(f"{k} = {v!r}\n" if isinstance(v, str) else f"{k} = {str(v).lower()}\n"
                            for k, v in doc.items() if v is not None))
    return path


def test_the_scanner_the_planner_assumes_is_the_simulator_the_daemon_drives():
    """Without a profile the planner fits the scanner simulator; its profile, the planner's defaults and the
    daemon's hello (TableLimits) must say the same, or a default plan would be checked against another table."""
    from scanner_bridge.adapter import TableLimits

    assert load_scanner_profile(SIMULATOR_PROFILE) == ScannerSpec()
    assert scanner_spec(TableLimits().to_json(), "hello", bore_diameter_mm=700.0) == ScannerSpec()
    assert load_scanner_profile(SIMULATOR_PROFILE, bore_diameter_mm=780.0).bore_diameter_mm == 780.0


@pytest.mark.parametrize("values, expect", [
    ({"longitudinal_max_mm": None}, "longitudinal_max_mm missing"),
    ({"bore_height_min_mm": float("nan")}, "finite number"),
    ({"bore_height_max_mm": "280"}, "finite number"),
    ({"bore_diameter_mm": True}, "finite number"),
    ({"bore_height_min_mm": 300.0}, "minimum must be below"),
    ({"bore_diameter_mm": 30.0}, "wider than twice"),
])
def test_a_bad_scanner_profile_is_refused_in_one_line(tmp_path, values, expect):
    path = _profile(tmp_path / "scanner.toml", **values)
    with pytest.raises(ScannerProfileError, match=expect) as ei:
        load_scanner_profile(path)
    assert str(path) in str(ei.value) and "\n" not in str(ei.value)


def test_an_unreadable_scanner_profile_is_refused_in_one_line(tmp_path):
    with pytest.raises(ScannerProfileError, match="not found"):
        load_scanner_profile(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("bore_diameter_mm = [")
    with pytest.raises(ScannerProfileError, match="not a readable scanner profile"):
        load_scanner_profile(tmp_path / "bad.toml")
    r = ctpos("plan", str(tmp_path), "--protocol", "chest", "--scanner", str(tmp_path / "bad.toml"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a readable scanner profile" in r.stderr
    # A site's profile set once in the environment is read the same way.
    site = {**os.environ, "CTPOS_SCANNER": str(tmp_path / "bad.toml")}
    r = subprocess.run([sys.executable, "-m", "ctpos", "plan", str(tmp_path), "--protocol", "chest"], text=True,
                       capture_output=True, timeout=300, env=site)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "bad.toml: not a readable scanner profile" in r.stderr


def test_ctpos_plan_fits_the_scanner_its_profile_describes(sim_cases, body_model, keypoint_net, tmp_path):
    """A site's profile, not the simulator's defaults, is what `ctpos plan` checks a plan against: a table whose
    travel stops 50 mm short of the range's lower end in T clips the range there, and says so."""
    from positioning.cli import plan_capture

    here = plan_capture(sim_cases[0], "chest", body_model, keypoint_net)[0]
    lowest = min(here.scan_range_table_mm.values())
    short = _profile(tmp_path / "short.toml", longitudinal_max_mm=-lowest - 50.0)
    r = ctpos("plan", str(sim_cases[0]), "--protocol", "chest", "--json", "--scanner", str(short))
    assert r.returncode == 0, r.stderr
    cli = json.loads(r.stdout)
    assert "RANGE_CLIPPED" in [w["code"] for w in cli["warnings"]]
    assert "RANGE_CLIPPED" not in [w["code"] for w in here.warnings]
    assert min(cli["scan_range_table_mm"].values()) == pytest.approx(lowest + 50.0, abs=0.06)  # JSON in 0.1 mm
    assert max(cli["scan_range_table_mm"].values()) == here.to_json()["scan_range_table_mm"][
        max(here.scan_range_table_mm, key=here.scan_range_table_mm.get)]


def test_segmentation_ahead_is_the_segmentation(sim_cases):
    from positioning.capture import read_capture
    from positioning.cli import SegmentationAhead
    from positioning.segment import segment_patient

    cap = read_capture(sim_cases[2])
    here = segment_patient(cap)
    with SegmentationAhead(cap) as ahead:
        seg, ms = ahead.result()
    assert ms > 0
    for f in dataclasses.fields(here):
        a, b = getattr(here, f.name), getattr(seg, f.name)
        if isinstance(a, np.ndarray):
            assert np.array_equal(a, b, equal_nan=True), f.name
        elif f.name != "objects":
            assert a == b, f.name
    assert len(seg.objects) == len(here.objects)


def test_a_refusal_in_the_segmentation_child_is_raised_here(sim_cases, tmp_path):
    from positioning.capture import read_capture
    from positioning.cli import SegmentationAhead
    from positioning.segment import SegmentationError

    case = _broken(sim_cases, tmp_path, "all-zero depth")
    with SegmentationAhead(read_capture(case)) as ahead, \
            pytest.raises(SegmentationError, match="of the depth image holds data"):
        ahead.result()


def _child_dies(monkeypatch):
    """A child killed, or ended by a bug of ours, without a result."""
    import positioning.segment as segment

    parent, real = os.getpid(), segment.segment_patient

    def dies_in_the_child(cap):
        if os.getpid() != parent:
            os._exit(3)
        return real(cap)

    monkeypatch.setattr(segment, "segment_patient", dies_in_the_child)


def _no_fork(monkeypatch):
    """No process left to fork (a site's process limit)."""
    def no_fork():
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)


@pytest.mark.parametrize("fail, logged", [(_child_dies, "gave no result"),
                                          (_no_fork, "no child process for the segmentation")])
def test_a_segmentation_child_that_fails_is_replaced_here(sim_cases, monkeypatch, caplog, fail, logged):
    """Without the child's result the plan is still made: the capture is segmented in this process, and it says so."""
    from positioning.capture import read_capture
    from positioning.cli import SegmentationAhead
    from positioning.segment import segment_patient

    cap = read_capture(sim_cases[0])
    expected = segment_patient(cap).points_s
    fail(monkeypatch)
    with SegmentationAhead(cap) as ahead:
        seg, _ = ahead.result()
    assert np.array_equal(seg.points_s, expected)
    assert logged in caplog.text


def test_leaving_without_the_result_ends_the_child(sim_cases):
    from positioning.capture import read_capture
    from positioning.cli import SegmentationAhead

    with SegmentationAhead(read_capture(sim_cases[0])) as ahead:
        pid = ahead._pid
    with pytest.raises(ChildProcessError):  # reaped: no longer this process's child
        os.waitpid(pid, os.WNOHANG)


def _broken(sim_cases, tmp_path, how):
    case = tmp_path / "case"
    shutil.copytree(sim_cases[0], case)
    if how == "missing depth":
        (case / "depth.png").unlink()
    elif how == "corrupt depth":
        (case / "depth.png").write_bytes(b"garbage")
    elif how == "all-zero depth":
        cv2.imwrite(str(case / "depth.png"), np.zeros((480, 848), np.uint16))
    elif how == "non-finite JSON":
        (case / "scene.json").write_text((case / "scene.json").read_text().replace('"table_height_mm": ',
                                                                                  '"table_height_mm": NaN, "x": '))
    elif how == "table reading 100 mm off":
        scene = json.loads((case / "scene.json").read_text())
        (case / "scene.json").write_text(json.dumps({**scene, "table_height_mm": scene["table_height_mm"] - 100.0}))
    return case


@pytest.mark.parametrize("how, expect", [("missing depth", "missing"), ("corrupt depth", "not a readable PNG"),
                                         ("all-zero depth", "of the depth image holds data"),
                                         ("non-finite JSON", "non-finite"),
                                         ("table reading 100 mm off", "the calibration")])
def test_bad_captures_exit_nonzero_with_one_line(sim_cases, tmp_path, how, expect):
    r = ctpos("plan", str(_broken(sim_cases, tmp_path, how)), "--protocol", "chest", "--json")
    assert r.returncode != 0 and r.stdout == ""
    assert expect in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_a_camera_moved_since_calibration_exits_nonzero(sim_cases, tmp_path):
    case = tmp_path / "case"
    shutil.copytree(sim_cases[0], case)
    scene = json.loads((case / "scene.json").read_text())
    m = np.array(scene["camera_to_scanner"])
    c, s = np.cos(np.radians(4.0)), np.sin(np.radians(4.0))  # turned 4 deg about S's x axis, through the camera
    m[:3, :3] = np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ m[:3, :3]
    (case / "scene.json").write_text(json.dumps({**scene, "camera_to_scanner": m.tolist()}))
    r = ctpos("plan", str(case), "--protocol", "chest", "--json")
    assert r.returncode != 0 and r.stdout == "" and r.stderr.count("\n") == 1
    assert "the camera may have moved since its calibration" in r.stderr and "Traceback" not in r.stderr


def _assert_same_plan(a, b, iso_mm: float, ends_mm: float) -> None:
    assert b.patient_position == a.patient_position
    assert abs(b.table_height_mm - a.table_height_mm) < iso_mm
    for end in ("cranial", "caudal"):
        assert abs(b.scan_range_table_mm[end] - a.scan_range_table_mm[end]) < ends_mm


def test_a_capture_in_another_depth_unit_gives_the_same_plan(sim_cases, body_model, keypoint_net, tmp_path):
    """Another tool's capture may count depth in quarter millimetres (an L515's unit): depth_scale says so."""
    from positioning.cli import plan_capture

    case = tmp_path / "quarter-mm"
    shutil.copytree(sim_cases[0], case)
    cam = json.loads((case / "camera.json").read_text())
    metres = cv2.imread(str(case / "depth.png"), cv2.IMREAD_UNCHANGED) * cam["depth_scale"]
    cv2.imwrite(str(case / "depth.png"), np.round(metres / 0.00025).astype(np.uint16))
    (case / "camera.json").write_text(json.dumps({**cam, "depth_scale": 0.00025}))
    _assert_same_plan(plan_capture(sim_cases[0], "chest", body_model, keypoint_net)[0],
                      plan_capture(case, "chest", body_model, keypoint_net)[0], iso_mm=1.0, ends_mm=2.0)


def test_a_camera_turned_on_its_axis_gives_the_same_plan(sim_cases, body_model, keypoint_net, tmp_path):
    """Another site mounts the camera turned 90 degrees about its optical axis (the image's long side across the
    table): the same scene, so the same plan, up to the pixels' new sampling of the body."""
    from positioning.cli import plan_capture

    case = tmp_path / "turned"
    shutil.copytree(sim_cases[0], case)
    cam = json.loads((case / "camera.json").read_text())
    scene = json.loads((case / "scene.json").read_text())
    for name in ("depth.png", "color.png"):
        img = cv2.imread(str(case / name), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(case / name), cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE))
    turned = {**cam, "width": cam["height"], "height": cam["width"], "fx": cam["fy"], "fy": cam["fx"],
              "cx": cam["height"] - 1 - cam["cy"], "cy": cam["cx"]}
    turn = np.eye(4)
    turn[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]  # old camera frame -> the turned one's (x' = -y, y' = x)
    (case / "camera.json").write_text(json.dumps(turned))
    (case / "scene.json").write_text(json.dumps({**scene, "camera_to_scanner": (np.array(scene["camera_to_scanner"])
                                                                                @ np.linalg.inv(turn)).tolist()}))
    _assert_same_plan(plan_capture(sim_cases[0], "chest", body_model, keypoint_net)[0],
                      plan_capture(case, "chest", body_model, keypoint_net)[0], iso_mm=2.0, ends_mm=6.0)


def test_empty_table_exits_nonzero(body_model, tmp_path):
    from positioning.capture import write_capture
    from sim.scene import load_config, sample_scene
    from sim.simulate import simulate

    cap, _ = simulate(sample_scene(5, load_config(None), body_model.data.train["betas"]), body_model,
                      with_patient=False)
    r = ctpos("plan", str(write_capture(tmp_path / "empty", cap)), "--protocol", "chest")
    assert r.returncode != 0 and "no patient on the table" in r.stderr and r.stderr.count("\n") == 1


def test_ctpos_eval_prints_the_accuracy_table(sim_cases):
    r = ctpos("eval", str(sim_cases[0].parent), "--protocol", "chest")
    assert r.returncode == 0, r.stderr
    assert "table height error" in r.stdout and "patient position correct" in r.stdout
    assert "landmarks, distance to the truth's" in r.stdout and "not compared" not in r.stdout


def test_a_plan_is_compared_with_what_its_truth_gives():
    from positioning.evaluate import compare, summarise

    plan = {"patient_position": "FFS", "table_height_mm": 200.0, "iso_offset_lateral_mm": 10.0,
            "body_thickness_mm": 250.0, "scan_range_scanner_mm": {"cranial": -1300.0, "caudal": -1000.0},
            "landmarks_scanner_mm": {"vertex": [0.0, -600.0, 100.0], "neck": [0.0, -800.0, 0.0]}}
    region = {"cranial_y_mm": -1290.0, "caudal_y_mm": -1010.0, "ideal_table_height_mm": 203.0,
              "iso_offset_lateral_mm": 12.0, "body_thickness_mm": 240.0}
    full = compare(plan, {"patient_position": "FFS", "protocols": {"chest": region},
                          "landmarks_scanner_mm": {"vertex": [3.0, -600.0, 104.0], "knee_left": [0, 0, 0]}}, "chest")
    # Feet first, the head lies towards -y_S: both ends reach 10 mm past the region's (the truth's own ends say which
    # way the head lies, so a wrong patient position does not flip the overscan's sign).
    assert full.position_ok and full.height_err_mm == -3.0 and full.lateral_err_mm == -2.0
    assert full.thickness_err_mm == 10.0 and full.overscan_cranial_mm == 10.0 and full.overscan_caudal_mm == 10.0
    assert full.covered and full.landmark_err_mm == {"vertex": 5.0} and full.missing == ()
    short = compare(plan, {"protocols": {"chest": {**region, "caudal_y_mm": -980.0}}}, "chest")
    assert short.covered is False and short.overscan_caudal_mm == -20.0 and short.position_ok is None
    # Another tool's truth: a top-level table height is the table's state there, never taken for the plan's.
    foreign = compare(plan, {"patient_position": "HFS", "table_height_mm": 200.0,
                             "protocols": {"chest": {"cranial_y_mm": float("nan"), "ideal_table_height_mm": "x"}}},
                      "chest")
    assert foreign.position_ok is False and foreign.height_err_mm is None and foreign.covered is None
    assert foreign.missing == ("landmarks_scanner_mm", "protocols.chest")  # none of the region's five is usable
    assert compare(plan, {"protocols": {"chest": {"body_thickness_mm": 240.0}}}, "chest").missing[2:] == tuple(
        f"protocols.chest.{k}" for k in ("cranial_y_mm", "caudal_y_mm", "ideal_table_height_mm",
                                         "iso_offset_lateral_mm"))
    lines = summarise([full, foreign])
    assert "patient position correct: 50.0 % (n=2)" in lines
    assert any(line.startswith("table height error: median 3.0 mm") and "n=1" in line for line in lines)
    assert lines[-1].startswith("not compared, as truth.json gives no usable landmarks_scanner_mm (in 1 of 2)")


def test_ctpos_eval_goes_on_past_captures_it_cannot_plan_or_compare(sim_cases, tmp_path):
    root = tmp_path / "other-tool"
    for name in ("ours", "partial", "corrupt-truth", "no-truth", "no-depth"):
        shutil.copytree(sim_cases[0], root / name)
    truth = json.loads((sim_cases[0] / "truth.json").read_text())
    (root / "partial" / "truth.json").write_text(json.dumps({"patient_position": truth["patient_position"]}))
    (root / "corrupt-truth" / "truth.json").write_text('{"patient_position": ')
    (root / "no-truth" / "truth.json").unlink()
    (root / "no-depth" / "depth.png").unlink()
    out = tmp_path / "rows.json"
    r = ctpos("eval", str(root), "--protocol", "chest", "--json-out", str(out))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "protocol chest: 5 captures, 1 refused, 0 failed" in r.stdout
    assert "patient position correct: 100.0 % (n=2)" in r.stdout and "(|error|, n=1)" in r.stdout
    assert "refused no-depth: " in r.stdout and "depth.png: missing" in r.stdout
    assert "truth corrupt-truth: not compared (" in r.stdout and "truth no-truth: not compared (" in r.stdout
    rows = {row["case"]: row for row in json.loads(out.read_text())}
    assert rows["partial"]["position_ok"] is True and rows["partial"]["height_err"] is None
    assert rows["no-truth"]["ms"] > 0 and rows["ours"]["covered"] is not None
    r = ctpos("eval", str(tmp_path / "nothing-here"), "--protocol", "chest")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a folder" in r.stderr


def test_bore_clearance_moves_the_table_off_iso_only_as_far_as_needed():
    from positioning.plan import bore_safe_height

    # A box-shaped body 400 mm wide, from 100 mm below to 150 mm above the isocenter at height 200 mm,
    # whose chest is scanned at y 0..-300; a point far down the table (feet side) never reaches the gantry.
    g = np.stack(np.meshgrid(np.linspace(-200, 200, 9), np.linspace(-1000, 0, 11), np.linspace(-100, 150, 6)), -1)
    v = np.concatenate([g.reshape(-1, 3), [[1000.0, -3000.0, 0.0]]])
    spec = ScannerSpec(bore_diameter_mm=520.0, clearance_margin_mm=20.0)
    rng = {"cranial": 0.0, "caudal": -300.0}
    h, c = bore_safe_height(v, 200.0, 200.0, rng, spec)
    # At ISO the top corners are at r = 250 > 240; they clear 240 once 17.3 mm lower (1 mm steps: 218 mm).
    assert h == 218.0 and c >= 20.0
    with pytest.raises(PlanRefused, match=r"^the body would hit the bore \(10 mm beyond its wall\) at the ISO height "
                                          r"and no table height keeps 20 mm"):
        bore_safe_height(v, 200.0, 200.0, rng, ScannerSpec(bore_diameter_mm=480.0))
    with pytest.raises(PlanRefused, match=r"^the body comes within 10 mm of the bore at the ISO height"):
        bore_safe_height(v, 200.0, 200.0, rng, ScannerSpec(bore_diameter_mm=520.0, clearance_margin_mm=200.0))
    h, c = bore_safe_height(v, 200.0, 200.0, rng, ScannerSpec(bore_diameter_mm=700.0))
    assert h == 200.0 and c == pytest.approx(350.0 - np.hypot(200, 150), abs=0.01)


def test_bore_check_over_the_hull_equals_every_point():
    """The bore check looks only at the corners of the body's (x, z) hull; over random bodies it decides exactly as
    checking every point at every table height would."""
    import math

    from positioning.plan import bore_safe_height

    rng = np.random.default_rng(0)
    spec = ScannerSpec(bore_diameter_mm=760.0)
    heights = np.concatenate([[200.0], np.arange(spec.height_min_mm, spec.height_max_mm + 0.5, 1.0)])
    refused = 0
    for _ in range(50):
        pts = rng.normal(0, 1, (3000, 3)) * [rng.uniform(80, 200), 300, rng.uniform(50, 150)] \
            + [0, -1500, rng.uniform(-150, 50)]
        passing = pts[pts[:, 1] + 1500 >= spec.gantry_face_y_mm]
        every = np.array([380 - math.sqrt(float(np.max(passing[:, 0] ** 2 + (passing[:, 2] + 250 - h) ** 2)))
                          for h in heights])
        try:
            h, c = bore_safe_height(pts, 200.0, 250.0, {"cranial": -1200.0, "caudal": -1500.0}, spec)
        except PlanRefused:
            refused += 1
            assert (every < spec.clearance_margin_mm).all()
            continue
        i = 0 if h == 200.0 else int(np.flatnonzero(heights[1:] == h)[0]) + 1
        assert c == pytest.approx(every[i], abs=1e-3)
        ok = np.flatnonzero(every[1:] >= spec.clearance_margin_mm)
        assert every[0] >= spec.clearance_margin_mm or h == heights[1:][ok[np.argmin(np.abs(heights[1:][ok] - 200))]]
    assert 0 < refused < 50  # both outcomes were exercised


def test_a_fresh_plan_loads_no_scipy(sim_cases):
    """scipy.spatial took about 150 ms of a fresh `ctpos plan`'s imports; OpenCV's FLANN and Rodrigues stand in
    for its k-d tree and rotations (docs/planning.md, "Time"). Checked on the imports, not on a clock."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "ctpos", "plan", str(sim_cases[0]),
                        "--protocol", "chest", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported and not {m for m in imported if m.split(".")[0] == "scipy"}
