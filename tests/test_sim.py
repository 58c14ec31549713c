"""The simulator: determinism, geometry of the scene, ground truth and the depth noise model."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from positioning.capture import read_capture, read_truth
from positioning.frames import depth_to_points, project, transform
from sim import render
from sim.room import box
from sim.scene import SceneConfigError, load_config, sample_scene
from sim.simulate import PROTOCOLS, posed_patient, simulate, slab_centre


def test_same_seed_same_capture(body_model):
    cfg = load_config(None)
    a = simulate(sample_scene(42, cfg, body_model.data.train["betas"]), body_model)
    b = simulate(sample_scene(42, cfg, body_model.data.train["betas"]), body_model)
    c = simulate(sample_scene(43, cfg, body_model.data.train["betas"]), body_model)
    assert (a[0].depth == b[0].depth).all() and (a[0].color == b[0].color).all() and a[1] == b[1]
    assert not (a[0].depth == c[0].depth).all()


def test_truth_holds_every_protocol_and_landmark(sim_cases):
    for case in sim_cases:
        t = read_truth(case)
        head_dir = 1 if t["patient_position"].startswith("H") else -1
        for name in PROTOCOLS:
            p = t["protocols"][name]
            assert (p["cranial_y_mm"] - p["caudal_y_mm"]) * head_dir > 50, name
            assert p["ideal_table_height_mm"] is not None
        for lm in ("vertex", "neck", "shoulder_left", "shoulder_right", "hip_left", "hip_right", "knee_left",
                   "knee_right", "ankle_left", "ankle_right"):
            assert len(t["landmarks_scanner_mm"][lm]) == 3
        chest = t["protocols"]["chest"]
        assert 180 < abs(chest["cranial_y_mm"] - chest["caudal_y_mm"]) < 330  # adult lungs are 20-30 cm


def test_patient_left_is_where_the_position_code_says(sim_cases):
    """HFS: patient's left at +x_S; FFP (prone, feet first): also +x_S (both flips cancel)."""
    for case in sim_cases:
        t = read_truth(case)
        lm = t["landmarks_scanner_mm"]
        dx = lm["shoulder_left"][0] - lm["shoulder_right"][0]
        expect = {"HFS": 1, "FFS": -1, "HFP": -1, "FFP": 1}[t["patient_position"]]
        assert np.sign(dx) == expect
        head_dir = 1 if t["patient_position"].startswith("H") else -1
        assert (lm["vertex"][1] - lm["ankle_left"][1]) * head_dir > 1000


def test_body_rests_on_the_mattress_and_the_camera_sees_it(sim_cases):
    for case in sim_cases:
        cap, t = read_capture(case), read_truth(case)
        s = t["scene"]
        mattress_top = s["mattress_mm"] - t["table_height_mm"]
        # The lowest truth joint is above the mattress; the body's back lies on it (within noise below).
        assert min(p[2] for p in t["joints_scanner_mm"].values()) > mattress_top
        pts = transform(depth_to_points(cap.depth_mm(), cap.camera), cap.scene.camera_to_scanner)
        valid = cap.depth > 0
        # Measured points at the pelvis truth pixel lie near the body surface above the pelvis joint.
        uv = project(np.array(t["joints_scanner_mm"]["spine2"]), cap.scene.camera_to_scanner, cap.camera)
        u, v = np.round(uv).astype(int)
        win = valid[v - 3:v + 4, u - 3:u + 4]
        top = pts[v - 3:v + 4, u - 3:u + 4][win][:, 2]
        assert win.any()
        assert 30 < np.median(top) - t["joints_scanner_mm"]["spine2"][2] < 250


