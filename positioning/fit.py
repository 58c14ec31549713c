"""Fit the SMPL-layout body model to a segmented patient: pure torch over arrays.

Hypotheses: patient positions × arm poses, each started from the canonical pose
(positioning/poses.py), placed by the keypoints (or the points' principal axis and
extent); a prone hypothesis twice, its face turned to either side (prone patients
turn their heads aside). The caller chooses them: from the keypoints, usually one position and one
arm pose, both supine and prone when the network is unsure (perceive.py); without
keypoints all four positions × both arm poses. All hypotheses are optimised
together (batched); the lowest final cost wins, and its margin over the best
hypothesis of another patient position is the position's confidence.

Cost (per hypothesis, metres):
* data, ICP-style: each observed point to its nearest model vertex, and each
  upward-facing model vertex to its nearest observed point (robust, correspondences
  refreshed every few steps with a KD-tree, outside autograd);
* keypoints (when given): confidence-weighted distance of model joints to 3D keypoints;
* contact: no vertex below the support surface, the body's lowest point on it, and
  the upper trunk's lowest point on it too (a lying trunk rests at both ends);
* priors: betas (unit Gaussian), pose near the hypothesis's canonical pose, joint
  limits (knees and elbows bend one way; the neck and head nod or tilt at most
  HEAD_TILT_LIMIT_RAD each, and turn freely).

During the fit the kinematics are smplx's (``smplx.lbs``'s rodrigues; its rigid
transforms composed by tree level, checked against smplx's in the tests) and the
blend is evaluated on a fixed subset of vertices; the final mesh comes from the
full smplx layer.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from positioning.anatomy import posed_levels
from positioning.bodymodel import BodyModel
from positioning.frames import grid_means
from positioning.nearest import NearestIndex
from positioning.poses import POSITION_ROTATIONS, POSITIONS, canonical_pose
from positioning.skeleton import JOINT_INDEX as J
from positioning.skeleton import NUM_JOINTS, PARENTS

ARMS = ("down", "up")
N_POINTS = 1500
N_VERTS = 1500
# The fit's points are the means of cells this size on a grid fixed to the table: the body's surface weighs the same
# wherever the camera sees it densely or sparsely, and the same body on a moved table is sampled the same way (three
# table positions held out: 6.1 -> 4.5 mm spread at the median, chest; docs/planning.md).
FIT_CELL_MM = 30.0
CONVERGED_FRACTION = 0.02  # of the summed cost over 10 iterations: less and the fit has settled
ROBUST_M = 0.05  # data residuals beyond 5 cm count as outliers (Geman-McClure scale)
KEYPOINT_WEIGHT = 1.0
KEYPOINT_ROBUST_M = 0.08
# A lying body rests at both ends of its trunk (supine: shoulder blades and buttocks;
# prone: chest and pelvis); the camera never sees that side, so it is a prior.
UPPER_TRUNK = ("spine2", "spine3", "left_collar", "right_collar")
UPPER_CONTACT_WEIGHT = 10.0
# A lying head turns to the side (prone patients do, up to 60 degrees and more) but nods or tilts little: the table holds
# it. Without the limit the fit of a prone head turned aside nodded it instead, crown up: 6 of 25 prone head plans on
# tuning captures ended 80-139 mm short of the vertex (docs/planning.md, "Head, chest-abdomen-pelvis and whole-body plans").
HEAD_TILT_LIMIT_RAD = 0.4
# Prone, the face is turned aside, and a fit started face down still pressed against the limit above (the vertex 45-88 mm
# short in 3 of 6 such tuning scenes, 1-24 mm with both starts): each prone hypothesis starts face left and face right,
# and the better fit wins (same docs section). About the body's y axis; + turns the face to the body's left.
PRONE_HEAD_TURN_RAD = 0.8


@dataclass(frozen=True)
class FitResult:
    """The fitted body in S (mm) and what it rests on.

    vertices (V, 3) float32 mm, frame S; joints (24, 3) float32 mm, frame S;
    betas (K,), body_pose (24, 3) axis-angle incl. zero root, rotation (3, 3) body->S;
    landmarks: {name: (3,) mm in S}: the internal levels of positioning/anatomy.py (no
    per-patient offsets), the top of the head ("vertex") and the face points;
    patient_position: DICOM code; position_margin: cost gap to the best other position
    (relative); costs: final cost of every hypothesis; residual_mm: median distance of
    the observed points to the fitted surface; timing_ms: per stage; iterations: Adam
    steps taken (fewer than asked when the fit settled early).
    """

    vertices: np.ndarray
    joints: np.ndarray
    betas: np.ndarray
    body_pose: np.ndarray
    rotation: np.ndarray
    translation_mm: np.ndarray
    patient_position: str
    arms: str
    position_margin: float
    costs: dict[str, float]
    residual_mm: float
    joint_confidence: np.ndarray
    landmarks: dict[str, np.ndarray] = field(default_factory=dict)
    timing_ms: dict[str, float] = field(default_factory=dict)
    iterations: int = 0


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside, restoring the caller's setting after.

    The fit's tensors are small: splitting each op over two cores costs more than it
    gains (measured: perception about 6 % faster on one thread) and leaves the other
    core to the rest of the caller's process (a camera, a display). The keypoint
    network's convolutions are not small; they run on the caller's threads (its
    four flipped windows: about 30 ms of a plan on this machine's two).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Skin:
    """smplx's LBS on a vertex subset. Tensors float32, metres, model frame.

    The joints are linear in the betas, so the joint regressor is applied to the
    template and to each shape direction once, here, instead of to the whole mesh at
    every step; only the subset's vertices are shaped and skinned.
    """

    def __init__(self, model: BodyModel, sub: np.ndarray) -> None:
        d = model.data
        k = model.num_betas
        v_t = torch.as_tensor(d.v_template)
        sd = torch.as_tensor(d.shapedirs[:, :, :k])
        jr = torch.as_tensor(d.J_regressor)
        # Flattened so that shaping is one matrix product: (72,) + betas (B, K) @ (K, 72), and (3S,) likewise.
        self.j_t = (jr @ v_t).reshape(-1)
        self.j_sd = torch.einsum("jv,vcl->jcl", jr, sd).reshape(-1, k).T.contiguous()
        self.v_t = v_t[sub].reshape(-1)
        self.sd = sd[sub].reshape(-1, k).T.contiguous()
        self.w_sub = torch.as_tensor(d.weights[sub])
        self.upper = torch.as_tensor(np.isin(d.weights[sub].argmax(1), [J[n] for n in UPPER_TRUNK]))
        self.parents = torch.as_tensor(np.array(PARENTS))
        self.k = k
        # The chain composed one tree level at a time: 9 batched products instead of 23
        # (an iteration's cost is the count of small torch ops; docs/planning.md).
        depth = [0] * NUM_JOINTS
        for i in range(1, NUM_JOINTS):
            depth[i] = depth[PARENTS[i]] + 1
        levels = [[i for i in range(NUM_JOINTS) if depth[i] == d] for d in range(max(depth) + 1)]
        self.by_depth = torch.as_tensor([i for lv in levels for i in lv])
        self.joint_order = torch.as_tensor(np.argsort(self.by_depth.numpy()))
        self.level_ends = np.cumsum([len(lv) for lv in levels]).tolist()
        self.parent_in_level = [torch.as_tensor([levels[d - 1].index(PARENTS[i]) for i in levels[d]])
                                for d in range(1, len(levels))]

    def rest_joints(self, betas: torch.Tensor) -> torch.Tensor:
        """betas (B, K) -> the shaped body's joints at rest (B, 24, 3), metres, model frame."""
        return torch.addmm(self.j_t, betas, self.j_sd).view(-1, NUM_JOINTS, 3)

    def transforms(self, betas: torch.Tensor, pose: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Rest joints (24, 3) and smplx's posed joint transforms (24, 4, 4) of one body (metres)."""
        from smplx.lbs import batch_rigid_transform, batch_rodrigues

        j = self.rest_joints(betas)
        rot = batch_rodrigues(pose.reshape(-1, 3)).reshape(1, NUM_JOINTS, 3, 3)
        _, a = batch_rigid_transform(rot, j, self.parents)
        return j[0].numpy().astype(np.float64), a[0].numpy().astype(np.float64)

    def rigid_transforms(self, rot: torch.Tensor, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """smplx's ``batch_rigid_transform``, by tree level: rot (B, 24, 3, 3), rest joints j (B, 24, 3) ->
        (posed joints (B, 24, 3), each joint's rest-to-posed transform (B, 24, 3, 4)); metres, model frame."""
        b = j.shape[0]
        rel = torch.cat([j[:, :1], j[:, 1:] - j[:, self.parents[1:]]], 1)
        local = torch.cat([torch.cat([rot, rel[..., None]], -1),
                           torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(b, NUM_JOINTS, 1, 4)], -2)[:, self.by_depth]
        world = [local[:, :1]]
        for lo, hi, parent in zip(self.level_ends, self.level_ends[1:], self.parent_in_level):
            world.append(world[-1][:, parent] @ local[:, lo:hi])
        w = torch.cat(world, 1)[:, self.joint_order]
        r, posed = w[..., :3, :3], w[..., :3, 3]
        return posed, torch.cat([r, (posed - (r @ j[..., None])[..., 0])[..., None]], -1)

    def __call__(self, betas: torch.Tensor, pose: torch.Tensor,
                 orient: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """betas (B, K), pose (B, 24, 3) -> (vertices (B, S, 3), joints (B, 24, 3)), root at the origin.

        orient: (B, 3, 3) the root's rotation in place of pose[:, 0]'s (the body's orientation in S,
        applied inside the chain rather than to its results: fewer ops).
        """
        from smplx.lbs import batch_rodrigues

        b = betas.shape[0]
        j = self.rest_joints(betas)
        v = torch.addmm(self.v_t, betas, self.sd).view(b, -1, 3)
        rot = batch_rodrigues(pose.reshape(-1, 3)).reshape(b, NUM_JOINTS, 3, 3)
        if orient is not None:
            rot = torch.cat([orient[:, None], rot[:, 1:]], 1)
        posed_j, a = self.rigid_transforms(rot, j)
        t = (self.w_sub @ a.reshape(b, NUM_JOINTS, 12)).view(b, -1, 3, 4)  # each vertex's blended transform
        v = (t[..., :3] @ v[..., None])[..., 0] + t[..., 3]
        return v - posed_j[:, :1], posed_j - posed_j[:, :1]


class Adam:
    """torch.optim.Adam's update (no weight decay, no AMSGrad), over groups of (tensors, learning rate).

    Why not torch.optim: constructing any of its optimisers imports torch._dynamo (and sympy),
    about 1 s on this machine, a third of a fresh `ctpos plan` process (docs/planning.md).
    The arithmetic is torch's single-tensor Adam, op for op; tests/test_perception.py checks that
    both take the same steps.
    """

    def __init__(self, groups: list[tuple[list[torch.Tensor], float]], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params = [(p, lr) for ps, lr in groups for p in ps]
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.steps = 0
        self.exp_avg = [torch.zeros_like(p) for p, _ in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p, _ in self.params]

    def zero_grad(self) -> None:
        for p, _ in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        bias1 = 1 - self.beta1 ** self.steps
        bias2_sqrt = (1 - self.beta2 ** self.steps) ** 0.5
        for (p, lr), m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            m.lerp_(p.grad, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(p.grad, p.grad, value=1 - self.beta2)
            p.addcdiv_(m, (v.sqrt() / bias2_sqrt).add_(self.eps), value=-lr / bias1)


def _rot_z(a: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(a), torch.sin(a)
    z, o = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([torch.stack([c, -s, z], -1), torch.stack([s, c, z], -1), torch.stack([z, z, o], -1)], -2)


def _geman_mcclure(d2: torch.Tensor, scale: float) -> torch.Tensor:
    """Geman-McClure's robust cost of distances given squared (d2), saturating at 1 beyond about scale."""
    return d2 / (d2 + scale * scale)


def _small_rot(v: torch.Tensor) -> torch.Tensor:
    from smplx.lbs import batch_rodrigues

    return batch_rodrigues(v)


# The body's midline as keypoints give it: single joints and the middles of left-right pairs (a mirrored
# hypothesis, supine for prone, has the same midline). PLACE_MIN_CONF: a keypoint surer than this counts.
MIDLINE = (("pelvis",), ("left_hip", "right_hip"), ("neck",), ("left_shoulder", "right_shoulder"), ("head",))
PLACE_MIN_CONF = 0.3


def _midline(joints: np.ndarray, conf: np.ndarray) -> np.ndarray:
    """(M, 2) x, y of the MIDLINE points whose joints are all surer than PLACE_MIN_CONF (joints (24, 3))."""
    keep = [names for names in MIDLINE if all(conf[J[n]] > PLACE_MIN_CONF for n in names)]
    return np.array([np.mean([joints[J[n], :2] for n in names], 0) for names in keep]).reshape(-1, 2)


def _keypoint_placement(model_joints: np.ndarray, kp: np.ndarray, conf: np.ndarray) -> tuple[float, np.ndarray] | None:
    """Yaw (rad, folded into (-pi/2, pi/2] like the principal axis) and x, y of the root joint that lay the model's
    midline on the keypoints' one; None with fewer than three midline keypoints.

    model_joints (24, 3), root at the origin, and kp (24, 3): one unit, frame S. A rotation, scale and shift by
    OpenCV's least-median-of-squares estimate: any one midline keypoint may be anywhere (a pelvis 420 mm up the trunk
    put the whole fit there when it alone placed the body; docs/perception.md), and the scale takes the body's size.
    """
    import cv2

    dst, src = _midline(kp, conf), _midline(model_joints, conf)
    if len(dst) < 3:
        return None
    a, _ = cv2.estimateAffinePartial2D(src.astype(np.float32), dst.astype(np.float32), method=cv2.LMEDS)
    if a is None:
        return None
    yaw = float(np.arctan2(a[1, 0], a[0, 0]))
    yaw = yaw - np.pi if yaw > np.pi / 2 else (yaw + np.pi if yaw <= -np.pi / 2 else yaw)
    return yaw, a[:, 2].astype(np.float64)


def _principal_yaw(points: np.ndarray) -> float:
    """Angle (rad) of the points' long axis against +y_S, in (-pi/2, pi/2]."""
    xy = points[:, :2] - points[:, :2].mean(0)
    w, v = np.linalg.eigh(np.cov(xy.T))
    ax = v[:, np.argmax(w)]
    if ax[1] < 0:
        ax = -ax
    return float(np.arctan2(-ax[0], ax[1]))


def fit_body(model: BodyModel, points_s_mm: np.ndarray, support_z_s_mm: float,
             keypoints_s_mm: np.ndarray | None = None, keypoint_conf: np.ndarray | None = None,
             iterations: int = 120, seed: int = 0, positions: tuple[str, ...] = POSITIONS,
             arms: tuple[str, ...] = ARMS, warm: FitResult | None = None,
             converge_after: int | None = None, table_origin_s_mm: np.ndarray | None = None) -> FitResult:
    """Fit every hypothesis to the patient's points (N, 3) mm in S; return the best.

    keypoints_s_mm: (24, 3) optional 3D keypoints in S (SMPL joint order) with
    keypoint_conf (24,) in 0..1 (0 where a joint has no keypoint).
    warm: the previous frame's result: one hypothesis, started from it (live use).
    converge_after: stop once this many iterations are done and the summed cost fell by less than
    CONVERGED_FRACTION over the last 10 (checked every 5; at most `iterations`); None runs them all.
    table_origin_s_mm: (3,) where T's origin lies in S at the capture (CONVENTIONS.md); the points are fitted
    as the means of FIT_CELL_MM cells of a grid laid from it (from S's origin when None), at most N_POINTS.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    nv = model.data.v_template.shape[0]
    sub = np.sort(rng.choice(nv, min(N_VERTS, nv), replace=False))  # drawn first: the same for every capture
    cells = grid_means(points_s_mm, FIT_CELL_MM, table_origin_s_mm)
    pts = cells[rng.choice(len(cells), min(N_POINTS, len(cells)), replace=False)] / 1000.0
    support = support_z_s_mm / 1000.0
    skin = _Skin(model, sub)
    if warm is not None:
        hyps = [(warm.patient_position, warm.arms, 0.0)]
        base = torch.as_tensor(warm.rotation[None], dtype=torch.float32)
        pose0 = torch.as_tensor(warm.body_pose[None], dtype=torch.float32)
        yaw0 = 0.0
    else:
        hyps = [(p, a, turn) for p in positions for a in arms
                for turn in ((PRONE_HEAD_TURN_RAD, -PRONE_HEAD_TURN_RAD) if p.endswith("P") else (0.0,))]
        base = torch.as_tensor(np.stack([POSITION_ROTATIONS[p] for p, _, _ in hyps]), dtype=torch.float32)
        pose0 = torch.as_tensor(np.stack([canonical_pose(a, turn, p.endswith("P")) for p, a, turn in hyps]),
                                dtype=torch.float32)
        yaw0 = _principal_yaw(pts)
    h = len(hyps)
    yaws, roots = np.full(h, yaw0), [None] * h
    if warm is None and keypoints_s_mm is not None:
        with torch.no_grad():
            _, j0 = skin(torch.zeros(h, skin.k), pose0, base)
        for i in range(h):
            placed = _keypoint_placement(j0[i].numpy(), keypoints_s_mm / 1000.0, keypoint_conf)
            if placed is not None:
                yaws[i], roots[i] = placed
    centre = pts.mean(0)
    # Parameters: yaw, small tilt, translation, betas, pose offset.
    yaw = torch.tensor(yaws, dtype=torch.float32, requires_grad=True)
    tilt = torch.zeros(h, 3, requires_grad=True)
    trans = torch.tensor(np.tile([centre[0], centre[1], support + 0.12], (h, 1)), dtype=torch.float32,
                         requires_grad=True)
    betas = torch.zeros(h, skin.k) if warm is None else torch.as_tensor(warm.betas[None], dtype=torch.float32)
    betas.requires_grad_(True)
    dpose = torch.zeros(h, NUM_JOINTS, 3, requires_grad=True)
    pts_t = torch.as_tensor(pts, dtype=torch.float32)
    tree = NearestIndex(pts)
    kp = None if keypoints_s_mm is None else torch.as_tensor(keypoints_s_mm / 1000.0, dtype=torch.float32)
    kc = None if keypoint_conf is None else torch.as_tensor(keypoint_conf, dtype=torch.float32)
    # The neck's and head's rotation about the body's x and z axes (nod, tilt) in the flattened pose; y is the turn.
    nod_tilt_idx = torch.as_tensor([3 * J[n] + axis for n in ("neck", "head") for axis in (0, 2)])
    free = torch.ones(NUM_JOINTS, 3)
    free[0] = 0.0  # the root's rotation is yaw/tilt/base
    opt = Adam([([yaw, tilt], 0.02), ([trans], 0.01), ([betas], 0.05), ([dpose], 0.03)])
    with torch.no_grad():
        if warm is not None:
            trans[:] = torch.as_tensor(warm.translation_mm / 1000.0, dtype=torch.float32)
        else:
            # Each hypothesis starts with its body's extent over the points' extent (yawed frame),
            # or with its midline on the keypoints' when they give one.
            v, _ = skin(betas, pose0)
            vs = torch.einsum("bij,bvj->bvi", _rot_z(yaw) @ base, v)
            c_pts = torch.as_tensor((pts.min(0) + pts.max(0)) / 2, dtype=torch.float32)
            c_mod = (vs.min(1).values + vs.max(1).values) / 2
            trans[:, :2] = c_pts[:2] - c_mod[:, :2]
            for i, root in enumerate(roots):
                if root is not None:
                    trans[i, :2] = torch.as_tensor(root, dtype=torch.float32)
            trans[:, 2] = support - vs[..., 2].min(1).values
    t_setup = time.perf_counter()
    obs_rows = pts_vis = vis_w = None
    hyp_rows = torch.arange(h)[:, None] * len(sub)  # hypothesis i's vertices start at row i * S of the (B * S, 3) stack
    history: list[float] = []
    for it in range(iterations):
        opt.zero_grad()
        pose = pose0 + dpose * free
        v, j = skin(betas, pose, _rot_z(yaw) @ _small_rot(tilt) @ base)
        vs = v + trans[:, None]
        js = j + trans[:, None]
        if it % 5 == 0:
            with torch.no_grad():
                vn = vs.numpy()
                corr_obs = torch.as_tensor(np.stack([NearestIndex(vn[i]).query(pts)[1] for i in range(h)]))
                obs_rows = (corr_obs + hyp_rows).reshape(-1)
                # Model points the camera could see: the upper part of the body at each place, each weighing
                # 1 / (their count) so that the term is their mean.
                vis = torch.as_tensor(vn[..., 2] > support + 0.04, dtype=torch.float32)
                vis_w = vis / vis.sum(1, keepdim=True).clamp(min=1)
                pts_vis = pts_t[torch.as_tensor(np.stack([tree.query(vn[i])[1] for i in range(h)]))]
        # Squared distances: Geman-McClure needs no square root.
        d2_obs = (vs.reshape(-1, 3).index_select(0, obs_rows).view(h, -1, 3) - pts_t).square().sum(-1)
        d2_vis = (vs - pts_vis).square().sum(-1)
        e_obs = _geman_mcclure(d2_obs, ROBUST_M).mean(1)
        e_vis = (_geman_mcclure(d2_vis, ROBUST_M) * vis_w).sum(1)
        z = vs[..., 2]
        below = torch.relu(support - z)
        e_contact = (below ** 2).mean(1) * 100.0 + (z.min(1).values - support).pow(2) * 10.0 \
            + (z[:, skin.upper].min(1).values - support).pow(2) * UPPER_CONTACT_WEIGHT
        e_beta = (betas ** 2).mean(1) * 1e-3
        e_pose = ((dpose * free) ** 2).sum((1, 2)) * 2e-3
        knee = pose[:, [J["left_knee"], J["right_knee"]], 0]
        elbow_l, elbow_r = pose[:, J["left_elbow"], 1], pose[:, J["right_elbow"], 1]
        nod_tilt = pose.reshape(h, -1)[:, nod_tilt_idx]
        e_limit = (torch.relu(-knee) ** 2).sum(1) + torch.relu(elbow_l) ** 2 + torch.relu(-elbow_r) ** 2 \
            + (torch.relu(nod_tilt.abs() - HEAD_TILT_LIMIT_RAD) ** 2).sum(1)
        cost = e_obs + 0.5 * e_vis + e_contact + e_beta + e_pose + e_limit
        if kp is not None:
            # Robust: a keypoint on the wrong limb (a left/right swap) saturates instead of dragging the body.
            e_kp = _geman_mcclure((js - kp).square().sum(-1), KEYPOINT_ROBUST_M)
            cost = cost + KEYPOINT_WEIGHT * (kc * e_kp).sum(1) / kc.sum().clamp(min=1e-6)
        total = cost.sum()
        total.backward()
        opt.step()
        history.append(float(total.detach()))
        if converge_after is not None and it + 1 >= converge_after and (it + 1) % 5 == 0 \
                and history[-11] - history[-1] < CONVERGED_FRACTION * abs(history[-11]):
            break
    t_opt = time.perf_counter()
    with torch.no_grad():
        final = cost.detach().numpy()
    costs = {f"{p}/{a}" + ("" if not turn else "/face-left" if turn > 0 else "/face-right"): float(c)
             for (p, a, turn), c in zip(hyps, final)}
    best = int(np.argmin(final))
    pos_best = hyps[best][0]
    others = [c for (p, _, _), c in zip(hyps, final) if p != pos_best]
    margin = float((min(others) - final[best]) / max(final[best], 1e-9)) if others else 1.0

    with torch.no_grad():
        lay = model.layer
        pose_best = (pose0 + dpose * free)[best:best + 1]
        out = lay(betas=betas[best:best + 1].detach(), body_pose=pose_best[:, 1:].reshape(1, -1),
                  global_orient=torch.zeros(1, 3), transl=torch.zeros(1, 3))
        root = out.joints[0, 0]
        r = (_rot_z(yaw) @ _small_rot(tilt) @ base)[best]
        verts = ((out.vertices[0] - root) @ r.T + trans[best]).numpy() * 1000.0
        joints = ((out.joints[0, :NUM_JOINTS] - root) @ r.T + trans[best]).numpy() * 1000.0
        rest_j, rel = skin.transforms(betas[best:best + 1].detach(), pose_best)
        body_pts = {**posed_levels(rest_j, rel),
                    "vertex": out.vertices[0, model.landmark_vertex_ids["vertex"]].numpy().astype(np.float64),
                    **{n: out.joints[0, NUM_JOINTS + i].numpy().astype(np.float64)
                       for i, n in enumerate(("nose", "reye", "leye", "rear", "lear"))}}
        landmarks = {n: ((torch.as_tensor(p, dtype=torch.float32) - root) @ r.T + trans[best]).numpy() * 1000.0
                     for n, p in body_pts.items()}
    resid = float(np.median(NearestIndex(verts).query(points_s_mm[rng.choice(len(points_s_mm), min(5000,
                                                                         len(points_s_mm)), replace=False)])[0]))
    t_end = time.perf_counter()
    return FitResult(
        vertices=verts.astype(np.float32), joints=joints.astype(np.float32), betas=betas[best].detach().numpy(),
        body_pose=(pose0 + dpose * free)[best].detach().numpy(), rotation=r.numpy(),
        translation_mm=trans[best].detach().numpy() * 1000.0, patient_position=pos_best, arms=hyps[best][1],
        position_margin=margin, costs=costs, residual_mm=resid,
        joint_confidence=np.full(NUM_JOINTS, float(np.clip(margin, 0, 1))), landmarks=landmarks,
        timing_ms={"fit_setup": (t_setup - t0) * 1000, "fit_optimise": (t_opt - t_setup) * 1000,
                   "fit_mesh": (t_end - t_opt) * 1000}, iterations=len(history))
