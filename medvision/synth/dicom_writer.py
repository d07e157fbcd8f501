"""Write a synthetic view as a Digital Mammography X-Ray Image Storage - For Presentation object."""

from __future__ import annotations

import datetime as _dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, HTJ2KLossless, HTJ2KLosslessRPCL
from pydicom.uid import (
    DigitalMammographyXRayImageStorageForPresentation as MG_FOR_PRESENTATION,
)

from medvision import __version__
from medvision.errors import ConfigError
from medvision.synth.vendors import Vendor

# SNOMED CT codes (DICOM CID 4014 view, CID 4031 region).
VIEW_CODES = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}
BREAST_CODE = ("76752008", "Breast")
# Patient Orientation (row direction \ column direction) in the conventional display: chest wall
# away from the viewer's centre line, i.e. right breasts point left and left breasts point right.
ORIENTATION = {("R", "CC"): ["P", "L"], ("L", "CC"): ["A", "R"], ("R", "MLO"): ["P", "F"], ("L", "MLO"): ["A", "F"]}


@dataclass(frozen=True)
class ImageRecord:
    """The identifiers and labels of one synthetic image."""

    patient_id: str
    patient_name: str
    age: int
    study_uid: str
    series_uid: str
    sop_uid: str
    accession: str
    laterality: str
    view: str
    instance_number: int
    study_date: _dt.date


def _code(value: str, meaning: str, scheme: str = "SCT") -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def build_dataset(
    stored: np.ndarray,
    rec: ImageRecord,
    vendor: Vendor,
    window: tuple[float, float],
    pixel_spacing_mm: float,
) -> Dataset:
    """Assemble the dataset (uncompressed); ``save`` compresses it if asked."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MG_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = rec.sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"MEDVISION_{__version__}"[:16]

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.SOPClassUID = MG_FOR_PRESENTATION
    ds.SOPInstanceUID = rec.sop_uid
    date = rec.study_date.strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "093000"
    ds.AccessionNumber = rec.accession
    ds.Modality = "MG"
    ds.Manufacturer = vendor.manufacturer
    ds.InstitutionName = "medvision synthetic site"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "SYNTHETIC screening mammography"
    ds.SeriesDescription = f"{rec.laterality} {rec.view}"
    ds.ManufacturerModelName = vendor.model_name
    ds.SoftwareVersions = f"medvision {__version__}"
    ds.DeviceSerialNumber = str(vendor.machine_id)
    ds.PatientName = rec.patient_name
    ds.PatientID = rec.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "F"
    ds.PatientAge = f"{rec.age:03d}Y"
    ds.BodyPartExamined = "BREAST"
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.DetectorType = "DIRECT"
    ds.ImagerPixelSpacing = [f"{pixel_spacing_mm:.4f}", f"{pixel_spacing_mm:.4f}"]
    ds.StudyInstanceUID = rec.study_uid
    ds.SeriesInstanceUID = rec.series_uid
    ds.StudyID = rec.accession[-8:]
    ds.SeriesNumber = 1
    ds.InstanceNumber = rec.instance_number
    ds.PatientOrientation = ORIENTATION[(rec.laterality, rec.view)]
    ds.ImageLaterality = rec.laterality
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.AnatomicRegionSequence = Sequence([_code(*BREAST_CODE)])
    view_item = _code(*VIEW_CODES[rec.view])
    view_item.ViewModifierCodeSequence = Sequence()
    ds.ViewCodeSequence = Sequence([view_item])
    ds.AcquisitionContextSequence = Sequence()
    ds.OrganExposed = "BREAST"
    ds.BreastImplantPresent = "NO"
    ds.PartialView = "NO"

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = vendor.photometric
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = vendor.bits_stored
    ds.HighBit = vendor.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1 if vendor.photometric == "MONOCHROME1" else 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "INVERSE" if vendor.photometric == "MONOCHROME1" else "IDENTITY"
    ds.WindowCenter = f"{window[0]:.0f}"
    ds.WindowWidth = f"{window[1]:.0f}"
    ds.VOILUTFunction = vendor.voi_function
    ds.WindowCenterWidthExplanation = "SYNTHETIC DEFAULT"
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    ds.set_original_encoding(False, True)  # explicit VR, little endian
    return ds


HTJ2K_LOSSLESS = (HTJ2KLossless, HTJ2KLosslessRPCL)


def save(ds: Dataset, path: Path, transfer_syntax: str) -> None:
    """Write ``ds`` as a conformant Part 10 file, compressing losslessly when asked (HTJ2K with OpenJPH's
    ``ojph_compress``, which no Python package here replaces: Debian ``openjph-tools``)."""
    if transfer_syntax in HTJ2K_LOSSLESS:
        order = "RPCL" if transfer_syntax == HTJ2KLosslessRPCL else "LRCP"
        encapsulated(ds, htj2k_codestream(ds.pixel_array, ds.BitsStored, "-reversible", "true", "-prog_order", order),
                     transfer_syntax)
    elif transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax, encoding_plugin=_encoder_for(transfer_syntax), generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def encapsulated(ds: Dataset, codestream: bytes, transfer_syntax: str) -> Dataset:
    """``ds`` (changed in place) with ``codestream`` as its one encapsulated frame, in ``transfer_syntax``."""
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    return ds


def htj2k_codestream(pixels: np.ndarray, bits_stored: int, *options: str) -> bytes:
    """``pixels`` (unsigned, ``bits_stored`` deep) as an HTJ2K codestream written by ``ojph_compress`` with
    ``options`` (its own: ``-reversible true`` for lossless, ``-prog_order``, ``-block_size``, ...)."""
    import shutil
    import subprocess
    import tempfile

    tool = shutil.which("ojph_compress")
    if tool is None:
        raise ConfigError("writing HTJ2K needs OpenJPH's ojph_compress (Debian package openjph-tools)")
    rows, columns = pixels.shape
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "in.pgm", Path(tmp) / "out.j2c"
        source.write_bytes(b"P5\n%d %d\n%d\n" % (columns, rows, (1 << bits_stored) - 1) + pixels.astype(">u2").tobytes())
        subprocess.run([tool, "-i", str(source), "-o", str(out), *options], check=True, capture_output=True, timeout=120)
        return out.read_bytes()


def _encoder_for(transfer_syntax: str) -> str:
    # Pin the encoder so output does not depend on which optional plugins happen to be installed.
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

    return {RLELossless: "pydicom", JPEGLSLossless: "pyjpegls", JPEG2000Lossless: "pylibjpeg"}[transfer_syntax]


def uid_for(*parts: object) -> str:
    """A deterministic UID in the 2.25 (UUID-derived) form, from a hash of the given parts.

    pydicom's ``generate_uid(prefix=None)`` ignores its entropy sources, so derive it here.
    """
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"
