"""Fixed 2-D sine-cosine positional embeddings in the MAE layout (He et al., CVPR 2022; reference
``util/pos_embed.py``).

For a grid of ``gh x gw`` patches (row-major) and width ``D``: the first ``D/2`` channels encode the
column index, the last ``D/2`` the row index; each half is ``[sin(pos * w_k), cos(pos * w_k)]`` with
``w_k = 10000^(-k / (D/4))``. With ``cls_token`` a zero row is prepended. Official checkpoints store these
values, so the layout matters when a fresh model meets loaded weights.
"""

from __future__ import annotations

import torch

from dmae.errors import InputError


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """``pos: [M]`` -> ``[M, dim]`` = ``[sin(pos * omega), cos(pos * omega)]`` (float64).

    ``omega_k = 10000^(-k / (dim/2))`` for ``k < dim/2``, as MAE's ``get_1d_sincos_pos_embed_from_grid``.

    Raises:
        ValueError: ``dim`` is odd.
    """
    if dim % 2:
        raise InputError(f"embedding dim must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # [D/2]
    out = pos.to(torch.float64)[:, None] * omega[None, :]  # [M, D/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """Return ``[1, (1 if cls_token) + gh*gw, dim]`` float32 positional embeddings.

    MAE's ``get_2d_sincos_pos_embed``: ``grid = (gh, gw)``, patches row-major; the first ``dim/2`` channels
    encode the column, the last ``dim/2`` the row; the cls row, if any, is zeros.

    Raises:
        ValueError: ``dim`` is not divisible by 4.
    """
    if dim % 4:
        raise InputError(f"2-D sin-cos embedding needs dim divisible by 4, got {dim}")
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)
