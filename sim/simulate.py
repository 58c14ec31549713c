"""One simulated capture: a patient on the table under a ceiling RGB-D camera, with its ground truth."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np

from positioning.bodymodel import BodyModel
from positioning.capture import CameraIntrinsics, Capture, SceneState
from positioning.plan import surface_samples
from positioning.skeleton import ARM_JOINTS, JOINT_INDEX, JOINT_NAMES, LANDMARK_JOINTS
from sim import render
from sim.body import anny_body_template, make_pose, place_body, pose_body
from sim.room import Mesh, box, room_meshes
from sim.scene import HEIGHT, WIDTH, SceneParams

PROTOCOLS = ("chest", "abdomen", "chest_abdomen_pelvis", "head", "whole_body")
GOWN_JOINTS = {JOINT_INDEX[n] for n in ("pelvis", "spine1", "spine2", "spine3", "left_collar", "right_collar",
                                          "left_hip", "right_hip", "left_shoulder", "right_shoulder")}
SLAB_HALF_MM = 15.0
TRUNK_JOINTS = ("pelvis", "spine1", "spine2", "spine3", "left_collar", "right_collar")
# How far the neck bends, back or forwards, to rest the head on the mattress: a neck bends 50-60 degrees, and a trunk
# settled 10 degrees head-up held a stiff head 100-125 mm over the mattress.
HEAD_NOD_DEG = 45.0
LABEL_COLOURS = {"floor": (0.45, 0.45, 0.43), "pedestal": (0.8, 0.8, 0.78), "tabletop": (0.2, 0.2, 0.22),
                 "mattress": (0.25, 0.35, 0.55), "gantry": (0.9, 0.9, 0.88), "cushion": (0.3, 0.5, 0.6),
                 "pillow": (0.85, 0.85, 0.8),
                 "blanket": (0.85, 0.88, 0.92)}


@dataclass(frozen=True)
class SimCamera:
    """Intrinsics matrix (3, 3) and pose camera_to_scanner (4, 4, mm) of the simulated RealSense."""

    intrinsics: CameraIntrinsics
    k: np.ndarray
    camera_to_scanner: np.ndarray


def camera_pose(height_mm: float, tilt_deg: float, roll_deg: float, lateral_mm: float, target_y_t: float,
                table_height_mm: float, table_longitudinal_mm: float, pan_deg: float = 0.0) -> np.ndarray:
    """(4, 4) camera_to_scanner of a ceiling camera looking down at the table.

    Image x runs along the table (+y_S); the optical axis meets the tabletop at y_T = target_y_t,
    x = lateral_mm, tilted towards the gantry by tilt_deg and across the table by pan_deg (the
    camera hung beside the table on its +x_S side, looking back across it), then rolled.
    """
    t, a = math.radians(tilt_deg), math.radians(pan_deg)
    target = np.array([lateral_mm, table_longitudinal_mm + target_y_t, -table_height_mm])
    z_c = np.array([-math.sin(a) * math.cos(t), math.sin(t), -math.cos(a) * math.cos(t)])
    pos = target + height_mm * np.array([math.tan(a), -math.tan(t) / math.cos(a), 1.0])  # target - z_c * h/z_c[2]
    x_c = np.array([0.0, 1.0, 0.0]) - z_c[1] * z_c
    x_c /= np.linalg.norm(x_c)
    y_c = np.cross(z_c, x_c)
    r = math.radians(roll_deg)
    x_c, y_c = math.cos(r) * x_c + math.sin(r) * y_c, -math.sin(r) * x_c + math.cos(r) * y_c
    m = np.eye(4)
    m[:3, :3] = np.column_stack([x_c, y_c, z_c])
    m[:3, 3] = pos
    return m


def d455_intrinsics(fx: float, principal_offset_px: float, width: int = WIDTH,
                    height: int = HEIGHT) -> tuple[CameraIntrinsics, np.ndarray]:
    """D455-like depth intrinsics and their 3x3 matrix; fx (px) and the offset are for 848 px wide and scale
    with the width (the same field of view at another resolution)."""
    fx, principal_offset_px = fx * width / WIDTH, principal_offset_px * width / WIDTH
    fy = fx * 1.002
    cx, cy = width / 2 - 0.5 + principal_offset_px, height / 2 - 0.5 - 0.7 * principal_offset_px
    intr = CameraIntrinsics(width, height, float(fx), float(fy), float(cx), float(cy), 0.001)
    return intr, np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])


def make_camera(p: SceneParams) -> SimCamera:
    """The scene's simulated RealSense: intrinsics and mount."""
    intr, k = d455_intrinsics(p.fx, p.principal_offset_px, *p.image_size)
    m = camera_pose(p.camera_height_mm, p.camera_tilt_deg, p.camera_roll_deg, p.camera_lateral_mm,
                    p.camera_target_y_mm, p.table_height_mm, p.table_longitudinal_mm, p.camera_pan_deg)
    return SimCamera(intr, k, m)


