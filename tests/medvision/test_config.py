import pytest
import yaml

from medvision.config import RunConfig, load_config, save_config
from medvision.errors import ConfigError


def test_yaml_plus_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "mv_vit_test"}, "train": {"epochs": 3}}))
    cfg = load_config(path, ["train.epochs=5", "train.augment.enabled=false", "preprocess.image_size=64"])
    assert cfg.model.name == "mv_vit_test" and cfg.train.epochs == 5
    assert cfg.train.augment.enabled is False and cfg.preprocess.image_size == 64


def test_round_trip(tmp_path):
    cfg = load_config(None, ["train.lr=0.01"])
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg
    assert RunConfig.model_validate_json(cfg.model_dump_json()) == cfg


@pytest.mark.parametrize("override,words", [
    ("train.epochz=3", "train.epochz"),
    ("train.epochs=0", "train.epochs"),
    ("preprocess.voi=magic", "preprocess.voi"),
    ("nonsense", "section.key=value"),
])
def test_invalid_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert words in info.value.message
