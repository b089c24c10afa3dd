"""The Denoising Masked Autoencoder: ``Mask(x + eta) -> Encoder -> h -> Decoder -> x_hat``.

DMAE (Wu et al., ICLR 2023, Sec. 3) on MAE's asymmetric encoder-decoder (He et al., CVPR 2022; reference
``models_mae.py``), with a ViT encoder (Dosovitskiy et al., ICLR 2021) built from timm's blocks.

The module's own attributes (``patch_embed``, ``cls_token``, ``pos_embed``, ``blocks``, ``norm``,
``decoder_*``, ``mask_token``) are named so that its state dict has exactly the keys of the official DMAE
and MAE checkpoints, which are timm's ViT layout. The blocks are timm's, so attention is fused
(``scaled_dot_product_attention``) wherever PyTorch provides it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from dmae.corrupt import Masking, patchify, unpatchify
from dmae.data import IMAGENET_MEAN, IMAGENET_STD
from dmae.errors import InputError
from dmae.models.pos_embed import sincos_2d
from dmae.models.preprocess import InputAdapter

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")


def config_from_dict(cls: type[C], d: dict[str, Any], what: str) -> C:
    """An architecture dataclass from a dict read back from a file, refusing keys it does not know.

    Raises:
        ValueError: naming the unknown keys. Whatever ``cls(**d)`` raises propagates (for
            :class:`DMAEConfig`, ``ValueError`` for invalid values).
    """
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise InputError(f"{what}: unknown keys {unknown}")
    return cls(**d)


@dataclass
class DMAEConfig:
    """Architecture of a DMAE. Everything needed to rebuild the model from a state dict.

    The defaults are MAE's ``mae_vit_base_patch16_dec512d8b`` (ViT-B/16 encoder, 512-d 8-block decoder);
    ``mean``/``std`` are the per-channel input normalization, in [0, 1] pixel units.

    Raises:
        ValueError: (on construction) a size, depth or head count that is not a positive integer,
            ``img_size`` not divisible by ``patch_size``, an embedding dim not divisible by its head count
            or by 4 (2-D sin-cos positions).
    """

    img_size: int = 224  # side of the (square) model input; other inputs are resized to it, after the noise
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)

    def __post_init__(self) -> None:
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        for name in (
            "img_size",
            "patch_size",
            "in_chans",
            "embed_dim",
            "depth",
            "num_heads",
            "decoder_embed_dim",
            "decoder_depth",
            "decoder_num_heads",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.img_size % self.patch_size:
            raise InputError(f"model config: img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads or self.decoder_embed_dim % self.decoder_num_heads:
            raise InputError(
                "model config: embedding dims must be divisible by their head counts, got "
                f"{self.embed_dim}/{self.num_heads} and {self.decoder_embed_dim}/{self.decoder_num_heads}"
            )
        if self.embed_dim % 4 or self.decoder_embed_dim % 4:
            raise InputError("model config: embedding dims must be divisible by 4 (2-D sin-cos positions)")

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid ``(rows, columns)``: ``(img_size // patch_size,) * 2``."""
        side = self.img_size // self.patch_size
        return side, side

    @property
    def num_patches(self) -> int:
        """Patches per image, ``L = gh * gw``."""
        gh, gw = self.grid
        return gh * gw

    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-safe dict of every field (``mean``/``std`` as lists), read back by :meth:`from_dict`."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DMAEConfig:
        """Rebuild from :meth:`to_dict`'s output.

        Raises:
            ValueError: unknown keys (named), or values the constructor rejects.
        """
        return config_from_dict(cls, d, "model config")


