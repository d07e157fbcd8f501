import csv
import json

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from medvision.config import ModelConfig, RunConfig
from medvision.errors import ConfigError
from medvision.training.models import create_model, load_local_weights


def test_run_folder_has_checkpoint_config_split_and_metrics(tiny_run):
    for name in ("best.safetensors", "config.yaml", "split.csv", "metrics.json"):
        assert (tiny_run / name).is_file(), name
    cfg = RunConfig.model_validate(yaml.safe_load((tiny_run / "config.yaml").read_text()))
    assert cfg.model.name == "mv_vit_test" and cfg.train.epochs == 2
    with safe_open(str(tiny_run / "best.safetensors"), framework="pt") as fh:
        assert RunConfig.model_validate_json(fh.metadata()["config"]) == cfg
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert len(metrics["history"]) == 2
    assert all(0.0 <= h["val_auroc"] <= 1.0 for h in metrics["history"])
    assert metrics["best_epoch"] in (1, 2)
    assert metrics["val_sensitivity"] >= 0.9  # the stored operating point reaches its target on validation
    assert 0.0 <= metrics["threshold"] <= 1.0


def test_split_is_patient_level(tiny_run):
    with open(tiny_run / "split.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    splits = {}
    for r in rows:
        splits.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits.values())
    assert {"train", "val", "test"} == {next(iter(s)) for s in splits.values()}


def test_rgb_weights_load_into_a_greyscale_model(tmp_path):
    import timm

    rgb = timm.create_model("vit_tiny_patch16_224", pretrained=False, in_chans=3, num_classes=10,
                            img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, global_pool="avg")
    path = tmp_path / "rgb.safetensors"
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, str(path))
    # Different input size: position embeddings are resampled (8x8 -> 12x12 grid).
    model = create_model(ModelConfig(name="mv_vit_test", pretrained=str(path)), image_size=96)
    got = model.backbone.state_dict()
    expected = rgb.state_dict()["patch_embed.proj.weight"].sum(dim=1, keepdim=True)
    torch.testing.assert_close(got["patch_embed.proj.weight"], expected)
    torch.testing.assert_close(got["blocks.1.mlp.fc1.weight"], rgb.state_dict()["blocks.1.mlp.fc1.weight"])
    assert got["pos_embed"].shape[1] == 1 + 12 * 12
    # A grey image through the summed kernel equals the RGB image R = G = B through the original one.
    grey = torch.rand(1, 1, 64, 64)
    rgb.eval()
    ref = rgb.patch_embed(grey.repeat(1, 3, 1, 1))
    torch.testing.assert_close(model.backbone.patch_embed.proj(grey).flatten(2).transpose(1, 2), ref)


def test_mismatched_weights_are_refused_by_name(tmp_path):
    wrong = tmp_path / "wrong.safetensors"
    save_file({"patch_embed.proj.weight": torch.zeros(64, 1, 8, 8)}, str(wrong))
    model = create_model(ModelConfig(name="mv_vit_test"), 64)
    with pytest.raises(ConfigError, match="do not match the architecture"):
        load_local_weights(model.backbone, wrong)
    with pytest.raises(ConfigError, match="not found"):
        load_local_weights(model.backbone, tmp_path / "missing.pth")


def test_token_pooled_logit_lies_between_mean_and_max_of_the_token_logits():
    model = create_model(ModelConfig(name="mv_vit_test"), 64).eval()
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        tokens = model.token_logits(x)
        logit = model(x)[:, 0]
    assert tokens.shape == (3, 64)
    assert torch.all(logit >= tokens.mean(1) - 1e-6) and torch.all(logit <= tokens.max(1).values + 1e-6)


def test_training_refuses_a_split_without_both_classes(tmp_path, synth_dir):
    from medvision.config import load_config
    from medvision.training.train import train

    labels = tmp_path / "neg.csv"
    with open(synth_dir / "labels.csv", newline="") as src, labels.open("w", newline="") as dst:
        reader = csv.DictReader(src)
        writer = csv.DictWriter(dst, reader.fieldnames)
        writer.writeheader()
        writer.writerows(r for r in reader if r["cancer"] == "0")
    cfg = load_config(None, [f"data.labels_csv={labels}", f"data.image_dir={synth_dir / 'images'}",
                             "model.name=mv_vit_test", "preprocess.image_size=64"])
    with pytest.raises(ConfigError, match="both classes"):
        train(cfg, tmp_path / "run", show_progress=False)


def test_conv_stem_vit_keeps_the_token_grid():
    model = create_model(ModelConfig(name="mv_vit_demo"), 160).eval()
    stem = model.backbone.patch_embed.proj
    assert isinstance(stem, torch.nn.Sequential) and sum(isinstance(m, torch.nn.Conv2d) for m in stem) == 5
    with torch.no_grad():
        assert model.token_logits(torch.zeros(2, 1, 160, 160)).shape == (2, 100)


def test_training_is_repeatable_for_a_seed(tmp_path, synth_dir):
    """Same config and seed, same result: sampling, augmentation and initialisation are all seeded."""
    from medvision.config import load_config
    from medvision.training.train import train

    cfg = load_config(None, [f"data.labels_csv={synth_dir / 'labels.csv'}", f"data.image_dir={synth_dir / 'images'}",
                             "model.name=mv_vit_test", "preprocess.image_size=64", "train.epochs=2",
                             "train.num_workers=0", "data.val_fraction=0.25", "data.test_fraction=0.25"])
    a = train(cfg, tmp_path / "a", show_progress=False)
    b = train(cfg, tmp_path / "b", show_progress=False)
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    assert a["val_auroc"] == b["val_auroc"] and a["threshold"] == b["threshold"]


def test_training_from_a_manifest_reuses_the_split_and_the_decode_cache(tmp_path, synth_dir):
    """A manifest plus a saved split: the run trains on exactly that split; a second run decodes nothing."""
    import os

    from medvision.cli import main
    from medvision.data import read_split

    m, s = tmp_path / "m.csv", tmp_path / "split.csv"
    assert main(["data", "manifest", "--rsna", str(synth_dir / "labels.csv"), "--images", str(synth_dir / "images"),
                 "--out", str(m)]) == 0
    assert main(["data", "split", str(m), "--out", str(s), "--val", "0.25", "--test", "0.25", "--seed", "5"]) == 0
    cache = tmp_path / "cache"
    args = ["train", "--config", "tiny", "--manifest", str(m), "--split", str(s), "--no-progress",
            "train.epochs=1", "train.num_workers=0", f"data.cache_dir={cache}"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert read_split(tmp_path / "a" / "split.csv") == read_split(s)
    shards = sorted(cache.rglob("shard-*.npy"))
    assert shards  # train and val decoded once into the cache
    stamp = {p: os.stat(p).st_mtime_ns for p in shards}
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert sorted(cache.rglob("shard-*.npy")) == shards and all(os.stat(p).st_mtime_ns == t for p, t in stamp.items())
    a = (tmp_path / "a" / "metrics.json").read_text()
    b = (tmp_path / "b" / "metrics.json").read_text()
    import json

    assert json.loads(a)["val_auroc"] == json.loads(b)["val_auroc"]
