"""The one-call Python API: certify any ``nn.Module`` over any data set, with the CLI's logs, checks and resumption.

``dmae certify`` builds a model and a data set from options; :func:`certify` takes them from the caller. Both run
the same code (:mod:`dmae.certification.runner`): the pre-flight checks and probe, CERTIFY (Cohen et al., ICML
2019) or sequential CERTIFY, one TSV row per image in the field's format with a JSON of its settings, exact
resumption, sharding under ``torchrun``. The result gives the certified-accuracy table and the HTML report
(:mod:`dmae.reporting`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from dmae import _API
from dmae import checkpoint as ckpt
from dmae.certification.log import LogError, read_log_rows
from dmae.certification.runner import CertifyConfig, certify_module
from dmae.config import Options
from dmae.datasets import user_data
from dmae.errors import InputError, python_terms, temporary_folder
from dmae.models.classifier import ViTClassifier
from dmae.reporting.report import CertLog, Comparison, Table, distinct_names, expand_folders, summarize
from dmae.reporting.report import compare as compare_logs
from dmae.reporting.report import read_log as read_certlog
from dmae.runtime import module_device
from dmae.training.engine import TrainResult
from dmae.training.finetune import FinetuneConfig, LinprobeConfig
from dmae.training.finetune import finetune as run_finetune
from dmae.training.pretrain import PretrainConfig
from dmae.training.pretrain import pretrain as run_pretrain


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
            raise InputError("the HTML report reads the log files: certify with log_dir=FOLDER to keep them")
        write_html_report(path, list(self.paths), [], title)
        return Path(path)


# the keywords of certify / predict where the command line names the option otherwise
_CERTIFY_NAMES = {"output_dir": "log_dir", "batch": "batch_size", "max": "max_images", "checkpoint": "model"}


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
    candidate: Literal["select", "label"] = "select",
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
    shard: tuple[int, int] | str | None = None,
    merge: bool = False,
    allow_partial: bool = False,
) -> CertifyResult:
    """Certify ``model`` (any ``nn.Module`` mapping [0, 1] images ``[B, C, H, W]`` to logits ``[B, K]``; its first
    layer normalizes) on every ``skip``-th image of ``dataset`` (any map-style data set of ``(image [C, H, W] in
    [0, 1], label)``), at each ``sigma``.

    CERTIFY as in Cohen et al. (ICML 2019): ``n0`` samples select the class, ``n`` samples bound p_A (one-sided
    Clopper-Pearson at ``alpha``), radius ``sigma * Phi^-1(p_A_lower)``. ``sequential="targets"`` or
    ``"continuous"`` stops sampling once the answer is settled (docs/sequential.md; at most ``n_max`` samples,
    default ``n``); ``candidate="label"`` certifies each image's label instead of a class chosen by ``n0``
    selection samples (a row is the label when certified, -1 when not: what certified accuracy counts);
    ``sound=True`` certifies soundly in floating point (docs/sound.md; 8-bit images). The model runs on its own
    device and is never modified (a model in training mode is certified in eval mode and restored). The noise of
    image ``idx`` depends only on (``seed``, idx), so rows do not depend on ``batch_size``.

    With ``log_dir``, rows go to ``log_dir/{mode}_sigma{S}.tsv`` (+ ``.json``) as they are done; calling again
    continues them, and a log of other settings, weights or images is refused. Under ``torchrun``
    each rank certifies its share (put the model on ``cuda:LOCAL_RANK``); ``shard=(K, N)`` certifies every N-th
    image from the K-th into a log of its own, and ``merge=True`` (``allow_partial``: with images missing) merges
    the shard logs into the main one (docs/cluster.md). Without ``log_dir``, the logs live in a temporary folder.

    Returns a :class:`CertifyResult` (``.logs``, ``.table()``, ``.html(path)``).

    Raises:
        InputError: a bad setting, a log written with other settings, images outside [0, 1] or not floating point,
            labels outside the model's classes, logits not ``[B, K]``.  ShardError: (``merge``) not one split.
    """
    targets = tuple(radii) if radii is not None and sequential == "targets" else None
    options: dict[str, Any] = dict(n0=n0, n=n, alpha=alpha, sequential=sequential, n_max=n_max, radii=targets)
    options |= dict(sound=sound, candidate=candidate, **_shard_options(shard, merge, allow_partial, log_dir))
    with _certify_config(
        model, sigma, log_dir, data_name, batch_size, seed, skip, max_images, precision, progress, options
    ) as cfg:
        runs = certify_module(model, dataset, cfg, "certify", num_classes)
        logs = [read_certlog(r.path) for r in runs]
    return CertifyResult(logs, [r.path for r in runs] if log_dir is not None else None)


def _shard_options(
    shard: tuple[int, int] | str | None, merge: bool, allow_partial: bool, log_dir: str | Path | None
) -> dict[str, Any]:
    """The CLI's ``--shard K/N``, ``--merge`` and ``--allow-partial`` of an API call (checked with the other options).

    Raises:
        ValueError: ``shard`` not a pair of integers or ``"K/N"``; a shard or a merge without ``log_dir`` (their
            logs are the point: a temporary folder would lose them).
    """
    if isinstance(shard, (tuple, list)):
        if len(shard) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in shard):
            raise InputError(f"shard must be (K, N), two integers with 0 <= K < N; got {shard!r}")
        shard = f"{shard[0]}/{shard[1]}"
    if (shard is not None or merge) and log_dir is None:
        raise InputError(f"{'shard' if shard is not None else 'merge'} needs log_dir: the logs are kept there")
    return dict(shard=shard, merge=merge, allow_partial=allow_partial)


@contextlib.contextmanager
def _certify_config(
    model: Any,
    sigma: float | Sequence[float],
    log_dir: str | Path | None,
    data_name: str,
    batch_size: int,
    seed: int,
    skip: int,
    max_images: int | None,
    precision: str,
    progress: bool,
    options: dict[str, Any],
) -> Iterator[CertifyConfig]:
    """The :class:`CertifyConfig` of an API call, writing to ``log_dir`` or (None) to a folder removed afterwards;
    what is raised, warned or printed while it is in use names the call's keywords (``log_dir``, not
    ``--output-dir``)."""
    sigmas = (float(sigma),) if isinstance(sigma, (int, float)) else tuple(float(s) for s in sigma)
    with (
        python_terms(**_CERTIFY_NAMES),
        tempfile.TemporaryDirectory(prefix="dmae-certify-") as scratch,
        temporary_folder(scratch) if log_dir is None else contextlib.nullcontext(),
    ):
        yield CertifyConfig(
            checkpoint=f"<{type(model).__name__}>",
            data=data_name,
            sigma=sigmas,
            skip=skip,
            max=max_images,
            batch=batch_size,
            seed=seed,
            output_dir=str(log_dir if log_dir is not None else scratch),
            device=str(module_device(model)),
            precision=precision,  # type: ignore[arg-type]  # checked by CertifyConfig's validation
            progress=progress,
            **options,
        )


@dataclass
class PredictLog:
    """PREDICT's answers at one ``sigma`` (Cohen et al., ICML 2019): arrays ``[N]`` of image indices, labels and
    predictions (-1: abstained, the top two classes' counts not told apart at level alpha); ``path`` the TSV."""

    sigma: float
    idx: np.ndarray
    label: np.ndarray
    predict: np.ndarray
    path: Path

    @property
    def accuracy(self) -> float:
        """Fraction of images predicted correctly (an abstention counts as wrong); NaN with no image."""
        return float(np.mean(self.predict == self.label)) if len(self.idx) else float("nan")

    @property
    def abstention(self) -> float:
        """Fraction of images abstained on; NaN with no image."""
        return float(np.mean(self.predict == -1)) if len(self.idx) else float("nan")

    def __str__(self) -> str:
        return (
            f"sigma {self.sigma:g}: {len(self.idx)} images, accuracy {100 * self.accuracy:.1f}%, "
            f"abstained {100 * self.abstention:.1f}%"
        )


def read_predict_log(path: str | Path, sigma: float) -> PredictLog:
    """A PREDICT log (``idx label predict correct time``) as a :class:`PredictLog`.

    Raises:
        LogError: unreadable, missing columns, or a row that is not integers (file and line named).
    """
    rows = read_log_rows(path, need=("idx", "label", "predict"))
    cols = [rows.header.index(c) for c in ("idx", "label", "predict")]
    try:
        arr = np.array([[int(f[j]) for j in cols] for f in rows.rows], dtype=np.int64).reshape(-1, 3)
    except ValueError as e:
        raise LogError(f"{path}: a row that is not integers: {e}") from e
    return PredictLog(sigma, arr[:, 0], arr[:, 1], arr[:, 2], Path(path))


@dataclass
class PredictResult:
    """The answers of one :func:`predict` call, one :class:`PredictLog` per sigma; ``print(result)`` shows them."""

    logs: list[PredictLog]

    def __str__(self) -> str:
        return "\n".join(str(lg) for lg in self.logs)


def predict(
    model: nn.Module,
    dataset: Any,
    *,
    sigma: float | Sequence[float],
    n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    seed: int = 0,
    skip: int = 1,
    max_images: int | None = None,
    num_classes: int | None = None,
    log_dir: str | Path | None = None,
    data_name: str = "custom",
    precision: str = "auto",
    progress: bool = False,
    shard: tuple[int, int] | str | None = None,
    merge: bool = False,
    allow_partial: bool = False,
) -> PredictResult:
    """The smoothed classifier's prediction for every ``skip``-th image of ``dataset``: PREDICT of Cohen et al.
    (ICML 2019), ``n`` noise samples vote and the top class is returned when a two-sided binomial test tells it
    from the runner-up at level ``alpha`` (else -1, abstain). Model, data set, logs and resumption as
    :func:`certify` (``dmae predict`` runs the same code), ``shard`` / ``merge`` / ``allow_partial`` too; the log's
    rows are ``idx label predict correct time``.

    Returns:
        a :class:`PredictResult` (``.logs``: accuracy and abstention per sigma).
    Raises:
        ValueError: as :func:`certify`.
    """
    options: dict[str, Any] = dict(n=n, alpha=alpha)
    options.update(_shard_options(shard, merge, allow_partial, log_dir))
    with _certify_config(
        model, sigma, log_dir, data_name, batch_size, seed, skip, max_images, precision, progress, options
    ) as cfg:
        runs = certify_module(model, dataset, cfg, "predict", num_classes)
        logs = [read_predict_log(r.path, r.sigma) for r in runs]
    if log_dir is None:  # the files are gone with the temporary folder: say so rather than name them
        for lg in logs:
            lg.path = Path("(not kept: give log_dir)")
    return PredictResult(logs)


# ----------------------------------------------------------------------------- training
C = TypeVar("C", bound=Options)


def _options(cls: type[C], config: C | None, data: str | None, options: dict[str, Any]) -> C:
    """``config`` (default: ``cls()``) with ``options`` (the CLI's option names, ``--blr`` -> ``blr``; paths may be
    ``Path``s) set; the
    options left unset keep their defaults, which a run adapts to small data as the CLI's do.

    Raises:
        ValueError: an option ``cls`` does not have (the known ones listed).
    """
    base = config if config is not None else cls()
    options = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in options.items()}  # paths as the CLI's
    return base.updated(**options, **({"data": data} if data is not None else {}))


