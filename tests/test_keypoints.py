"""The depth keypoint network: its input window, label conventions, and the committed weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from positioning.capture import read_capture, read_truth
from positioning.keypoints import (FLIP, KEYPOINTS, VIEWS, VIEWS_AGREE_MM, combine_views, detect_keypoints,
                                   load_keypoint_net, position_from_sides, predict, side_to_anatomy, view_inputs,
                                   window_input)
from positioning.poses import POSITION_ROTATIONS, canonical_pose
from positioning.segment import CELL_MM, segment_patient, shifted_height_map
from positioning.keypoints import PELVIS_HIPS_MAX_MM, Window, pelvis_from_hips
from sim.keypoint_training import _augment, _local_soft_argmax, _targets, renoise, side_labels, view_cells


def test_flip_swaps_left_and_right_only():
    for i, j in enumerate(FLIP):
        a, b = KEYPOINTS[i], KEYPOINTS[j]
        assert a.replace("left", "right") == b or a.replace("right", "left") == b or a == b
        assert FLIP[j] == i


def _posed_keypoints(body_model, position: str) -> np.ndarray:
    """(K, 3) anatomical keypoints (mm) of the mean body, arms down, lying in a position (no yaw)."""
    from positioning.skeleton import JOINT_INDEX

    out = body_model.layer(betas=torch.zeros(1, 16),
                           body_pose=torch.as_tensor(canonical_pose("down")[1:].reshape(1, -1), dtype=torch.float32))
    j = out.joints[0, :24].detach().numpy() @ POSITION_ROTATIONS[position].T * 1000.0
    return np.array([j[JOINT_INDEX[n]] for n in KEYPOINTS])


@pytest.mark.parametrize("position", ["HFS", "FFS", "HFP", "FFP"])
def test_side_labels_put_the_plus_x_limb_first_in_every_position(body_model, position):
    """The network's "left_*" channel is the limb at +x; side_to_anatomy turns it back into the patient's left."""
    anat = _posed_keypoints(body_model, position)
    side, _ = side_labels(anat[None, :, [1, 0]], anat[None, :, 2], np.array([position]))
    k = {n: i for i, n in enumerate(KEYPOINTS)}
    for limb in ("shoulder", "elbow", "wrist", "hip", "knee", "ankle"):
        # cells are (row along y, column along x)
        assert side[0, k[f"left_{limb}"], 1] > side[0, k[f"right_{limb}"], 1], (position, limb)
    back = side[0, list(side_to_anatomy(position))]
    assert np.allclose(back, anat[:, [1, 0]])


@pytest.mark.parametrize("position", ["HFS", "FFS", "HFP", "FFP"])
def test_position_from_head_direction_and_prone_output(body_model, position):
    kp = _posed_keypoints(body_model, position)
    k = {n: i for i, n in enumerate(KEYPOINTS)}
    p_prone = 0.9 if position.endswith("P") else 0.1
    assert position_from_sides(kp[:, 1], p_prone) == position
    for joint in ("head", "neck", "pelvis", "left_ankle"):  # one keypoint at the body's other end turns nothing
        moved = kp[:, 1].copy()
        other = "right_ankle" if joint in ("head", "neck") else "head"
        moved[k[joint]] = kp[k[other], 1] + np.sign(kp[k[other], 1] - kp[k[joint], 1]) * 100.0
        assert position_from_sides(moved, p_prone) == position, joint


def test_augmentations_keep_the_side_labels(body_model):
    """After a half turn or a mirror the "left_*" (+x) channels still hold the limbs at larger x."""
    rng = np.random.default_rng(0)
    anat = _posed_keypoints(body_model, "HFS")
    side, hts = side_labels((anat[None, :, [1, 0]] / 10.0 + [128, 32]).astype(np.float32), anat[None, :, 2],
                            np.array(["HFS"]))
    cells, h = torch.as_tensor(side, dtype=torch.float32), torch.as_tensor(hts, dtype=torch.float32)
    x = torch.zeros(1, 2, 256, 64)
    k = {n: i for i, n in enumerate(KEYPOINTS)}
    turned = set()
    for _ in range(40):
        _, c, _ = _augment(x, cells, h, rng)
        c = c[0].numpy()
        assert c[k["left_shoulder"], 1] > c[k["right_shoulder"], 1] and c[k["left_knee"], 1] > c[k["right_knee"], 1]
        turned.add(bool(c[k["head"], 0] < c[k["pelvis"], 0]))
    assert turned == {True, False}


def test_augmented_labels_stay_on_their_cells():
    """A flipped window's labels point at the cells their keypoints' content moved to."""
    rng = np.random.default_rng(1)
    cells = np.column_stack([rng.integers(0, 256, len(KEYPOINTS)), rng.integers(0, 64, len(KEYPOINTS))])
    x = torch.zeros(1, 2, 256, 64)
    marks = torch.arange(1, len(KEYPOINTS) + 1, dtype=torch.float32) / 100.0
    x[0, 0, cells[:, 0], cells[:, 1]] = marks
    seen = set()
    for _ in range(20):  # heights travel with their labels: here they carry each keypoint's mark
        xa, c, h = _augment(x, torch.as_tensor(cells[None], dtype=torch.float32), marks[None].clone(), rng)
        ij = c[0].round().long()
        assert torch.equal(xa[0, 0, ij[:, 0], ij[:, 1]], h[0])
        seen.add(tuple(c[0, 0].tolist()))
    assert len(seen) == 4  # all four flips drawn


def test_a_pelvis_away_from_the_hips_is_put_between_them():
    k = {n: i for i, n in enumerate(KEYPOINTS)}
    xy = np.zeros((len(KEYPOINTS), 2))
    xy[k["left_hip"]], xy[k["right_hip"]] = (90.0, 0.0), (-90.0, 20.0)
    hts, conf = np.full(len(KEYPOINTS), 100.0), np.full(len(KEYPOINTS), 0.9)
    hts[k["pelvis"]], conf[k["right_hip"]] = 300.0, 0.6
    xy[k["pelvis"]] = (5.0, 10.0 + PELVIS_HIPS_MAX_MM - 10)  # near enough: kept
    np.testing.assert_array_equal(pelvis_from_hips(xy, hts, conf)[0], xy)
    xy[k["pelvis"]] = (0.0, 420.0)  # up the trunk: the network's error
    got, h, c = pelvis_from_hips(xy, hts, conf)
    np.testing.assert_allclose(got[k["pelvis"]], (0.0, 10.0))
    assert h[k["pelvis"]] == 100.0 and c[k["pelvis"]] == 0.6 and xy[k["pelvis"], 1] == 420.0  # input untouched


def test_a_scenes_views_are_flipped_alike():
    """With group=2 both windows of a capture (its two views) take the same flips, and their labels follow."""
    rng = np.random.default_rng(2)
    cells = np.column_stack([rng.integers(0, 256, len(KEYPOINTS)), rng.integers(0, 64, len(KEYPOINTS))])
    x = torch.zeros(8, 2, 256, 64)
    marks = torch.arange(1, len(KEYPOINTS) + 1, dtype=torch.float32) / 100.0
    x[:, 0, cells[:, 0], cells[:, 1]] = marks
    xa, c, h = _augment(x, torch.as_tensor(np.repeat(cells[None], 8, 0), dtype=torch.float32),
                        marks.repeat(8, 1), rng, group=2)
    assert torch.equal(xa[0::2], xa[1::2]) and torch.equal(c[0::2], c[1::2])
    assert len({tuple(c[b, 0].tolist()) for b in range(0, 8, 2)}) > 1  # groups differ from each other


def test_view_cells_name_the_same_table_point_in_every_view():
    rng = np.random.default_rng(3)
    origins = np.array([[[-315.0, -1270.0], [-310.0, -1265.0]]])
    cells0 = rng.uniform(0, 64, (1, len(KEYPOINTS), 2))
    vc = view_cells(cells0, origins)
    pts = [Window(*origins[0, v]).to_table(vc[0, v]) for v in range(2)]
    np.testing.assert_allclose(pts[0], pts[1], atol=1e-9)
    np.testing.assert_allclose(vc[0, 0], cells0[0])


def test_renoise_touches_only_the_body_and_keeps_its_size():
    """Fresh noise lands on occupied cells only; holes remove at most 4 % of them; heights move by millimetres."""
    rng = np.random.default_rng(4)
    x = torch.zeros(16, 2, 256, 64)
    x[:, 0, 40:220, 16:48] = 150.0 / 300.0
    x[:, 1, 40:220, 16:48] = 1.0
    y = renoise(x, rng)
    body = x[:, 1] > 0
    assert torch.count_nonzero(y[:, :, ~body[0]]) == 0
    lost = (body & (y[:, 1] == 0)).sum((1, 2)).float() / body.sum((1, 2))
    assert lost.max() <= 0.041 and lost.max() > 0
    kept = body & (y[:, 1] > 0)
    moved = (y[:, 0] - x[:, 0]).abs()[kept] * 300.0
    assert 0.1 < float(moved.median()) < 10.0
    assert torch.equal(renoise(x, np.random.default_rng(4)), y)  # one seed, one draw


def test_soft_argmax_reads_a_target_heatmap_back_to_its_cell():
    """The training's differentiable read-out of a heatmap drawn by _targets returns the cells it was drawn at."""
    rng = np.random.default_rng(5)
    cells = torch.as_tensor(rng.uniform([10, 10], [246, 54], (3, len(KEYPOINTS), 2)), dtype=torch.float32)
    tgt = _targets(cells).clamp(1e-6, 1 - 1e-6)
    got = _local_soft_argmax(torch.logit(tgt), cells)
    assert torch.allclose(got, cells, atol=0.1)  # the window rounds to whole cells around the target: < 1 mm


