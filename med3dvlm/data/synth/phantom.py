"""SynthCT phantoms: a CT-like chest-abdomen volume in Hounsfield units with known findings.

Anatomy is laid out in millimetres over a fixed field of view (``FOV_MM``, D x H x W =
inferior->superior, anterior->posterior, right->left, the loader's canonical orientation), so a
case looks the same at any grid size: body outline (fat, muscle wall), spine, aorta, lungs above
a diaphragm, heart, liver, spleen, kidneys, bowel loops in mesenteric fat. Organs are ellipsoids
whose surfaces are bent by a smooth random field; edges are partial-volume ramps one voxel wide,
so small objects stay visible on coarse grids. Enhancement follows the contrast phase (aorta,
heart, kidneys, liver, spleen). A thick-slice acquisition plane blurs one axis (three voxels).

Findings (0-3 per case, ``LABELS``): lesions with organ, side, location, size and density; fluid
(pleural effusion, ascites); calcification (kidney stone, aortic wall plaques); cardiomegaly.
Their HU contrast is large (the smallest, a hypodense kidney lesion, is ~30 HU under the kidney at
12 HU noise) and lesions are 1.5-5 cm across, several voxels at 32x64x64.

Everything is a function of (seed, index, size): ``make_phantom`` draws from
``numpy.random.default_rng([seed, index])`` in a fixed order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["FOV_MM", "LABELS", "PHASES", "PLANES", "Finding", "Phantom", "make_phantom"]

FOV_MM = (256.0, 384.0, 384.0)
LABELS = ("Lung nodule", "Liver lesion", "Kidney lesion", "Pleural effusion", "Ascites", "Kidney stone",
          "Aortic calcification", "Cardiomegaly")
PHASES = ("non-contrast", "arterial", "portal venous")
PLANES = ("axial", "coronal", "sagittal")
PLANE_PROBABILITIES = (0.6, 0.2, 0.2)
# The axis a thick-slice acquisition in each plane blurs, in (D, H, W).
PLANE_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}
FINDING_COUNT_PROBABILITIES = (0.2, 0.35, 0.3, 0.15)  # 0, 1, 2, 3 findings

# HU by phase (non-contrast, arterial, portal venous), typical adult values.
ENHANCED_HU = {"aorta": (40, 300, 170), "heart": (40, 260, 150), "kidney": (35, 170, 180),
               "liver": (60, 75, 115), "spleen": (50, 110, 120)}
HU = {"air": -1000, "fat": -100, "mesentery": -90, "bowel": 35, "muscle": 50, "lung": -850,
      "fluid": 8, "cancellous": 250, "cortical": 700, "disc": 80, "csf": 15}
NOISE_HU = 12.0
LESION_DENSITIES = {"hypodense": -50.0, "hyperdense": +70.0}  # relative to the organ; fat is absolute
FAT_LESION_HU = -90.0
NODULE_HU = {"solid": 40.0, "ground-glass": -550.0}
STONE_HU = 1000.0
PLAQUE_HU = 900.0
# Diameters (cm) a lesion of each kind is drawn around; VQA offers these as the size choices.
SIZE_CLASSES_CM = {"Lung nodule": (1.5, 2.0, 2.5, 3.0), "Liver lesion": (2.0, 3.0, 4.0, 5.0),
                   "Kidney lesion": (1.5, 2.0, 3.0, 4.0), "Kidney stone": (0.5, 0.8, 1.0, 1.2)}
FLUID_AMOUNTS = {"small": 0.15, "moderate": 0.3, "large": 0.45}  # share of the lung / abdomen depth


@dataclass
class Finding:
    """One abnormality, as the report and the questions describe it and as it was drawn.

    kind: a ``LABELS`` entry. organ: "lung", "liver", "kidney", "pleura", "peritoneum", "aorta",
    "heart". side: "right", "left", "bilateral" or None. location: e.g. "right upper lobe".
    density: "hypodense", "hyperdense", "fat-containing", "solid", "ground-glass", "fluid",
    "calcified" or None. size_cm: drawn diameter; size_class: the nearest ``SIZE_CLASSES_CM``
    entry ("2 cm") or the fluid amount ("small"). hu: the HU painted at ``center_voxel`` (d, h, w).
    """

    kind: str
    organ: str
    side: str | None = None
    location: str | None = None
    density: str | None = None
    size_cm: float | None = None
    size_class: str | None = None
    hu: float | None = None
    center_voxel: tuple[int, int, int] | None = None


@dataclass
class Phantom:
    """hu: (D, H, W) int16 in the canonical orientation; affine: voxel (d, h, w) -> RAS+ mm."""

    index: int
    hu: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    phase: str
    plane: str
    findings: list[Finding]
    organ_hu: dict[str, float] = field(default_factory=dict)

    @property
    def labels(self) -> dict[str, int]:
        present = {f.kind for f in self.findings}
        return {label: int(label in present) for label in LABELS}


class _Grid:
    """Voxel-centre coordinates in mm (z up, y posterior, x to the patient's left), centred at 0."""

    def __init__(self, size: tuple[int, int, int]):
        self.size = size
        self.spacing = tuple(f / n for f, n in zip(FOV_MM, size))
        self.axes = [((np.arange(n, dtype=np.float32) + 0.5) * s - f / 2)
                     for n, s, f in zip(size, self.spacing, FOV_MM)]
        self.ramp = float(np.mean(self.spacing))  # width of a partial-volume edge

    def box(self, center, half_extent) -> tuple[slice, slice, slice] | None:
        """Index box covering center +- half_extent (mm); None when it misses the grid."""
        box = []
        for axis, c, e, s, n in zip(self.axes, center, half_extent, self.spacing, self.size):
            if not math.isfinite(e):
                box.append(slice(0, n))
                continue
            lo = max(0, int(np.floor((c - e - axis[0]) / s)))
            hi = min(n, int(np.ceil((c + e - axis[0]) / s)) + 1)
            if lo >= hi:
                return None
            box.append(slice(lo, hi))
        return tuple(box)

    def coords(self, box):
        z, y, x = (a[s] for a, s in zip(self.axes, box))
        return z[:, None, None], y[None, :, None], x[None, None, :]

    def voxel(self, point_mm) -> tuple[int, int, int]:
        return tuple(int(np.clip(round((p - a[0]) / s), 0, n - 1))
                     for p, a, s, n in zip(point_mm, self.axes, self.spacing, self.size))

    def affine(self) -> np.ndarray:
        """Voxel (d, h, w) -> RAS+ mm: d runs to superior (+z), h to posterior (-y RAS), w to the
        patient's left (-x RAS)."""
        sd, sh, sw = self.spacing
        affine = np.zeros((4, 4))
        affine[2, 0], affine[1, 1], affine[0, 2] = sd, -sh, -sw
        affine[:3, 3] = (-self.axes[2][0], -self.axes[1][0], self.axes[0][0])
        affine[3, 3] = 1.0
        return affine


class _Painter:
    """Composites soft-edged ellipsoids into an HU volume."""

    def __init__(self, grid: _Grid, shape_field: np.ndarray):
        self.grid, self.field = grid, shape_field
        self.hu = np.full(grid.size, HU["air"], dtype=np.float32)

    def coverage(self, center, radii, wobble: float = 0.0):
        """(box, fraction of each voxel inside the ellipsoid) or None off the grid; ``wobble`` bends
        the surface by that fraction of the radius along the smooth field."""
        radii = np.asarray(radii, dtype=np.float64)
        box = self.grid.box(center, radii * (1 + wobble) + self.grid.ramp)
        if box is None:
            return None
        z, y, x = self.grid.coords(box)
        rho = np.sqrt(((z - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2
                      + ((x - center[2]) / radii[2]) ** 2)
        if wobble:
            rho = rho / (1 + wobble * self.field[box])
        finite = radii[np.isfinite(radii)]
        scale = float(np.exp(np.mean(np.log(finite))))  # mm per unit of rho near the surface
        return box, np.clip(0.5 - (rho - 1) * scale / self.grid.ramp, 0.0, 1.0).astype(np.float32)

    def paint(self, center, radii, hu, wobble: float = 0.0, within=None):
        """Blend ``hu`` (a number or a full-volume array) into the ellipsoid; ``within(z, y, x)``
        optionally scales the coverage (0..1). Returns (box, coverage)."""
        covered = self.coverage(center, radii, wobble)
        if covered is None:
            return None
        box, cover = covered
        if within is not None:
            cover = cover * within(*self.grid.coords(box))
        target = hu[box] if isinstance(hu, np.ndarray) else np.float32(hu)
        self.hu[box] += (target - self.hu[box]) * cover
        return box, cover


def _smooth_field(rng: np.random.Generator, grid: _Grid, scale_mm: float) -> np.ndarray:
    """Unit-variance random field smooth over ``scale_mm`` (trilinear upsampling of coarse noise)."""
    coarse = [int(math.ceil(f / scale_mm)) + 1 for f in FOV_MM]
    noise = torch.from_numpy(rng.standard_normal(coarse, dtype=np.float32))[None, None]
    fine = torch.nn.functional.interpolate(noise, size=grid.size, mode="trilinear", align_corners=True)[0, 0]
    return (fine / fine.std().clamp_min(1e-6)).numpy()


def _inside(rng: np.random.Generator, center, radii, max_rho: float, signs=(0, 0, 0), reject=None):
    """A random point within ``max_rho`` of the ellipsoid's normalised radius, on the side of each
    axis that ``signs`` asks for (+1 / -1 / 0 either), and not rejected by ``reject(point)``; None
    when 200 draws found none."""
    for _ in range(200):
        u = rng.uniform(-1, 1, 3)
        if np.linalg.norm(u) > 1:
            continue
        u = np.array([abs(v) * s if s else v for v, s in zip(u, signs)]) * max_rho
        point = tuple(float(c + r * v) for c, r, v in zip(center, radii, u))
        if reject is None or not reject(point):
            return point
    return None


def _touches(point, radius: float, ellipsoids) -> bool:
    """Whether a sphere at ``point`` comes within ``radius`` + 3 mm of any (centre, radii) ellipsoid
    (tested on the ellipsoids grown by that margin)."""
    for centre, radii in ellipsoids:
        grown = np.asarray(radii) + radius + 3.0
        if np.sum(((np.asarray(point) - centre) / grown) ** 2) < 1.0:
            return True
    return False


def _size_class(kind: str, rng: np.random.Generator) -> tuple[float, str]:
    """A diameter (cm) jittered around one of the kind's size classes, and that class's name."""
    classes = SIZE_CLASSES_CM[kind]
    cls = float(rng.choice(classes))
    step = min(np.diff(classes)) / 2
    diameter = round(float(cls + rng.uniform(-0.6, 0.6) * step), 1)
    return diameter, f"{cls:g} cm"


def make_phantom(index: int, seed: int = 0, size: tuple[int, int, int] = (64, 128, 128)) -> Phantom:
    """Case ``index`` of the SynthCT data set drawn with ``seed`` on a ``size`` (D, H, W) grid."""
    size = tuple(int(s) for s in size)
    if len(size) != 3 or min(size) < 16:
        raise ValueError(f"size must be three axes (D, H, W) of at least 16 voxels; got {size}")
    rng = np.random.default_rng([seed, index])
    grid = _Grid(size)
    painter = _Painter(grid, _smooth_field(rng, grid, 48.0))
    texture = _smooth_field(rng, grid, 20.0)

    phase = PHASES[int(rng.integers(len(PHASES)))]
    plane = PLANES[int(rng.choice(len(PLANES), p=PLANE_PROBABILITIES))]
    p = PHASES.index(phase)
    organ_hu = {name: float(values[p] + rng.uniform(-5, 5)) for name, values in ENHANCED_HU.items()}
    n_findings = int(rng.choice(len(FINDING_COUNT_PROBABILITIES), p=FINDING_COUNT_PROBABILITIES))
    kinds = set(rng.choice(LABELS, size=n_findings, replace=False).tolist())

    # ---- body: elliptic cylinder along D, fat, muscle wall, interior --------------------------
    body = np.array([np.inf, 115.0, 160.0]) * rng.uniform(0.85, 1.05)
    fat = rng.uniform(10, 25)
    centre_y = rng.uniform(-5, 10)
    z_dia = rng.uniform(20, 45)  # diaphragm height above the field's centre
    origin = (0.0, centre_y, 0.0)
    painter.paint(origin, body, HU["fat"])
    painter.paint(origin, body - [0, fat, fat], HU["muscle"])
    interior = body - [0, fat + 8, fat + 8]
    bowel = np.clip(texture * 1.5 + 0.3, 0.0, 1.0)
    abdomen = (HU["mesentery"] + (HU["bowel"] - HU["mesentery"]) * bowel).astype(np.float32)
    painter.paint(origin, interior, abdomen)
    ay, ax = interior[1], interior[2]

    findings: list[Finding] = []
    if "Ascites" in kinds:
        amount = str(rng.choice(list(FLUID_AMOUNTS)))
        depth = FLUID_AMOUNTS[amount]
        lower = z_dia - 15

        def peritoneal_band(z, y, x):
            rho = np.sqrt(((y - centre_y) / ay) ** 2 + (x / ax) ** 2)
            return ((rho > 1 - depth) & (z < lower) & (y < centre_y + 0.3 * ay)).astype(np.float32)

        painter.paint(origin, interior, HU["fluid"], within=peritoneal_band)
        spot = (lower - 40.0, centre_y - (1 - depth / 2) * ay, 0.0)
        findings.append(Finding("Ascites", "peritoneum", None, "peritoneal cavity", "fluid", None, amount,
                                HU["fluid"], grid.voxel(spot)))

    # ---- abdominal organs (the lungs, painted later, carve the liver's dome) -------------------
    spine_y = centre_y + 0.72 * ay
    jitter = lambda: rng.uniform(-8, 8, 3)  # noqa: E731
    liver_c = np.array([z_dia - 45, centre_y - 0.05 * ay, -0.45 * ax]) + jitter()
    liver_r = np.array([70.0, 0.62 * ay, 0.45 * ax]) * rng.uniform(0.9, 1.1)
    painter.paint(liver_c, liver_r, organ_hu["liver"], wobble=0.06)
    spleen_c = np.array([z_dia - 40, centre_y + 0.3 * ay, 0.62 * ax]) + jitter()
    painter.paint(spleen_c, np.array([50.0, 0.38 * ay, 0.22 * ax]) * rng.uniform(0.9, 1.1),
                  organ_hu["spleen"], wobble=0.06)
    kidneys = {}
    for side, sign in (("right", -1), ("left", 1)):
        c = np.array([z_dia - 90, spine_y - 0.05 * ay, sign * 0.45 * ax]) + jitter()
        r = np.array([50.0, 0.28 * ay, 0.2 * ax]) * rng.uniform(0.9, 1.1)
        painter.paint(c, r, organ_hu["kidney"], wobble=0.04)
        kidneys[side] = (c, r)
    kidney_list = list(kidneys.values())

    # ---- thorax ---------------------------------------------------------------------------------
    lungs = {}
    for side, sign in (("right", -1), ("left", 1)):
        c = np.array([z_dia + 95, centre_y + 0.05 * ay, sign * 0.5 * ax]) + jitter()
        r = np.array([105.0, 0.8 * ay, 0.42 * ax]) * rng.uniform(0.95, 1.05)
        painter.paint(c, r, HU["lung"], wobble=0.04)
        lungs[side] = (c, r)
    fluid_level = {}  # side -> y (mm) below which (posterior) the lung holds fluid
    if "Pleural effusion" in kinds:
        side = str(rng.choice(["right", "left", "bilateral"]))
        amount = str(rng.choice(list(FLUID_AMOUNTS)))
        for s in ("right", "left") if side == "bilateral" else (side,):
            c, r = lungs[s]
            level = fluid_level[s] = c[1] + r[1] * (1 - 2 * FLUID_AMOUNTS[amount])
            painter.paint(c, r, HU["fluid"], wobble=0.04,
                          within=lambda z, y, x, level=level: (y > level).astype(np.float32))
        c, r = lungs["right" if side == "bilateral" else side]
        spot = (c[0] - 0.3 * r[0], c[1] + r[1] * (1 - FLUID_AMOUNTS[amount]), c[2])
        findings.append(Finding("Pleural effusion", "pleura", side, f"{side} pleural space", "fluid", None,
                                amount, HU["fluid"], grid.voxel(spot)))
    heart_scale = rng.uniform(1.3, 1.45) if "Cardiomegaly" in kinds else rng.uniform(0.92, 1.05)
    heart_c = np.array([z_dia + 40, centre_y - 0.3 * ay, 0.12 * ax]) + jitter()
    heart_r = np.array([40.0, 0.32 * ay, 0.28 * ax]) * heart_scale
    painter.paint(heart_c, heart_r, organ_hu["heart"], wobble=0.03)
    if "Cardiomegaly" in kinds:
        findings.append(Finding("Cardiomegaly", "heart", None, "heart", None, None, None,
                                organ_hu["heart"], grid.voxel(heart_c)))

    # ---- spine and aorta (the lungs wrap around them) -------------------------------------------
    spine_r = rng.uniform(15, 19)
    painter.paint((0, spine_y, 0), (np.inf, spine_r, spine_r), HU["cortical"])
    painter.paint((0, spine_y, 0), (np.inf, spine_r - 3, spine_r - 3), HU["cancellous"])
    disc_phase = rng.uniform(0, 32)
    painter.paint((0, spine_y, 0), (np.inf, spine_r - 1, spine_r - 1), HU["disc"],
                  within=lambda z, y, x: (np.mod(z - disc_phase, 32.0) < 7).astype(np.float32))
    painter.paint((0, spine_y + spine_r + 9, 0), (np.inf, 13, 13), HU["cortical"])
    painter.paint((0, spine_y + spine_r + 9, 0), (np.inf, 8, 8), HU["csf"])
    aorta = (0.0, spine_y - spine_r - 13, rng.uniform(10, 20))
    aorta_r = rng.uniform(10, 13)
    painter.paint(aorta, (np.inf, aorta_r, aorta_r), organ_hu["aorta"])
    if "Aortic calcification" in kinds:
        thoracic = bool(rng.integers(2))
        z_range = (z_dia + 10, FOV_MM[0] / 2 - 10) if thoracic else (-FOV_MM[0] / 2 + 10, z_dia - 10)
        plaques = []
        for _ in range(int(rng.integers(3, 7))):
            angle = rng.uniform(0, 2 * np.pi)
            plaque = (rng.uniform(*z_range), aorta[1] + aorta_r * np.sin(angle),
                      aorta[2] + aorta_r * np.cos(angle))
            painter.paint(plaque, (7.0, 4.5, 4.5), PLAQUE_HU)
            plaques.append(plaque)
        findings.append(Finding("Aortic calcification", "aorta", None,
                                "thoracic aorta" if thoracic else "abdominal aorta", "calcified", None,
                                None, PLAQUE_HU, grid.voxel(plaques[0])))

    # ---- focal findings, painted over their organs ----------------------------------------------
    top = FOV_MM[0] / 2
    if "Lung nodule" in kinds:
        diameter, size_class = _size_class("Lung nodule", rng)
        radius = diameter * 5.0
        # lobes in a random order: with a large heart or effusion one lobe may have no room
        for choice in rng.permutation(4):
            side, upper = ("right", "left")[choice // 2], bool(choice % 2)
            c, r = lungs[side]
            z_mid = (c[0] - r[0] + min(c[0] + r[0], top)) / 2  # middle of the lung's part in the field

            def misplaced(point):  # in the other lobe, out of the field, on the heart or in fluid
                z, y = point[0], point[1]
                return ((z > z_mid) != upper or z > top - radius - 5 or abs(z - z_mid) < radius
                        or y + radius + 5 > fluid_level.get(side, np.inf)
                        or _touches(point, radius, [(heart_c, heart_r)]))

            centre = _inside(rng, c, r, 0.7, reject=misplaced)
            if centre is not None:
                break
        else:
            raise RuntimeError(f"SynthCT case {index}: no room for a lung nodule of {diameter} cm")
        density = str(rng.choice(list(NODULE_HU)))
        painter.paint(centre, (radius,) * 3, NODULE_HU[density], wobble=0.08)
        findings.append(Finding("Lung nodule", "lung", side, f"{side} {'upper' if upper else 'lower'} lobe",
                                density, diameter, size_class, NODULE_HU[density], grid.voxel(centre)))
    if "Liver lesion" in kinds:
        diameter, size_class = _size_class("Liver lesion", rng)
        lobe = str(rng.choice(["right", "left"]))
        # the right lobe is the lateral part of the liver (towards the patient's right, -x)
        centre = _inside(rng, liver_c, liver_r, 0.45, signs=(-1, 0, -1 if lobe == "right" else 1),
                         reject=lambda point: _touches(point, diameter * 5.0,
                                                       [(heart_c, heart_r), *kidney_list, *lungs.values()]))
        if centre is None:
            raise RuntimeError(f"SynthCT case {index}: no room for a liver lesion of {diameter} cm")
        density, hu = _lesion_density(rng, organ_hu["liver"])
        painter.paint(centre, (diameter * 5.0,) * 3, hu, wobble=0.08)
        findings.append(Finding("Liver lesion", "liver", None, f"{lobe} hepatic lobe", density, diameter,
                                size_class, hu, grid.voxel(centre)))
    if "Kidney lesion" in kinds:
        side = str(rng.choice(["right", "left"]))
        pole = str(rng.choice(["upper", "lower"]))
        c, r = kidneys[side]
        diameter, size_class = _size_class("Kidney lesion", rng)
        centre = (c[0] + (0.55 if pole == "upper" else -0.55) * r[0], c[1], c[2])
        density, hu = _lesion_density(rng, organ_hu["kidney"])
        painter.paint(centre, (diameter * 5.0,) * 3, hu, wobble=0.08)
        findings.append(Finding("Kidney lesion", "kidney", side, f"{pole} pole of the {side} kidney", density,
                                diameter, size_class, hu, grid.voxel(centre)))
    if "Kidney stone" in kinds:
        side = str(rng.choice(["right", "left"]))
        c, r = kidneys[side]
        diameter, size_class = _size_class("Kidney stone", rng)
        centre = (c[0], c[1], c[2] - np.sign(c[2]) * 0.3 * r[2])  # renal pelvis: medial part
        painter.paint(centre, (max(diameter * 5.0, 2.5),) * 3, STONE_HU)
        findings.append(Finding("Kidney stone", "kidney", side, f"{side} kidney", "calcified", diameter,
                                size_class, STONE_HU, grid.voxel(centre)))

    image = painter.hu + rng.standard_normal(size, dtype=np.float32) * np.float32(NOISE_HU)
    image = _thick_slices(image, PLANE_AXIS[plane])
    hu = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    findings.sort(key=lambda f: LABELS.index(f.kind))
    return Phantom(index, hu, grid.spacing, grid.affine(), phase, plane, findings, organ_hu)


def _lesion_density(rng: np.random.Generator, organ_hu: float) -> tuple[str, float]:
    density = str(rng.choice(["hypodense", "hyperdense", "fat-containing"]))
    return density, FAT_LESION_HU if density == "fat-containing" else organ_hu + LESION_DENSITIES[density]


def _thick_slices(image: np.ndarray, axis: int) -> np.ndarray:
    """Mean of three neighbours along ``axis`` (a slice three voxels thick), edges kept."""
    out = image.copy()
    inner = [slice(None)] * 3
    inner[axis] = slice(1, -1)
    before, after = list(inner), list(inner)
    before[axis], after[axis] = slice(None, -2), slice(2, None)
    out[tuple(inner)] = (image[tuple(before)] + image[tuple(inner)] + image[tuple(after)]) / 3
    return out
