import csv
import json
from pathlib import Path

import numpy as np
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


def _tiny_cfg(synth_dir, *extra):
    from medvision.config import load_config

    return load_config(None, [f"data.labels_csv={synth_dir / 'labels.csv'}", f"data.image_dir={synth_dir / 'images'}",
                              "model.name=mv_vit_test", "preprocess.image_size=64", "train.batch_size=8",
                              "train.num_workers=0", "data.val_fraction=0.25", "data.test_fraction=0.25",
                              "train.warmup_epochs=0.5", *extra])


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, synth_dir):
    """Stop after epoch 1, resume, and land on the uninterrupted run's weights bit for bit."""
    from safetensors.torch import load_file

    from medvision.training.train import train

    cfg = _tiny_cfg(synth_dir, "train.epochs=3", "train.ema_decay=0.9", "train.accumulate=2", "train.layer_decay=0.8")
    straight = train(cfg, tmp_path / "straight", show_progress=False)

    class Interrupt(Exception):
        pass

    def stop_after_first(epoch, record):
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "resumed", show_progress=False, on_epoch_end=stop_after_first)
    assert (tmp_path / "resumed" / "last.pt").is_file()
    resumed = train(cfg, tmp_path / "resumed", show_progress=False, resume=True)
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in straight["history"]]
    assert resumed["val_auroc"] == straight["val_auroc"] and resumed["reproducibility"]["resumed"]
    a, b = load_file(str(tmp_path / "straight" / "best.safetensors")), load_file(str(tmp_path / "resumed" / "best.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)["model"]
    lb = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(la[k], lb[k]) for k in la)
    # the recipe cannot change under a resumed run
    changed = _tiny_cfg(synth_dir, "train.epochs=3", "train.ema_decay=0.9", "train.accumulate=2", "train.lr=0.1")
    with pytest.raises(ConfigError, match="other train settings \\(layer_decay, lr\\)"):
        train(changed, tmp_path / "resumed", show_progress=False, resume=True)


def test_early_stopping_ema_accumulation_and_logs(tmp_path, synth_dir):
    from medvision.training.train import train

    cfg = _tiny_cfg(synth_dir, "train.epochs=6", "train.early_stopping=1", "train.lr=1e-6", "train.ema_decay=0.5")
    m = train(cfg, tmp_path / "run", show_progress=False)
    assert len(m["history"]) < 6  # a learning rate this small cannot keep improving AUROC every epoch
    aucs = [h["val_auroc"] for h in m["history"]]
    assert aucs[-1] <= max(aucs[:-1])
    assert m["best_epoch"] == 1 + int(np.argmax(aucs))
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "val/auroc", "val/loss", "lr"} <= set(acc.Tags()["scalars"])
    assert len(acc.Scalars("val/auroc")) == len(m["history"])


def test_layer_decay_scales_learning_rates_from_head_to_stem(synth_dir):
    from medvision.training.train import _param_groups

    cfg = _tiny_cfg(synth_dir, "train.layer_decay=0.5", "train.lr=1e-3")
    model = create_model(cfg.model, 64)
    groups = _param_groups(model, cfg)
    by_name = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            by_name[names[id(p)]] = (g["lr"], g["weight_decay"])
    assert by_name["head.weight"][0] == pytest.approx(1e-3)
    assert by_name["backbone.patch_embed.proj.weight"][0] < by_name["backbone.blocks.0.attn.qkv.weight"][0] < 1e-3
    assert by_name["backbone.blocks.0.norm1.weight"][1] == 0.0 and by_name["head.weight"][1] > 0
    assert len(by_name) == sum(1 for _ in model.parameters())


def test_resume_from_the_cli(tmp_path, tiny_run, capsys):
    import shutil

    from medvision.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = json.loads((run / "metrics.json").read_text())
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0  # finished: metrics written again
    after = json.loads((run / "metrics.json").read_text())
    assert after["val_auroc"] == before["val_auroc"] and after["history"] == before["history"]
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--config", "tiny"]) == 2
    assert "own config.yaml" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert main(["train", "--config", "tiny"]) == 2


RECIPES = sorted(p.stem for p in (Path(__file__).parents[2] / "training" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_validates_and_builds_its_model(recipe):
    from medvision.config import load_config
    from medvision.training.command import resolve_config_path

    cfg = load_config(resolve_config_path(recipe))
    model = create_model(cfg.model.model_copy(update={"pretrained": None}), cfg.preprocess.image_size).eval()
    size = cfg.preprocess.image_size
    with torch.no_grad():
        assert model(torch.zeros(1, 1, size, size)).shape == (1, 1)
    assert {"vit_small", "vit_base", "student_vit_tiny", "student_deit_tiny", "student_resnet18",
            "student_vit_tiny_192"} <= set(RECIPES)


def test_weights_from_a_hugging_face_cache_folder(tmp_path):
    model = create_model(ModelConfig(name="resnet18"), 64)
    rgb = {k: (v.repeat(1, 3, 1, 1) / 3 if k == "conv1.weight" else v) for k, v in model.state_dict().items()}
    snap = tmp_path / "models--timm--resnet18.a1_in1k" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in rgb.items()}, str(snap / "model.safetensors"))
    fresh = create_model(ModelConfig(name="resnet18", pretrained=str(tmp_path / "models--timm--resnet18.a1_in1k")), 64)
    assert torch.allclose(fresh.state_dict()["conv1.weight"], model.state_dict()["conv1.weight"], atol=1e-6)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no weights file in .*empty"):
        create_model(ModelConfig(name="resnet18", pretrained=str(tmp_path / "empty")), 64)
    with pytest.raises(ConfigError, match="pretrained weights not found"):
        create_model(ModelConfig(name="resnet18", pretrained=str(tmp_path / "missing.safetensors")), 64)


