"""Patient segmentation: which measured points are the patient, in the table frame. Pure.

The depth is mapped to S through the calibration and to T through the table
readings (CONVENTIONS.md). The support surface (mattress, or the bare tabletop) is
found from the data — the dominant height just above z_T = 0 — so mattresses of
any thickness, and captures made by other tools, are handled alike. Its slope is
checked first: the tabletop is level in S, so a support sloping in the calibrated
frame means the camera moved since its calibration (``support_tilt``). Everything
standing proud of it inside the tabletop's footprint is binned into a top-down
height map (10 mm cells) and split into connected parts: the largest is the
patient; other parts are reported as objects, or refused as a second person when
they are body-sized or stand tall beside the table.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from positioning.capture import Capture
from positioning.frames import scanner_to_table, valid_depth_to_scanner
from positioning.nearest import NearestIndex

CELL_MM = 10.0
FOOTPRINT_HALF_WIDTH_MM = 330.0  # tabletop (~260) plus what hangs over: a blanket, an elbow
MAX_BODY_HEIGHT_MM = 650.0  # above the support: a knee on a cushion, an obese abdomen
MIN_CLEARANCE_MM = 25.0  # above the support: less is mattress noise
# How far below a seen surface the bore check assumes unseen body may bulge out along the camera's rays (an obese
# flank below its widest point). Measured on 400 held-out plans (docs/planning.md): 0 mm let one true body hit the
# bore, 40 mm none (5 false refusals per 200), 80 mm none (19 false refusals per 200).
HIDDEN_DEPTH_MM = 40.0
MIN_PATIENT_AREA_M2 = 0.12
PERSON_AREA_M2 = 0.25  # a second part this large is a second person
GANTRY_Y_S_MM = -500.0  # nearer the isocenter than this is the gantry's face or the bore
# A patient seen within this of GANTRY_Y_S_MM reaches into the gantry (the simulator's patients, the table out at
# loading, end 238 mm short of it or more in 200 held-out scenes: docs/planning.md).
GANTRY_REACH_MM = 30.0
STANDING_BESIDE_MM = 400.0  # beyond the footprint's side: where a person standing at the table is looked for
# Of the points in an object's cells, at least this share is at body height; fewer, and the mattress is seen
# between them: the tail of the sensor's noise (3 of 100 held-out scenes reported such a patch as an object,
# 6-14 % of the points in its cells at body height; a box on the mattress, or feet, 93-100 %; docs/perception.md).
OBJECT_COVER = 0.5
SHADOW_BRIDGE_MM = 150.0  # unseen gaps this wide or narrower within the occupied cells do not part them
# A pixel this fraction of its depth behind the nearest and in front of the farthest depth around it (5 x 5) lies
# between two surfaces: a real surface would have to be seen more than 81 degrees off its normal (60 mm over two
# 4.7 mm pixels, at 2 m and 848 px wide; 73 degrees at 424 px wide), where stereo barely measures.
VEIL_STEP = 0.03
# Specks: connected blobs of depth (neighbours within SPECKLE_STEP_MM of each other) smaller than this share of the
# image (40 px at 848 x 480, about 9 cm² at 2 m). A speck point with hardly any other measured point (on the support
# or at body height, specks included) within SPECK_AWAY_MM is a sensor's outlier: one beside the table would stand
# for body in the bore check. The edge of a flank or an elbow seen at a grazing angle breaks into specks too, and it
# is body: such specks lie near each other or near other surface.
SPECKLE_FRACTION = 1e-4
SPECKLE_STEP_MM = 50
SPECK_AWAY_MM = 60.0
SPECK_NEIGHBOURS = 4  # fewer other points than this within SPECK_AWAY_MM: alone (two outliers may fall near each other)
# The tabletop is level in S (its z_T axis is S's vertical). A support surface sloping in the calibrated frame means
# the calibration no longer describes the camera: it was bumped or re-aimed, or the calibration is another room's.
SLOPE_SEARCH_MM = 150.0
LEVEL_POINTS = 20000
LEVEL_SPAN_MM = (800.0, 350.0)  # along, across: the support's points must span this much to measure its slope
# Along, across. Across is measured over the table's width only, where a depth camera's smooth error of a few mm
# (grows with the square of the distance) is a slope of a degree or more: it warns, and never refuses.
LEVEL_WARN_DEG = (1.0, 3.0)
LEVEL_REFUSE_DEG = (3.0, float("inf"))
# Where the support is looked for (mm, z_T): from a tabletop a little low to a thick mattress. Its commonest height
# at either end of the window means the real support lies beyond it and the window caught only its noise's tail.
SUPPORT_WINDOW_MM = (-20.0, 150.0)
ON_SUPPORT_MM = 30.0  # within this of the support's height: the support itself (its noise, its slight sag)
# A CT mattress lies 0-100 mm above the tabletop (the simulator draws 40-70). A support found outside this, but
# inside the window, may be a mattress of another kind or a table reading that many mm off: it warns.
SUPPORT_USUAL_MM = (-10.0, 100.0)
# The tabletop carries all that lies on it: over its middle (every CT tabletop is wider than twice this) and along
# the support, nothing seen lies more than BELOW_TABLETOP_MM (the depth's noise) below its top. Surfaces there
# (down to BELOW_SEARCH_MM: not the floor) over more than BELOW_TABLETOP_M2 mean the table height reading, the
# calibration or the depth is wrong, and the support found is another surface.
TABLETOP_MIDDLE_HALF_MM = 180.0
BELOW_TABLETOP_MM = 25.0
BELOW_SEARCH_MM = 400.0
BELOW_TABLETOP_M2 = 0.03
# A curved tabletop's mattress is a trough: its top rises towards the long edges, and the patient's back lies lower
# than the support seen beside it (a 30 mm rise, flat support assumed: chest ISO height +5.4 mm at the median,
# docs/planning.md "A curved tabletop"). Across the middle CURVE_HALF_WIDTH_MM each side, the support's height is
# a parabola, z_T = z0 + k x_T^2, through each 20 mm strip's median support height (``support_curve_t``). A curve
# is taken only when it rises CURVE_MIN_RISE_MM at CURVE_HALF_WIDTH_MM and CURVE_MIN_T standard errors: a depth
# camera's smooth error bends a flat mattress too (earlier rules found rises of 6-16 mm in 11 of 200 held-out flat
# scenes, 20-46 mm in 5 of 100 with twice the noise and in 1 of 30 at 1280x720; these find none). A fall (a
# mattress's rounded edges) is flat. CURVE_MIN_STRIPS strips must show the support, from within 80 mm of the centre
# line to 160 mm out.
# Supine or prone, a trunk is wider than it stands tall; lying on the side (a decubitus position, which
# CONVENTIONS.md's four codes do not name and the fit cannot describe) it stands taller than it is wide. The
# median height / width over the body's fullest rows (``trunk_aspect``): 0.41-0.94 over 200 held-out scenes,
# 0.38-1.03 over 80 bodies straight from anny (BMI up to 70); on the side 1.01-2.02 (24 scenes, 22 above this).
# Before, 8 of those 24 were planned, 7 as the wrong position with the lungs' range up to 1.16 m off, 3 unwarned.
SIDE_LYING_ASPECT = 1.12
CURVE_HALF_WIDTH_MM = 240.0
CURVE_MIN_RISE_MM = 20.0
CURVE_MIN_T = 8.0
CURVE_MIN_STRIPS = 12


class SegmentationError(Exception):
    """No single patient can be found on the table; the message says why in one line."""


class TableNotLevel(SegmentationError):
    """The support surface slopes in the calibrated frame: the calibration does not describe the camera."""


class TableMismatch(SegmentationError):
    """The support is not where the calibration and the table readings put the tabletop."""


@dataclass(frozen=True)
class DetectedObject:
    """A part on the table that is not the patient. centre (3,) mm in S; size (3,) mm."""

    centre: np.ndarray
    size: np.ndarray
    area_m2: float


@dataclass(frozen=True)
class Segmentation:
    """The patient's points and where they lie.

    points_s: (N, 3) float32, mm, frame S, the patient's measured surface.
    pixels: (N, 2) int, (row, col) of each point in the depth image.
    support_z_s: height of the support surface (mattress top) in S under the patient's middle, mm; on a curved
    mattress its height across the table is ``support_z_at`` (support_curvature k, 1/mm: it rises by k x^2 from
    its centre line; 0 flat; support_x_s the x of the patient's middle, where support_z_s was taken).
    heightmap: (Hm, Wm) float32, mm above the support, 10 mm cells, NaN = empty;
    heightmap_origin_t: (x_T, y_T) of cell [0, 0]'s centre.
    on_table_s: (M, 3) float32, mm, frame S: everything at body height over the
    table and up to 250 mm beyond its sides (the patient, objects beside them, a
    hand over the edge): what travels into the bore with the table. A sensor's
    outliers are left out (specks with hardly any other point near, ``outliers``).
    hidden_s: (M', 3) float32, mm, frame S: where the camera's ray through each of
    those points has come down HIDDEN_DEPTH_MM further (at most to 25 mm above the
    support). The space between a point and its hidden end is unseen and may hold
    body (the flank of an obese patient below its widest point); the bore check
    counts it.
    off_image_s: (K, 3) float32, mm, frame S: the patient's points on the image's outermost two rows and
    columns, where the body runs off the camera's image (none when it is all in view).
    """

    points_s: np.ndarray
    pixels: np.ndarray
    support_z_s: float
    heightmap: np.ndarray
    heightmap_origin_t: tuple[float, float]
    area_m2: float
    objects: list[DetectedObject] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)
    on_table_s: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.float32))
    hidden_s: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.float32))
    support_tilt_deg: tuple[float | None, float | None] = (None, None)
    off_image_s: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.float32))
    support_curvature: float = 0.0
    support_x_s: float = 0.0

    def support_z_at(self, x_s: np.ndarray) -> np.ndarray:
        """The support's z_S (mm) at x_S (mm; any shape): support_z_s on a flat support."""
        return self.support_z_s + self.support_curvature * (np.square(x_s) - self.support_x_s ** 2)


def consensus_line(u: np.ndarray, z: np.ndarray, tol_mm: float, floats_count: bool = False,
                   min_gap: float = 0.0) -> np.ndarray | None:
    """(K,) bool: which points (u, z) (K,) each, mm, lie within tol_mm of the line through the pair of them that
    most others agree with. floats_count: points more than tol_mm below a line count against it (a support
    carries what is seen, so a line floating over points is not the support). Pairs closer than min_gap in u
    are not tried; None when none is left."""
    i, j = np.triu_indices(len(u), 1)
    keep = np.abs(u[j] - u[i]) > min_gap
    i, j = i[keep], j[keep]
    if len(i) == 0:
        return None
    rise = ((z[j] - z[i]) / (u[j] - u[i]))[:, None]
    off = z[None] - z[i][:, None] - rise * (u[None] - u[i][:, None])  # (pairs, points), mm
    agree = np.abs(off) < tol_mm
    score = agree.sum(1) - ((off < -tol_mm).sum(1) if floats_count else 0)
    return agree[int(np.argmax(score))]


def trunk_aspect(heightmap: np.ndarray) -> tuple[float, float, float]:
    """(height / width, height mm, width mm): the median over the height map's rows whose cross-section (the sum of
    their heights) is in the top 30 %, of each row's greatest height and its occupied width.

    heightmap: (Hm, Wm) mm above the support, 10 mm cells (``Segmentation.heightmap``), NaN = empty."""
    seen = ~np.isnan(heightmap)
    filled = np.where(seen, heightmap, 0.0)
    width, height, area = seen.sum(1) * CELL_MM, filled.max(1), filled.sum(1)
    rows = width >= 5 * CELL_MM
    if not rows.any():
        return 0.0, 0.0, 0.0
    full = rows & (area >= np.percentile(area[rows], 70))
    return (float(np.median(height[full] / width[full])), float(np.median(height[full])),
            float(np.median(width[full])))


def support_curve_t(points_t: np.ndarray, support_z_t: float) -> tuple[float, float]:
    """(z0, k): the support's height across the table, z_T = z0 + k x_T^2 (mm; 1/mm), or (support_z_t, 0.0) where
    it is flat or cannot be told (module constants CURVE_*).

    points_t: (N, 3) mm, frame T, the support's points (within ON_SUPPORT_MM of support_z_t, between its ends:
    under the patient it is still seen past the head and the feet); support_z_t: the support's commonest height
    (``support_height_t``). Each 20 mm strip across gives the median height of its points. The strips that agree
    with one parabola (the line through two of them in x_T^2 that most others lie within 6 mm of) are the
    support's, and OpenCV's Huber line fit of their heights over x_T^2 gives z0 and k. A curve must rise
    CURVE_MIN_RISE_MM and CURVE_MIN_T standard errors of its fit: a noisy camera's smooth error is no curve.
    """
    import cv2

    h = CURVE_HALF_WIDTH_MM
    q = points_t[np.abs(points_t[:, 0]) < h]
    x_edges = np.arange(-h, h + 1.0, 20.0)
    strip = np.digitize(q[:, 0], x_edges) - 1
    n = np.bincount(strip, minlength=len(x_edges))[:len(x_edges) - 1]
    xz = np.array([(0.5 * (x_edges[i] + x_edges[i + 1]), float(np.median(q[strip == i, 2])))
                   for i in np.flatnonzero(n >= 50)], dtype=np.float64).reshape(-1, 2)
    if len(xz) < CURVE_MIN_STRIPS:
        return support_z_t, 0.0
    # x^2 / h keeps both axes in mm, so a line fit's perpendicular distance is nearly the vertical one.
    u, z = xz[:, 0] ** 2 / h, xz[:, 1]
    on = consensus_line(u, z, 6.0, min_gap=20.0)
    if on is None:
        return support_z_t, 0.0
    ax = np.abs(xz[on, 0])
    if on.sum() < CURVE_MIN_STRIPS or ax.min() > 80.0 or ax.max() < 160.0:
        return support_z_t, 0.0
    vu, vz, u0, zu = cv2.fitLine(np.stack([u[on], z[on]], 1).astype(np.float32), cv2.DIST_HUBER, 0, 0.01,
                                 0.01).ravel()
    slope = float(vz / vu)
    z0 = float(zu - slope * u0)
    resid = z[on] - z0 - slope * u[on]
    se = float(np.sqrt((resid ** 2).sum() / max(on.sum() - 2, 1) / ((u[on] - u[on].mean()) ** 2).sum()))
    if slope * h < CURVE_MIN_RISE_MM or slope < CURVE_MIN_T * se:
        return support_z_t, 0.0
    return z0, slope / h


def support_tilt(points_t: np.ndarray, support_z_t: float) -> tuple[float | None, float | None]:
    """(along, across): the support surface's slope in degrees along the table (dz/dy_T) and across it (dz/dx_T).

    points_t: (N, 3) mm, frame T: what the camera sees over the tabletop's footprint (support, patient, objects);
    support_z_t: the support's height over the whole footprint (``support_height_t``). Each 100 mm slice across
    the table gives the height of its lowest surface within SLOPE_SEARCH_MM of support_z_t; the slices that
    agree with one line, less those whose lowest surface lies below it, are the support's (elsewhere the patient
    or a blanket hides it), and a line through them is the first guess of the support's plane. OpenCV's line
    fits over the points near the plane so far (60, 30, then 15 mm) refine both slopes. None where the support's
    points span too little of the table to measure a slope (LEVEL_SPAN_MM; a patient covering nearly all of the
    mattress); the slope across is only measured with the slope along.
    """
    import cv2

    def line(u: np.ndarray, z: np.ndarray) -> tuple[float, float]:
        """Slope and intercept of z over u: OpenCV's least-squares line."""
        vu, vz, u0, z0 = cv2.fitLine(np.stack([u, z], 1).astype(np.float32), cv2.DIST_L2, 0, 0.01, 0.01).ravel()
        return float(vz / vu), float(z0 - vz / vu * u0)

    q = points_t[np.abs(points_t[:, 2] - support_z_t) < SLOPE_SEARCH_MM].astype(np.float64)
    q = q[::max(1, len(q) // LEVEL_POINTS)]  # evenly over the image: plenty for two slopes, at any depth size
    # Within 240 mm of the centre line: a blanket hanging over the tabletop's edges is below the support.
    mid = q[np.abs(q[:, 0]) < 240.0]
    if len(mid) == 0:
        return None, None
    y_edges = np.arange(mid[:, 1].min(), mid[:, 1].max() + 100.0, 100.0)
    z_edges = np.arange(support_z_t - SLOPE_SEARCH_MM, support_z_t + SLOPE_SEARCH_MM + 1.0, 5.0)
    hist, _, _ = np.histogram2d(mid[:, 1], mid[:, 2], bins=(y_edges, z_edges))  # (slices, 5 mm height bins)
    profile = []
    for y0, h in zip(y_edges, hist):
        # The commonest height within 60 mm above the slice's lowest well-filled bin: the lowest surface's middle,
        # not the low tail of its noise (which grows with the distance from the camera, and would tilt the line).
        filled = np.flatnonzero(h >= max(5.0, 0.05 * h.sum()))
        if len(filled):
            profile.append((y0 + 50.0, z_edges[filled[0] + int(np.argmax(h[filled[0]:filled[0] + 12]))] + 2.5))
    profile = np.array(profile, dtype=np.float64).reshape(-1, 2)
    if len(profile) < 3:
        return None, None
    # Where a blanket or the patient hides the support, a slice's lowest surface is theirs: the line through two
    # slices that most others agree with (within 10 mm) picks the support's slices; a line is fitted over those.
    # The support carries everything on it: a line with a slice's lowest surface more than 10 mm below it floats
    # over something seen, so such slices count against it (a line along a blanket's slope would otherwise tie
    # with the mattress's).
    support_slices = profile[consensus_line(profile[:, 0], profile[:, 1], 10.0, floats_count=True)]
    if np.ptp(support_slices[:, 0]) < LEVEL_SPAN_MM[0]:
        return None, None
    (along, height), across = line(support_slices[:, 0], support_slices[:, 1]), 0.0
    for band in (60.0, 30.0, 15.0):
        # Only the points near the plane so far: a patient covering most of the support is not allowed to pull it.
        q = q[np.abs(q[:, 2] - height - along * q[:, 1] - across * q[:, 0]) < band]
        if len(q) < 100:
            return None, None
        # The two slopes are fitted in turn, each on the heights with the other taken out.
        for _ in range(2):
            along, _ = line(q[:, 1], q[:, 2] - across * q[:, 0])
            across, height = line(q[:, 0], q[:, 2] - along * q[:, 1])
    span_y, span_x = np.ptp(np.percentile(q[:, :2], [5, 95], axis=0), axis=0)[[1, 0]]
    if span_y < LEVEL_SPAN_MM[0]:
        return None, None  # a plane fitted over a short stretch of the table does not give its slope across either
    return float(np.degrees(np.arctan(along))), (float(np.degrees(np.arctan(across))) if span_x >= LEVEL_SPAN_MM[1]
                                                 else None)


def below_tabletop(points_t: np.ndarray, support_z_t: float) -> None:
    """Raise TableMismatch where surfaces over the tabletop's middle lie below its top (see BELOW_TABLETOP_MM).

    points_t: (N, 3) mm, frame T, what the camera sees over the tabletop's footprint; support_z_t: the support's
    height (``support_height_t``). Looked for behind the head-end mark (y_T < 0: a head rest may run past it,
    narrower than the tabletop) and between the support's ends (past them, the floor or the table's base).
    """
    y_support = points_t[np.abs(points_t[:, 2] - support_z_t) < ON_SUPPORT_MM, 1]
    y_lo, y_hi = np.percentile(y_support, [0.1, 99.9])
    x, y, z = points_t[:, 0], points_t[:, 1], points_t[:, 2]
    low = points_t[(np.abs(x) < TABLETOP_MIDDLE_HALF_MM) & (y >= y_lo) & (y <= min(y_hi, 0.0))
                   & (z < -BELOW_TABLETOP_MM) & (z > -BELOW_SEARCH_MM)]
    area_m2 = len(np.unique(np.floor(low[:, :2] / CELL_MM).astype(np.int64), axis=0)) * (CELL_MM / 1000.0) ** 2
    if area_m2 > BELOW_TABLETOP_M2:
        raise TableMismatch(f"surfaces over the tabletop lie {-np.median(low[:, 2]):.0f} mm below its top "
                            f"({area_m2 * 1e4:.0f} cm²): the table height reading, the calibration or the depth "
                            f"is wrong; run the daily check (ctpos calibrate --check)")


def level_warnings(tilt: tuple[float | None, float | None]) -> list[dict[str, str]]:
    """The warning for a support's slope (``support_tilt``'s along, across; degrees): none, CALIBRATION_SUSPECT
    from LEVEL_WARN_DEG, or TableNotLevel raised from LEVEL_REFUSE_DEG."""
    slopes = [(t, axis, warn, refuse) for t, axis, warn, refuse in zip(tilt, ("along", "across"), LEVEL_WARN_DEG,
                                                                         LEVEL_REFUSE_DEG) if t is not None]
    if not any(abs(t) >= warn for t, _, warn, _ in slopes):
        return []
    reason = (f"the tabletop slopes {' and '.join(f'{t:+.1f} deg {axis}' for t, axis, _, _ in slopes)} in the "
              f"calibrated frame, where it is level")
    if any(abs(t) >= refuse for t, _, _, refuse in slopes):
        raise TableNotLevel(f"{reason}: the camera may have moved since its calibration; run the daily check "
                            f"(ctpos calibrate --check) or calibrate again")
    return [{"code": "CALIBRATION_SUSPECT", "message": f"{reason}: check the camera's calibration"}]


def hidden_ends(points_s: np.ndarray, camera_s: np.ndarray, floor_z_s: float,
                depth_mm: float = HIDDEN_DEPTH_MM) -> np.ndarray:
    """(M, 3) where the camera ray through each point (N, 3), mm, frame S, has come down depth_mm (or to floor_z_s).

    camera_s: (3,) the camera's centre in S. Points at or below the floor have no hidden part and are dropped.
    Along a line the distance from the bore's axis is convex, so a point and its hidden end bound the whole
    unseen segment between them.
    """
    d = points_s.astype(np.float64) - camera_s
    end_z = np.maximum(floor_z_s, points_s[:, 2] - depth_mm)
    s = np.full(len(d), -1.0)
    down = d[:, 2] < -1e-6
    s[down] = (end_z[down] - camera_s[2]) / d[down, 2]
    keep = s > 1.0
    return (camera_s + s[keep, None] * d[keep]).astype(np.float32)


def speckle_pixels(depth_mm: np.ndarray, fraction: float = SPECKLE_FRACTION,
                   step_mm: int = SPECKLE_STEP_MM) -> np.ndarray:
    """(H, W) bool: the pixels of a z-depth image (mm, 0 = no data) that OpenCV's speckle filter removes: blobs of
    fewer than ``fraction`` of the image's pixels, cut off from everything else by depth steps over step_mm."""
    import cv2

    d = np.clip(np.round(depth_mm), 0, np.iinfo(np.int16).max).astype(np.int16)
    cv2.filterSpeckles(d, 0, max(1, round(fraction * d.size)), step_mm)
    return (d == 0) & (depth_mm > 0)


def outliers(points_s: np.ndarray, candidates: np.ndarray, away_mm: float = SPECK_AWAY_MM,
             neighbours: int = SPECK_NEIGHBOURS) -> np.ndarray:
    """(N,) bool: the candidate points with fewer than ``neighbours`` other points within away_mm.

    points_s (N, 3) mm; candidates (N,) bool. The fit ignores outliers (robust cost)
    and the front is a median, so only what the bore check counts is cleared of them.
    """
    out = np.zeros(len(points_s), bool)
    if candidates.any() and len(points_s) > 1:
        d, _ = NearestIndex(points_s).query(points_s[candidates], k=neighbours + 1)  # the first: itself
        out[np.flatnonzero(candidates)[d[:, -1] > away_mm]] = True
    return out


def veil_pixels(depth_mm: np.ndarray, rel_step: float = VEIL_STEP) -> np.ndarray:
    """(H, W) bool: mixed ("flying") pixels of a z-depth image (H, W), mm, 0 = no data.

    Where a silhouette meets the background far behind it, a sensor (or an
    anti-aliased render) may return a blend of the two depths: points hanging in the
    air beside and below the body, which the bore check would take for body. Such a
    pixel is well behind the nearest depth around it and well in front of the
    farthest; on a real surface one of the two differences is small.
    """
    import cv2

    z = depth_mm.astype(np.float32)
    valid = z > 0
    square = np.ones((5, 5), np.uint8)
    near = cv2.erode(np.where(valid, z, np.float32(np.inf)), square)
    far = cv2.dilate(z, square)  # no data (0) never wins
    step = rel_step * z
    return valid & (z - near > step) & (far - z > step)


def support_height_t(z_t: np.ndarray) -> tuple[float, bool]:
    """The support surface's z_T (mm), the median of the densest 5 mm height band within SUPPORT_WINDOW_MM, and
    whether that band is the window's first or last (the real support then lies beyond the window).

    z_t: (N,) mm, the heights over the tabletop's footprint. Raises TableMismatch where too little lies in the
    window."""
    lo, hi = SUPPORT_WINDOW_MM
    z = z_t[(z_t > lo) & (z_t < hi)]
    if len(z) < 500:
        raise TableMismatch("the tabletop is not where the calibration and table readings put it")
    hist, edges = np.histogram(z, bins=np.arange(lo, hi + 5.0, 5.0))
    k = int(np.argmax(hist))
    band = z[(z >= edges[k] - 5) & (z < edges[k + 1] + 5)]
    return float(np.median(band)), k in (0, len(hist) - 1)


def shifted_height_map(seg: Segmentation, table_longitudinal_mm: float,
                       shift_mm: float) -> tuple[np.ndarray, tuple[float, float]]:
    """The patient's height map as ``seg.heightmap`` (its points only, each cell's highest), on a grid moved
    shift_mm back along both table axes: (heightmap (Hm + 1, Wm + 1) float32 mm above the support, NaN = empty;
    (x_T, y_T) of cell [0, 0]'s centre). The extra row and column keep every point in a cell.

    Which points share a cell, and so each cell's value, depends on where the grid lies: two grids half a cell
    apart give two looks at the same surface (the keypoint network's two views, positioning/keypoints.py).
    """
    pts = seg.points_s.astype(np.float64)
    x_t, y_t, above = pts[:, 0], pts[:, 1] - table_longitudinal_mm, pts[:, 2] - seg.support_z_at(pts[:, 0])  # T ∥ S
    x0, y0 = seg.heightmap_origin_t[0] - shift_mm, seg.heightmap_origin_t[1] - shift_mm
    ny, nx = seg.heightmap.shape[0] + 1, seg.heightmap.shape[1] + 1
    # Cell centres at x0 + j * CELL: cell j spans [x0 + (j - 1/2) CELL, x0 + (j + 1/2) CELL).
    ix = np.floor((x_t - x0) / CELL_MM + 0.5).astype(int)
    iy = np.floor((y_t - y0) / CELL_MM + 0.5).astype(int)
    ok = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    hm = np.full((ny, nx), -np.inf, np.float32)
    np.maximum.at(hm, (iy[ok], ix[ok]), above[ok].astype(np.float32))
    return np.where(np.isfinite(hm), hm, np.nan).astype(np.float32), (x0, y0)


def segment_patient(capture: Capture, min_valid_fraction: float = 0.3) -> Segmentation:
    """Find the patient in one capture (see module doc). Raises SegmentationError with the reason."""
    import cv2

    depth = capture.depth_mm()
    valid = depth > 0
    if valid.mean() < min_valid_fraction:
        raise SegmentationError(f"only {valid.mean() * 100:.0f} % of the depth image holds data "
                                f"(camera covered, too close, or not a depth image)")
    depth[veil_pixels(depth)] = 0.0
    sc = capture.scene
    rows, cols, pts_s = valid_depth_to_scanner(depth, capture.camera, sc.camera_to_scanner)
    # Only what lies over or beside the table, short of the gantry, is judged below (x_T = x_S): most of a
    # ceiling camera's pixels are floor, and every pass over them costs (about a fifth of segmentation at 1280x720).
    near_table = (np.abs(pts_s[:, 0]) < FOOTPRINT_HALF_WIDTH_MM + STANDING_BESIDE_MM) & (pts_s[:, 1] < GANTRY_Y_S_MM)
    rows, cols, pts_s = rows[near_table], cols[near_table], pts_s[near_table]
    speck = speckle_pixels(depth)[rows, cols]
    pts_t = scanner_to_table(pts_s, sc.table_height_mm, sc.table_longitudinal_mm)
    in_foot = np.abs(pts_t[:, 0]) < FOOTPRINT_HALF_WIDTH_MM
    foot_t = pts_t[in_foot]
    support, at_edge = support_height_t(foot_t[:, 2])
    # Checked first: on a sloping support, everything judged by height above it would be wrong; and a camera turned
    # since its calibration is named as such before the support's height is judged.
    tilt = support_tilt(foot_t, support)
    warnings = level_warnings(tilt)
    if at_edge:
        lo, hi = SUPPORT_WINDOW_MM
        raise TableMismatch(f"the tabletop is not where the calibration and table readings put it: the support "
                            f"seen lies {support:+.0f} mm from where its top should be, at the edge of the "
                            f"{lo:+.0f} to {hi:+.0f} mm searched")
    if not SUPPORT_USUAL_MM[0] <= support <= SUPPORT_USUAL_MM[1]:
        warnings.append({"code": "TABLE_READING_SUSPECT",
                         "message": f"the support lies {support:+.0f} mm from the tabletop's top, where a CT mattress "
                                    f"lies {SUPPORT_USUAL_MM[0]:+.0f} to {SUPPORT_USUAL_MM[1]:+.0f} mm: check the table "
                                    f"height reading and the camera's calibration"})
    below_tabletop(foot_t, support)
    on_flat = np.abs(foot_t[:, 2] - support) < ON_SUPPORT_MM
    y_ends = np.percentile(foot_t[on_flat, 1], [1, 99]) + np.array([50.0, -50.0])  # not the tabletop past its ends
    z0, curvature = support_curve_t(foot_t[on_flat & (foot_t[:, 1] > y_ends[0]) & (foot_t[:, 1] < y_ends[1])], support)
    surface = support if curvature == 0.0 else z0 + curvature * np.square(pts_t[:, 0])
    above = pts_t[:, 2] - surface
    cand = in_foot & (above > MIN_CLEARANCE_MM) & (above < MAX_BODY_HEIGHT_MM)

    # Top-down height map over the support's length (not the floor seen past its ends).
    on_support = in_foot & (np.abs(above) < ON_SUPPORT_MM)
    ys = pts_t[on_support | cand, 1]
    y_lo, y_hi = float(np.percentile(ys, 0.1)) - 100.0, float(np.percentile(ys, 99.9)) + 100.0
    cand &= (pts_t[:, 1] >= y_lo) & (pts_t[:, 1] <= y_hi)
    ny = int((y_hi - y_lo) / CELL_MM) + 1
    nx = int(2 * FOOTPRINT_HALF_WIDTH_MM / CELL_MM) + 1
    ix = np.clip(((pts_t[:, 0] + FOOTPRINT_HALF_WIDTH_MM) / CELL_MM).astype(int), 0, nx - 1)
    iy = np.clip(((pts_t[:, 1] - y_lo) / CELL_MM).astype(int), 0, ny - 1)
    hm = np.full((ny, nx), -np.inf, np.float32)
    np.maximum.at(hm, (iy[cand], ix[cand]), above[cand].astype(np.float32))
    occ = np.isfinite(hm).astype(np.uint8)
    occ = cv2.morphologyEx(occ, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    # A stretch the camera saw nothing of, at any height, does not part a body: from a steep mount the chin's
    # shadow hides the neck and the head came apart from the trunk as an "object" (docs/perception.md). Unseen
    # cells within SHADOW_BRIDGE_MM of the occupied ones join what lies on either side of them.
    cell = iy * nx + ix
    seen_any = np.zeros(ny * nx, bool)
    seen_any[cell[in_foot & (pts_t[:, 1] >= y_lo) & (pts_t[:, 1] <= y_hi)]] = True
    k = int(SHADOW_BRIDGE_MM / CELL_MM) | 1
    bridge = ~seen_any.reshape(ny, nx) & (cv2.morphologyEx(occ, cv2.MORPH_CLOSE, np.ones((k, k), np.uint8)) > 0)
    n, labels = cv2.connectedComponents(occ | bridge.astype(np.uint8), connectivity=8)
    area_of = np.bincount(labels[occ > 0], minlength=n)  # cells; the bridges are not the body's area
    cell_m2 = (CELL_MM / 1000.0) ** 2
    parts = sorted((i for i in range(1, n) if area_of[i] > 0), key=lambda i: -area_of[i])
    if not parts or area_of[parts[0]] * cell_m2 < MIN_PATIENT_AREA_M2:
        raise SegmentationError("no patient on the table")
    body = parts[0]
    label_of_point = np.where(cand, labels[iy, ix], 0)
    body_area = area_of[body] * cell_m2
    objects = []
    # Points at body height and on the support in each cell: a thing on the mattress hides the mattress under it,
    # while the sensor's noise lifts a few scattered points of a mattress still seen all around them.
    seen = on_support & (pts_t[:, 1] >= y_lo) & (pts_t[:, 1] <= y_hi)
    n_up, n_down = np.bincount(cell[cand], None, ny * nx), np.bincount(cell[seen], None, ny * nx)
    for p in parts[1:]:
        area = area_of[p] * cell_m2
        if area < 0.005 or above[label_of_point == p].max(initial=0) < 40.0:  # noise, a cable, a fold
            continue
        in_part = labels.ravel() == p
        up = n_up[in_part].sum()
        if up < OBJECT_COVER * (up + n_down[in_part].sum()):
            continue
        sel = label_of_point == p
        if area >= PERSON_AREA_M2:
            raise SegmentationError(f"a second person-sized shape ({area:.2f} m²) is on the table")
        q = pts_s[sel]
        objects.append(DetectedObject(q.mean(0), np.ptp(q, axis=0), float(area)))
        warnings.append({"code": "OBJECT_BESIDE_PATIENT",
                         "message": f"object of {area * 1e4:.0f} cm² beside the patient, not fitted"})
    body_pts = label_of_point == body
    # What lies past GANTRY_Y_S_MM was left out above: a patient reaching that far may go on into the gantry, where
    # the region's end, and what the bore check must count (a raised hand), are not in the capture.
    if pts_s[body_pts, 1].max() > GANTRY_Y_S_MM - GANTRY_REACH_MM:
        raise SegmentationError("the patient reaches into the gantry: move the table out of it and capture again")
    # Half off the table: much of the patient lies over the footprint's lateral edge.
    bt = pts_t[body_pts]
    over = np.abs(bt[:, 0]) > FOOTPRINT_HALF_WIDTH_MM - 20
    if over.mean() > 0.05:
        raise SegmentationError(f"the patient lies over the table's edge ({over.mean() * 100:.0f} % of the "
                                f"body surface at the edge)")
    # Someone standing at the table: surfaces well above any lying body, beside or over it.
    tall = (above > MAX_BODY_HEIGHT_MM) & (above < 1500)
    if tall.sum() > 800:  # a head seen from above is ~1,500 points at 1 m
        raise SegmentationError("a person is standing at the table")
    # Off the table: body points outside the footprint at body height (an arm or leg
    # hanging off). Checked after the standing person, whose body is outside too.
    outside = (~in_foot) & (above > MIN_CLEARANCE_MM) & (above < MAX_BODY_HEIGHT_MM) & \
              (np.abs(pts_t[:, 0]) < FOOTPRINT_HALF_WIDTH_MM + 250)
    if outside.sum() > 0.25 * body_pts.sum():
        raise SegmentationError("the patient lies partly off the table")
    hm[labels != body] = -np.inf
    hm_out = np.where(np.isfinite(hm), hm, np.nan).astype(np.float32)
    aspect, tall_mm, wide_mm = trunk_aspect(hm_out)
    if aspect > SIDE_LYING_ASPECT:
        raise SegmentationError(f"the patient seems to lie on the side (the trunk {tall_mm:.0f} mm tall, "
                                f"{wide_mm:.0f} mm wide): ctpos plans supine and prone patients only")
    at_body_height = (cand | outside) & (pts_t[:, 1] >= y_lo) & (pts_t[:, 1] <= y_hi)
    near = at_body_height | on_support
    alone = np.zeros(len(pts_s), bool)
    alone[near] = outliers(pts_s[near], speck[near] & at_body_height[near])
    on_table = pts_s[at_body_height & ~alone]
    # Under the patient's middle: where its back lies on a curved mattress (on a flat one z0 is the support).
    x_mid = float(np.median(pts_t[body_pts, 0]))
    under = z0 + curvature * x_mid ** 2
    hidden = hidden_ends(on_table, sc.camera_to_scanner[:3, 3],
                         float(under - sc.table_height_mm) + MIN_CLEARANCE_MM)
    # The patient's points on the image's outermost rows and columns: the body runs off the image there.
    h, w = depth.shape
    r, c = rows[body_pts], cols[body_pts]
    off_image = (r <= 1) | (r >= h - 2) | (c <= 1) | (c >= w - 2)
    return Segmentation(pts_s[body_pts].astype(np.float32), np.stack([rows[body_pts], cols[body_pts]], 1),
                        float(under - sc.table_height_mm), hm_out,
                        (-FOOTPRINT_HALF_WIDTH_MM + CELL_MM / 2, y_lo + CELL_MM / 2), float(body_area), objects,
                        warnings, on_table, hidden, tilt, pts_s[body_pts][off_image].astype(np.float32),
                        float(curvature), x_mid)