@pytest.mark.parametrize("flip_dims", [(3,), (2, 3), (2,)])
def test_flip_averaged_prediction_follows_a_flipped_window(sim_cases, keypoint_net, flip_dims):
    """predict() of a flipped window is predict() of the window flipped the same way (sides swapped when
    mirrored across): the mean runs over the same four flips, each turned back correctly."""
    seg = segment_patient(read_capture(sim_cases[0]))
    x, _ = window_input(seg.heightmap, seg.heightmap_origin_t)
    x = torch.as_tensor(x)[None]
    heat, height, prone = predict(keypoint_net, x)
    heat_f, height_f, prone_f = predict(keypoint_net, x.flip(flip_dims))
    swap = list(FLIP) if 3 in flip_dims else list(range(len(KEYPOINTS)))
    assert torch.allclose(heat_f, heat.flip(flip_dims)[:, swap], atol=1e-4)
    assert torch.allclose(height_f, height.flip(flip_dims)[:, swap], atol=1e-5)
    assert torch.allclose(prone_f, prone, atol=1e-5)


def test_views_in_one_batch_are_each_views_own_passes(sim_cases, keypoint_net):
    """predict() with each window's own flips, batched, gives what each window gives alone through its flips."""
    cap = read_capture(sim_cases[0])
    xs, _ = view_inputs(segment_patient(cap), cap.scene.table_longitudinal_mm)
    xs = torch.as_tensor(xs)
    heat, height, prone = predict(keypoint_net, xs, [flips for _, flips in VIEWS])
    for v, (_, flips) in enumerate(VIEWS):
        h, e, p = predict(keypoint_net, xs[v:v + 1], [flips])
        assert torch.allclose(heat[v], h[0], atol=1e-4) and torch.allclose(height[v], e[0], atol=1e-5)
        assert torch.allclose(prone[v], p[0], atol=1e-5)
    assert not torch.allclose(heat[0], heat[1], atol=1e-2)  # two different looks