def test_depth_noise_grows_with_distance_squared():
    """A flat floor seen at 1 m and 2 m: the per-pixel noise sd should scale by about 4."""
    rng = np.random.default_rng(0)
    k = np.array([[430.0, 0, 424], [0, 430, 240], [0, 0, 1]])
    sds = []
    for z in (1000.0, 2000.0):
        cam = np.eye(4)
        cam[:3, :3] = np.diag([1.0, -1.0, -1.0])  # looking straight down
        cam[2, 3] = z
        ideal = render.raycast([box([-5000, -5000, -10], [5000, 5000, 0], "floor")], k, cam, 848, 480)
        d = render.add_depth_noise(ideal.depth, 430.0, 0.08, 0.0, 0.0, rng).astype(float)
        patch = d[200:280, 380:460]
        patch = patch[patch > 0]
        sds.append(patch.std())
        assert abs(np.median(patch) - z) < 0.01 * z
    assert 2.5 < sds[1] / sds[0] < 6.0


def test_stereo_shadow_beside_near_edges():
    z = np.full((20, 200), 2000.0)
    z[:, 100:] = 1000.0  # a near object on the right half
    occ = render.stereo_shadow(z, 430.0)
    assert occ[:, 80:100].all()  # background just left of the edge is hidden from the right imager
    assert not occ[:, :50].any() and not occ[:, 100:].any()


def test_config_fixes_and_ranges_parameters(tmp_path, body_model):
    f = tmp_path / "c.toml"
    f.write_text('patient_position = "FFP"\npose = ["arms_up"]\ntable_height_mm = [300.0, 310.0]\nblanket = true\n')
    cfg = load_config(f)
    for s in range(5):
        p = sample_scene(s, cfg, body_model.data.train["betas"])
        assert p.patient_position == "FFP" and p.pose == "arms_up" and p.blanket
        assert 300 <= p.table_height_mm <= 310


def test_anny_years_draws_the_same_scene_with_a_younger_body(tmp_path, body_model):
    """Children: only the anny body's age changes; the default scenes (model bodies) draw as before."""
    f, g = tmp_path / "c.toml", tmp_path / "d.toml"
    f.write_text('body_source = "anny"\nanny_years = [3.0, 11.0]\n')
    g.write_text('body_source = "anny"\n')
    betas = body_model.data.train["betas"]
    for seed in range(5):
        child, adult = sample_scene(seed, load_config(f), betas), sample_scene(seed, load_config(g), betas)
        assert 3.0 <= child.anny_phenotype["years"] <= 11.0 <= adult.anny_phenotype["years"]
        assert dataclasses.replace(child, anny_phenotype=adult.anny_phenotype) == adult
        assert {k: v for k, v in child.anny_phenotype.items() if k != "years"} == \
               {k: v for k, v in adult.anny_phenotype.items() if k != "years"}
    assert sample_scene(7, load_config(None), betas).anny_phenotype == {}


@pytest.mark.parametrize("tilt, pan", [(0.0, 0.0), (15.0, 0.0), (-10.0, 20.0), (30.0, -25.0)])
def test_the_camera_aims_at_its_target_and_stays_put_when_the_table_moves(body_model, tilt, pan):
    """camera_pan_deg hangs the camera beside the table, looking across; the table moving leaves it where it is."""
    from sim.scene import with_table_at
    from sim.simulate import make_camera

    cfg = {**load_config(None), "camera_tilt_deg": tilt, "camera_pan_deg": pan}
    p = sample_scene(11, cfg, body_model.data.train["betas"])
    m = make_camera(p).camera_to_scanner
    axis, pos = m[:3, 2], m[:3, 3]
    target = np.array([p.camera_lateral_mm, p.table_longitudinal_mm + p.camera_target_y_mm, -p.table_height_mm])
    s = (target - pos) @ axis
    assert np.allclose(pos + s * axis, target, atol=1e-6)  # the optical axis meets the tabletop at the target
    assert pos[2] + p.table_height_mm == pytest.approx(p.camera_height_mm)
    assert np.degrees(np.arcsin(axis[1])) == pytest.approx(tilt)
    assert np.degrees(np.arctan2(-axis[0], -axis[2])) == pytest.approx(pan)
    assert np.allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3))
    moved = with_table_at(p, p.table_height_mm + 60.0, p.table_longitudinal_mm - 200.0)
    assert np.allclose(make_camera(moved).camera_to_scanner, m, atol=1e-6)


