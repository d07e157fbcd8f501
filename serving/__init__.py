"""The FastAPI + ONNX Runtime service. Installed as ``medvision.serving``; never imports torch."""
