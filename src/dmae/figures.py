"""Figures as PNG files, drawn headless (matplotlib's Agg backend): shared by ``report`` and ``visualize``."""

from __future__ import annotations

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


def write_png(fig: Any, path: str | Path, dpi: int) -> Path:
    """Lay out ``fig``, write it to ``path`` (its folder created) as a PNG at ``dpi`` and close it; returns
    the path.

    Raises:
        OSError: the folder cannot be created or the file written.
    """
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
