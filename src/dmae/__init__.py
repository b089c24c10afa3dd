"""dmae: certifiably robust image classification with Denoising Masked Autoencoders.

Images outside a model are float tensors in [0, 1]; Gaussian noise is added in that space; every model's
first layer resizes and normalizes. So a noise level ``sigma`` means the same thing everywhere.
"""

__version__ = "0.1.0"

from dmae.corrupt import Masking, add_gaussian_noise, patchify, random_masking, unpatchify
from dmae.errors import DmaeError
from dmae.models import DenoisingMaskedAutoencoder, DMAEConfig, create_model, list_models
from dmae.runtime import DmaeWarning
from dmae.training.losses import reconstruction_loss

# the flows (certification, training, reports), imported on first use: ``import dmae`` stays light
_API = (
    "CertifyResult",
    "PredictResult",
    "certify",
    "compare",
    "finetune",
    "load_classifier",
    "predict",
    "pretrain",
    "read_log",
    "table",
)

__all__ = [
    "DMAEConfig",
    "DenoisingMaskedAutoencoder",
    "DmaeError",
    "DmaeWarning",
    "Masking",
    "add_gaussian_noise",
    "create_model",
    "datasets",
    "list_models",
    "patchify",
    "random_masking",
    "reconstruction_loss",
    "unpatchify",
    *_API,
]


def __getattr__(name: str) -> object:
    """The one-call API (:mod:`dmae.api`) and :mod:`dmae.datasets`, imported on first use: ``import dmae`` stays
    light, and the certification, training and reporting layers load only when asked for."""
    if name in _API:
        from dmae import api

        return getattr(api, name)
    if name == "datasets":
        import importlib

        return importlib.import_module("dmae.datasets")
    raise AttributeError(f"module 'dmae' has no attribute {name!r}")
