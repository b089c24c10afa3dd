"""dmae: certifiably robust image classification with Denoising Masked Autoencoders.

Images outside a model are float tensors in [0, 1]; Gaussian noise is added in that space; every model's
first layer resizes and normalizes. So a noise level ``sigma`` means the same thing everywhere.
"""

__version__ = "0.1.0"

from dmae.corrupt import Masking, add_gaussian_noise, patchify, random_masking, unpatchify
from dmae.models import DenoisingMaskedAutoencoder, DMAEConfig, create_model, list_models
from dmae.training.losses import reconstruction_loss

__all__ = [
    "CertifyResult",
    "DMAEConfig",
    "DenoisingMaskedAutoencoder",
    "Masking",
    "add_gaussian_noise",
    "certify",
    "create_model",
    "list_models",
    "patchify",
    "random_masking",
    "reconstruction_loss",
    "unpatchify",
]


def __getattr__(name: str) -> object:
    """``dmae.certify`` / ``dmae.CertifyResult`` (:mod:`dmae.api`), imported on first use: ``import dmae`` stays
    light, and the certification and reporting layers load only when asked for."""
    if name in ("certify", "CertifyResult"):
        from dmae import api

        return getattr(api, name)
    raise AttributeError(f"module 'dmae' has no attribute {name!r}")