def test_another_depth_resolution_draws_the_same_scene_at_that_size(tmp_path, body_model):
    """Captures from other cameras come at other sizes; the field of view stays, so the scene is the same."""
    f = tmp_path / "c.toml"
    f.write_text('depth_resolution = "1280x720"\n')
    p0 = sample_scene(3, load_config(None), body_model.data.train["betas"])
    p = sample_scene(3, load_config(f), body_model.data.train["betas"])
    assert dataclasses.replace(p, depth_resolution=p0.depth_resolution) == p0
    cap0, _ = simulate(p0, body_model)
    cap, _ = simulate(p, body_model)
    assert cap.depth.shape == (720, 1280) and cap.color.shape[:2] == (720, 1280)
    assert cap.camera.fx == pytest.approx(cap0.camera.fx * 1280 / 848)
    # The same body, seen in more pixels: the patient's points in S agree.
    c0, c = (transform(depth_to_points(k.depth_mm(), k.camera)[k.depth > 0], k.scene.camera_to_scanner)
             for k in (cap0, cap))
    assert len(c) > 2 * len(c0)
    assert np.abs(np.percentile(c[:, 2], [50, 90, 99]) - np.percentile(c0[:, 2], [50, 90, 99])).max() < 5.0


def test_mixed_pixels_blend_an_edge_and_leave_the_rest_as_it_was():
    """flying_fraction = 1: every pixel on a depth edge gets a depth between its two sides; the others, drawn
    from the same stream as without it, are unchanged."""
    from sim.render import add_depth_noise

    z = np.full((120, 160), 3000.0)
    z[:, :80] = 1900.0  # a silhouette over a floor 1.1 m behind it
    plain = add_depth_noise(z, 430.0, 0.05, 0.5, 0.0, np.random.default_rng(4)).astype(float)
    mixed = add_depth_noise(z, 430.0, 0.05, 0.5, 0.0, np.random.default_rng(4), flying_fraction=1.0).astype(float)

    def between(d):
        return (d > 2000) & (d < 2900)

    assert not between(plain).any()
    assert between(mixed[:, 78:82]).mean() > 0.25  # the edge band (some of it in the stereo shadow: no data)
    away = np.r_[0:75, 85:160]
    same = (plain[:, away] == mixed[:, away]) | (plain[:, away] == 0) | (mixed[:, away] == 0)
    assert same.mean() > 0.99 and not between(mixed[:, away]).any()


def test_outliers_are_random_depths_at_their_share_of_the_pixels():
    from sim.render import add_depth_noise

    z = np.full((200, 300), 2000.0)
    plain = add_depth_noise(z, 430.0, 0.05, 0.5, 0.0, np.random.default_rng(5)).astype(float)
    salted = add_depth_noise(z, 430.0, 0.05, 0.5, 0.0, np.random.default_rng(5), outlier_fraction=0.01).astype(float)
    changed = plain != salted
    assert 0.007 < changed.mean() < 0.013  # 1 %, less the few drawn near the true depth
    assert np.ptp(salted[changed]) > 4000 and 400 <= salted[changed].min() and salted.max() <= 6000


@pytest.mark.parametrize("text, expect", [
    ("tabel_height_mm = 3", "unknown scene parameter"),
    ("pose = 'cartwheel'", "pose must be among"),
    ("this is = not toml =", "not valid TOML"),
    ("depth_resolution = '1280 by 720'", "WIDTHxHEIGHT"),
    ("flying_fraction = 1.5", "from 0 to 1"),
    ("flying_fraction = 'some'", "from 0 to 1"),
    ("outlier_fraction = -0.1", "outlier_fraction must be a number from 0 to 1"),
    ("head_pillow_mm = 400", "head_pillow_mm must be a number from 0 to 150"),
    ("mattress_curve_mm = -5", "mattress_curve_mm must be a number from 0 to 100"),
    ("roll_deg = 200", "roll_deg must be a number from -90 to 90"),
    ("anny_years = 0.5", "anny_years must be a number from 1 to 90"),
    ("anny_years = [3, 5, 7]", "anny_years must be one age or a range"),
    ("camera_pan_deg = 60", "camera_pan_deg must be a number from -45 to 45"),
])
def test_bad_config_refused(tmp_path, text, expect):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(SceneConfigError, match=expect):
        load_config(f)


