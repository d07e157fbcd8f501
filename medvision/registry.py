"""Model registry: names -> architecture and defaults (timm's ``@register_model`` / ``PretrainedCfg`` idea).

The registry is plain data so the core stays torch-free; ``medvision.training.models`` turns an
entry into a torch module with timm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from medvision.errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: the timm architecture, its overrides, and defaults that travel with it."""

    name: str
    timm_name: str
    timm_kwargs: dict = field(default_factory=dict)
    image_size: int = 224
    labels: tuple[str, str] = ("non-cancer", "cancer")
    pool: str = "lse"  # "lse": per-token classifier + log-sum-exp pooling; "timm": the timm model's own head
    lse_r: float = 5.0
    stem: str = "patch"  # "patch": the ViT's linear patch projection; "conv": a stride-2 convolution stack
    source: str = "timm"  # "timm" or "monai" (timm_name is then a monai.networks.nets class)
    role: str = ""  # "teacher", "student" or "" (tests, demo)
    description: str = ""


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ConfigError(f"model '{spec.name}' is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    """Look up a registered model; any other timm name is accepted as-is at 224 px."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith(("vit_", "deit_", "resnet", "efficientnet", "convnext")):
        pool = "lse" if name.startswith(("vit_", "deit_")) else "timm"
        return ModelSpec(name=name, timm_name=name, pool=pool, description="timm model (unregistered defaults)")
    raise ConfigError(
        f"unknown model '{name}'. Registered: {', '.join(list_models())}; "
        "or give a timm name such as 'vit_small_patch16_224'"
    )


# ViTs score every patch token and pool the scores (medvision.training.models.TokenPooledViT), so
# the heatmap is exact; timm_kwargs hold timm overrides only.

register_model(ModelSpec(
    "vit_small_patch16_224", "vit_small_patch16_224", {}, 224, role="teacher",
    description="ViT-S/16, 22 M parameters: the default teacher (fine-tuned from local pretrained weights)",
))
register_model(ModelSpec(
    "vit_base_patch16_224", "vit_base_patch16_224", {}, 224, role="teacher",
    description="ViT-B/16, 86 M parameters: the large teacher",
))
register_model(ModelSpec(
    "vit_tiny_patch16_224", "vit_tiny_patch16_224", {}, 224, role="student",
    description="ViT-Ti/16, 5.7 M parameters",
))
register_model(ModelSpec(
    "deit_tiny_patch16_224", "deit_tiny_patch16_224", {}, 224, role="student",
    description="DeiT-Ti/16, 5.7 M parameters (the DeiT distillation student)",
))
register_model(ModelSpec(
    "deit_tiny_distilled_patch16_224", "deit_tiny_distilled_patch16_224", {}, 224, role="student",
    description="DeiT-Ti/16 with DeiT's distillation token: one head learns from the labels, one from the teacher",
))
register_model(ModelSpec(
    "mv_deit_distilled_test", "deit_tiny_distilled_patch16_224",
    dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2), 64,
    description="2-layer distilled DeiT for tests",
))
register_model(ModelSpec(
    "mv_vit_small", "vit_small_patch16_224", {}, 224, stem="conv", role="teacher",
    description="ViT-S/16 with a convolutional stem: the teacher that learns without pretrained weights",
))
register_model(ModelSpec(
    "resnet18", "resnet18", {}, 224, pool="timm", role="student",
    description="ResNet-18, 11.7 M parameters: the CNN student (global average pooling, so its CAM is exact)",
))
register_model(ModelSpec(
    "monai_densenet121", "DenseNet121", {"spatial_dims": 2}, 224, pool="timm", source="monai",
    description="MONAI DenseNet-121 (2-D), 7 M parameters",
))
register_model(ModelSpec(
    "mv_vit_demo", "vit_tiny_patch16_224",
    dict(img_size=160, patch_size=16, embed_dim=128, depth=4, num_heads=2), 160, stem="conv",
    description="4-layer, 128-wide ViT with a convolutional stem at 160 px: learns from scratch on 2 CPU cores "
    "within the demo's budget",
))
register_model(ModelSpec(
    "mv_vit_demo_student", "vit_tiny_patch16_224",
    dict(img_size=128, patch_size=16, embed_dim=96, depth=3, num_heads=2), 128, stem="conv", role="student",
    description="3-layer, 96-wide ViT at 128 px: the demo's student, distilled from mv_vit_demo",
))
register_model(ModelSpec(
    "mv_cnn_test", "test_resnet", {}, 64, pool="timm",
    description="timm's 0.4 M-parameter test ResNet (global average pooling): the CNN student for tests",
))
register_model(ModelSpec(
    "mv_vit_test", "vit_tiny_patch16_224",
    dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2), 64,
    description="2-layer, 32-wide ViT for tests (seconds per epoch on a CPU)",
))
