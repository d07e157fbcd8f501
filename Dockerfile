# The serving image: ONNX Runtime + FastAPI, no torch. Build: docker build -t medvision-serve .
# Run:   docker run -p 8000:8000 -v $PWD/model.onnx:/models/model.onnx:ro -v medvision-data:/data medvision-serve
# Other commands: docker run --rm -v medvision-data:/data medvision-serve keys create site-a --scopes score
# A whole stack (PostgreSQL, an Orthanc PACS wired to it): compose.yaml.
# Put it behind a TLS proxy (docs/security.md): it binds 0.0.0.0, so the review UI's cookie is marked Secure.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY medvision ./medvision
COPY training ./training
COPY serving ./serving
RUN pip wheel --no-cache-dir --no-deps -w /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    MEDVISION_ARTIFACT=/models/model.onnx MEDVISION_HOST=0.0.0.0 MEDVISION_PORT=8000 \
    MEDVISION_UI_SECURE_COOKIES=true \
    MEDVISION_DATA_DIR=/data MEDVISION_DATABASE_URL=sqlite:////data/medvision.db
COPY --from=build /wheels /wheels
RUN WHEEL=$(ls /wheels/medvision_radiology-*.whl) && pip install --no-cache-dir "${WHEEL}[serve,cpu]" && rm -rf /wheels \
 && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
 && useradd --system --uid 10001 --no-create-home medvision \
 && mkdir -m 0700 /data && chown 10001 /data
USER 10001
WORKDIR /data
VOLUME /data
EXPOSE 8000 11112
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
ENTRYPOINT ["medvision"]
CMD ["serve"]
