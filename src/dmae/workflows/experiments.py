"""``dmae experiment``: each of the paper's experiments as one command, pretrain -> fine-tune -> certify -> report.

An experiment is a YAML file in ``configs/experiments/`` (or any path): a title, the paper's table, the
``torchrun`` commands for one node and several, and its **stages** in order. A stage runs one of the package's
jobs with a shipped preset (``config``) and overrides (``set``):

- ``pretrain`` / ``finetune`` / ``linprobe``: a training run in ``OUT/<stage>``; ``init`` names the stage whose
  export it starts from (``model.safetensors`` of a pretraining stage);
- ``certify``: every classifier of ``runs`` (stage names) is certified at its training sigma, or at each of
  ``sigmas``, into ``OUT/<stage>/<run>``; ``set`` gives the protocol (``skip``, ``n``, ``sequential``, ...).

``groups`` (label -> classifier stages) are the comparisons of the final report: one certified-accuracy table
per group (best sigma per radius), written to ``OUT/report.md``. ``comparisons`` (pairs of classifier stages
certified on the same images) add paired tables: the difference in certified accuracy per radius with its
paired standard error and McNemar p-value (:func:`dmae.reporting.report.compare`).

Re-running the same command skips what is done and resumes what is not: training stages resume from their
checkpoint (a finished run returns at once), certification skips the rows already in its logs. ``--use
STAGE=PATH`` replaces a stage by weights you have (an official checkpoint, or a pretraining shared by several
experiments). ``--smoke`` runs the same stages through the same code on a shrunken problem (the pico model,
Fashion-MNIST, a few steps, four test images, small n): the tests run every shipped experiment this way.

The GPU-hour estimates come from the throughputs measured in ``benchmarks/RESULTS.md`` (see
:data:`THROUGHPUT`).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from dmae import config as C
from dmae.errors import DmaeError, InputError, StageInterrupted

if TYPE_CHECKING:
    from dmae.certification.runner import CertifyConfig
    from dmae.training.engine import TrainOptions

COMMANDS = ("pretrain", "finetune", "linprobe", "certify")
RUN_FILES = {
    "pretrain": "model.safetensors",
    "finetune": "model_last.safetensors",
    "linprobe": "model_last.safetensors",
}

# Measured in benchmarks/RESULTS.md on one H100 / H200 (bf16): pretraining images/s (ViT-B batch 512, ViT-L batch
# 128, 75% masking) and certification forward passes/s (compiled). Fine-tuning has no measurement yet: its
# images/s are estimated from the FLOPs, 3 x forward(197 tokens) x m noise copies against pretraining's measured
# 58.8 / 124.7 GFLOP per image; a forward pass is 35.2 (ViT-B) / 123.2 (ViT-L) GFLOP, from the certification
# rows of benchmarks/RESULTS.md (MFU x 989.4 TFLOP/s / passes per second).
THROUGHPUT = {
    "dmae_vit_base_patch16_dec512d8b": {
        "pretrain": 3517.0,
        "forward_gflop": 35.2,
        "pretrain_gflop": 58.8,
        "certify": 11087.0,
    },
    "dmae_vit_large_patch16_dec512d8b": {
        "pretrain": 1401.0,
        "forward_gflop": 123.2,
        "pretrain_gflop": 124.7,
        "certify": 3726.0,
    },
}
TRAIN_IMAGES = {"imagenet": 1_281_167, "cifar10": 50_000, "fashion-mnist": 60_000}
EVAL_IMAGES = {"imagenet": 50_000, "cifar10": 10_000, "fashion-mnist": 10_000}

# --smoke: the same stages on a problem of seconds (tests run every shipped experiment this way)
SMOKE: dict[str, dict[str, Any]] = {
    "train": {
        "data": "fashion-mnist",
        "data_root": None,
        "train_subset": 128,
        "batch_size": 32,
        "accum_iter": 1,
        "epochs": 1,
        "warmup_epochs": 0.5,
        "num_workers": 0,
        "randaug": None,
        "eval_images": 16,
        "save_every": 0,
        "log_every": 2,
        "img_size": None,
    },
    "pretrain": {"model": "dmae_vit_pico_patch4_dec32d1b"},
    "finetune": {"val_size": 32},
    "linprobe": {"val_size": 32},
    "certify": {
        "data": "fashion-mnist",
        "data_root": None,
        "n0": 10,
        "n": 50,
        "n_max": None,
        "skip": 2500,
        "max": None,
        "batch": 200,
    },
}


class ExperimentError(DmaeError, ValueError):
    """A malformed experiment file, an unknown experiment or stage, or a stage that cannot run yet."""


@dataclass
class Stage:
    """One step of an experiment: a job (``command``) with a preset and overrides."""

    name: str
    command: str
    config: str | None = None
    set: dict[str, Any] = field(default_factory=dict)
    init: str | None = None  # training stages: the stage whose export they start from
    runs: list[str] = field(default_factory=list)  # certify: the classifier stages
    sigmas: list[float] | None = None  # certify: noise levels (default: each run's training sigma)
    effective_batch: int | None = None  # training: batch x accum_iter x processes; accum_iter follows the world size


@dataclass
class Experiment:
    """A whole experiment as shipped in ``configs/experiments/<name>.yaml``."""

    name: str
    title: str
    paper: str
    stages: list[Stage]
    groups: dict[str, list[str]]
    torchrun: dict[str, str] = field(default_factory=dict)
    notes: str = ""
    comparisons: list[list[str]] = field(default_factory=list)  # [a, b]: a against b on the same images

    def stage(self, name: str) -> Stage:
        """The stage called ``name``.  Raises ExperimentError naming the known stages."""
        for s in self.stages:
            if s.name == name:
                return s
        raise ExperimentError(
            f"experiment {self.name} has no stage {name!r}; stages: {', '.join(s.name for s in self.stages)}"
        )


def experiments_dir() -> Path:
    """The folder of the shipped experiment files."""
    return Path(str(resources.files("dmae") / "configs" / "experiments"))


def list_experiments() -> list[str]:
    """Names of the shipped experiments, sorted."""
    return sorted(p.stem for p in experiments_dir().glob("*.yaml"))


TOP_KEYS = {"title", "paper", "torchrun", "stages", "groups", "notes", "comparisons"}


def load_experiment(name_or_path: str) -> Experiment:
    """Read a shipped experiment (by name) or an experiment file, and check that its stages fit together.

    Raises:
        ExperimentError: unknown name (listing the shipped ones), a stage with an unknown command, a reference to
            a stage that does not come before it, a group naming no classifier stage, a comparison that is not two
            different certified classifier stages or whose certify stages choose different test images (skip,
            max, split), an unknown key.
    """
    p = Path(name_or_path)
    if p.suffix not in (".yaml", ".yml"):
        p = experiments_dir() / f"{name_or_path}.yaml"
        if not p.is_file():
            raise ExperimentError(f"unknown experiment {name_or_path!r}; shipped: {', '.join(list_experiments())}")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict):
        raise ExperimentError(
            f"{p.name} is not a mapping of keys ({', '.join(sorted(TOP_KEYS))}): it holds a {type(raw).__name__}"
        )
    if set(raw) - TOP_KEYS:  # a misspelt key (comparison:) would be dropped silently
        raise ExperimentError(
            f"{p.name}: unknown keys {sorted(set(raw) - TOP_KEYS)}; an experiment takes {', '.join(sorted(TOP_KEYS))}"
        )
    known = set(Stage.__dataclass_fields__) - {"name"}
    for n, spec in (raw.get("stages") or {}).items():
        if not isinstance(spec, dict) or set(spec) - known:
            extra = sorted(set(spec) - known) if isinstance(spec, dict) else spec
            raise ExperimentError(
                f"{p.name}: stage {n} has unknown keys {extra}; a stage takes {', '.join(sorted(known))}"
            )
    stages = [Stage(name=n, **spec) for n, spec in (raw.get("stages") or {}).items()]
    exp = Experiment(
        p.stem,
        raw.get("title", p.stem),
        raw.get("paper", ""),
        stages,
        raw.get("groups") or {},
        raw.get("torchrun") or {},
        raw.get("notes", ""),
        raw.get("comparisons") or [],
    )
    _check(exp)
    return exp


def _check(exp: Experiment) -> None:
    seen: dict[str, Stage] = {}
    for s in exp.stages:
        if s.command not in COMMANDS:
            raise ExperimentError(f"{exp.name}: stage {s.name} has command {s.command!r}; one of {', '.join(COMMANDS)}")
        for ref in ([s.init] if s.init else []) + s.runs:
            if ref not in seen:
                raise ExperimentError(f"{exp.name}: stage {s.name} refers to {ref!r}, which is not an earlier stage")
        if s.command == "certify" and any(seen[r].command == "pretrain" for r in s.runs):
            raise ExperimentError(f"{exp.name}: stage {s.name} certifies a pretraining stage; certify classifiers")
        if s.init and seen[s.init].command == "certify":
            raise ExperimentError(f"{exp.name}: stage {s.name} starts from {s.init}, a certify stage")
        if s.sigmas is not None and (
            not isinstance(s.sigmas, list)
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in s.sigmas)
        ):
            raise ExperimentError(f"{exp.name}: stage {s.name} has sigmas {s.sigmas!r}; give a list of numbers > 0")
        names = set((_config_class(s.command) if s.command != "certify" else _certify_class()).__dataclass_fields__)
        if set(s.set) - names:
            raise ExperimentError(
                f"{exp.name}: stage {s.name} sets unknown options {sorted(set(s.set) - names)} of dmae {s.command}"
            )
        seen[s.name] = s
    for label, runs in exp.groups.items():
        for r in runs:
            if r not in seen or seen[r].command not in ("finetune", "linprobe"):
                raise ExperimentError(f"{exp.name}: group {label!r} names {r!r}, which is not a fine-tuning stage")
    certified = {r for s in exp.stages if s.command == "certify" for r in s.runs}
    for pair in exp.comparisons:
        if not isinstance(pair, list) or len(pair) != 2 or any(r not in certified for r in pair) or pair[0] == pair[1]:
            raise ExperimentError(
                f"{exp.name}: comparison {pair!r} must be two different classifier stages that a "
                f"certify stage certifies ({', '.join(sorted(certified)) or 'none'})"
            )
        _check_same_images(exp, *pair)


# the certify options that choose which test images are certified: a paired comparison needs them equal
_IMAGE_OPTIONS = ("skip", "max", "split")


def _check_same_images(exp: Experiment, a: str, b: str) -> None:
    """Refuse, at load time rather than after the compute, a comparison of runs certified on different images."""
    fields = _certify_class().__dataclass_fields__
    default = {k: fields[k].default for k in _IMAGE_OPTIONS}  # an option left out and set to its default agree

    def selections(run: str) -> dict[tuple[Any, ...], str]:
        return {
            tuple(s.set.get(k, default[k]) for k in _IMAGE_OPTIONS): s.name
            for s in exp.stages
            if s.command == "certify" and run in s.runs
        }

    sa, sb = selections(a), selections(b)
    if not set(sa) & set(sb):

        def show(sel: dict[tuple[Any, ...], str]) -> str:
            return "; ".join(
                f"{st}: " + ", ".join(f"{k}={v}" for k, v in zip(_IMAGE_OPTIONS, key, strict=True))
                for key, st in sel.items()
            )

        raise ExperimentError(
            f"{exp.name}: comparison [{a}, {b}] pairs runs certified on different test images "
            f"({a} by {show(sa)}; {b} by {show(sb)}); certify both with the same "
            f"{', '.join(_IMAGE_OPTIONS)} (compared as written: a default left out is None)"
        )


# ----------------------------------------------------------------------------- the commands
def _check_use(items: tuple[str, ...]) -> None:
    for item in items:
        if "=" not in item or not item.split("=", 1)[0] or not item.split("=", 1)[1]:
            raise InputError(f"--use takes STAGE=PATH, got {item!r}")


@dataclass
class ExperimentConfig(C.Options):
    """Every option of ``dmae experiment``."""

    name: str = C.option(
        "", "a shipped experiment (list them with `dmae experiments`) or an experiment YAML file", positional=True
    )
    output_dir: str | None = C.option(
        None, "where the stages' runs and the report go (default: runs/NAME, runs/NAME-smoke with --smoke)"
    )
    use: tuple[str, ...] | None = C.option(
        None,
        "STAGE=PATH: take that stage's weights from PATH instead of running it "
        "(an official checkpoint, or a run shared with another experiment); it takes every value after it, so "
        "give NAME before it",
        check=_check_use,
    )
    only: tuple[str, ...] | None = C.option(
        None, "run only these stages (their inputs must exist); it takes every value after it, so give NAME before it"
    )
    smoke: bool = C.option(
        False,
        "the same stages on a shrunken problem (pico model, Fashion-MNIST, a few steps, "
        "4 test images, n = 50): checks an experiment end to end in a minute on a CPU",
    )
    dry_run: bool = C.option(False, "print the stages, their resolved settings and the GPU-hour estimate; run nothing")
    data_root: str | None = C.option(None, "data set directory (ImageNet: the folder holding train/ and val/)")
    device: str = C.option("auto", "auto, cpu, cuda")
    progress: bool = C.option(True, "show progress bars")

    def check_combination(self) -> None:
        if not self.name:
            raise InputError("name an experiment (see `dmae experiments`)")

    def options(self, exp: Experiment) -> ExperimentOptions:
        """The run's :class:`ExperimentOptions`; raises ExperimentError for a --use / --only naming no stage."""
        use = dict(item.split("=", 1) for item in self.use or ())
        for name in [*use, *(self.only or ())]:
            exp.stage(name)
        for name, path in use.items():
            if not Path(path).exists():
                raise ExperimentError(f"--use {name}={path}: no such file or folder")
        out = Path(self.output_dir or f"runs/{exp.name}{'-smoke' if self.smoke else ''}")
        return ExperimentOptions(
            out, use, self.smoke, self.data_root, self.device, self.progress, list(self.only) if self.only else None
        )


