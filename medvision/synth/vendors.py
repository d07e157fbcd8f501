"""Fictional detector vendors: each maps attenuation to stored pixel values its own way.

Real archives mix vendors whose raw values differ in bit depth, polarity, curve and default
window; a reader that ignores Photometric Interpretation or the VOI LUT gets them wrong. The
names are invented so nobody mistakes this for real vendor data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)


@dataclass(frozen=True)
class Vendor:
    manufacturer: str
    model_name: str
    machine_id: int
    bits_stored: int
    photometric: str  # MONOCHROME1 stores bright-for-air; MONOCHROME2 bright-for-tissue
    gamma: float  # stored ~ offset + span * attenuation**gamma (before polarity)
    offset: int
    voi_function: str  # LINEAR or SIGMOID
    transfer_syntaxes: tuple[str, ...]


VENDORS: tuple[Vendor, ...] = (
    Vendor("Aurora Imaging Labs", "Aurora DM-1", 21, 12, "MONOCHROME2", 1.0, 180, "LINEAR",
           (ExplicitVRLittleEndian, JPEG2000Lossless)),
    Vendor("Borealis Medical", "BX Mammo 14", 29, 14, "MONOCHROME1", 0.8, 900, "SIGMOID",
           (ExplicitVRLittleEndian, JPEGLSLossless)),
    Vendor("Cygnus Systems", "Cygnus FFDM", 48, 12, "MONOCHROME2", 1.4, 60, "LINEAR",
           (ExplicitVRLittleEndian, RLELossless)),
)

# Only at the "shifted" site (``sites.SITES``): a vendor none of the others resemble, with a flatter processing
# curve (gamma 0.55) and a sigmoid VOI LUT, the way a model meets a new site's equipment.
SHIFTED_VENDOR = Vendor("Draco Diagnostics", "Draco DR-7", 63, 14, "MONOCHROME2", 0.55, 400, "SIGMOID",
                        (ExplicitVRLittleEndian, JPEG2000Lossless))


def to_stored(attenuation: np.ndarray, vendor: Vendor) -> np.ndarray:
    """Map attenuation in [0, 1] to this vendor's unsigned stored values."""
    top = (1 << vendor.bits_stored) - 1
    span = top - 2 * vendor.offset
    values = vendor.offset + span * np.clip(attenuation, 0, 1) ** vendor.gamma
    if vendor.photometric == "MONOCHROME1":
        values = top - values
    return np.clip(np.rint(values), 0, top).astype(np.uint16)


def default_window(stored: np.ndarray, breast: np.ndarray) -> tuple[float, float]:
    """Window centre / width a vendor console would pick: the breast's 1st to 99.99th percentile."""
    values = stored[breast] if breast.any() else stored.ravel()
    lo, hi = np.percentile(values, [1.0, 99.99])
    width = max(float(hi - lo) * 1.1, 2.0)
    return float(round((lo + hi) / 2.0)), float(round(width))