def test_one_arm_up_raises_one_wrist_past_its_shoulder_and_lowers_the_other(body_model):
    """A pose the default draw leaves out (a stiff shoulder, a drip line), for other tools' kinds of capture."""
    from positioning.skeleton import JOINT_INDEX

    cfg = {**load_config(None), "pose": "one_arm_up", "patient_position": "HFS"}
    raised = set()
    for seed in range(6):
        j = posed_patient(sample_scene(seed, cfg, body_model.data.train["betas"]), body_model)[2]
        # HFS: the head lies towards +y (the gantry); beyond the shoulder towards it is raised.
        reach = {s: j[JOINT_INDEX[f"{s}_wrist"], 1] - j[JOINT_INDEX[f"{s}_shoulder"], 1] for s in ("left", "right")}
        up = [s for s, r in reach.items() if r > 100]
        assert len(up) == 1 and min(reach.values()) < -200, reach
        raised.add(up[0])
    assert raised == {"left", "right"}


def test_a_head_pillow_lifts_a_supine_head_and_fills_the_gap_under_it(body_model):
    """head_pillow_mm bends the neck so the head lies on a pillow that the camera sees around it; the default
    scenes are drawn unchanged (the option is last and fixed)."""
    from positioning.skeleton import JOINT_INDEX

    cfg = {**load_config(None), "patient_position": "HFS", "pose": "arms_down"}
    p = sample_scene(5, cfg, body_model.data.train["betas"])
    pillow = dataclasses.replace(p, head_pillow_mm=80.0)
    assert sample_scene(5, {**cfg, "head_pillow_mm": 80.0}, body_model.data.train["betas"]) == pillow
    head = body_model.data.weights.argmax(1) == JOINT_INDEX["head"]
    mattress_top = p.mattress_mm - p.table_height_mm
    lift = [posed_patient(q, body_model)[1][head, 2].min() - mattress_top for q in (p, pillow)]
    assert lift[1] - lift[0] > 40
    (cap0, _), (cap, _) = simulate(p, body_model), simulate(pillow, body_model)
    # Beside the head the camera now sees the pillow's top, not the mattress.
    c0, c = (transform(depth_to_points(k.depth_mm(), k.camera)[k.depth > 0], k.scene.camera_to_scanner)
             for k in (cap0, cap))
    j = posed_patient(pillow, body_model)[2][JOINT_INDEX["head"]]
    near = [np.abs(q[:, 1] - j[1]) < 40 for q in (c0, c)]
    beside = [(np.abs(q[:, 0] - j[0]) > 120) & (np.abs(q[:, 0] - j[0]) < 190) & m for q, m in zip((c0, c), near)]
    assert np.median(c0[beside[0], 2]) < mattress_top + 15 < mattress_top + 40 < np.median(c[beside[1], 2])


def test_a_curved_mattress_rises_at_its_edges_and_the_back_lies_in_it(body_model):
    """mattress_curve_mm: a curved tabletop's mattress, its top mattress_mm on the centre line and that much higher
    at the long edges; the patient's back lies on it (nothing below it), the default scenes drawn unchanged."""
    from sim.room import MATTRESS_WIDTH

    cfg = {**load_config(None), "patient_position": "HFS", "pose": "arms_down", "blanket": False, "yaw_deg": 0.0,
           "lateral_offset_mm": 0.0}
    p = sample_scene(7, cfg, body_model.data.train["betas"])
    curved = dataclasses.replace(p, mattress_curve_mm=30.0)
    assert sample_scene(7, {**cfg, "mattress_curve_mm": 30.0}, body_model.data.train["betas"]) == curved
    cap, _ = simulate(curved, body_model)
    pts = transform(depth_to_points(cap.depth_mm(), cap.camera)[cap.depth > 0], cap.scene.camera_to_scanner)
    centre_z = p.mattress_mm - p.table_height_mm
    verts = posed_patient(curved, body_model)[1]
    # Seen beside the shins (HFS: the feet towards -y): the mattress's top near its edges, to the sensor's noise.
    y = posed_patient(curved, body_model)[2][0, 1]
    for x in (-0.45, 0.45):
        at = pts[(np.abs(pts[:, 0] - x * MATTRESS_WIDTH) < 8) & (np.abs(pts[:, 1] - y + 600) < 60)]
        assert abs(np.median(at[:, 2]) - (centre_z + 30.0 * 0.9 ** 2)) < 4.0
    surface = centre_z + 30.0 * (2 * verts[:, 0] / MATTRESS_WIDTH) ** 2
    on = np.abs(verts[:, 0]) < MATTRESS_WIDTH / 2
    assert (verts[on, 2] >= surface[on] - 1e-6).all() and (verts[on, 2] < surface[on] + 1.0).sum() > 100