def test_saved_config_holds_absolute_paths(tmp_path, synth_dir, monkeypatch):
    """A run trained from one folder can be evaluated or exported from any other."""
    from medvision.cli import main

    monkeypatch.chdir(synth_dir)
    assert main(["train", "--config", "tiny", "--labels", "labels.csv", "--images", "images", "--out",
                 str(tmp_path / "run"), "--no-progress", "train.epochs=1", "data.val_fraction=0.25",
                 "data.test_fraction=0.25"]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    assert Path(saved["labels_csv"]).is_absolute() and Path(saved["image_dir"]).is_absolute()
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "run", "--bootstrap", "50", "--no-progress"]) == 0


def test_full_decode_augmentation_draws_the_full_resolution_image_in_its_share_repeatably(synth_dir):
    from medvision.cache import decode_many
    from medvision.preprocess import Preprocess, PreprocessConfig
    from medvision.training.dataset import CachedImages

    paths = sorted(str(p) for p in (synth_dir / "images").rglob("*.dcm"))[:8]
    reduced = Preprocess(PreprocessConfig(image_size=64, decode_long_side=96))
    full = Preprocess(PreprocessConfig(image_size=64))
    a = np.stack([img for img, _ in decode_many(paths, reduced, workers=1, show_progress=False)])
    b = np.stack([img for img, _ in decode_many(paths, full, workers=1, show_progress=False)])
    assert not np.array_equal(a, b)  # the two decodes differ a little

    def drawn(share, epoch):
        ds = CachedImages(a, np.zeros(len(a)), reduced, seed=3, alternate=b, alternate_share=share)
        ds.set_epoch(epoch)
        out = []
        for i in range(len(ds)):
            x = ds[i][0].numpy()[0]
            normal = lambda img: (img - 0.5) / 0.5  # noqa: E731
            out.append("full" if np.allclose(x, normal(b[i])) else "reduced" if np.allclose(x, normal(a[i])) else "?")
        return out

    assert drawn(0.0, 0) == ["reduced"] * 8 and drawn(1.0, 0) == ["full"] * 8
    half = drawn(0.5, 0)
    assert set(half) == {"full", "reduced"} and drawn(0.5, 0) == half  # both, and the same for a seed and epoch
    assert drawn(0.5, 1) != half


def test_paired_decodes_carry_the_same_augmentation_and_the_consistency_term_trains(synth_dir, tmp_path, monkeypatch):
    """``augment.consistency``: each sample is the image under the contract and at full resolution with the same
    flip, affine, exposure and noise (so the term compares decodes, not augmentations), and a run trains with it."""
    from medvision.cache import decode_many
    from medvision.config import AugmentConfig
    from medvision.preprocess import Preprocess, PreprocessConfig
    from medvision.training.augment import build_augment
    from medvision.training.dataset import CachedImages

    paths = sorted(str(p) for p in (synth_dir / "images").rglob("*.dcm"))[:6]
    reduced = Preprocess(PreprocessConfig(image_size=64, decode_long_side=96))
    full = Preprocess(PreprocessConfig(image_size=64))
    a = np.stack([img for img, _ in decode_many(paths, reduced, workers=1, show_progress=False)])
    b = np.stack([img for img, _ in decode_many(paths, full, workers=1, show_progress=False)])
    every = AugmentConfig(flip_vertical=0.5, affine=1.0, brightness_contrast=1.0, gamma=1.0, noise=1.0)
    same = CachedImages(a, np.zeros(len(a)), reduced, build_augment(every, 0), seed=1, alternate=a.copy(), paired=True)
    for i in range(len(same)):
        x, _ = same[i]
        assert x.shape == (2, 1, 64, 64) and torch.equal(x[0], x[1])  # same image in: the same augmented image out
        assert not np.allclose(x[0].numpy()[0], (a[i] - 0.5) / 0.5)  # and it was augmented
    both = CachedImages(a, np.zeros(len(a)), reduced, build_augment(every, 0), seed=1, alternate=b, paired=True)
    x, _ = both[0]
    assert 0 < float((x[0] - x[1]).abs().mean()) < 0.1  # the decodes differ a little, the augmentation does not

    from medvision.cli import main

    monkeypatch.chdir(synth_dir)
    assert main(["train", "--config", "tiny", "--labels", "labels.csv", "--images", "images", "--out",
                 str(tmp_path / "run"), "--no-progress", "train.epochs=1", "data.val_fraction=0.25",
                 "data.test_fraction=0.25", "preprocess.decode_long_side=96", "train.augment.consistency=1.0"]) == 0
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert len(history) == 1 and np.isfinite(history[0]["train_loss"])
