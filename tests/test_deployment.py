"""The container image and the compose stack, checked against what medvision knows (no container engine runs
here): every setting the stack gives medvision is a real setting with a valid value, Orthanc and medvision point at
each other consistently (DICOMweb both ways, DIMSE both ways), the image's data folder is writable by its user, and
every variable the stack needs is in .env.example."""

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())


def _filled(text: str) -> str:
    """``${VAR}`` / ``${VAR:?message}`` replaced by a stand-in value, as compose would from .env."""
    return re.sub(r"\$\{([A-Z_]+)(:\?[^}]*)?\}", lambda m: f"x-{m.group(1).lower()}", text)


def _env(service: str) -> dict[str, str]:
    return {k: _filled(str(v)) for k, v in COMPOSE["services"][service]["environment"].items()}


def test_every_setting_given_to_medvision_is_a_valid_setting():
    from medvision.serving.settings import Settings

    env = _env("medvision")
    fields = {f"MEDVISION_{name.upper()}": name for name in Settings.model_fields}
    unknown = set(env) - set(fields)
    assert not unknown, f"compose.yaml sets settings medvision does not have: {unknown}"
    settings = Settings(**{fields[k]: v for k, v in env.items()})
    assert settings.database_url.startswith("postgresql+psycopg://medvision:x-postgres_password@postgres/")
    assert settings.dimse_port == 11112 and settings.data_dir == "/data"


def test_orthanc_and_medvision_point_at_each_other():
    mv, orthanc = _env("medvision"), json.loads(_env("orthanc")["ORTHANC_JSON"])
    web = orthanc["DicomWeb"]
    assert web["Enable"] and web["Servers"]["medvision"]["Url"] == "http://medvision:8000/dicomweb/"
    assert web["Servers"]["medvision"]["HttpHeaders"]["Authorization"] == "Bearer x-medvision_orthanc_key"
    # reports back by STOW-RS: into Orthanc's DICOMweb root, with a user Orthanc knows
    assert mv["MEDVISION_PACS_URL"] == f"http://orthanc:{orthanc['HttpPort']}{web['Root'].rstrip('/')}"
    assert orthanc["RegisteredUsers"][mv["MEDVISION_PACS_USERNAME"]] == mv["MEDVISION_PACS_PASSWORD"]
    # DIMSE both ways: Orthanc knows medvision's node, medvision lets Orthanc send and sends reports back to it
    assert orthanc["DicomModalities"]["medvision"] == [mv["MEDVISION_DIMSE_AE_TITLE"], "medvision",
                                                       int(mv["MEDVISION_DIMSE_PORT"])]
    from medvision.serving.dimse import parse_callers

    assert set(parse_callers(mv["MEDVISION_DIMSE_CALLERS"])) == {orthanc["DicomAet"]}
    assert mv["MEDVISION_DIMSE_DESTINATION"] == f"{orthanc['DicomAet']}@orthanc:{orthanc['DicomPort']}"
    # the routing rule: every stable study to the DICOMweb server named above
    lua_mount = next(v for v in COMPOSE["services"]["orthanc"]["volumes"] if v.endswith(".lua:ro"))
    source, target = lua_mount.split(":")[:2]
    assert target in orthanc["LuaScripts"]
    assert "/dicom-web/servers/medvision/stow" in (ROOT / source).read_text()


def test_the_model_and_data_volumes_match_the_image():
    mv = COMPOSE["services"]["medvision"]
    assert "./models:/models:ro" in mv["volumes"] and _env("medvision")["MEDVISION_ARTIFACT"].startswith("/models/")
    assert any(v.endswith(":/data") for v in mv["volumes"])
    docker = (ROOT / "Dockerfile").read_text()
    assert "MEDVISION_DATA_DIR=/data" in docker and "chown 10001 /data" in docker and "WORKDIR /data" in docker
    assert 'ENTRYPOINT ["medvision"]' in docker and 'CMD ["serve"]' in docker  # `run medvision keys ...` works


def test_every_variable_the_stack_needs_is_in_the_env_example():
    needed = set(re.findall(r"\$\{([A-Z_]+)", (ROOT / "compose.yaml").read_text()))
    example = {line.split("=")[0] for line in (ROOT / ".env.example").read_text().splitlines()
               if line and not line.startswith("#")}
    assert needed == example
