"""Build a registered model with timm: one input channel, one cancer logit, optional local weights."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import timm
import torch
from timm.layers import PatchEmbed, resample_abs_pos_embed

from medvision.config import ModelConfig
from medvision.errors import ConfigError
from medvision.registry import get_model_spec

log = logging.getLogger(__name__)


class ConvStemPatchEmbed(PatchEmbed):
    """Patch embedding by a stack of stride-2 3x3 convolutions instead of one 16x16 projection.

    "Early convolutions help transformers see better" (Xiao et al., 2021): a convolutional stem makes
    a ViT far more sample-efficient when it trains from scratch on a small dataset, as medvision's
    demo must; the transformer that follows is unchanged.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        stride = self.patch_size[0]
        n_convs = int(math.log2(stride))
        if 2**n_convs != stride or self.patch_size[0] != self.patch_size[1]:
            raise ConfigError(f"a convolutional stem needs a square power-of-two patch size, got {self.patch_size}")
        embed_dim = self.proj.out_channels
        in_chans = self.proj.in_channels
        layers: list[torch.nn.Module] = []
        width = max(embed_dim // 2 ** (n_convs - 1), 8)
        for _ in range(n_convs):
            layers += [torch.nn.Conv2d(in_chans, width, 3, stride=2, padding=1, bias=False),
                       torch.nn.BatchNorm2d(width), torch.nn.ReLU(inplace=True)]
            in_chans, width = width, min(width * 2, embed_dim)
        layers.append(torch.nn.Conv2d(in_chans, embed_dim, 1))
        self.proj = torch.nn.Sequential(*layers)


class TokenPooledViT(torch.nn.Module):
    """A timm ViT whose classifier scores every patch token; the image logit pools those scores.

    Pooling is log-sum-exp, ``(logsumexp(r * t) - log N) / r``: between the mean (r -> 0) and the
    max (r -> inf) of the token logits ``t``. A screening cancer is a few patches of a large image;
    mean pooling dilutes their gradient N-fold, LSE lets the most suspicious patches dominate. The
    token logits are the heatmap, and the pooled logit is an exact function of them.
    """

    def __init__(self, backbone: torch.nn.Module, r: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(backbone.num_features, 1)
        self.r = r
        # DeiT's distillation token (timm's *_distilled_* models): its own head learns from the teacher; at
        # inference the logit is the mean of the pooled token logit and the distillation logit.
        self.dist_head = torch.nn.Linear(backbone.num_features, 1) if hasattr(backbone, "dist_token") else None
        self.return_dist = False  # set by distillation training: forward then returns (pooled, distillation)

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups for layer-wise learning-rate decay (timm's interface): stem, blocks, then head."""
        return {
            "stem": r"^backbone\.(?:cls_token|dist_token|reg_token|pos_embed|patch_embed)",
            "blocks": [(r"^backbone\.blocks\.(\d+)", None), (r"^backbone\.norm|^head|^dist_head", (99999,))],
        }

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in getattr(self.backbone, "no_weight_decay", lambda: set())()}

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        feats = self.backbone.forward_features(x)
        token_logits = self.head(feats[:, self.backbone.num_prefix_tokens :]).squeeze(-1)
        dist = self.dist_head(feats[:, 1]) if self.dist_head is not None else None
        return token_logits, dist

    def token_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Per-patch cancer logits, shape (batch, patches)."""
        return self._features(x)[0]

    def scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logit, heatmap)`` from one pass; heatmap = token logits on the patch grid (batch, 1, rows, cols).

        The logit is the heatmap's LSE-mean, averaged with the distillation token's logit when there is one.
        """
        tokens, dist = self._features(x)
        gh, gw = self.backbone.patch_embed.grid_size
        logit = self.pool(tokens)
        if dist is not None:
            logit = (logit + dist) / 2
        return logit, tokens.reshape(x.shape[0], 1, gh, gw)

    def heatmap(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores(x)[1]

    def pool(self, token_logits: torch.Tensor) -> torch.Tensor:
        """(batch, N) token logits -> (batch, 1) image logit: ``(logsumexp(r t) - log N) / r``."""
        z = self.r * token_logits.flatten(1)
        # log(mean(exp(z))) computed stably; no Python int from the shape, so the ONNX trace stays generic.
        m = z.amax(dim=1, keepdim=True)
        return (m + torch.log(torch.exp(z - m).mean(dim=1, keepdim=True))) / self.r

    def forward(self, x: torch.Tensor):
        tokens, dist = self._features(x)
        pooled = self.pool(tokens)
        if dist is None:
            return pooled
        if self.training and self.return_dist:
            return pooled, dist
        return (pooled + dist) / 2


def create_model(cfg: ModelConfig, image_size: int, weights_follow: bool = False) -> torch.nn.Module:
    """Instantiate ``cfg.name`` for greyscale input at ``image_size`` with a single output logit
    (``weights_follow``: the caller loads trained weights next, so starting from random ones is no news)."""
    spec = get_model_spec(cfg.name)
    if spec.source == "monai":
        return _create_monai(spec, cfg)
    kwargs = dict(spec.timm_kwargs)
    if spec.timm_name.startswith(("vit_", "deit_")):
        kwargs["img_size"] = image_size
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if spec.stem == "conv":
        kwargs["embed_layer"] = ConvStemPatchEmbed
    token_pooled = spec.pool == "lse"
    if token_pooled:
        # timm's distilled DeiTs insist on token pooling; the classifier is ours either way (num_classes=0)
        kwargs.update(num_classes=0, global_pool="token" if "distilled" in spec.timm_name else "")
    else:
        kwargs.setdefault("num_classes", 1)
    if cfg.pretrained == "hub":
        try:
            backbone = timm.create_model(spec.timm_name, pretrained=True, in_chans=1, **kwargs)
        except Exception as exc:
            raise ConfigError(
                f"could not fetch pretrained '{spec.timm_name}' from the hub ({type(exc).__name__}: {exc}). "
                "Offline? Pass a local file with model.pretrained=/path/to/weights.safetensors"
            ) from None
    else:
        backbone = timm.create_model(spec.timm_name, pretrained=False, in_chans=1, **kwargs)
        if cfg.pretrained:
            load_local_weights(backbone, Path(cfg.pretrained))
        elif not weights_follow:
            log.warning("no pretrained weights given (model.pretrained): '%s' starts from random initialisation",
                        cfg.name)
    return TokenPooledViT(backbone, spec.lse_r) if token_pooled else backbone


def _cam_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The linear classifier of a timm CNN with global average pooling (then CAM is exact), else None."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    pool = getattr(getattr(model, "global_pool", None), "pool_type", None)
    if isinstance(head, torch.nn.Linear) and pool == "avg" and hasattr(model, "forward_features"):
        return head
    return None


def has_exact_heatmap(model: torch.nn.Module) -> bool:
    return hasattr(model, "heatmap") or _cam_head(model) is not None


def class_activation_map(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's own heatmap, exact by construction, shape (batch, 1, rows, cols).

    TokenPooledViT: its token logits (the logit is their log-sum-exp mean). A timm CNN with global
    average pooling and a linear classifier: the classifier applied at every location (CAM, Zhou et
    al. 2016), whose spatial mean is the logit. Raises ``ValueError`` for other models.
    """
    if hasattr(model, "heatmap"):
        return model.heatmap(x)
    head = _cam_head(model)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no exact heatmap")
    return torch.nn.functional.conv2d(model.forward_features(x), head.weight[:, :, None, None], head.bias)


def _create_monai(spec, cfg: ModelConfig) -> torch.nn.Module:
    import monai.networks.nets as nets

    model = getattr(nets, spec.timm_name)(in_channels=1, out_channels=1, **spec.timm_kwargs)
    if cfg.pretrained:
        if cfg.pretrained == "hub":
            raise ConfigError(f"{spec.name}: no hub weights; pass a local file with model.pretrained=")
        load_local_weights(model, Path(cfg.pretrained))
    else:
        log.warning("no pretrained weights given (model.pretrained): '%s' starts from random initialisation", cfg.name)
    return model


# File names timm / Hugging Face caches use for weights, in order of preference.
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "model.pth")


def resolve_weights_file(path: Path) -> Path:
    """A weights file, or a timm / Hugging Face cache folder (``models--org--name/snapshots/<rev>/``) holding one."""
    if path.is_file():
        return path
    if path.is_dir():
        for name in _WEIGHT_FILES:
            found = sorted(path.rglob(name), key=lambda p: p.stat().st_mtime, reverse=True)
            if found:
                return found[0]
        raise ConfigError(f"no weights file in {path} (looked for {', '.join(_WEIGHT_FILES)})")
    raise ConfigError(f"pretrained weights not found: {path}")


def load_local_weights(model: torch.nn.Module, path: Path) -> None:
    """Load an RGB or greyscale checkpoint into ``model``, adapting input channels and position grid.

    RGB patch-embedding kernels are summed over channels (a grey image equals R = G = B, so the
    summed kernel gives the same activations); the classifier head is dropped; position embeddings
    are resampled to the new grid. Anything else that does not fit is an error naming the keys.
    """
    path = resolve_weights_file(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
    own = model.state_dict()
    adapted = {}
    for k, v in state.items():
        k = k.removeprefix("module.")
        if k.startswith(("head.", "fc.", "classifier.")) or k not in own:
            continue
        if v.ndim == 4 and own[k].ndim == 4 and v.shape[1] == 3 and own[k].shape[1] == 1:
            v = v.sum(dim=1, keepdim=True)
        if k == "pos_embed" and v.shape != own[k].shape:
            prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
            v = resample_abs_pos_embed(v, new_size=model.patch_embed.grid_size, num_prefix_tokens=prefix)
        if v.shape != own[k].shape:
            raise ConfigError(
                f"weights in {path.name} do not match the architecture: '{k}' is {tuple(v.shape)}, "
                f"the model expects {tuple(own[k].shape)}"
            )
        adapted[k] = v
    missing = [k for k in own if k not in adapted and not k.startswith(("head.", "fc.", "classifier."))]
    if len(missing) > 0.5 * len(own) or not adapted:
        raise ConfigError(
            f"weights in {path.name} do not match the architecture: {len(missing)} of {len(own)} tensors missing "
            f"(e.g. {', '.join(missing[:3])})"
        )
    model.load_state_dict(adapted, strict=False)
    log.info("loaded %d tensors from %s (%d left at initialisation)", len(adapted), path.name, len(missing))
