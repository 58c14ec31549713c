"""Ray-cast RGB-D rendering (Open3D, CPU) with a RealSense-like depth noise model.

Noise model (docs/simulator.md), applied to the ideal z-depth in this order:

1. stereo shadow: a background pixel that the right imager (baseline 95 mm along
   +x_C) cannot see behind a nearer edge gets no depth, as on a D4xx;
2. axial noise: per-pixel Gaussian with sigma = subpixel * z^2 / (f * baseline);
3. spatially correlated error: a smooth random field, ``wave_mm`` at 1 m, growing with z^2;
4. quantisation: disparity in steps of 1/32 px, then depth in 1 mm units;
5. dropouts: half of the pixels on depth edges, random blob-shaped holes covering
   ``hole_fraction`` of the image, and 0.2 % isolated pixels.

Optionally (``flying_fraction`` > 0; off in the default scenes), that fraction of the
depth-edge pixels are *mixed pixels* instead: a depth anywhere between the nearer
and the farther surface around them, as an anti-aliased render or another sensor's
edge smearing gives (they float in the air beside a silhouette). And optionally
(``outlier_fraction`` > 0; off by default) that fraction of all pixels reads a depth
drawn evenly over the sensor's range: a sensor's sparkle outliers, or another
tool's impulse noise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.room import Mesh

BASELINE_MM = 95.0
SUBPIXEL_STEP = 1.0 / 32.0
MIN_RANGE_MM, MAX_RANGE_MM = 400.0, 6000.0


@dataclass(frozen=True)
class Render:
    """Ideal render: z-depth (H, W) float32 mm (0 = no hit), label index (H, W) int (-1 = none),
    face index within its mesh (H, W) int, shading cosine (H, W) float32."""

    depth: np.ndarray
    label: np.ndarray
    face: np.ndarray
    shade: np.ndarray


def camera_rays(k: np.ndarray, cam_to_s: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W, 6) float32 rays in S: origin, then direction whose z_C component is 1 (so t = z-depth)."""
    u, v = np.meshgrid(np.arange(width) + 0.0, np.arange(height) + 0.0)
    d_c = np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u)], -1)
    d_s = d_c @ cam_to_s[:3, :3].T
    o = np.broadcast_to(cam_to_s[:3, 3], d_s.shape)
    return np.concatenate([o, d_s], -1).astype(np.float32)


def raycast(meshes: list[Mesh], k: np.ndarray, cam_to_s: np.ndarray, width: int, height: int) -> Render:
    """Cast one ray per pixel into the meshes (frame S, mm)."""
    import open3d as o3d

    scene = o3d.t.geometry.RaycastingScene()
    ids = []
    for m in meshes:
        ids.append(scene.add_triangles(o3d.core.Tensor(m.vertices.astype(np.float32)),
                                       o3d.core.Tensor(m.faces.astype(np.uint32))))
    rays = camera_rays(k, cam_to_s, width, height)
    ans = scene.cast_rays(o3d.core.Tensor(rays))
    t = ans["t_hit"].numpy()
    gid = ans["geometry_ids"].numpy().astype(np.int64)
    hit = np.isfinite(t)
    lookup = np.full(max(ids) + 2, -1, np.int64)
    lookup[np.array(ids)] = np.arange(len(ids))
    label = np.where(hit, lookup[np.where(hit, gid, len(lookup) - 1)], -1)
    n = ans["primitive_normals"].numpy()
    d = rays[..., 3:] / np.linalg.norm(rays[..., 3:], axis=-1, keepdims=True)
    shade = np.abs((n * d).sum(-1))
    return Render(np.where(hit, t, 0).astype(np.float32), label, ans["primitive_ids"].numpy().astype(np.int64),
                  np.where(hit, shade, 0).astype(np.float32))


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Zero-mean, unit-sd random field, smooth over ``cell`` pixels."""
    import cv2

    small = rng.normal(0, 1, (shape[0] // cell + 2, shape[1] // cell + 2)).astype(np.float32)
    f = cv2.resize(small, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    return (f - f.mean()) / (f.std() + 1e-6)


def stereo_shadow(z: np.ndarray, fx: float, max_shift: int = 64) -> np.ndarray:
    """(H, W) bool: pixels the right imager cannot see (occluded by a nearer surface to their right)."""
    disp = np.where(z > 0, fx * BASELINE_MM / np.maximum(z, 1e-3), 0.0)
    occ = np.zeros(z.shape, bool)
    for s in range(1, max_shift + 1):
        occ[:, :-s] |= (disp[:, s:] - disp[:, :-s]) >= s
    return occ


def _child(rng: np.random.Generator, k: int) -> np.random.Generator:
    """The k-th child stream of rng's seed: an optional noise draws from it, so that the default noise (drawn
    from rng itself) stays the same with or without it, and each option's draws with or without the others."""
    ss = rng.bit_generator.seed_seq
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(ss.entropy, spawn_key=ss.spawn_key + (k,))))


