"""The embedded SMPL-layout body model and its loader."""
from __future__ import annotations

import numpy as np
import pytest
import smplx
import torch

from positioning.bodymodel import ENV_VAR, BodyModelError, load_body_model, read_body_model
from positioning.skeleton import JOINT_INDEX, NUM_JOINTS, PARENTS


def test_embedded_model_is_an_smpl_layer_in_smpl_layout(body_model):
    layer = body_model.layer
    assert isinstance(layer, smplx.SMPL)
    assert body_model.num_betas == 16
    assert list(layer.parents.numpy()[1:]) == list(PARENTS[1:])
    out = layer(betas=torch.zeros(2, 16), body_pose=torch.zeros(2, 69), global_orient=torch.zeros(2, 3),
                transl=torch.zeros(2, 3))
    assert out.vertices.shape == (2, body_model.data.v_template.shape[0], 3)
    assert out.joints.shape == (2, NUM_JOINTS + 5, 3)  # 24 joints + nose, eyes, ears
    np.testing.assert_allclose(body_model.data.weights.sum(1), 1.0, atol=1e-4)
    np.testing.assert_allclose(body_model.data.J_regressor.sum(1), 1.0, atol=1e-3)


def test_rest_pose_is_anatomically_laid_out(body_model):
    """Head up, feet down, left on +x, arms straight out sideways (a T-pose), face to +z."""
    j = body_model.layer(betas=torch.zeros(1, 16)).joints[0].detach().numpy()
    assert j[JOINT_INDEX["head"], 1] > j[JOINT_INDEX["neck"], 1] > j[JOINT_INDEX["pelvis"], 1] > j[JOINT_INDEX["left_knee"], 1]
    assert j[JOINT_INDEX["left_shoulder"], 0] > 0 > j[JOINT_INDEX["right_shoulder"], 0]
    arm = j[JOINT_INDEX["left_wrist"]] - j[JOINT_INDEX["left_shoulder"]]
    assert abs(arm[1]) < 0.02 * np.linalg.norm(arm)
    assert j[NUM_JOINTS, 2] > j[JOINT_INDEX["head"], 2]  # the nose is in front of the head joint
    assert 1.5 < np.ptp(body_model.data.v_template[:, 1]) < 1.95


def test_shape_space_spans_short_to_tall(body_model):
    tb = body_model.data.train["betas"]
    n = 200
    v = body_model.layer(betas=torch.as_tensor(tb[:n]), body_pose=torch.zeros(n, 69), global_orient=torch.zeros(n, 3),
                         transl=torch.zeros(n, 3)).vertices.detach().numpy()
    stature = v[..., 1].max(1) - v[..., 1].min(1)
    assert stature.min() < 1.55 and stature.max() > 1.9


def test_licensed_file_path_gives_the_same_interface(tmp_path, body_model, monkeypatch):
    """A user-supplied SMPL-layout .npz (here: the embedded arrays saved under SMPL's field names)."""
    d = body_model.data
    path = tmp_path / "SMPL_NEUTRAL.npz"
    np.savez(path, v_template=d.v_template, shapedirs=d.shapedirs[:, :, :10], J_regressor=d.J_regressor,
             weights=d.weights, kintree_table=np.array([PARENTS, range(24)]), f=d.faces,
             posedirs=np.zeros((len(d.v_template), 3, 207), np.float32),
             landmark_names=np.array(list(d.landmark_vertex_ids)), landmark_vertex_ids=np.array(list(d.landmark_vertex_ids.values())))
    monkeypatch.setenv(ENV_VAR, str(path))
    m = load_body_model()
    assert m.data.source == str(path) and m.num_betas == 10
    # Posed: the file's (V, 3, 207) block of zeros and the embedded model's one broadcast zero row agree.
    pose = torch.as_tensor(np.random.default_rng(0).normal(0, 0.3, (1, 69)), dtype=torch.float32)
    out = m.layer(betas=torch.zeros(1, 10), body_pose=pose)
    ref = body_model.layer(betas=torch.zeros(1, 16), body_pose=pose)
    np.testing.assert_allclose(out.vertices.detach().numpy(), ref.vertices.detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("problem, expect", [
    ("missing", "not found"),
    ("garbage", "not a readable .npz"),
    ("no_weights", "'weights' is missing"),
    ("bad_regressor", "J_regressor has shape"),
    ("bad_tree", "kintree_table"),
    ("nan", "non-finite"),
])
def test_bad_model_files_fail_with_one_line_reason(tmp_path, body_model, problem, expect):
    d = body_model.data
    arrays = dict(v_template=d.v_template, shapedirs=d.shapedirs, J_regressor=d.J_regressor, weights=d.weights,
                  kintree_table=np.array([PARENTS, range(24)]), f=d.faces,
                  landmark_names=np.array(list(d.landmark_vertex_ids)),
                  landmark_vertex_ids=np.array(list(d.landmark_vertex_ids.values())))
    path = tmp_path / f"{problem}.npz"
    if problem == "garbage":
        path.write_bytes(b"this is not a zip file")
    elif problem != "missing":
        if problem == "no_weights":
            del arrays["weights"]
        elif problem == "bad_regressor":
            arrays["J_regressor"] = d.J_regressor[:20]
        elif problem == "bad_tree":
            arrays["kintree_table"] = np.zeros((2, 24), int)
        elif problem == "nan":
            arrays["v_template"] = d.v_template.copy()
            arrays["v_template"][3, 1] = np.nan
        np.savez(path, **arrays)
    with pytest.raises(BodyModelError) as ei:
        read_body_model(path)
    msg = str(ei.value)
    assert expect in msg and str(path) in msg and "\n" not in msg
