"""Synthetic screening sites: the images a model is built on, and a site whose images differ the way real sites do.

Published evaluations of mammography AI found that a threshold set on one vendor's images moved the cancer
detection rate by a third on another's, and that age and density mixes moved it too. The "shifted" site makes
that testable here: another vendor's processing curve, fainter lesions after that processing, more noise, an older
population, and its own identifiers (patients, UIDs) so both sites can live in one archive.
"""

from __future__ import annotations

from dataclasses import dataclass

from medvision.synth.vendors import SHIFTED_VENDOR, VENDORS, Vendor


@dataclass(frozen=True)
class SiteProfile:
    name: str
    vendors: tuple[Vendor, ...]
    lesion_contrast: float  # multiplies the findings' contrast
    noise: float  # standard deviation of noise added to attenuation (0..1 scale)
    ages: tuple[int, int]  # uniform, years [low, high)
    patient_base: int  # patient ids start here
    site_id: int | None  # the labels' site_id; None: by vendor (1 or 2), as the reference data always had
    description: str


SITES: dict[str, SiteProfile] = {
    "reference": SiteProfile("reference", VENDORS, 1.0, 0.0, (40, 80), 10000, None,
                             "three vendors (Aurora, Borealis, Cygnus), ages 40-79"),
    "shifted": SiteProfile("shifted", (SHIFTED_VENDOR,), 0.7, 0.012, (55, 90), 60000, 3,
                           "one vendor none of the reference images come from (Draco DR-7: flatter processing "
                           "curve, sigmoid VOI LUT), findings 30 % fainter after its processing, more noise, ages "
                           "55-89"),
}
