"""The heatmap Secondary Capture: colours land where the model looked, in the image's own orientation,
and the object is valid for dciodvfy."""

import subprocess

import numpy as np
import pydicom
from helpers import require_tool
from pydicom.uid import generate_uid

from medvision.serving.engine import Engine
from medvision.serving.heatmap_capture import build_capture, overlay


def test_hot_cell_maps_back_through_crop_flip_and_resize(artifact, dicom_files):
    engine = Engine(artifact)
    flips = set()
    for path in dicom_files[:8]:  # both lateralities: some images are flipped to chest wall left, some not
        stored, meta = engine.preprocess.read(path)  # as the model's contract decodes it
        geo = engine.preprocess.geometry(stored, meta)
        flips.add(geo.flipped)
        _, heat = engine.run_with_heatmap(engine.preprocess(stored, meta)[None])
        gh, gw = heat.shape[2:]
        fake = np.zeros((1, 1, gh, gw), np.float32)
        fake[0, 0, gh // 2, gw // 4] = 5.0  # one hot cell, off-centre so a wrong flip would show

        def run_with_heatmap(x, fake=fake):
            return np.array([0.5]), fake

        engine.run_with_heatmap = run_with_heatmap
        rgb, _ = overlay(engine, path)
        del engine.run_with_heatmap
        red = rgb[..., 0].astype(int) - rgb[..., 2].astype(int)  # the hot end of the ramp is red
        y, x = np.unravel_index(np.argmax(red), red.shape)
        scale = max(meta.rows, meta.columns) / max(rgb.shape[:2])  # capture pixels -> image pixels
        ix, iy = geo.to_input((x + 0.5) * scale, (y + 0.5) * scale)
        cell = (int(iy / geo.size * gh), int(ix / geo.size * gw))
        assert abs(cell[0] - gh // 2) <= 1 and abs(cell[1] - gw // 4) <= 1, (path.name, cell, geo.flipped)
    assert flips == {True, False}


def test_capture_is_a_valid_secondary_capture_of_the_same_study(artifact, dicom_files, tmp_path):
    engine = Engine(artifact)
    capture = build_capture(engine, dicom_files[2], generate_uid(), 1)
    ref = pydicom.dcmread(dicom_files[2], stop_before_pixels=True)
    assert capture.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and capture.StudyInstanceUID == ref.StudyInstanceUID
    assert capture.PhotometricInterpretation == "RGB" and capture.BurnedInAnnotation == "NO"
    assert capture.SourceImageSequence[0].ReferencedSOPInstanceUID == ref.SOPInstanceUID
    path = tmp_path / "sc.dcm"
    capture.save_as(path, enforce_file_format=True)
    out = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors
