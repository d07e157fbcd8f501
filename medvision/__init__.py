"""medvision: DICOM-correct radiology AI, from synthetic mammograms to a served ONNX model.

The core package holds what every stage shares (DICOM reading, preprocessing, the artifact
schema, the synthetic dataset); ``medvision.training`` (torch) and ``medvision.serving``
(onnxruntime) build on it and are never imported from here.
"""

__version__ = "0.1.0"
