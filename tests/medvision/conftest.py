import copy

import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

from medvision.synth.dataset import example_image
from medvision.synth.dicom_writer import save
from medvision.synth.vendors import VENDORS

MATRIX_SYNTAXES = [ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless]


@pytest.fixture(scope="session")
def matrix(tmp_path_factory):
    """One 1024 x 832 view per vendor of the generator, written in each transfer syntax the generator uses:
    ``{(machine_id, syntax): path}``. Read only."""
    out = tmp_path_factory.mktemp("matrix")
    files = {}
    for vendor in VENDORS:
        ds = example_image(vendor, 1024, 832, seed=1)
        for syntax in MATRIX_SYNTAXES:
            path = out / f"{vendor.machine_id}-{syntax}.dcm"
            save(copy.deepcopy(ds), path, syntax)
            files[(vendor.machine_id, syntax)] = path
    return files