def heightmap(meshes: list[Mesh], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """(len(ys), len(xs)) top surface z (mm, S) seen straight down; -inf where nothing is hit."""
    import open3d as o3d

    scene = o3d.t.geometry.RaycastingScene()
    for m in meshes:
        scene.add_triangles(o3d.core.Tensor(m.vertices.astype(np.float32)), o3d.core.Tensor(m.faces.astype(np.uint32)))
    gx, gy = np.meshgrid(xs, ys)
    rays = np.stack([gx, gy, np.full_like(gx, 3000.0), 0 * gx, 0 * gx, -np.ones_like(gx)], -1).astype(np.float32)
    t = scene.cast_rays(o3d.core.Tensor(rays))["t_hit"].numpy()
    return np.where(np.isfinite(t), 3000.0 - t, -np.inf)


def blanket_mesh(support: list[Mesh], y_from: float, y_to: float, mattress_top: float,
                 half_width: float = 260.0, step: float = 8.0) -> Mesh:
    """A thin blanket draped over everything in ``support`` between y_from and y_to (mm, S)."""
    from scipy.ndimage import gaussian_filter, grey_dilation

    xs = np.arange(-half_width, half_width + step, step)
    ys = np.arange(min(y_from, y_to), max(y_from, y_to) + step, step)
    h = heightmap(support, xs, ys)
    h = np.maximum(h, mattress_top)
    # Cloth spans the gaps between limbs: dilate the relief, then let it sag smoothly.
    draped = gaussian_filter(grey_dilation(h, size=(5, 9)), sigma=3.0)
    draped = np.maximum(draped, h) + 4.0
    draped[:, [0, -1]] = mattress_top - 40.0  # it hangs over the mattress edges
    gx, gy = np.meshgrid(xs, ys)
    v = np.stack([gx, gy, draped], -1).reshape(-1, 3)
    nx = len(xs)
    i, j = np.meshgrid(np.arange(len(ys) - 1), np.arange(nx - 1), indexing="ij")
    a = (i * nx + j).ravel()
    f = np.concatenate([np.stack([a, a + 1, a + nx + 1], 1), np.stack([a, a + nx + 1, a + nx], 1)])
    return Mesh(v, f.astype(np.int32), "blanket")


def _mesh_volume(v: np.ndarray, f: np.ndarray) -> float:
    return float(abs(np.einsum("ij,ij->i", np.cross(v[f[:, 0]], v[f[:, 1]]), v[f[:, 2]]).sum()) / 6.0)


def region_limits(lm: dict[str, np.ndarray], head_dir: float, soles_y: float) -> dict[str, tuple[float, float]]:
    """(cranial y_S, caudal y_S) of each protocol's target region from the posed landmarks."""
    ear_y = 0.5 * (lm["rear"][1] + lm["lear"][1])
    return {
        "chest": (lm["lung_apex"][1], lm["lung_base"][1]),
        "abdomen": (lm["diaphragm_dome"][1], lm["iliac_crest"][1]),
        "chest_abdomen_pelvis": (lm["lung_apex"][1], lm["symphysis"][1]),
        # Skull base: 15 mm caudal of the ear canals.
        "head": (lm["vertex"][1], ear_y - 15.0 * head_dir),
        "whole_body": (lm["vertex"][1], soles_y),
    }


def slab_centre(verts: np.ndarray, faces: np.ndarray, keep: np.ndarray, y: float) -> dict[str, float] | None:
    """Centre and size of the body's cross-section in the slab |y_S - y| <= SLAB_HALF_MM (arms excluded): AP,
    lateral, mm. verts (V, 3) mm, frame S; faces (F, 3). The surface between the vertices counts: a trunk's vertex
    rows can lie farther apart than the slab is wide (positioning.plan.surface_samples)."""
    s = surface_samples(verts, faces[keep[faces].all(1)], np.array([y - SLAB_HALF_MM, y + SLAB_HALF_MM]))[0]
    if len(s) < 10:
        return None
    return {"x": float((s[:, 0].max() + s[:, 0].min()) / 2), "z": float((s[:, 2].max() + s[:, 2].min()) / 2),
            "ap_mm": float(s[:, 2].max() - s[:, 2].min()), "lat_mm": float(s[:, 0].max() - s[:, 0].min())}


def _trunk(model: BodyModel) -> np.ndarray:
    """(V,) bool: the trunk's vertices (pelvis, spine, collars), on which a lying body settles."""
    return np.isin(model.data.weights.argmax(1), [JOINT_INDEX[n] for n in TRUNK_JOINTS])


def _limbs(model: BodyModel) -> list[tuple[np.ndarray, tuple[int, ...], tuple[int, int], np.ndarray | None]]:
    """The four limbs for sim.body.place_body: (skinning weight (V,), joint chain from the root, swing axis
    joints, the far part's weight or None). A leg's far part (knee down) drops onto the mattress; arms do not
    drop (a hand may rest on the belly)."""
    w = model.data.weights
    hips = (JOINT_INDEX["right_hip"], JOINT_INDEX["left_hip"])
    shoulders = (JOINT_INDEX["right_shoulder"], JOINT_INDEX["left_shoulder"])
    out = []
    for side in ("left", "right"):
        leg = tuple(JOINT_INDEX[f"{side}_{j}"] for j in ("hip", "knee", "ankle", "foot"))
        arm = tuple(JOINT_INDEX[f"{side}_{j}"] for j in ("shoulder", "elbow", "wrist", "hand"))
        out.append((w[:, list(leg)].sum(1), leg, hips, w[:, list(leg[1:])].sum(1)))
        out.append((w[:, list(arm)].sum(1), arm, shoulders, None))
    return out


def _bend_neck(body_pose: np.ndarray, rad: float) -> None:
    """Nod the head forwards by rad (negative: back) in a (69,) body pose, shared 3:2 by the neck and head joints."""
    for joint, share in (("neck", 0.6), ("head", 0.4)):
        body_pose[3 * (JOINT_INDEX[joint] - 1)] += share * rad


def posed_patient(p: SceneParams, model: BodyModel, rng: np.random.Generator | None = None,
                  anatomy_spread: bool = True):
    """The scene's patient in S (mm): (own rest mesh or None, vertices, joints, face points, internal levels).

    Deterministic for the scene (the pose draws from p.pose_seed); evaluation uses it
    for the true surface, which the capture folder does not store. anatomy_spread=False:
    the lungs where the anatomy rule puts them on this skeleton (``pose_body``).
    """
    rng = rng if rng is not None else np.random.default_rng(p.pose_seed)
    body_pose = make_pose(p.pose, p.patient_position.endswith("P"), rng)
    if p.head_pillow_mm > 0 and p.patient_position.endswith("S"):
        # The neck and head bend forwards until the back of the head (some 180 mm from the neck joint) is
        # about the pillow's height up; the pillow then fills the gap (simulate()).
        _bend_neck(body_pose, math.asin(min(p.head_pillow_mm / 180.0, 0.8)))
    template = anny_body_template(p.anny_phenotype) if p.body_source == "anny" else None

    def place(pose: np.ndarray, draws: np.random.Generator, head=None) -> tuple:
        verts_b, joints_b, face_b, levels_b = pose_body(model, np.array(p.betas), pose, template, draws,
                                                        anatomy_spread)
        return place_body(verts_b, joints_b, face_b, levels_b, p.patient_position, p.yaw_deg, p.lateral_offset_mm,
                          p.head_gap_mm, p.mattress_mm, p.table_height_mm, p.table_longitudinal_mm, _trunk(model),
                          p.sink_mm, _limbs(model), p.mattress_curve_mm, p.roll_deg, head)

    if not (p.head_pillow_mm > 0 and p.patient_position.endswith("S")):
        # The head rests on the mattress, the neck bent back or forwards (at most HEAD_NOD_DEG in all): placed to
        # find the nod that would rest it, posed with it (``_bend_neck``, as the pillow's bend above),
        # until it rests (a posed nod does about 3/4 of the swing's work: 2-3 rounds). The trial poses draw their
        # internal levels from a copy of the generator, so no later draw changes.
        head = (model.data.weights[:, JOINT_INDEX["head"]], JOINT_INDEX["neck"],
                (JOINT_INDEX["right_shoulder"], JOINT_INDEX["left_shoulder"]), HEAD_NOD_DEG)
        total, limit = 0.0, math.radians(HEAD_NOD_DEG)
        for _ in range(3):
            *_, nod = place(body_pose, copy.deepcopy(rng), head)
            nod = float(np.clip(total + nod, -limit, limit)) - total
            if abs(nod) < math.radians(0.5):
                break
            total += nod
            _bend_neck(body_pose, nod)
    verts, joints, face, levels, _ = place(body_pose, rng)
    return template, verts, joints, face, levels


def simulate(p: SceneParams, model: BodyModel, extra_meshes: list[Mesh] | None = None,
             with_patient: bool = True) -> tuple[Capture, dict]:
    """Render one capture of scene p and compute its ground truth (frame S, mm).

    extra_meshes: more things in the room (objects, a second person); with_patient=False
    renders the empty table (its truth then says only that)."""
    rng = np.random.default_rng(p.pose_seed)
    template, verts, joints, face, levels = posed_patient(p, model, rng)
    mattress_top_t = p.mattress_mm
    mattress_top = mattress_top_t - p.table_height_mm
    faces = model.faces.astype(np.int32)
    body = Mesh(verts, faces, "body")
    room = room_meshes(p.table_height_mm, p.table_longitudinal_mm, p.mattress_mm, p.bore_diameter_mm,
                       p.mattress_curve_mm)
    meshes = room + ([body] if with_patient else []) + list(extra_meshes or [])
    dominant = model.data.weights.argmax(1)
    if p.pose == "knees_bent" and with_patient:
        # Supine, the cushion is under the knees; prone, under the raised shins.
        ids = ["left_knee", "right_knee"] + (["left_ankle", "right_ankle"] if p.patient_position[2] == "P" else [])
        y = joints[[JOINT_INDEX[j] for j in ids], 1].mean()
        near = np.abs(verts[:, 1] - y) < 60
        top = verts[near, 2].min() if near.any() else mattress_top + 100
        meshes.append(box([-220, y - 160, mattress_top], [220, y + 160, top], "cushion"))
    if p.head_pillow_mm > 0 and p.patient_position.endswith("S") and with_patient:
        # Under the raised head, from the mattress to the head's underside: as wide as a pillow, as long as
        # the head, so the raised arms beside it may rest on its edge.
        head = verts[dominant == JOINT_INDEX["head"]]
        y0, y1 = head[:, 1].min() + 20, head[:, 1].max() - 20
        top = head[:, 2].min()
        if top > mattress_top + 5:
            meshes.append(box([joints[JOINT_INDEX["head"], 0] - 200, y0, mattress_top],
                              [joints[JOINT_INDEX["head"], 0] + 200, y1, top], "pillow"))
    head_dir = 1.0 if p.patient_position.startswith("H") else -1.0
    if p.blanket and with_patient:
        hips_y = 0.5 * (joints[JOINT_INDEX["left_hip"], 1] + joints[JOINT_INDEX["right_hip"], 1])
        start = hips_y + head_dir * rng.uniform(-150, 200)
        end = verts[:, 1].min() - 60 if head_dir > 0 else verts[:, 1].max() + 60
        meshes.append(blanket_mesh([body] + meshes[len(room) + 1:], start, end, mattress_top))

    cam = make_camera(p)
    ideal = render.raycast(meshes, cam.k, cam.camera_to_scanner, *p.image_size)
    noise_rng = np.random.default_rng(p.seed + 7919)
    depth = render.add_depth_noise(ideal.depth, cam.intrinsics.fx, p.noise_subpixel, p.noise_wave_mm,
                                   p.hole_fraction, noise_rng, p.flying_fraction, p.outlier_fraction)

    skin = np.array([0.95, 0.80, 0.70]) * (1 - p.skin_tone) + np.array([0.36, 0.24, 0.17]) * p.skin_tone
    vcol = np.tile(skin, (len(verts), 1))
    if p.gown:
        gown = np.array([0.55, 0.72, 0.78]) if p.seed % 2 else np.array([0.75, 0.82, 0.65])
        vcol[np.isin(dominant, list(GOWN_JOINTS))] = gown
    albedo = [LABEL_COLOURS.get(m.label, (0.5, 0.5, 0.5)) if m.label != "body" else vcol[faces].mean(1)
              for m in meshes]
    color = render.shade_color(ideal, albedo, noise_rng)

    capture = Capture(depth=depth, color=color, camera=cam.intrinsics,
                      scene=SceneState(cam.camera_to_scanner, p.table_height_mm, p.table_longitudinal_mm),
                      name=f"sim-{p.seed}")
    if not with_patient:
        return capture, {"patient": False, "scene": p.to_json()}
    rest = template if template is not None else (
        model.data.v_template + np.einsum("vck,k->vc", model.data.shapedirs[:, :, :len(p.betas)], np.array(p.betas)))
    truth = ground_truth(p, model, rest, verts, joints, face, levels, dominant, head_dir, ideal)
    return capture, truth


def ground_truth(p: SceneParams, model: BodyModel, rest, verts, joints, face, levels, dominant, head_dir,
                 ideal) -> dict:
    """truth.json: position, joints, landmarks, region limits and ideal table heights (frame S, mm).

    rest: (V, 3) the body's rest mesh in metres (for stature and BMI)."""
    lm_ids = model.landmark_vertex_ids
    lm = {"vertex": verts[lm_ids["vertex"]]}
    lm.update({n: face[i] for i, n in enumerate(("nose", "reye", "leye", "rear", "lear"))})
    lm.update(levels)
    soles_y = verts[:, 1].min() if head_dir > 0 else verts[:, 1].max()
    regions = region_limits(lm, head_dir, soles_y)
    keep = ~np.isin(dominant, list(ARM_JOINTS))
    protocols = {}
    for name, (cr, ca) in regions.items():
        c = slab_centre(verts, model.faces, keep, 0.5 * (cr + ca))
        protocols[name] = {"cranial_y_mm": float(cr), "caudal_y_mm": float(ca),
                           "ideal_table_height_mm": float(p.table_height_mm + c["z"]) if c else None,
                           "iso_offset_lateral_mm": c["x"] if c else None,
                           "body_thickness_mm": c["ap_mm"] if c else None,
                           "body_width_mm": c["lat_mm"] if c else None}
    landmarks = {"vertex": lm["vertex"].tolist()}
    landmarks.update({k: joints[JOINT_INDEX[j]].tolist() for k, j in LANDMARK_JOINTS.items()})
    stature = float(rest[:, 1].max() - rest[:, 1].min())
    bmi = _mesh_volume(rest, model.faces) * 980.0 / stature ** 2
    on_body = ideal.label == 4  # floor, pedestal, tabletop, mattress, gantry, then the body
    train = model.data.train
    return {
        "patient_position": p.patient_position,
        "pose": p.pose,
        "body_source": p.body_source,
        "stature_mm": stature * 1000.0,
        "bmi": bmi,
        "age_years": float(train["age_years"][p.source_body]) if p.body_source == "model" and "age_years" in train
        else p.anny_phenotype.get("years"),
        "blanket": p.blanket,
        "table_height_mm": p.table_height_mm,
        "table_longitudinal_mm": p.table_longitudinal_mm,
        "joints_scanner_mm": {n: joints[i].tolist() for i, n in enumerate(JOINT_NAMES)},
        "landmarks_scanner_mm": landmarks,
        "internal_scanner_mm": {k: levels[k].tolist() for k in levels},
        "face_points_scanner_mm": {n: face[i].tolist() for i, n in enumerate(("nose", "reye", "leye", "rear", "lear"))},
        "protocols": protocols,
        "body_pixels": int(on_body.sum()),
        "scene": p.to_json(),
    }
