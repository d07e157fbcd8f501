"""Service settings, read from the environment (``MEDVISION_*``) by pydantic-settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MEDVISION_", extra="ignore", protected_namespaces=())

    artifact: str = Field("model.onnx", description="ONNX artifact written by 'medvision export'")
    threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0: one where decoding processes fill the "
                         "cores (a distilled student's call gains nothing from more, and waking them costs CPU; a large "
                         "model answering requests one at a time may want more), else one per physical core the service may run on "
                         "(within its CPU quota)")
    providers: list[str] | None = Field(None, description="execution providers in order; default: CUDA if present, else CPU")
    batch_max_size: int = Field(8, ge=1, description="micro-batching: most images per model call (1 = off)")
    batch_max_wait_ms: float = Field(5.0, ge=0, description="micro-batching: longest wait for company")
    queue_max: int = Field(64, ge=1, description="requests allowed in at once (being received, decoded or waiting for the "
                           "model); beyond it a request is refused at once with 429 and Retry-After")
    request_timeout_s: float = Field(60.0, gt=0, description="a request waiting longer for the model gets 503")
    decode_processes: int | None = Field(None, ge=0, description="decode uploads and received studies in this many "
                                         "worker processes (default: one per core when there are several; 0: in "
                                         "threads of the service process). Threads decode about one image at a time "
                                         "(parsing and several codecs hold the GIL); processes use every core and "
                                         "survive a codec that crashes. A request alone in the service is decoded in "
                                         "its own thread (no hop to a process)")
    decode_ahead: bool = Field(True, description="a request alone in the service whose body (JPEG 2000, HTJ2K or "
                               "uncompressed) arrives slowly enough (from across a network) has its image read from "
                               "the bytes in while the rest arrives (medvision.read_ahead): the same pixels, answered "
                               "sooner")
    decode_timeout_s: float = Field(30.0, gt=0, description="a file whose decoding in a worker process takes longer "
                                    "than this, alone, is refused (decode_too_slow) and its worker stopped")
    max_upload_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="largest accepted DICOM request body "
                                  "(/v1/predict, STOW-RS), counted as it streams in however it is framed")
    max_form_bytes: int = Field(64 * 1024, ge=1024, description="largest accepted body on every other route (JSON "
                                "and form requests)")
    max_stow_parts: int = Field(200, ge=1, description="most instances in one STOW-RS request (a larger study is "
                                "sent in several requests)")
    max_pixels: int = Field(80_000_000, ge=1, description="largest declared rows x columns x frames")
    decode_long_side: int | None = Field(None, ge=0, description="the decode contract this deployment validated "
                                         "(the artifact's preprocess.decode_long_side; 0: full resolution): a model "
                                         "trained under another is refused at start-up. Unset: the artifact's own")
    key_cache_seconds: float = Field(5.0, ge=0, description="a verified API key is trusted this long without a "
                                     "database lookup; a revoked key stops working within it (0: look up every "
                                     "request)")
    database_url: str = Field("sqlite:///medvision_data/medvision.db",
                              description="SQLAlchemy URL: sqlite:///path (WAL) or postgresql+psycopg://user@host/db")
    data_dir: str = Field("medvision_data", description="received instances (instances/), reports (reports/), the "
                          "review UI's renderings (renders/); created 0700, files 0600")
    render_cache_bytes: int = Field(512 * 1024 * 1024, ge=0, description="review UI: most bytes of rendered PNGs "
                                    "kept on disk (the least recently used go first; 0: no cache)")
    decoded_cache_bytes: int = Field(256 * 1024 * 1024, ge=0, description="review UI: most bytes of decoded pixels "
                                     "kept in memory, so a study's window presets, renderings, heatmaps and window "
                                     "changes decode each image once (the least recently used go first; 0: none)")
    pacs_url: str | None = Field(None, description="DICOMweb root of the PACS to store reports into by STOW-RS")
    pacs_username: str | None = Field(None, description="HTTP basic auth user for pacs_url")
    pacs_password: str | None = Field(None, description="HTTP basic auth password for pacs_url")
    heatmap_capture: bool = Field(False, description="with each SR, a Secondary Capture per image with the heatmap "
                                  "overlaid (stored next to the SR and sent to the PACS with it)")
    study_stable_seconds: float = Field(2.0, ge=0, description="score a received study once no instance of it "
                                        "arrived for this long (one report per study, not one per request)")
    drift_window_images: int = Field(2000, ge=10, description="drift watch: each site's most recent scored images "
                                     "compared with the artifact's reference")
    drift_min_studies: int = Field(100, ge=1, description="drift watch: no alarm from fewer studies than this")
    drift_alpha: float = Field(0.001, gt=0, lt=1, description="drift watch: false-alarm rate per window of an "
                               "unchanged site (shared among the quantities, Bonferroni)")
    drift_interval_s: float = Field(300.0, gt=0, description="drift watch: Prometheus gauges at most this old")
    job_workers: int = Field(1, ge=0, description="threads scoring received studies (0: receive only)")
    job_lease_seconds: float = Field(60.0, gt=0, description="a crashed worker's job is taken over after this")
    dimse_port: int | None = Field(None, ge=0, le=65535, description="DICOM storage SCP port (C-ECHO, C-STORE in); "
                                   "unset: no DICOM node (0: any free port)")
    dimse_host: str = Field("127.0.0.1", description="address the DICOM node binds")
    dimse_ae_title: str = Field("MEDVISION", min_length=1, max_length=16, description="the node's AE title")
    dimse_callers: str = Field("", description="who may send: AET=SITE[@ADDRESS] entries, comma-separated (the site "
                               "owns what that AE sends; an address pins it); anyone else is refused at association")
    dimse_max_associations: int = Field(20, ge=1, description="associations at once (a PACS burst: several "
                                        "associations of a few instances each)")
    dimse_acse_timeout: float = Field(30.0, gt=0, description="seconds to wait for association messages")
    dimse_dimse_timeout: float = Field(60.0, gt=0, description="seconds to wait for a DIMSE message")
    dimse_network_timeout: float = Field(120.0, gt=0, description="seconds an idle association is kept")
    dimse_min_free_bytes: int = Field(1 << 30, ge=0, description="below this much free disk in the data folder, "
                                      "C-STORE answers 0xA700 (out of resources) before writing")
    dimse_tls_cert: str | None = Field(None, description="PEM certificate for DICOM over TLS (PS3.15); with the key")
    dimse_tls_key: str | None = Field(None, description="PEM private key of dimse_tls_cert")
    dimse_tls_ca: str | None = Field(None, description="PEM CA bundle: callers must present a certificate it signed")
    dimse_destination: str | None = Field(None, description="where reports go back by C-STORE: AET@HOST:PORT")
    dimse_destination_tls: bool = Field(False, description="send to the destination over TLS (verified with "
                                        "dimse_tls_ca, or the system's CAs)")
    ui_session_minutes: float = Field(30.0, gt=0, description="review UI: a session ends after this long without "
                                      "activity")
    ui_secure_cookies: bool | None = Field(None, description="review UI: mark the session cookie Secure (HTTPS "
                                           "only). Default: on unless the service binds a loopback address (behind a "
                                           "TLS proxy on the same host, or local use)")
    forwarded_allow_ips: str = Field("127.0.0.1,::1", description="addresses of the reverse proxies whose "
                                     "X-Forwarded-For is trusted for the client's address (comma-separated, as "
                                     "uvicorn's --forwarded-allow-ips); never '*' when clients can reach the "
                                     "service directly")
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per log line")


    @field_validator("dimse_callers")
    @classmethod
    def _callers(cls, value: str) -> str:
        from medvision.serving.dimse import parse_callers

        parse_callers(value)
        return value

    @field_validator("dimse_destination")
    @classmethod
    def _destination(cls, value: str | None) -> str | None:
        if value:
            parse_destination(value)
        return value

    @property
    def cores(self) -> int:
        """The cores this process may use (its CPUs, fewer under a CPU quota: ``medvision.cores``)."""
        from medvision.cores import usable_cores

        return usable_cores()

    @property
    def decoders(self) -> int:
        """Decoding worker processes to start (0: decode in threads)."""
        if self.decode_processes is not None:
            return self.decode_processes
        return self.cores if self.cores > 1 else 0

    @property
    def secure_cookies(self) -> bool:
        if self.ui_secure_cookies is not None:
            return self.ui_secure_cookies
        return self.host not in ("127.0.0.1", "localhost", "::1")


def parse_destination(text: str) -> tuple[str, str, int]:
    """``AET@HOST:PORT`` -> (ae title, host, port)."""
    aet, sep, where = text.partition("@")
    host, _, port = where.rpartition(":")
    if not sep or not aet or len(aet) > 16 or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"a DICOM destination reads AET@HOST:PORT, not {text!r}")
    return aet, host, int(port)


def load_settings(**overrides) -> Settings:
    """Settings from the environment and ``overrides``; a bad value is a one-line error naming the variable."""
    from pydantic import ValidationError

    from medvision.errors import ConfigError

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"MEDVISION_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid service setting(s): {problems}") from None
