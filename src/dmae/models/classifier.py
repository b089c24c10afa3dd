"""The base classifier of a smoothed model: ``f(x) = Head(Encoder(x))`` taking [0, 1] images.

It is timm's ``VisionTransformer`` (so the state-dict keys are the official fine-tuned ones: ``fc_norm.*``,
``head.*``; linear probes: ``head.0`` BatchNorm and ``head.1`` Linear) with our :class:`InputAdapter` as its
first layer. Two feature modes, as in the paper:

- ``pool="avg"`` (fine-tuning): global average over patch tokens -> ``fc_norm`` -> Linear head (std 2e-5).
- ``pool="token"`` (linear probing): the cls token after ``norm`` -> BatchNorm1d(affine=False, eps 1e-6)
  -> Linear head (std 0.01).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Literal

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dmae.errors import InputError
from dmae.models.dmae import DMAEConfig, config_from_dict
from dmae.models.pos_embed import sincos_2d
from dmae.models.preprocess import InputAdapter

# "avg": global average of the patch tokens (fine-tuning); "token": the cls token (linear probing)
Pool = Literal["avg", "token"]


@dataclass
class ClassifierConfig:
    """Everything needed to rebuild a classifier from its state dict."""

    encoder: DMAEConfig
    num_classes: int
    pool: Pool = "avg"
    drop_path: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):
            self.encoder = DMAEConfig.from_dict(self.encoder)
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise InputError(f"classifier: num_classes must be an integer >= 2, got {self.num_classes!r}")
        if self.pool not in ("avg", "token"):
            raise InputError(f"classifier: pool must be 'avg' or 'token', got {self.pool!r}")
        if not 0.0 <= self.drop_path < 1.0:
            raise InputError(f"classifier: drop_path must be in [0, 1), got {self.drop_path!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the encoder's config nested), read back by :meth:`from_dict`."""
        d = asdict(self)
        d["encoder"] = self.encoder.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassifierConfig:
        """Rebuild from :meth:`to_dict`'s output; raises ``ValueError`` naming unknown keys."""
        return config_from_dict(cls, d, "classifier config")


class ViTClassifier(VisionTransformer):
    """A timm ViT whose first layer maps [0, 1] images to normalized model inputs (resize included)."""

    def __init__(self, config: ClassifierConfig) -> None:
        e = config.encoder
        super().__init__(
            img_size=e.img_size,
            patch_size=e.patch_size,
            in_chans=e.in_chans,
            num_classes=config.num_classes,
            global_pool=config.pool,
            embed_dim=e.embed_dim,
            depth=e.depth,
            num_heads=e.num_heads,
            mlp_ratio=e.mlp_ratio,
            qkv_bias=True,
            drop_path_rate=config.drop_path,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
        )
        self.config = config
        # the noise it was fine-tuned at (sigma, or [low, high]) once loaded from a run that records it: smoothing it
        # at another sigma warns (dmae.smoothing.Smooth)
        self.trained_sigma: float | list[float] | None = None
        self.preprocess = InputAdapter(e.img_size, e.in_chans, e.mean, e.std)
        # timm leaves these None / Identity only for pos_embed="none" / num_classes 0, which are never built here
        pos_embed, head = self.pos_embed, self.head
        assert pos_embed is not None and isinstance(head, nn.Linear)
        # fixed sin-cos positions until a checkpoint provides its own (it then fine-tunes them, as the paper does)
        pos_embed.data.copy_(sincos_2d(e.embed_dim, e.grid))
        if config.pool == "token":
            linear = nn.Linear(e.embed_dim, config.num_classes)
            nn.init.trunc_normal_(linear.weight, std=0.01)
            nn.init.zeros_(linear.bias)
            # timm's VisionTransformer infers its head as Linear | Identity; any module may stand there
            self.head = nn.Sequential(nn.BatchNorm1d(e.embed_dim, affine=False, eps=1e-6), linear)  # type: ignore[assignment]
        else:
            nn.init.trunc_normal_(head.weight, std=2e-5)
            nn.init.zeros_(head.bias)

    def forward_features(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """[0, 1] images ``[N, C, H, W]`` (any size; resized after noise) -> tokens ``[N, 1 + L, D]``."""
        return super().forward_features(self.preprocess(x), *args, **kwargs)