def test_window_is_centred_on_the_patient(sim_cases):
    cap = read_capture(sim_cases[0])
    seg = segment_patient(cap)
    x, win = window_input(seg.heightmap, seg.heightmap_origin_t)
    assert x.shape == (2, 256, 64) and x[1].sum() > 2000
    rows = np.nonzero(x[1].any(1))[0]
    assert abs((rows.min() + rows.max()) / 2 - 128) < 3


def test_the_shifted_height_map_unshifted_is_the_segmentations(sim_cases):
    """The second view's rasteriser on the segmentation's own grid gives the segmentation's height map, cell for cell."""
    cap = read_capture(sim_cases[0])
    seg = segment_patient(cap)
    hm, origin = shifted_height_map(seg, cap.scene.table_longitudinal_mm, 0.0)
    assert origin == seg.heightmap_origin_t
    np.testing.assert_allclose(hm[:-1, :-1], seg.heightmap, atol=1e-3)  # NaN where NaN; float32 points
    assert np.isnan(hm[-1]).all() and np.isnan(hm[:, -1]).all()


def test_the_half_cell_view_holds_each_point_in_its_nearest_cell(sim_cases):
    cap = read_capture(sim_cases[0])
    seg = segment_patient(cap)
    hm, (x0, y0) = shifted_height_map(seg, cap.scene.table_longitudinal_mm, CELL_MM / 2)
    assert (x0, y0) == (seg.heightmap_origin_t[0] - CELL_MM / 2, seg.heightmap_origin_t[1] - CELL_MM / 2)
    p = seg.points_s.astype(np.float64)
    i = np.rint((p[:, 1] - cap.scene.table_longitudinal_mm - y0) / CELL_MM).astype(int)
    j = np.rint((p[:, 0] - x0) / CELL_MM).astype(int)
    above = p[:, 2] - seg.support_z_s
    assert np.all(hm[i, j] >= above - 1e-3)  # no point stands above its cell
    top = np.full(hm.shape, -np.inf)
    np.maximum.at(top, (i, j), above)
    np.testing.assert_allclose(hm[np.isfinite(top)], top[np.isfinite(top)], atol=1e-3)  # each cell its highest
    assert np.isnan(hm[~np.isfinite(top)]).all()


