"""Figures as PNG files, drawn headless (matplotlib's Agg backend): shared by ``report`` and ``visualize``."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, so figures render without a display.

    matplotlib is imported on the first call, not when this module is imported.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: Any, dpi: int) -> bytes:
    """Lay out ``fig``, render it as PNG bytes at ``dpi`` and close it."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    return buf.getvalue()


def write_png(fig: Any, path: str | Path, dpi: int) -> Path:
    """:func:`png_bytes` written to ``path`` (its folder created); returns the path.

    Raises:
        OSError: the folder cannot be created or the file written.
    """
    png = png_bytes(fig, dpi)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path
