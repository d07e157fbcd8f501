"""The result of a scored study as a DICOM Structured Report (TID 1500 Measurement Report, via highdicom).

One measurement group per scored image, referencing it as the source image: the model's calibrated
probability of cancer (DCM 111047) and a qualitative evaluation at the operating point (Abnormal /
Normal), with the algorithm's identity (model name, artifact hash, operating point, threshold) and what the
probability means (the calibration that made it and the cancer share it was calibrated on) in the group's
Algorithm Identification. The observer is the device (medvision), never a
person. The SR joins the source study (same Study Instance UID, patient and study attributes copied
from the images by highdicom), in a new series, so the PACS files it with the exam.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from medvision import __version__

if TYPE_CHECKING:
    from medvision.serving.engine import ModelInfo

# Codes that no standard context group defines: a private scheme, declared as such.
_AT_OPERATING_POINT = hd.sr.CodedConcept("MV0001", "99MEDVISION", "Cancer suspected at the model operating point")
DEVICE_UID_ROOT = "2.25."


@dataclass(frozen=True)
class ImageScore:
    sop_instance_uid: str
    probability: float
    above_threshold: bool
    threshold: float | None = None  # the one the call was made at (a site calibration's), else the model's
    meaning: tuple[str, ...] = ()  # what the probability is relative to (site_calibrations.Meaning.parameters())


def derived_uid(*parts: object) -> str:
    """A UID that depends only on ``parts`` (pydicom's root, a hash of them): the same report made twice is the same
    SOP Instance, so a PACS files it once, and a changed report (more images, another model or calibration) is a
    new one."""
    return generate_uid(entropy_srcs=["medvision", *map(repr, parts)])


def report_uids(site: str, study_instance_uid: str, model: ModelInfo, scores: list[ImageScore]) -> tuple[str, str]:
    """``(series, SOP instance)`` UIDs of the report on one study of one site: one series per study and model; one
    instance per content (what was scored, with what probability, at which threshold and calibration)."""
    series = derived_uid("report series", site, study_instance_uid, model.artifact_sha256)
    content = sorted((s.sop_instance_uid, round(float(s.probability), 6), s.above_threshold, s.threshold, s.meaning)
                     for s in scores)
    return series, derived_uid("report", series, content)


def build_sr(sources: list[Dataset], scores: list[ImageScore], model: ModelInfo, series_number: int = 9901,
             instance_number: int = 1, uids: tuple[str, str] | None = None) -> hd.sr.Comprehensive3DSR:
    """``sources``: the scored images (headers suffice); ``model``: the engine's ``model_info()``; ``uids``: the
    report's series and SOP Instance UIDs (``report_uids``; new random ones when None)."""
    series_uid, sop_uid = uids or (generate_uid(), generate_uid())
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    missing = [s.sop_instance_uid for s in scores if s.sop_instance_uid not in by_uid]
    if missing or not scores:
        raise ValueError(f"{len(missing)} scored image(s) have no source dataset" if missing else "nothing scored")
    def algorithm(s: ImageScore) -> hd.sr.AlgorithmIdentification:
        return hd.sr.AlgorithmIdentification(
            name=model.name[:64], version=model.artifact_sha256[:16],
            parameters=[f"threshold={s.threshold if s.threshold is not None else model.threshold:.6f}",
                        f"operating point: {model.operating_point}"[:64], f"format={model.format}", f"gate={model.gate}",
                        *s.meaning],
        )

    groups = []
    for i, s in enumerate(scores, start=1):
        ds = by_uid[s.sop_instance_uid]
        source = hd.sr.SourceImageForMeasurementGroup.from_source_image(ds)
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid("tracking", sop_uid, s.sop_instance_uid),
                                                         identifier=f"image {i}"),
            algorithm_id=algorithm(s),
            finding_sites=[hd.sr.FindingSite(codes.SCT.Breast)],
            source_images=[source],
            measurements=[hd.sr.Measurement(name=codes.DCM.ProbabilityOfCancer, value=round(float(s.probability), 6),
                                            unit=codes.UCUM.NoUnits, algorithm_id=algorithm(s))],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                name=_AT_OPERATING_POINT, value=codes.SCT.Abnormal if s.above_threshold else codes.SCT.Normal)],
        ))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=DEVICE_UID_ROOT + str(int(model.artifact_sha256[:30], 16)), name="medvision",
            manufacturer_name="medvision", model_name=model.name[:64]),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.Mammography,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    first = by_uid[scores[0].sop_instance_uid]
    return hd.sr.Comprehensive3DSR(
        evidence=[by_uid[s.sop_instance_uid] for s in scores],
        content=report,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer="medvision",
        is_complete=True,
        is_final=False,  # an algorithm's result awaiting a reader: not a verified, final report
        is_verified=False,
        institution_name=str(getattr(first, "InstitutionName", "") or "") or None,
        software_versions=__version__,
        series_description="medvision AI result (research use only)",
    )
