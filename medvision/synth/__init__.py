"""The built-in synthetic screening-mammography dataset (see data_cards/synthetic_mammography.md)."""

from medvision.synth.dataset import SynthConfig, generate_dataset

__all__ = ["SynthConfig", "generate_dataset"]
