"""Build a registered model with timm: one input channel, one cancer logit, optional local weights."""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from timm.layers import resample_abs_pos_embed

from medvision.config import ModelConfig
from medvision.errors import ConfigError
from medvision.registry import get_model_spec

log = logging.getLogger(__name__)


def create_model(cfg: ModelConfig, image_size: int) -> torch.nn.Module:
    """Instantiate ``cfg.name`` for greyscale input at ``image_size`` with a single output logit."""
    spec = get_model_spec(cfg.name)
    kwargs = dict(spec.timm_kwargs)
    if spec.timm_name.startswith(("vit_", "deit_")):
        kwargs["img_size"] = image_size
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if cfg.pretrained == "hub":
        try:
            return timm.create_model(spec.timm_name, pretrained=True, in_chans=1, num_classes=1, **kwargs)
        except Exception as exc:
            raise ConfigError(
                f"could not fetch pretrained '{spec.timm_name}' from the hub ({type(exc).__name__}: {exc}). "
                "Offline? Pass a local file with model.pretrained=/path/to/weights.safetensors"
            ) from None
    model = timm.create_model(spec.timm_name, pretrained=False, in_chans=1, num_classes=1, **kwargs)
    if cfg.pretrained:
        load_local_weights(model, Path(cfg.pretrained))
    else:
        log.warning("no pretrained weights given (model.pretrained): '%s' starts from random initialisation", cfg.name)
    return model


def load_local_weights(model: torch.nn.Module, path: Path) -> None:
    """Load an RGB or greyscale checkpoint into ``model``, adapting input channels and position grid.

    RGB patch-embedding kernels are summed over channels (a grey image equals R = G = B, so the
    summed kernel gives the same activations); the classifier head is dropped; position embeddings
    are resampled to the new grid. Anything else that does not fit is an error naming the keys.
    """
    if not path.is_file():
        raise ConfigError(f"pretrained weights not found: {path}")
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