def pretrain(
    data: str | Dataset = "fashion-mnist",
    *,
    eval_data: Dataset | None = None,
    config: PretrainConfig | None = None,
    **options: Any,
) -> TrainResult:
    """Pretrain a DMAE (Wu et al., ICLR 2023): a ViT autoencoder that reconstructs images from Gaussian-noised,
    masked inputs. ``dmae pretrain`` runs the same code.

    ``data`` is a built-in data set's name (``fashion-mnist``, ``cifar10``, ``imagenet``, ``folder``) or a map-style
    data set of your own, items ``(image [C, H, W] float in [0, 1], label)`` of one shape (labels are not used;
    its per-channel statistics become the model's input normalization); ``eval_data`` (same shape) is scored for
    reconstruction after every epoch (default: the training images). ``options`` are ``dmae pretrain``'s
    (``output_dir``, ``model``, ``sigma``, ``mask_ratio``, ``epochs``, ``batch_size``, ``blr``, ``resume``, ...;
    ``dmae pretrain --help`` lists them), applied over ``config``. The run folder (``output_dir``) holds the
    config, a resumable ``checkpoint.pt``, ``log.jsonl`` and ``model.safetensors``; ``resume=True`` continues it
    (refused if the options or the images differ).

    Returns:
        the :class:`~dmae.training.engine.TrainResult` (``.model``, ``.eval_start`` / ``.eval_end``, ``.step``).
    Raises:
        ValueError: an unknown or bad option.  DataError: unreadable data, images not [0, 1] floats.
        FileExistsError: ``output_dir`` holds a run and ``resume`` is off.  FloatingPointError: training diverged.
    """
    with python_terms():
        if isinstance(data, str):
            return run_pretrain(_options(PretrainConfig, config, data, options))
        cfg = _options(PretrainConfig, config, None, options)
        return run_pretrain(cfg, user_data(data, eval_data, need_classes=False))


