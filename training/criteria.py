"""The promotion gate's limits, in one place: ``medvision gate``, ``medvision quantize`` (which keeps only INT8
candidates within them) and their command-line defaults all read ``GateCriteria``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GateCriteria:
    max_auroc_drop: float = 0.01  # teacher - student AUROC on the held-out split
    max_sensitivity_drop: float = 0.02  # at the stored operating points
    min_agreement: float = 0.99  # a quantized model's decisions agreeing with its fp32 source
    non_inferiority: bool = False  # decide on the upper 95 % bounds of the drops instead of point estimates
    # the artifact decoded under its own contract (preprocess.decode_long_side) against the same artifact decoding
    # every pixel: AUROC lost to the contract (full - contract), and decisions agreeing between the two
    max_contract_auroc_drop: float = 0.005
    min_contract_agreement: float = 0.99


DEFAULT = GateCriteria()