class DenoisingMaskedAutoencoder(nn.Module):
    """ViT encoder over visible noisy patches + light decoder predicting every patch of the clean image.

    DMAE's model (Wu et al., ICLR 2023, Sec. 3): MAE's architecture (He et al., CVPR 2022) trained to
    reconstruct the clean image from a noised, masked one. Inputs are [0, 1] images; the
    :class:`~dmae.models.preprocess.InputAdapter` (``preprocess``) resizes and normalizes them inside.

    Raises:
        ValueError: (on construction) ``config.mean``/``config.std`` do not have ``in_chans`` values, or a
            std is not positive (from ``InputAdapter``).
    """

    def __init__(self, config: DMAEConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        # timm's Block types norm_layer as a class, but only calls it (timm passes such partials itself)
        norm_layer = cast("type[nn.LayerNorm]", partial(nn.LayerNorm, eps=1e-6))
        self.preprocess = InputAdapter(c.img_size, c.in_chans, c.mean, c.std)

        # --- encoder (timm ViT layout) ---
        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, c.embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, c.embed_dim), requires_grad=False
        )  # fixed sin-cos
        self.blocks = nn.ModuleList(
            [Block(c.embed_dim, c.num_heads, c.mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(c.depth)]
        )
        self.norm = norm_layer(c.embed_dim)

        # --- decoder ---
        self.decoder_embed = nn.Linear(c.embed_dim, c.decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, c.decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(c.decoder_embed_dim, c.decoder_num_heads, c.mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(c.decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(c.decoder_embed_dim)
        self.decoder_pred = nn.Linear(c.decoder_embed_dim, c.patch_size**2 * c.in_chans, bias=True)
        self.initialize_weights()

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        """Fixed sin-cos positions; xavier-uniform Linear (and patch-embed as a flattened Linear); tokens N(0, .02).

        MAE's ``initialize_weights`` (He et al., CVPR 2022); LayerNorms start at weight 1, bias 0.
        """
        grid = self.config.grid
        self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], grid))
        self.decoder_pos_embed.data.copy_(sincos_2d(self.decoder_pos_embed.shape[-1], grid))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_module)

    @staticmethod
    def _init_module(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ helpers
    @property
    def num_patches(self) -> int:
        """Patches per image ``L`` (see :attr:`DMAEConfig.num_patches`)."""
        return self.config.num_patches

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``[N, C, S, S]`` (model resolution) -> ``[N, L, p*p*C]``.

        Raises:
            ValueError: the image sides are not divisible by the patch size (:func:`dmae.corrupt.patchify`).
        """
        return patchify(imgs, self.config.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, L, p*p*C]`` -> ``[N, C, S, S]``.

        Raises:
            ValueError: the last dim is not ``p*p*C`` (:func:`dmae.corrupt.unpatchify`).
            RuntimeError: ``L`` is not the model's patch count (from ``torch.reshape``).
        """
        return unpatchify(x, self.config.patch_size, self.config.in_chans, self.config.grid)

    def target(self, clean: torch.Tensor) -> torch.Tensor:
        """The reconstruction target: the clean [0, 1] image, resized, normalized and patchified ``[N, L, p*p*C]``.

        DMAE's target is the clean image (Wu et al., ICLR 2023, Sec. 3), not the noisy input.

        Raises:
            ValueError: ``clean`` is not ``[N, C, H, W]`` or has a channel count the model cannot take.
        """
        return self.patchify(self.preprocess(clean))

    def to_pixels(self, pred: torch.Tensor) -> torch.Tensor:
        """Predicted (normalized) patches ``[N, L, p*p*C]`` -> images ``[N, C, S, S]`` in [0, 1] pixel space
        at model resolution (denormalized, not clipped).

        Raises:
            ValueError, RuntimeError: ``pred`` does not have the model's patch shape (see :meth:`unpatchify`).
        """
        return self.preprocess.denormalize(self.unpatchify(pred))

    # ------------------------------------------------------------------ forward
    def forward_encoder(self, x: torch.Tensor, masking: Masking) -> torch.Tensor:
        """Encode the visible patches of already-corrupted [0, 1] images ``x: [N, C, H, W]``.

        MAE's ``forward_encoder`` (He et al., CVPR 2022): positions are added before the visible patches
        are gathered, then the cls token (with its position) is prepended.

        Returns:
            The latent ``[N, 1 + L_keep, D]`` (cls token first).
        Raises:
            ValueError: ``x`` is not ``[N, C, H, W]`` or has a channel count the model cannot take, or
                ``masking`` was drawn for another batch size or patch count.
        """
        x = self.patch_embed(self.preprocess(x))  # [N, L, D]
        x = x + self.pos_embed[:, 1:, :]
        n, L, d = x.shape
        if masking.ids_keep.shape[0] != n or masking.mask.shape[1] != L:
            raise InputError(f"masking is for {tuple(masking.mask.shape)} patches, images give [{n}, {L}]")
        x = torch.gather(x, 1, masking.ids_keep.unsqueeze(-1).expand(-1, -1, d))  # [N, L_keep, D]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(n, -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Latent ``[N, 1 + L_keep, D]`` -> predicted normalized patches ``[N, L, p*p*C]`` for every patch.

        MAE's ``forward_decoder`` (He et al., CVPR 2022): mask tokens fill the removed positions,
        ``ids_restore [N, L]`` unshuffles them, and the cls token's prediction is dropped.
        """
        x = self.decoder_embed(latent)  # [N, 1 + L_keep, Dd]
        n, L = ids_restore.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(n, L + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # [N, L, Dd], shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def forward(self, x: torch.Tensor, masking: Masking) -> torch.Tensor:
        """Predict every patch of the clean image from the visible patches of the corrupted ``x``.

        Args:
            x: corrupted images in [0, 1] pixel space (noise already added), ``[N, C, H, W]``.
            masking: which patches the encoder sees (see :func:`dmae.corrupt.random_masking`).
        Returns:
            ``[N, L, p*p*C]`` predictions in normalized pixel space.
        Raises:
            ValueError: as :meth:`forward_encoder`.
        """
        return self.forward_decoder(self.forward_encoder(x, masking), masking.ids_restore)

    # ------------------------------------------------------------------ parts
    def encoder_keys(self) -> list[str]:
        """State-dict keys of the encoder (what MAE's public encoder-only checkpoints hold)."""
        return [k for k in self.state_dict() if not (k.startswith("decoder") or k == "mask_token")]

    def num_params(self, part: str = "all") -> int:
        """Parameter count of ``'encoder'``, ``'decoder'`` or ``'all'`` (fixed positions included).

        Any other ``part`` counts nothing and returns 0.
        """
        enc = set(self.encoder_keys())
        total = 0
        for name, p in self.named_parameters():
            is_enc = name in enc
            if part == "all" or (part == "encoder" and is_enc) or (part == "decoder" and not is_enc):
                total += p.numel()
        return total