def finetune(
    data: str | Dataset = "fashion-mnist",
    *,
    test_data: Dataset | None = None,
    num_classes: int | None = None,
    linprobe: bool = False,
    config: FinetuneConfig | None = None,
    **options: Any,
) -> TrainResult:
    """Fine-tune a (pretrained) DMAE encoder into a base classifier for Gaussian smoothing: consistency
    regularization (``method="cr"``, Jeong & Shin, NeurIPS 2020) or cross-entropy on noisy copies (``"rs"``,
    Cohen et al., ICML 2019), as Wu et al. (ICLR 2023); ``linprobe=True`` trains only a linear head (LARS). ``dmae
    finetune`` / ``dmae linprobe`` run the same code.

    ``data`` is a built-in data set's name or a map-style data set of your own, items ``(image [C, H, W] float in
    [0, 1], label)``; its class count is ``num_classes``, else its ``classes`` attribute. ``val_size`` of its images
    are held out to select ``model_best`` (default: 10% up to 5,000); ``test_data`` is scored every epoch (never
    used to select). ``options`` are ``dmae finetune``'s (``init`` (pretrained weights), ``model``, ``sigma``,
    ``epochs``, ``output_dir``, ``resume``, ...), applied over ``config``. The run folder holds
    ``model_best.safetensors`` (load it with :func:`load_classifier`) and a resumable checkpoint.

    Returns:
        the :class:`~dmae.training.engine.TrainResult` (``.best``: the selected epoch's accuracies under noise).
    Raises:
        ValueError: an unknown or bad option (no ``init`` and no ``model``).  DataError: unreadable data, images not
            [0, 1] floats, no class count.  CheckpointError: ``init`` unreadable or not fitting.
    """
    cls: type[FinetuneConfig] = LinprobeConfig if linprobe else FinetuneConfig
    with python_terms():
        if isinstance(data, str):
            return run_finetune(_options(cls, config, data, options))
        cfg = _options(cls, config, None, options)
        return run_finetune(cfg, user_data(data, test_data, num_classes=num_classes))