def test_a_body_of_its_own_is_posed_not_the_model_template(body_model):
    """pose_body with a rest mesh of its own (anny's bodies) poses that mesh: in the rest pose it comes back
    unchanged, with its own joints (smplx's layer would silently pose its mean template instead)."""
    from sim.body import pose_body

    d = body_model.data
    own = d.v_template * np.array([1.1, 1.2, 0.9])
    zero = np.zeros((23, 3))
    v, j, _, levels = pose_body(body_model, np.zeros(body_model.num_betas), zero, own, np.random.default_rng(0))
    assert np.abs(v - own).max() < 1e-5
    assert np.abs(j - d.J_regressor @ own).max() < 1e-5
    v_mean, _, _, _ = pose_body(body_model, np.zeros(body_model.num_betas), zero, None, np.random.default_rng(0))
    assert np.abs(v_mean - d.v_template).max() < 1e-5


@pytest.mark.slow
def test_bodies_straight_from_anny(body_model):
    """anny's own surface (not its projection on our shape space) on the same skeleton and anatomy rules."""
    pytest.importorskip("anny")  # an optional extra; CI installs it with the test extra
    cfg = {**load_config(None), "body_source": "anny", "pose": "arms_down", "patient_position": "HFS"}
    p = sample_scene(3, cfg, body_model.data.train["betas"])
    cap, truth = simulate(p, body_model)
    assert truth["body_source"] == "anny" and 1400 < truth["stature_mm"] < 2300  # anny reaches 2.25 m
    assert 150 < abs(truth["protocols"]["chest"]["cranial_y_mm"] - truth["protocols"]["chest"]["caudal_y_mm"]) < 350
    assert (cap.depth > 0).mean() > 0.8
    # What is rendered is that body: lying straight, its length on the table is its stature.
    verts = posed_patient(p, body_model)[1]
    assert abs(np.ptp(verts[:, 1]) - truth["stature_mm"]) < 0.05 * truth["stature_mm"]


def test_a_limb_below_the_back_swings_up_to_rest_on_the_mattress():
    """A straight 'leg' whose far end is 60 mm below the floor swings about its root just enough; an arm above
    stays; a leg whose calf hangs in the air drops onto the floor."""
    from sim.body import limb_swings, swing

    x = np.linspace(0.0, 900.0, 91)
    leg = np.stack([np.zeros_like(x), -x, -x * 60.0 / 900.0], 1)  # from the hip at the origin, sloping down
    w = np.clip(x / 150.0, 0, 1)  # blended near the hip, rigid beyond
    up, = limb_swings(leg, -5.0, [(w, np.zeros(3), np.array([1.0, 0, 0]), None)])
    lifted = swing(leg, w, np.zeros(3), up)
    assert -5.0 <= lifted[:, 2].min() < -3.0  # rests on the floor, not above it
    moved = np.linalg.norm(lifted - leg, axis=1)
    assert moved[:10].max() < 5.0 and moved[-1] > 50.0  # the root barely moves, the far end rises
    high = leg + [0, 0, 100.0]
    assert np.allclose(limb_swings(high, -5.0, [(w, np.zeros(3), np.array([1.0, 0, 0]), None)])[0], np.eye(3))
    # A leg whose root rests on the floor (a buttock) but whose far part is 150 mm up (a calf in the air)
    # comes down until the far part rests.
    floating = np.stack([np.zeros_like(x), -x, x * 150.0 / 900.0], 1)
    far = (x > 450).astype(float)
    down, = limb_swings(floating, 0.0, [(w, np.zeros(3), np.array([1.0, 0, 0]), far)])
    dropped = swing(floating, w, np.zeros(3), down)
    assert 0.0 <= dropped[far > 0, 2].min() <= 2.0
    assert np.allclose(limb_swings(floating, 0.0, [(w, np.zeros(3), np.array([1.0, 0, 0]), None)])[0], np.eye(3))


