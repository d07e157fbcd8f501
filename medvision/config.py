"""One typed configuration for a training run: YAML in, CLI overrides, validated, saved with the run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medvision.errors import ConfigError
from medvision.preprocess import PreprocessConfig


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field("vit_small_patch16_224", description="registered name or timm architecture")
    pretrained: str | None = Field(
        None, description="local weights file (.safetensors / .pth / .bin) or 'hub' to let timm download"
    )
    drop_path_rate: float = Field(0.1, ge=0.0, le=0.9)


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    manifest: str | None = Field(None, description="manifest CSV (path, label, patient_id, ...); see 'medvision data manifest'")
    labels_csv: str | None = Field(None, description="RSNA-style labels CSV (patient_id, image_id, cancer)")
    image_dir: str | None = Field(None, description="folder holding <patient_id>/<image_id>.dcm")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    split_seed: int = 0
    split_file: str | None = Field(None, description="reuse this split CSV instead of making one")
    cache: bool = Field(True, description="decode each file once into the on-disk cache (memory-mapped)")
    cache_dir: str | None = Field(None, description="cache folder; default $MEDVISION_CACHE or ~/.cache/medvision/images")
    decode_workers: int = Field(0, ge=0, description="processes decoding DICOM, 0 = every core this process may use")


class AugmentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    flip_vertical: float = Field(0.5, ge=0, le=1, description="up/down flip: breasts are roughly symmetric")
    affine: float = Field(0.7, ge=0, le=1, description="probability of a small shift / scale / rotation")
    brightness_contrast: float = Field(0.5, ge=0, le=1)
    gamma: float = Field(0.3, ge=0, le=1)
    noise: float = Field(0.2, ge=0, le=1)
    full_decode: float = Field(0.0, ge=0, le=1, description="share of training samples drawn from the image decoded "
                               "at full resolution instead of under the decode contract (preprocess.decode_long_side): "
                               "a model that learned from both scores an image alike whichever way it is decoded")
    consistency: float = Field(0.0, ge=0, description="weight of a term that pulls together the logits of each "
                               "training image decoded both ways (under the contract and at full resolution, the same "
                               "augmentation on both): mean (logit_contract - logit_full)^2, next to the task loss on "
                               "both. Needs a reducing contract; every sample then costs two forward passes "
                               "(full_decode's random swap is not used)")


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    imbalance: str = Field("sampler", pattern="^(sampler|loss|none)$", description="class imbalance: 'sampler' draws "
                           "positives and negatives equally often, 'loss' weights positives by the negative/positive ratio")
    target_sensitivity: float = Field(0.9, gt=0, le=1, description="operating point chosen on validation")
    seed: int = 0
    num_workers: int = Field(2, ge=0)
    threads: int = Field(0, ge=0, description="torch intra-op threads, 0 = one per physical core this "
                         "process may use (its CPU set, within its CPU quota; OMP_NUM_THREADS when set)")
    max_minutes: float | None = Field(None, gt=0, description="stop after this wall time (best checkpoint kept)")
    accumulate: int = Field(1, ge=1, description="gradient accumulation: optimizer step every N batches")
    layer_decay: float | None = Field(None, gt=0, le=1, description="layer-wise lr decay for ViT fine-tuning (e.g. 0.75)")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="keep an EMA of the weights (e.g. 0.999); validate and save it")
    early_stopping: int | None = Field(None, ge=1, description="stop after N epochs without a better validation AUROC")
    device: str = Field("auto", pattern="^(auto|cpu|cuda(:\\d+)?)$", description="auto = cuda when available")
    precision: str = Field("fp32", pattern="^(auto|fp32|bf16|fp16)$",
                           description="autocast dtype; auto = bf16 on a GPU, fp32 on a CPU")
    channels_last: bool = Field(False, description="NHWC memory format (helps convolutions on GPU)")
    compile: bool = Field(False, description="torch.compile the model for training")
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms (slower on GPU)")
    tensorboard: bool = Field(True, description="write TensorBoard logs to <run>/tensorboard")
    augment: AugmentConfig = AugmentConfig()


class DistillConfig(BaseModel):
    """Knowledge distillation from a trained teacher run (``medvision distill``)."""

    model_config = ConfigDict(extra="forbid")

    teacher: str | None = Field(None, description="teacher run folder (best.safetensors); None = no distillation")
    mode: str = Field("soft", pattern="^(soft|hard)$",
                      description="soft: match the teacher's tempered probabilities; hard: the teacher's decisions as labels")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the teacher term (1 - alpha on the true labels)")
    temperature: float = Field(2.0, gt=0, description="softening temperature of soft distillation")


class RunConfig(BaseModel):
    """Everything a training run needs; written as ``config.yaml`` next to its outputs."""

    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = ModelConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    distill: DistillConfig = DistillConfig()


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{k}' is not a section")
    node[keys[-1]] = value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Build a validated ``RunConfig`` from an optional YAML file and ``key.sub=value`` overrides."""
    tree: dict = {}
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config {path} must be a mapping at the top level")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid configuration: {problems}") from None


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