# ----------------------------------------------------------------------------- loading and reading
def load_classifier(path: str | Path) -> ViTClassifier:
    """The base classifier a fine-tuning run saved (a run folder, ``model_best`` / ``model_last.safetensors``, or
    an official fine-tuned DMAE checkpoint), in eval mode on the CPU. Read without executing code (safetensors, or
    ``torch.load(weights_only=True)``). It carries ``trained_sigma`` (the noise it was trained at, when recorded),
    so :class:`~dmae.smoothing.Smooth` and :func:`certify` warn when it is certified at another sigma.

    Raises:
        CheckpointError: no such file, unreadable, not a trained classifier (no head), or non-finite weights.
    """
    resolved = ckpt.resolve_checkpoint(path)
    head = ckpt.head_classes(ckpt.read_weights(resolved)[0])
    if head is None:
        raise ckpt.CheckpointError(f"{resolved} is not a trained classifier (it has no head); fine-tune it first")
    model, _ = ckpt.load_classifier(resolved, head[0], pool=None)
    return model.eval()


def read_log(path: str | Path) -> CertLog:
    """A certification log (ours, or any tool's TSV with ``idx label predict radius correct`` columns) with its
    settings; see :func:`dmae.reporting.report.read_log`. ``dmae.table([...])`` tabulates several.

    Raises:
        LogError: unreadable, missing columns, a malformed or self-contradicting row (file and line named).
    """
    return read_certlog(path)