def test_views_average_where_they_agree_and_take_the_surer_where_not():
    xy = np.zeros((2, 3, 2))
    xy[1, 0] = [6.0, -8.0]  # 10 mm apart: averaged
    xy[1, 1] = [0.0, VIEWS_AGREE_MM + 1]  # apart: the surer view's
    xy[0, 2], xy[1, 2] = [100.0, 0.0], [0.0, 200.0]
    hts = np.array([[50.0, 60.0, 70.0], [60.0, 90.0, 10.0]])
    conf = np.array([[0.9, 0.4, 0.8], [0.7, 0.6, 0.2]])
    p, h, c = combine_views(xy, hts, conf)
    np.testing.assert_allclose(p, [[3.0, -4.0], [0.0, VIEWS_AGREE_MM + 1], [100.0, 0.0]])
    np.testing.assert_allclose(h, [55.0, 90.0, 70.0])
    np.testing.assert_allclose(c, [0.8, 0.5, 0.5])


def test_committed_network_finds_keypoints_near_the_truth(sim_cases):
    errs, positions = [], []
    for case in sim_cases:
        cap, t = read_capture(case), read_truth(case)
        seg = segment_patient(cap)
        kp = detect_keypoints(seg, cap.scene.table_height_mm, cap.scene.table_longitudinal_mm, load_keypoint_net())
        truth = np.array([t["joints_scanner_mm"][n] for n in KEYPOINTS])
        errs.append(np.linalg.norm(kp.points_s - truth, axis=1))
        positions.append((kp.position, t["patient_position"]))
    assert np.median(np.concatenate(errs)) < 60
    assert all(a == b for a, b in positions), positions