@dataclass
class ExperimentsConfig(C.Options):
    """``dmae experiments`` takes no options."""


def describe(exp: Experiment, opts: ExperimentOptions | None = None) -> str:
    """What an experiment runs: its stages (with the resolved settings when ``opts`` is given), the estimated
    GPU-hours per stage and the torchrun commands."""
    hours = gpu_hours(exp)
    estimate = (
        f"{sum(hours.values()):,.0f} ({', '.join(f'{k} {v:,.1f}' for k, v in hours.items())})"
        if hours
        else "none (no measured throughput for these models; CPU-sized: see the file's comment)"
    )
    lines = [
        f"{exp.name}: {exp.title}",
        f"  paper: {exp.paper}",
        f"  estimated GPU-hours on one H100/H200 (bf16): {estimate}",
    ]
    for st in exp.stages:
        src = f" from {st.init}" if st.init else (f" of {', '.join(st.runs)}" if st.runs else "")
        extra = (f" at sigma {', '.join(f'{x:g}' for x in st.sigmas)}" if st.sigmas else "") + (
            f" {st.set}" if st.set else ""
        )
        lines.append(f"  - {st.name}: {st.command}" + (f" --config {st.config}" if st.config else "") + src + extra)
        if opts is not None and st.command != "certify":
            cfg = training_config(exp, st, opts)
            lines.append(
                f"      -> {cfg.output_dir}: {cfg.epochs} epoch(s), batch {cfg.batch_size} x {cfg.accum_iter}, "
                f"data {cfg.data}" + (f", init {cfg.init}" if cfg.init else "")
            )
    if exp.comparisons:
        lines.append("  paired comparisons: " + "; ".join(f"{a} vs {b}" for a, b in exp.comparisons))
    lines += [f"  torchrun, {k.replace('_', ' ')}: {v}" for k, v in exp.torchrun.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running one
@dataclass
class ExperimentOptions:
    """How to run an experiment: where, which stages come from elsewhere, shrunken or not."""

    output_dir: Path
    use: dict[str, str] = field(default_factory=dict)  # stage -> weights (or run folder) that replace it
    smoke: bool = False
    data_root: str | None = None
    device: str = "auto"
    progress: bool = True
    only: list[str] | None = None  # run just these stages (their inputs must exist)


def _config_class(command: str) -> type[TrainOptions]:
    if command == "pretrain":
        from dmae.training.pretrain import PretrainConfig

        return PretrainConfig
    from dmae.training.finetune import FinetuneConfig, LinprobeConfig

    return LinprobeConfig if command == "linprobe" else FinetuneConfig


def stage_output(exp_opts: ExperimentOptions, stage: Stage) -> Path:
    """What a training stage leaves for later stages: its export, or the ``--use`` replacement."""
    if stage.name in exp_opts.use:
        return Path(exp_opts.use[stage.name])
    return exp_opts.output_dir / stage.name / RUN_FILES[stage.command]


def training_config(exp: Experiment, stage: Stage, opts: ExperimentOptions) -> Any:
    """The typed config of a training stage: preset <- ``set`` <- (``--smoke``) the shrunken problem <- paths."""
    cls = _config_class(stage.command)
    values = C.load_values(C.preset_path(stage.command, stage.config), cls) if stage.config else {}
    values.update(stage.set)
    if opts.smoke:
        names = {f for f in cls.__dataclass_fields__}
        shrink = {**SMOKE["train"], **SMOKE.get(stage.command, {})}
        if stage.command != "pretrain" and values.get("model") and not stage.init:  # from scratch: a shrunken model
            shrink["model"] = SMOKE["pretrain"]["model"]
        values.update({k: v for k, v in shrink.items() if k in names})
    if stage.effective_batch and not opts.smoke:
        batch = int(values.get("batch_size", cls.batch_size))
        values["batch_size"], values["accum_iter"] = _batch_for(stage, stage.effective_batch, batch)
    run = opts.output_dir / stage.name
    given = {
        "output_dir": str(run),
        "resume": (run / "checkpoint.pt").exists(),
        "device": opts.device,
        "progress": opts.progress,
    }
    if opts.data_root and not opts.smoke:
        given["data_root"] = opts.data_root
    if stage.init:
        given["init"] = str(stage_output(opts, exp.stage(stage.init)))
    return C.build_config(cls, values, given)


def _batch_for(stage: Stage, effective_batch: int, batch: int) -> tuple[int, int]:
    """(batch_size, accum_iter) that keep ``effective_batch`` (``stage``'s) = batch x accum_iter x processes
    (torchrun's WORLD_SIZE): the preset's per-process batch, or the largest divisor of the per-process share below
    it.

    Raises:
        ExperimentError: the effective batch is not a multiple of the number of processes (naming both).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    eff = int(effective_batch)  # a number as the experiment's YAML wrote it
    if eff % world:
        raise ExperimentError(f"stage {stage.name}: effective batch {eff} is not a multiple of {world} process(es)")
    share = eff // world
    b = min(batch, share)
    while share % b:
        b -= 1
    return b, share // b


def _certify_class() -> type[CertifyConfig]:
    from dmae.certification.runner import CertifyConfig

    return CertifyConfig


def certify_configs(exp: Experiment, stage: Stage, opts: ExperimentOptions) -> list[Any]:
    """One ``CertifyConfig`` per classifier of a certify stage (protocol from ``set``; data from the classifier's
    stage), logs in ``OUT/<stage>/<run>``."""
    from dmae.certification.runner import CertifyConfig

    out = []
    for run in stage.runs:
        src = exp.stage(run)
        data = training_config(exp, src, opts).data
        values = {"data": data, "sigma": tuple(stage.sigmas) if stage.sigmas else None, **stage.set}
        if opts.smoke:
            values.update(SMOKE["certify"])  # sequential stages then stop at n_max = --n = 50
        if opts.data_root and not opts.smoke:
            values["data_root"] = opts.data_root
        values.update(
            {
                "checkpoint": opts.use.get(run, str(opts.output_dir / run)),  # the run folder, or --use's
                "output_dir": str(opts.output_dir / stage.name / run),
                "device": opts.device,
                "progress": opts.progress,
            }
        )
        out.append(C.build_config(CertifyConfig, {}, values))
    return out


def _run_training(exp: Experiment, stage: Stage, opts: ExperimentOptions) -> None:
    if stage.name in opts.use:
        _say(f"[{exp.name}] {stage.name}: using {opts.use[stage.name]}")
        return
    if stage_output(opts, stage).is_file():
        _check_same_run(stage, training_config(exp, stage, opts))
        _say(f"[{exp.name}] {stage.name}: done ({stage_output(opts, stage)})")
        return
    if stage.init:
        _require_output(exp, opts, stage, stage.init, "starts from")
    cfg = training_config(exp, stage, opts)
    _say(
        f"[{exp.name}] {stage.name}: dmae {stage.command}"
        + (f" --config {stage.config}" if stage.config else "")
        + f" -> {cfg.output_dir}"
    )
    if stage.command == "pretrain":
        from dmae.training.pretrain import pretrain

        result = pretrain(cfg)
    else:
        from dmae.training.finetune import finetune

        result = finetune(cfg)
    if not result.finished:
        raise StageInterrupted(
            f"stage {stage.name} stopped at step {result.step}/{result.total_steps} (checkpoint in "
            f"{result.output_dir}); run the same command again to resume"
        )


def _require_output(exp: Experiment, opts: ExperimentOptions, stage: Stage, needed: str, how: str) -> None:
    """Raise ExperimentError when the stage ``needed`` (which ``stage`` starts from / certifies) has no output."""
    out = stage_output(opts, exp.stage(needed))
    if not out.exists():
        raise ExperimentError(f"stage {stage.name} {how} {needed}, which has not produced {out} yet")


def _is_main() -> bool:
    """Rank 0 of a torchrun job (or the only process): under torchrun every rank runs the stages, one speaks."""
    return int(os.environ.get("RANK", "0")) == 0


def _say(line: str) -> None:
    if _is_main():
        print(line, flush=True)


def _check_same_run(stage: Stage, cfg: Any) -> None:
    """Refuse to reuse a finished stage whose saved options differ from what the experiment now asks (a smoke run
    in the same folder, an edited ``set``): its export would stand for another run.

    Raises:
        ExperimentError: naming every option that differs, with both values.
    """
    from dmae.training.engine import RESUMABLE_OPTIONS, check_resumable

    saved = yaml.safe_load((Path(cfg.output_dir) / "config.yaml").read_text()) or {}
    try:
        check_resumable(saved, C.to_dict(cfg), RESUMABLE_OPTIONS, Path(cfg.output_dir), "its saved options")
    except ValueError as e:
        raise ExperimentError(
            f"stage {stage.name} is finished but was run with other options: {e}; use another "
            "--output-dir, or remove the stage's folder to run it again"
        ) from e


def run_experiment(exp: Experiment, opts: ExperimentOptions) -> dict[str, Any]:
    """Run (or resume) every stage of ``exp`` in order, then write ``OUT/report.md``; returns the report tables
    (group label -> :class:`dmae.reporting.report.Table`, ``"a vs b, sigma S"`` ->
    :class:`dmae.reporting.report.Comparison`).

    Raises:
        ExperimentError: a stage's input is missing; KeyboardInterrupt: a stage was stopped (re-run to resume);
        what the stages raise (ValueError, CheckpointError, DataError, ...).
    """
    from dmae.certification.runner import run_certification

    t0 = time.perf_counter()
    opts.output_dir.mkdir(parents=True, exist_ok=True)
    for stage in exp.stages:
        if opts.only and stage.name not in opts.only:
            continue
        if stage.command == "certify":
            for r in stage.runs:
                _require_output(exp, opts, stage, r, "certifies")
            for cfg in certify_configs(exp, stage, opts):
                _say(f"[{exp.name}] {stage.name}: certify {cfg.checkpoint} -> {cfg.output_dir}")
                run_certification(cfg)
        else:
            _run_training(exp, stage, opts)
    if not _is_main():  # one rank writes the report
        return {}
    tables = write_report(exp, opts)
    print(f"[{exp.name}] done in {(time.perf_counter() - t0) / 60:.1f} min; report: {opts.output_dir / 'report.md'}")
    return tables


def write_report(exp: Experiment, opts: ExperimentOptions) -> dict[str, Any]:
    """One certified-accuracy table per group (its classifiers' logs, best sigma per radius) and one paired
    table per comparison and common sigma (:func:`comparison_lines`) into ``OUT/report.md`` and the terminal;
    groups and comparisons without logs yet are listed as pending. Returns group label -> ``Table`` and
    ``"a vs b, sigma S"`` -> ``Comparison``.

    Raises:
        LogError: a certification log cannot be read; OSError: report.md cannot be written."""
    from dmae.reporting.report import find_logs, read_log, summarize

    def run_logs(run: str) -> list[Any]:
        logs = []
        for st in exp.stages:
            if st.command == "certify" and run in st.runs:
                for f in find_logs(opts.output_dir / st.name / run):
                    logs.append(read_log(f))
                    logs[-1].name = f"{run}/{f.stem}"
        return logs

    lines, tables = [f"# {exp.title}", "", f"Paper: {exp.paper}." if exp.paper else "", ""], {}
    for label, runs in exp.groups.items():
        logs = [lg for r in runs for lg in run_logs(r)]
        if not logs:
            lines += [f"## {label}", "", "(not certified yet)", ""]
            continue
        tables[label] = table = summarize(logs)
        print(f"\n{label}\n{table.text()}", flush=True)
        lines += [f"## {label}", "", table.markdown()]
    if exp.comparisons:
        lines += ["## Paired comparisons", ""]
    for a, b in exp.comparisons:
        lines += comparison_lines(a, run_logs(a), b, run_logs(b), tables)
    lines += ["## Training runs", "", *training_table(exp, opts)]
    (opts.output_dir / "report.md").write_text("\n".join(lines) + "\n")
    return tables


def comparison_lines(a: str, logs_a: list[Any], b: str, logs_b: list[Any], tables: dict[str, Any]) -> list[str]:
    """Markdown for the comparison of classifier stages ``a`` and ``b``: one paired table
    (:func:`dmae.reporting.report.compare`) per sigma both were certified at, added to ``tables`` as
    ``"a vs b, sigma S"``; a line saying why where there is none (not certified yet, no common sigma, different
    images)."""
    from dmae.reporting.report import ReportError, compare

    by_sigma_b = {round(lg.sigma, 6): lg for lg in logs_b if lg.sigma is not None}  # sigma as read back from JSON
    pairs = [
        (la, by_sigma_b[round(la.sigma, 6)])
        for la in logs_a
        if la.sigma is not None and round(la.sigma, 6) in by_sigma_b
    ]
    if not logs_a or not logs_b:
        return [f"{a} vs {b}: not both certified yet", ""]
    for run, logs in ((a, logs_a), (b, logs_b)):
        sigmas = [round(lg.sigma, 6) for lg in logs if lg.sigma is not None]
        if len(set(sigmas)) < len(sigmas):  # certified by two stages at one sigma: which one to pair is ambiguous
            return [
                f"{a} vs {b}: {run} has two certification logs at one sigma ({', '.join(lg.name for lg in logs)})",
                "",
            ]
    if not pairs:

        def sig(logs: list[Any]) -> str:
            return ", ".join(f"{lg.sigma:g}" for lg in logs if lg.sigma is not None) or "unknown"

        return [f"{a} vs {b}: no sigma in common ({a}: {sig(logs_a)}; {b}: {sig(logs_b)})", ""]
    lines = []
    for la, lb in pairs:
        try:
            c = compare(la, lb)
        except ReportError as e:  # e.g. one certification stopped part way: the rest of the report still comes out
            lines += [
                f"{a} vs {b}, sigma {la.sigma:g}: not comparable ({e}); if a certification is still running "
                "or was stopped, rerun the experiment to finish it",
                "",
            ]
            continue
        tables[f"{a} vs {b}, sigma {la.sigma:g}"] = c
        print(f"\n{c.text()}", flush=True)
        lines.append(c.markdown())
    return lines


def training_table(exp: Experiment, opts: ExperimentOptions) -> list[str]:
    """Markdown rows, one per finished training stage: steps, training time (from the logged images/s) and, for
    classifiers, the evaluation selected on held-out training images (its test accuracy under noise beside it)."""
    from dmae.reporting.html_report import read_records

    rows = ["| stage | command | steps | training min | selected eval |", "|---|---|---|---|---|"]
    for st in exp.stages:
        log = opts.output_dir / st.name / "log.jsonl"
        if st.command == "certify" or st.name in opts.use or not log.is_file():
            continue
        recs = read_records(log)
        train = [r for r in recs if r.get("type") == "train"]
        cfg = training_config(exp, st, opts)
        batch = cfg.batch_size * cfg.accum_iter  # img_per_s counts whole optimizer steps (one process's share)
        seconds, prev = 0.0, 0
        for r in train:  # each record covers the steps since the previous one at its images/s
            seconds += (r["step"] - prev) * batch / max(r.get("img_per_s", 0.0), 1e-9)
            prev = r["step"]
        evals = [r for r in recs if r.get("type") == "eval" and r.get("step", 0) > 0]
        val = [k for k in (evals[-1] if evals else {}) if k.startswith("val_")]
        best = max(evals, key=lambda r: r[val[0]]) if evals and val else (evals[-1] if evals else {})
        shown = ", ".join(f"{k} {v:.4f}" for k, v in best.items() if k not in ("type", "step", "epoch"))
        rows.append(f"| {st.name} | {st.command} | {prev} | {seconds / 60:.1f} | {shown} |")
    return rows


def gpu_hours(exp: Experiment) -> dict[str, float]:
    """Estimated GPU-hours per stage on one H100 / H200 (bf16) from :data:`THROUGHPUT`: pretraining from its
    measured images/s, fine-tuning from the FLOPs ratio to pretraining, certification from its measured passes/s
    at fixed n (``n0 + n`` per image). Stages whose model has no measurement are left out."""
    out: dict[str, float] = {}
    for st in exp.stages:
        if st.command == "certify":
            total = 0.0
            for r in st.runs:
                model = _stage_model(exp, exp.stage(r))
                if model not in THROUGHPUT:
                    break
                values = {"skip": 1, "n0": 100, "n": 100_000, "max": None, **st.set}
                data = _values(exp.stage(r)).get("data", "imagenet")
                images = math.ceil(EVAL_IMAGES.get(data, 0) / values["skip"])
                if values.get("max"):
                    images = min(images, values["max"])
                passes = images * (values["n0"] + (values.get("n_max") or values["n"])) * len(st.sigmas or [1])
                total += passes / THROUGHPUT[model]["certify"] / 3600
            else:
                out[st.name] = total
            continue
        model = _stage_model(exp, st)
        if model not in THROUGHPUT:
            continue
        v, t = _values(st), THROUGHPUT[model]
        images = v.get("epochs", 1) * min(
            TRAIN_IMAGES.get(v.get("data", "imagenet"), 0), v.get("train_subset") or math.inf
        )
        rate = t["pretrain"]
        if st.command != "pretrain":
            copies = v.get("num_noise", 2) if v.get("method", "cr") == "cr" and st.command == "finetune" else 1
            work = (3 if st.command == "finetune" else 1) * t["forward_gflop"] * copies
            rate = t["pretrain"] * t["pretrain_gflop"] / work
        out[st.name] = images / rate / 3600
    return out


def _values(stage: Stage) -> dict[str, Any]:
    values = (
        C.load_values(C.preset_path(stage.command, stage.config), _config_class(stage.command)) if stage.config else {}
    )
    return {**values, **stage.set}


def _stage_model(exp: Experiment, stage: Stage) -> str | None:
    """The architecture a stage trains: its own ``model``, else that of the stage it starts from."""
    while True:
        model = _values(stage).get("model")
        if model or not stage.init:
            return model
        stage = exp.stage(stage.init)


__all__ = [
    "COMMANDS",
    "SMOKE",
    "THROUGHPUT",
    "Experiment",
    "ExperimentConfig",
    "ExperimentError",
    "ExperimentOptions",
    "ExperimentsConfig",
    "Stage",
    "certify_configs",
    "describe",
    "experiments_dir",
    "gpu_hours",
    "list_experiments",
    "load_experiment",
    "run_experiment",
    "stage_output",
    "training_config",
    "write_report",
]
