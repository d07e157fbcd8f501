"""Pixel model of a compressed breast: outline, skin, pectoral muscle, 1/f^beta tissue and findings.

Everything here works in a *canonical* frame (chest wall on the left, nipple pointing right) and in
"attenuation" units in [0, 1] where brighter means more attenuating, as a MONOCHROME2 display shows
it. Laterality flips and the vendor-specific mapping to stored values happen in ``vendors.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MALIGNANT_KINDS = ("spiculated_mass", "ill_defined_mass", "calcification_cluster")
BENIGN_KINDS = ("circumscribed_mass", "scattered_calcifications")

# Fraction of fibroglandular tissue by BI-RADS density category (a: fatty ... d: extremely dense).
DENSITY_OFFSET = {"A": -1.4, "B": -0.6, "C": 0.1, "D": 0.8}


@dataclass(frozen=True)
class Finding:
    """A lesion drawn into one image; coordinates are pixels of the canonical frame."""

    kind: str
    malignant: bool
    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class BreastGeometry:
    """Where the breast lies in the canonical frame, shared by both views of one breast."""

    depth: float  # horizontal extent from chest wall, fraction of width
    half_height: float  # vertical semi-axis, fraction of height
    center_y: float  # fraction of height


def power_law_noise(shape: tuple[int, int], beta: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise whose power spectrum falls as 1/f^beta (beta ~ 3 for breast tissue), unit std."""
    h, w = shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    amplitude = f ** (-beta / 2.0)
    amplitude[0, 0] = 0.0
    spectrum = amplitude * (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape))
    field = np.fft.irfft2(spectrum, s=(h, w))
    return ((field - field.mean()) / (field.std() + 1e-12)).astype(np.float32)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def breast_region(
    shape: tuple[int, int], view: str, geom: BreastGeometry, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Return (normalised elliptical radius, pectoral-muscle weight) in the canonical frame.

    The radius is < 1 inside the breast; the MLO view is a rotated, longer ellipse reaching up into
    the axilla with the pectoral muscle as a wedge in the upper chest-wall corner.
    """
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = geom.depth * w
    b = geom.half_height * h
    cy = geom.center_y * h
    # Gentle outline irregularity so no two breasts share a perfect ellipse.
    theta = np.arctan2((yy - cy) / b, xx / a)
    wobble = 1.0 + 0.03 * np.sin(3 * theta + rng.uniform(0, 2 * np.pi)) + 0.02 * np.sin(
        5 * theta + rng.uniform(0, 2 * np.pi)
    )
    if view == "MLO":
        angle = np.deg2rad(rng.uniform(12, 22))
        cy_mlo = cy + 0.06 * h
        xr = xx * np.cos(angle) + (yy - cy_mlo) * np.sin(angle)
        yr = -xx * np.sin(angle) + (yy - cy_mlo) * np.cos(angle)
        radius = np.sqrt((xr / (a * 1.02)) ** 2 + (yr / (b * 1.12)) ** 2) / wobble
        # Pectoral muscle: wedge bounded by the line from (0, p_y) to (p_x, 0), fading into tissue.
        p_y = rng.uniform(0.45, 0.7) * h
        p_x = rng.uniform(0.22, 0.35) * w
        signed = (xx / p_x + yy / p_y) - 1.0  # < 0 inside the wedge
        pectoral = _smoothstep(-signed / 0.04)
        # The axillary tail: the breast reaches the top edge next to the muscle.
        radius = np.minimum(radius, np.where(signed < 0.25, 0.5 + signed, np.inf))
    else:
        radius = np.sqrt((xx / a) ** 2 + ((yy - cy) / b) ** 2) / wobble
        pectoral = np.zeros(shape, np.float32)
        if rng.random() < 0.3:  # pectoral muscle seen at the chest wall on some CC views
            edge = rng.uniform(0.02, 0.05) * w
            pectoral = _smoothstep((edge - xx) / (0.02 * w)) * (np.abs(yy - cy) < 0.6 * b)
    return radius.astype(np.float32), pectoral.astype(np.float32)


def _ellipse_field(xx, yy, f: Finding, aspect: float, angle: float) -> np.ndarray:
    dx, dy = xx - f.x, yy - f.y
    xr = dx * np.cos(angle) + dy * np.sin(angle)
    yr = -dx * np.sin(angle) + dy * np.cos(angle)
    return np.sqrt((xr / (f.radius * aspect)) ** 2 + (yr * aspect / f.radius) ** 2)


def _draw_dot(img: np.ndarray, x: float, y: float, r: float, amp: float, sharp: bool = True) -> None:
    h, w = img.shape
    x0, x1 = max(int(x - 3 * r - 2), 0), min(int(x + 3 * r + 3), w)
    y0, y1 = max(int(y - 3 * r - 2), 0), min(int(y + 3 * r + 3), h)
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    d = np.sqrt((xx - x) ** 2 + (yy - y) ** 2)
    blob = _smoothstep((r + 0.7 - d) / 1.4) if sharp else np.exp(-0.5 * (d / max(r, 0.5)) ** 2)
    img[y0:y1, x0:x1] += amp * blob


def draw_finding(
    canvas: np.ndarray, f: Finding, contrast: float, rng: np.random.Generator
) -> None:
    """Add one finding to ``canvas`` (tissue-attenuation units) in place."""
    h, w = canvas.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if f.kind == "circumscribed_mass":
        # Benign: round / oval with a sharp, smooth margin.
        r = _ellipse_field(xx, yy, f, rng.uniform(0.85, 1.15), rng.uniform(0, np.pi))
        canvas += contrast * _smoothstep((1.0 - r) * f.radius / 1.5) * (0.85 + 0.15 * (1 - np.clip(r, 0, 1)))
    elif f.kind == "ill_defined_mass":
        # Malignant: irregular outline, margin fading into the tissue.
        dx, dy = xx - f.x, yy - f.y
        theta = np.arctan2(dy, dx)
        lobes = 1.0 + sum(
            rng.uniform(0.08, 0.2) * np.sin(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5, 7)
        )
        r = np.sqrt(dx**2 + dy**2) / (f.radius * lobes)
        canvas += contrast * np.exp(-0.5 * (r / 0.75) ** 4) * (1.0 + 0.15 * rng.standard_normal(r.shape) * (r < 1.2))
    elif f.kind == "spiculated_mass":
        # Malignant: dense irregular core with thin radiating spicules.
        dx, dy = xx - f.x, yy - f.y
        d = np.sqrt(dx**2 + dy**2)
        canvas += contrast * np.exp(-0.5 * (d / (0.7 * f.radius)) ** 3)
        for _ in range(int(rng.integers(8, 16))):
            ang = rng.uniform(0, 2 * np.pi)
            length = f.radius * rng.uniform(1.6, 3.2)
            ux, uy = np.cos(ang), np.sin(ang)
            along = dx * ux + dy * uy
            across = np.abs(-dx * uy + dy * ux)
            taper = np.clip(1.0 - along / length, 0, 1)
            width = 0.6 + 1.2 * taper
            line = (along > 0) * (along < length) * np.exp(-0.5 * (across / width) ** 2) * taper
            canvas += 0.7 * contrast * line
    elif f.kind == "calcification_cluster":
        # Malignant: 6-16 small pleomorphic (varied size and shape) calcifications in a tight cluster.
        for _ in range(int(rng.integers(6, 17))):
            rr = f.radius * np.sqrt(rng.random())
            ang = rng.uniform(0, 2 * np.pi)
            cx, cy = f.x + rr * np.cos(ang), f.y + rr * np.sin(ang)
            size = rng.uniform(0.5, 1.4) * max(h, w) / 512
            _draw_dot(canvas, cx, cy, size, 2.2 * contrast * rng.uniform(0.6, 1.2))
            if rng.random() < 0.5:  # linear / branching fragments
                _draw_dot(canvas, cx + rng.uniform(-2, 2), cy + rng.uniform(-2, 2), size * 0.7, 1.5 * contrast)
    elif f.kind == "scattered_calcifications":
        # Benign: few, larger, round, evenly dense calcifications spread widely.
        for _ in range(int(rng.integers(3, 9))):
            cx = f.x + rng.uniform(-1, 1) * f.radius
            cy = f.y + rng.uniform(-1, 1) * f.radius
            size = rng.uniform(1.6, 3.0) * max(h, w) / 512
            _draw_dot(canvas, cx, cy, size, 2.2 * contrast)
    else:
        raise ValueError(f"unknown finding kind {f.kind!r}")


def render_breast(
    shape: tuple[int, int],
    view: str,
    geom: BreastGeometry,
    density: str,
    findings: list[Finding],
    contrast: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Render one view in the canonical frame; returns attenuation in [0, 1] (0 = air)."""
    radius, pectoral = breast_region(shape, view, geom, rng)
    inside = radius < 1.0
    # Compressed breast: constant thickness centrally, falling off towards the skin edge.
    thickness = _smoothstep((1.0 - radius) / 0.18) ** 0.7
    tissue = power_law_noise(shape, beta=rng.uniform(2.8, 3.2), rng=rng)
    fine = power_law_noise(shape, beta=2.0, rng=rng)
    # Fibroglandular tissue concentrates behind the nipple, away from the skin.
    central = np.clip(1.0 - radius, 0, 1) ** 0.5
    gland = 1.0 / (1.0 + np.exp(-(1.2 * tissue + DENSITY_OFFSET[density] + 0.8 * central - 0.4) / 0.9))
    lesions = np.zeros(shape, np.float32)
    for f in findings:
        draw_finding(lesions, f, contrast, rng)
    attenuation = 0.32 + 0.36 * gland + 0.03 * fine + lesions
    img = thickness * attenuation
    img += 0.22 * pectoral * inside * (0.9 + 0.1 * fine)
    skin = np.exp(-0.5 * ((radius - 0.985) / 0.008) ** 2)
    img += 0.10 * skin
    img = np.where(radius < 1.02, img, 0.0)
    img += 0.012 * rng.standard_normal(shape)  # quantum noise, also in the background
    return np.clip(img, 0.0, 1.0).astype(np.float32)
