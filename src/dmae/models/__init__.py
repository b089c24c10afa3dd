"""Models: the DMAE autoencoder, its input layer and named presets."""

from dmae.data import IMAGENET_MEAN, IMAGENET_STD
from dmae.models.dmae import DenoisingMaskedAutoencoder, DMAEConfig
from dmae.models.preprocess import InputAdapter
from dmae.models.registry import create_model, get_preset, list_models, model_config

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DMAEConfig",
    "DenoisingMaskedAutoencoder",
    "InputAdapter",
    "create_model",
    "get_preset",
    "list_models",
    "model_config",
]