LogLike = CertLog | CertifyResult | str | Path  # what compare() and table() take for a log (a path: file or folder)


def _as_logs(items: LogLike | Sequence[LogLike]) -> list[CertLog]:
    """Read logs from read logs, :class:`CertifyResult` s (each of their sigmas) and log files or folders (the logs
    in a folder, shard logs of one sigma as one log), in order. Logs read from files are named as ``dmae report``
    names them: the file's stem with as many of its folders as it takes to tell them apart.

    Raises:
        LogError: an unreadable log.  ReportError: a folder with no log in it.
    """
    if isinstance(items, (CertLog, CertifyResult, str, os.PathLike)):
        items = [items]
    entries: list[tuple[CertLog | None, Path | None]] = []
    for x in items:
        if isinstance(x, CertLog):
            entries.append((x, None))
        elif isinstance(x, CertifyResult):
            paths: list[Path | None] = list(x.paths) if x.paths else [None] * len(x.logs)
            entries += list(zip(x.logs, paths, strict=True))
        else:
            entries += [(None, p) for p in expand_folders([x])]
    names = iter(distinct_names([p for _, p in entries if p is not None]))
    logs = []
    for lg, path in entries:
        if path is not None:  # every path-named log takes its distinct name, in order
            lg = dataclasses.replace(lg or read_certlog(path), name=next(names))
        assert lg is not None
        logs.append(lg)
    return logs


def compare(a: LogLike, b: LogLike, *, radii: Sequence[float] | None = None) -> Comparison:
    """Paired comparison of two classifiers certified on the same images (see
    :func:`dmae.reporting.report.compare`): certified accuracy per radius, the difference, its paired standard
    error and the exact McNemar p-value; ACR likewise. ``a`` / ``b``: a log file, a read log, or a one-sigma
    :class:`CertifyResult`; ``print(dmae.compare(a, b))`` shows the table.

    Raises:
        ReportError: the logs do not hold the same images, or give an image different labels.  InputError: a
            result of several sigmas, or a folder of several logs.  LogError: an unreadable log.
    """
    both = _as_logs([a, b])
    if len(both) != 2:
        raise InputError(
            f"compare takes one log on each side, got {len(both)} logs ({', '.join(lg.name for lg in both)}): "
            "give one of a result's .logs, or a log file rather than a folder"
        )
    return compare_logs(both[0], both[1], tuple(radii) if radii is not None else None)


def table(logs: LogLike | Sequence[LogLike], radii: Sequence[float] | None = None) -> Table:
    """The certified-accuracy table of logs (files, folders of logs, read logs or results), as ``dmae report``
    prints it: one row per log and the best sigma per radius.

    Raises:
        ReportError: no logs, or a folder with none.  LogError: an unreadable log.
    """
    return summarize(_as_logs(logs), tuple(radii) if radii is not None else None)


# the names dmae itself exports from here (dmae._API), and the per-sigma answer of predict()
__all__ = [*_API, "PredictLog"]