def test_fine_tuning_starts_from_the_given_weights(tmp_path, keypoint_net):
    """--init: a network fine-tuned with a vanishing learning rate keeps the weights it started from; a fresh one does
    not have them. Two simulated captures, one epoch. Weights only: batch norm's running statistics move with every
    training pass whatever the learning rate."""
    from sim.keypoint_training import TRAIN_SEED0, generate, train

    data = tmp_path / "two.npz"
    generate([TRAIN_SEED0, TRAIN_SEED0 + 1], data, workers=1)
    init = tmp_path / "init.pt"
    torch.save({"model": keypoint_net.state_dict(), "keypoints": list(KEYPOINTS)}, init)
    start = {k: v.detach().clone() for k, v in keypoint_net.named_parameters()}

    def largest_change(out):
        got = torch.load(out, map_location="cpu", weights_only=True)["model"]
        return max(float((got[k].float() - start[k].float()).abs().max()) for k in start)

    train(data, data, tmp_path / "tuned.pt", epochs=1, init=init, max_lr=1e-12)
    train(data, data, tmp_path / "fresh.pt", epochs=1, max_lr=1e-12)
    assert largest_change(tmp_path / "tuned.pt") < 1e-6
    assert largest_change(tmp_path / "fresh.pt") > 1e-2


def test_a_patient_captured_at_several_table_positions_has_one_truth_on_the_table(tmp_path, keypoint_net):
    """--positions: every window of every table position, read by the committed network, finds the keypoints where
    the one table-frame truth says, and so does each position read as detect_keypoints reads a capture. Had a
    position's windows been placed as if the table had not moved, they would be off by the move, 50-250 mm
    (table_shifts). Each window on its own: the views' combined read takes the surer view where they disagree."""
    from positioning.keypoints import decode_heatmaps
    from sim.keypoint_training import TRAIN_SEED0, generate, read_position, table_shifts, truth_on_table

    data = tmp_path / "moved.npz"
    shifts = table_shifts(TRAIN_SEED0, 3)
    assert shifts[0] == 0.0 and min(abs(s) for s in shifts[1:]) >= 50.0 and shifts[1] * shifts[2] < 0
    generate([TRAIN_SEED0], data, workers=1, positions=3)
    d = dict(np.load(data))
    assert d["views"].shape[:2] == (1, 3 * len(VIEWS))
    cells, _ = side_labels(d["cells"], d["heights"], d["position"])
    side_truth = Window(*map(float, d["origins"][0, 0])).to_table(cells[0])  # (K, 2) mm, side-named
    heat, height, _ = predict(keypoint_net, torch.as_tensor(d["views"][0].astype(np.float32)),
                              [flips for _, flips in VIEWS] * 3)
    for w, (x0, y0) in enumerate(d["origins"][0]):
        got = Window(float(x0), float(y0)).to_table(decode_heatmaps(heat[w], height[w])[0])
        assert np.median(np.linalg.norm(got - side_truth, axis=1)) < 30.0, w
    for k in range(3):
        xy_t, _, pos = read_position(keypoint_net, d, 0, k)
        assert pos == d["position"][0]
        assert np.median(np.linalg.norm(xy_t - truth_on_table(d, 0), axis=1)) < 30.0


@pytest.mark.parametrize("skip", ["-1", "9999000"])
def test_training_seeds_cannot_reach_the_held_out_ones(skip, tmp_path, capsys):
    """--skip moves the training patients; it is refused before anything is drawn where they would overlap the
    held-out seeds (or start before the first training seed)."""
    from sim.keypoint_training import main

    with pytest.raises(SystemExit) as e:
        main(["--train", "2000", "--skip", skip, "--data", str(tmp_path)])
    assert e.value.code == 2 and "held-out" in capsys.readouterr().err and not any(tmp_path.iterdir())
