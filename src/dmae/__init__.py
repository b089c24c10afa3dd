"""dmae: certifiably robust image classification with Denoising Masked Autoencoders.

Images outside a model are float tensors in [0, 1]; Gaussian noise is added in that space; every model's
first layer resizes and normalizes. So a noise level ``sigma`` means the same thing everywhere.
"""

__version__ = "0.1.0"

from dmae.corrupt import Masking, add_gaussian_noise, patchify, random_masking, unpatchify  # noqa: E402
from dmae.models import DenoisingMaskedAutoencoder, DMAEConfig, create_model, list_models  # noqa: E402
from dmae.training.losses import reconstruction_loss  # noqa: E402

__all__ = [
    "DMAEConfig",
    "DenoisingMaskedAutoencoder",
    "Masking",
    "add_gaussian_noise",
    "create_model",
    "list_models",
    "patchify",
    "random_masking",
    "reconstruction_loss",
    "unpatchify",
]