def test_the_trunk_lies_on_the_mattress_in_every_scene(body_model):
    """No scene balances the trunk on a heel or a hand: the back touches the mattress (less the sink), a supine
    patient's legs rest on it rather than hang in the air, and the head rests on it (until the simulator bent the
    neck, heads stood 0-125 mm over the mattress, 32 mm at the median of 40 tuning scenes)."""
    from sim.scene import load_config, sample_scene
    from positioning.skeleton import JOINT_INDEX
    from sim.simulate import _limbs, _trunk, posed_patient

    trunk = _trunk(body_model)
    head = body_model.data.weights[:, JOINT_INDEX["head"]] > 0.5
    for seed in range(50_000_000, 50_000_012):  # includes FFP and arms-up scenes that used to float 35-73 mm
        p = sample_scene(seed, load_config(None), body_model.data.train["betas"])
        _, v, _, _, _ = posed_patient(p, body_model)
        mattress = p.mattress_mm - p.table_height_mm
        assert v[trunk, 2].min() - mattress < 0.01
        assert v[:, 2].min() >= mattress - 0.01
        assert v[head, 2].min() - mattress < 3.0, (seed, p.patient_position, p.pose)
        if p.patient_position.endswith("S"):  # supine, the calves or heels rest on it too
            for _, _, _, far in (limb for limb in _limbs(body_model) if limb[3] is not None):
                assert v[far > 0.5, 2].min() - mattress < 3.0, (seed, p.pose)


def test_the_truths_slab_is_the_bodys_surface_between_vertex_rows(coarse_trunk):
    """The ideal table height's slab reads the true body's surface, not whichever vertices fall in it: between
    two rows 36 mm apart (none in the slab) and over the crest row; the forearm over it is left out."""
    v, faces, trunk = coarse_trunk
    between = slab_centre(v, faces, trunk, 18.0)  # the slab 3-33 mm
    assert between["ap_mm"] == pytest.approx(100.0 + 30.0 * 33.0 / 36.0 + 100.0, abs=0.01)
    crest = slab_centre(v, faces, trunk, 30.0)
    assert crest["z"] == pytest.approx(15.0, abs=0.01) and crest["lat_mm"] == pytest.approx(300.0, abs=0.01)


def test_without_the_anatomy_spread_only_the_lungs_move(body_model):
    """bench/anatomy_bound.py compares the truth with the anatomy rule on the same skeleton: switching the
    per-patient spread off must change the lung levels and nothing else of the scene (its draws are still
    made, so the rest of the scene is the same)."""
    from positioning.anatomy import BASE_SD_M

    cfg = load_config(None)
    moved = []
    for seed in range(3):
        p = sample_scene(seed, cfg, body_model.data.train["betas"])
        _, v, j, face, drawn = posed_patient(p, body_model)
        _, v0, j0, face0, rule = posed_patient(p, body_model, anatomy_spread=False)
        assert (v == v0).all() and (j == j0).all() and (face == face0).all()
        for name in ("iliac_crest", "symphysis"):
            assert (drawn[name] == rule[name]).all(), name
        moved.append(abs(drawn["lung_base"][1] - rule["lung_base"][1]))
    assert 0.01 < max(moved) < 4 * BASE_SD_M * 1000, moved
