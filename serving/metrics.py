"""Prometheus metrics (one registry per app, so several apps in one process never share counters)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from medvision.serving.engine import ModelInfo

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Histogram("medvision_request_duration_seconds", "HTTP request latency",
                                  ["method", "route", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("medvision_requests_in_flight", "requests being handled", registry=r)
        self.inference = Histogram("medvision_inference_seconds", "model forward time per image",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.scores = Histogram("medvision_probability", "cancer probabilities returned",
                                buckets=tuple(i / 20 for i in range(1, 20)), registry=r)
        self.images = Counter("medvision_images_scored", "images scored, per site, whichever way they came "
                              "(/v1/predict, STOW-RS, C-STORE, pull)", ["site"], registry=r)
        self.refused = Counter("medvision_images_refused", "images refused, by reason, whichever way they came",
                               ["reason"], registry=r)
        self.jobs_queued = Gauge("medvision_jobs_queued", "received studies waiting to be scored", registry=r)
        self.oldest_due_job = Gauge("medvision_oldest_due_job_seconds", "how long the oldest study due for scoring "
                                    "has waited (0: none)", registry=r)
        self.batch_size = Histogram("medvision_batch_size", "images per ONNX Runtime call (micro-batching)",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.queue_depth = Gauge("medvision_queue_depth", "images waiting for the model", registry=r)
        self.dimse_associations = Counter("medvision_dimse_associations", "DICOM associations, by outcome",
                                          ["outcome"], registry=r)
        self.dimse_instances = Counter("medvision_dimse_instances", "instances received by C-STORE, by outcome",
                                       ["outcome"], registry=r)
        self.dependency_errors = Counter("medvision_dependency_unavailable", "requests answered 503 because a "
                                         "dependency did not answer, by dependency", ["dependency"], registry=r)
        self.results_sent = Counter("medvision_results_sent", "reports sent back to the PACS, by route and outcome",
                                    ["via", "outcome"], registry=r)
        self.drift_alarm = Gauge("medvision_drift_alarm", "1 while a site's recent images differ from the model's "
                                 "reference in this quantity (medvision.drift policy)", ["site", "quantity"], registry=r)
        self.drift_effect = Gauge("medvision_drift_effect", "the difference's size: Jensen-Shannon distance "
                                  "(categorical) or Wasserstein-1 (continuous)", ["site", "quantity"], registry=r)
        self.drift_window = Gauge("medvision_drift_window_studies", "studies in the site's drift window", ["site"],
                                  registry=r)
        self.model = Gauge("medvision_model_info", "the served model (value 1)",
                           ["name", "artifact_sha256", "format", "gate"], registry=r)

    def set_model(self, info: ModelInfo) -> None:
        self.model.clear()
        self.model.labels(info.name, info.artifact_sha256[:16], info.format, info.gate).set(1)
