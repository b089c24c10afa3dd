"""The one-call Python API: certify any ``nn.Module`` over any data set, with the CLI's logs, checks and resumption.

``dmae certify`` builds a model and a data set from options; :func:`certify` takes them from the caller. Both run
the same code (:mod:`dmae.certification.runner`): the pre-flight checks and probe, CERTIFY (Cohen et al., ICML
2019) or sequential CERTIFY, one TSV row per image in the field's format with a JSON of its settings, exact
resumption, sharding under ``torchrun``. The result gives the certified-accuracy table and the HTML report
(:mod:`dmae.reporting`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn

from dmae.certification.runner import CertifyConfig, certify_module
from dmae.reporting.report import CertLog, Table, read_log, summarize
from dmae.runtime import module_device


@dataclass
class CertifyResult:
    """The per-image certificates of one :func:`certify` call, one :class:`~dmae.reporting.report.CertLog` per
    sigma (arrays ``[N]``: ``idx``, ``label``, ``predict`` (-1: abstain), ``radius`` (l2, [0, 1] pixel units),
    ``correct``), and the log files when the call kept them (``log_dir``)."""

    logs: list[CertLog]
    paths: list[Path] | None

    def table(self, radii: Sequence[float] | None = None) -> Table:
        """Certified accuracy at ``radii`` (default: the data set's standard radii), ACR and abstention, one row
        per sigma (and the best sigma per radius); ``print(result.table())`` shows it."""
        return summarize(self.logs, tuple(radii) if radii is not None else None)

    def html(self, path: str | Path, title: str = "dmae report") -> Path:
        """Write the self-contained HTML report of these logs.

        Raises:
            ValueError: the call kept no log files (give ``log_dir``).
        """
        from dmae.reporting.html_report import write_html_report

        if self.paths is None:
            raise ValueError("the HTML report reads the log files: certify with log_dir=FOLDER to keep them")
        write_html_report(path, list(self.paths), [], title)
        return Path(path)


def certify(
    model: nn.Module,
    dataset: Any,
    *,
    sigma: float | Sequence[float],
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    sequential: Literal["targets", "continuous"] | None = None,
    n_max: int | None = None,
    radii: Sequence[float] | None = None,
    batch_size: int = 1000,
    seed: int = 0,
    skip: int = 1,
    max_images: int | None = None,
    sound: bool = False,
    num_classes: int | None = None,
    log_dir: str | Path | None = None,
    data_name: str = "custom",
    precision: str = "auto",
    progress: bool = False,
) -> CertifyResult:
    """Certify ``model`` (any ``nn.Module`` mapping [0, 1] images ``[B, C, H, W]`` to logits ``[B, K]``; its first
    layer normalizes) on every ``skip``-th image of ``dataset`` (any map-style data set of ``(image [C, H, W] in
    [0, 1], label)``), at each ``sigma``.

    CERTIFY as in Cohen et al. (ICML 2019): ``n0`` samples select the class, ``n`` samples bound p_A (one-sided
    Clopper-Pearson at ``alpha``), radius ``sigma * Phi^-1(p_A_lower)``. ``sequential="targets"`` or
    ``"continuous"`` stops sampling once the answer is settled (docs/sequential.md; at most ``n_max`` samples,
    default ``n``); ``sound=True`` certifies soundly in floating point (docs/sound.md; 8-bit images). The model
    runs on its own device and is never modified (a model in training mode is certified in eval mode and
    restored). The noise of image ``idx`` depends only on (``seed``, idx), so rows do not depend on
    ``batch_size`` (noise samples per forward pass).

    With ``log_dir``, rows go to ``log_dir/{mode}_sigma{S}.tsv`` (+ ``.json``) as they are done, and calling again
    with the same arguments continues them (an interrupted call loses at most the images in flight); a log
    written with other settings, another model's weights or another data set is refused. Under ``torchrun``
    each rank certifies its share (put the model on ``cuda:LOCAL_RANK``). Without ``log_dir``, the logs live in a
    temporary folder for the call.

    Returns:
        a :class:`CertifyResult` (``.logs``, ``.table()``, ``.html(path)``).
    Raises:
        ValueError: a bad setting (named), a log written with other settings, images outside [0, 1] or not
            floating point, labels outside the model's classes, a model whose logits are not ``[B, K]``.
    """
    sigmas = (float(sigma),) if isinstance(sigma, (int, float)) else tuple(float(s) for s in sigma)
    kept = Path(log_dir) if log_dir is not None else None
    with tempfile.TemporaryDirectory(prefix="dmae-certify-") as scratch:
        cfg = CertifyConfig(
            checkpoint=f"<{type(model).__name__}>",
            data=data_name,
            sigma=sigmas,
            n0=n0,
            n=n,
            alpha=alpha,
            skip=skip,
            max=max_images,
            batch=batch_size,
            seed=seed,
            output_dir=str(kept or scratch),
            device=str(module_device(model)),
            precision=precision,
            progress=progress,
            sequential=sequential,
            n_max=n_max,
            radii=tuple(radii) if radii is not None and sequential == "targets" else None,
            sound=sound,
        )  # type: ignore[arg-type]
        runs = certify_module(model, dataset, cfg, "certify", num_classes)
        logs = [read_log(r.path) for r in runs]
    return CertifyResult(logs, [r.path for r in runs] if kept else None)


__all__ = ["CertifyResult", "certify"]
