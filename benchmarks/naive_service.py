"""What a team would otherwise run: FastAPI + pydicom ``pixel_array`` + a timm ViT in torch fp32, one forward per
request. The peer of ``benchmarks/fullfield.py``; started there as its own process:

    NAIVE_MODEL=vit_small_patch16_224 python -m uvicorn naive_service:app --app-dir benchmarks --port 8100

No medvision code: the whole image is decoded, scaled to [0, 1] by its own range, resized to 224 x 224 with
antialiasing and scored (random weights: nothing can be downloaded here, and weights do not change the cost).
"""

from __future__ import annotations

import io
import os

import numpy as np
import pydicom
import timm
import torch
import torch.nn.functional as F
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

torch.set_grad_enabled(False)
MODEL = timm.create_model(os.environ.get("NAIVE_MODEL", "vit_small_patch16_224"), pretrained=False, in_chans=1,
                          num_classes=1).eval()
app = FastAPI()


@app.get("/readyz")
def ready() -> dict:
    return {"status": "ready"}


@app.post("/v1/predict")
async def predict(request: Request) -> dict:
    body = await request.body()
    return await run_in_threadpool(_score, body)  # off the event loop: concurrent requests decode side by side


def _score(body: bytes) -> dict:
    pixels = pydicom.dcmread(io.BytesIO(body)).pixel_array.astype(np.float32)
    lo, hi = float(pixels.min()), float(pixels.max())
    x = torch.from_numpy((pixels - lo) / max(hi - lo, 1.0))[None, None]
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    probability = torch.sigmoid(MODEL((x - 0.5) / 0.5)).item()
    return {"probability": probability}