def add_depth_noise(z: np.ndarray, fx: float, subpixel: float, wave_mm: float, hole_fraction: float,
                    rng: np.random.Generator, flying_fraction: float = 0.0, outlier_fraction: float = 0.0) -> np.ndarray:
    """Ideal z-depth (H, W) mm -> noisy depth (H, W) uint16 mm (0 = no data).

    flying_fraction: of the depth-edge pixels, the share given a mixed depth; outlier_fraction: of all
    pixels, the share given a random depth (module doc). Each draws from its own child of rng, so the
    other noise is the same with or without them.
    """
    import cv2

    valid = (z > MIN_RANGE_MM) & (z < MAX_RANGE_MM)
    valid &= ~stereo_shadow(np.where(valid, z, 0), fx)
    zm = z / 1000.0
    noisy = z + rng.normal(0, 1, z.shape) * subpixel * z * z / (fx * BASELINE_MM)
    noisy += _smooth_field(rng, z.shape, 40) * wave_mm * zm * zm
    gy, gx = np.gradient(np.where(valid, z, 0.0))
    edge = np.hypot(gx, gy) > 25.0
    edge = cv2.dilate(edge.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    mixed = np.zeros(z.shape, bool)
    if flying_fraction > 0:
        frng = _child(rng, 0)
        square = np.ones((3, 3), np.uint8)
        near = cv2.erode(np.where(valid, z, np.inf).astype(np.float32), square)
        far = cv2.dilate(np.where(valid, z, 0.0).astype(np.float32), square)
        mixed = edge & valid & np.isfinite(near) & (far > near) & (frng.uniform(size=z.shape) < flying_fraction)
        noisy[mixed] = near[mixed] + frng.uniform(size=z.shape)[mixed] * (far[mixed] - near[mixed])
    disp = fx * BASELINE_MM / np.maximum(noisy, 1.0)
    noisy = fx * BASELINE_MM / (np.round(disp / SUBPIXEL_STEP) * SUBPIXEL_STEP)
    valid &= ~(edge & (rng.uniform(size=z.shape) < 0.5)) | mixed
    if hole_fraction > 0:
        field = _smooth_field(rng, z.shape, 12)
        valid &= field < np.quantile(field, 1.0 - hole_fraction)
    valid &= rng.uniform(size=z.shape) > 0.002
    out = np.where(valid, np.clip(np.round(noisy), 0, 65535), 0).astype(np.uint16)
    if outlier_fraction > 0:
        orng = _child(rng, 1)
        hit = orng.uniform(size=z.shape) < outlier_fraction
        out[hit] = np.round(orng.uniform(MIN_RANGE_MM, MAX_RANGE_MM, hit.sum())).astype(np.uint16)
    return out


def shade_color(render: Render, albedo_of_label: list[np.ndarray | tuple], rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 RGB: Lambertian shading of per-label (or per-face, (F, 3)) albedo, plus sensor noise.

    albedo_of_label[i]: an RGB triple (0..1) or an (F, 3) array of per-face colours for mesh i.
    """
    h, w = render.depth.shape
    img = np.full((h, w, 3), 0.05)
    for i, alb in enumerate(albedo_of_label):
        m = render.label == i
        if not m.any():
            continue
        a = np.asarray(alb, float)
        col = a[render.face[m]] if a.ndim == 2 else a
        img[m] = col * (0.35 + 0.65 * render.shade[m, None])
    img += rng.normal(0, 0.01, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
