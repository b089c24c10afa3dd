"""The training skeleton every job plugs into, driven by a tiny noisy linear regression (no data set, no ViT)."""

import itertools
import json
import math
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from dmae.checkpoint import safe_load
from dmae.config import build_config, load_values
from dmae.distributed import DistInfo
from dmae.training.engine import (
    RESUMABLE_OPTIONS,
    Built,
    RunLog,
    StopFlag,
    TrainingJob,
    TrainOptions,
    build_scheduler,
    check_finite_parameters,
    check_resumable,
    check_run_folder,
    epoch_loader,
    step_seed,
    train,
)

W_TRUE = torch.tensor([1.0, -2.0, 0.5, 3.0])


class Regression(TrainingJob):
    """y = x . w + 0.1 on 64 points; the inputs get noise from the step's ``gen``, so every step's loss
    depends on the engine seeding it. ``nan_from``: the loss is NaN from that call on (1-based).
    ``sigint_at``: a SIGINT arrives during that call."""

    name = "regression"

    def __init__(self, cfg, nan_from=None, sigint_at=None, nan_loss_only=False):
        super().__init__(cfg)
        self.nan_from, self.sigint_at, self.nan_loss_only = nan_from, sigint_at, nan_loss_only
        self.calls = 0
        self.finished = False

    def build(self):
        x = torch.randn(64, 4, generator=torch.Generator().manual_seed(123))
        y = (x @ W_TRUE + 0.1).unsqueeze(1)
        return Built(nn.Linear(4, 1), TensorDataset(x, y))

    def build_optimizer(self, model, lr):
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.5)  # momentum: optimizer state must resume

    def forward_loss(self, model, x, y, gen, seed):
        self.calls += 1
        if self.sigint_at == self.calls:
            signal.raise_signal(signal.SIGINT)
        noisy = x + 0.3 * torch.randn(x.shape, generator=gen, device=x.device)
        loss = F.mse_loss(model(noisy), y)
        if self.nan_from is not None and self.calls >= self.nan_from:
            if self.nan_loss_only:  # a NaN loss whose gradients stay finite: the weights look healthy
                return loss + (loss.detach() * float("nan"))
            loss = loss * float("nan")  # NaN gradients too, so the weights diverge
        return loss

    def architecture(self):
        return "toy_config", {"in_features": 4, "out_features": 1}

    def on_main_finished(self):
        self.finished = True


def _cfg(out, **over):
    # 64 points / batch 8 = 8 steps per epoch, 2 epochs = 16 steps; 4 warmup steps
    kw = dict(
        device="cpu",
        progress=False,
        output_dir=str(out),
        batch_size=8,
        epochs=2,
        warmup_epochs=0.5,
        lr=0.05,
        min_lr=0.001,
        log_every=3,
    )
    return TrainOptions(**{**kw, **over})


def _run(out, job_kw=None, **over):
    job = Regression(_cfg(out, **over), **(job_kw or {}))
    return job, train(job)


def _log_rows(out, kind="train"):
    return [r for r in map(json.loads, (Path(out) / "log.jsonl").read_text().splitlines()) if r["type"] == kind]


# ----------------------------------------------------------------------------- whole runs
def test_run_writes_its_folder_and_learns(tmp_path):
    out = tmp_path / "run"
    job, res = _run(out)
    assert res.finished
    assert res.step == res.total_steps == 16
    assert not res.stopped
    assert job.finished
    assert [s for s, _ in res.losses] == list(range(1, 17))
    assert sum(v for _, v in res.losses[-4:]) < 0.2 * sum(v for _, v in res.losses[:4])  # it trains
    assert {"config.yaml", "toy_config.json", "checkpoint.pt", "log.jsonl"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "toy_config.json").read_text()) == {"in_features": 4, "out_features": 1}
    assert build_config(TrainOptions, load_values(out / "config.yaml", TrainOptions)) == job.cfg
    state = safe_load(out / "checkpoint.pt")
    assert state["step"] == 16
    assert state["epoch"] == 2
    assert state["toy_config"] == {"in_features": 4, "out_features": 1}
    assert state["config"]["lr"] == 0.05
    assert all(torch.equal(v, res.model.state_dict()[k]) for k, v in state["model"].items())
    rows = _log_rows(out)
    # a line at every multiple of 3 and at each epoch's end; each holds the mean loss of the steps since the last
    assert [r["step"] for r in rows] == [3, 6, 8, 9, 12, 15, 16]
    losses = dict(res.losses)
    assert rows[0]["loss"] == pytest.approx(sum(losses[s] for s in (1, 2, 3)) / 3)
    assert rows[2]["loss"] == pytest.approx((losses[7] + losses[8]) / 2)
    assert rows[3]["loss"] == pytest.approx(losses[9])
    assert rows[-1]["epoch"] == 2.0


def test_learning_rate_schedule_is_applied_before_each_step(tmp_path):
    out = tmp_path / "run"
    _run(out, log_every=1)
    lrs = {r["step"]: r["lr"] for r in _log_rows(out)}
    # step s (1-based) ran with the rate of step_update(s - 1): warmup from 0 over 4 steps, then cosine
    assert lrs[1] == 0.0
    assert lrs[3] == pytest.approx(0.05 * 2 / 4)
    assert lrs[5] == pytest.approx(0.05)
    assert lrs[16] == pytest.approx(0.001 + (0.05 - 0.001) * 0.5 * (1 + math.cos(math.pi * 11 / 12)))
    assert all(a >= b for a, b in itertools.pairwise([lrs[s] for s in range(5, 17)]))


@pytest.mark.parametrize("accum_iter", [1, 2])
def test_stop_after_then_resume_is_bit_identical(tmp_path, accum_iter):
    bs = 8 // accum_iter  # the same effective batch
    _, full = _run(tmp_path / "full", batch_size=bs, accum_iter=accum_iter)
    split = tmp_path / "split"
    a_job, a = _run(split, batch_size=bs, accum_iter=accum_iter, stop_after=5)  # mid-epoch
    assert a.stopped
    assert not a.interrupted
    assert a.step == 5
    assert not a.finished
    assert not a_job.finished
    assert safe_load(split / "checkpoint.pt")["step"] == 5
    # the second part crosses the epoch boundary, logging at other steps
    _, b = _run(split, batch_size=bs, accum_iter=accum_iter, stop_after=11, resume=True, log_every=2)
    c_job, c = _run(split, batch_size=bs, accum_iter=accum_iter, resume=True)
    assert b.step == 11
    assert c.finished
    assert c_job.finished
    assert a.losses + b.losses + c.losses == full.losses  # step by step, exactly
    sd_full, sd_split = full.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sd_full[k], sd_split[k]) for k in sd_full)
    steps = [r["step"] for r in _log_rows(split)]
    assert steps == sorted(set(steps))
    assert steps[-1] == 16  # nothing logged twice
    # the comparison has power: another seed gives other losses
    _, other = _run(tmp_path / "other", batch_size=bs, accum_iter=accum_iter, seed=1)
    assert other.losses != full.losses


class BiasOnly(Regression):
    """Plain SGD on the mean output: every micro-batch gives the bias a gradient of exactly 1."""

    def build_optimizer(self, model, lr):
        return torch.optim.SGD(model.parameters(), lr=lr)

    def forward_loss(self, model, x, y, gen, seed):
        return model(x).mean()


def test_gradient_accumulation_averages_the_micro_batches(tmp_path):
    cfg = _cfg(tmp_path / "run", batch_size=2, accum_iter=4, warmup_epochs=0.0, lr=0.1, min_lr=0.1, stop_after=1)
    job = BiasOnly(cfg)
    res = train(job)
    torch.manual_seed(cfg.seed)  # the engine draws the initial weights right after seeding with cfg.seed
    initial = nn.Linear(4, 1)
    assert res.step == 1
    assert job.plan.effective_batch == 8
    assert res.model.bias.item() == pytest.approx(initial.bias.item() - 0.1)  # lr x mean gradient (1), not x 4


def test_sigint_checkpoints_at_the_step_boundary_and_resumes(tmp_path):
    _, full = _run(tmp_path / "full")
    out = tmp_path / "run"
    old = signal.getsignal(signal.SIGINT)
    job, a = _run(out, job_kw={"sigint_at": 6})
    assert a.stopped
    assert a.interrupted
    assert a.step == 6
    assert not job.finished
    assert signal.getsignal(signal.SIGINT) is old  # the handler is put back
    assert safe_load(out / "checkpoint.pt")["step"] == 6
    _, b = _run(out, resume=True)
    assert a.losses + b.losses == full.losses


def test_resume_checks_the_folder_and_the_options(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint at"):
        _run(out, resume=True)
    _run(out, stop_after=2)
    with pytest.raises(FileExistsError, match="already holds a run; pass --resume"):
        _run(out)
    with pytest.raises(ValueError, match=r"options differ from the saved run \(lr: 0.05 -> 0.1\)"):
        _run(out, lr=0.1, resume=True)
    with pytest.raises(ValueError, match=r"seed: 0 -> 3, epochs: 2 -> 3"):
        _run(out, seed=3, epochs=3, resume=True)
    # options that do not change the trajectory may change
    _, res = _run(out, resume=True, log_every=5, save_every=4, stop_after=4)
    assert res.step == 4


def test_nan_loss_stops_before_saving(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="loss is nan at step 5"):
        _run(out, job_kw={"nan_from": 5}, log_every=1, save_every=2)
    assert safe_load(out / "checkpoint.pt")["step"] == 4  # the last good one; step 5 was never saved
    assert [r["step"] for r in _log_rows(out)] == [1, 2, 3, 4]
    out2 = tmp_path / "run2"
    with pytest.raises(FloatingPointError):
        _run(out2, job_kw={"nan_from": 1}, log_every=1)
    assert not (out2 / "checkpoint.pt").exists()


def test_nan_weights_stop_before_saving(tmp_path):
    """Logged only every 4 steps but saved every step: the NaN weights of step 5 are caught by the save."""
    out = tmp_path / "run"
    # the loss of step 5 (not logged yet) or the weights: either stops the run before step 5 is saved
    with pytest.raises(FloatingPointError, match=r"(loss is nan|weights are not finite) at step 5"):
        _run(out, job_kw={"nan_from": 5}, log_every=4, save_every=1)
    assert safe_load(out / "checkpoint.pt")["step"] == 4


def test_a_nan_loss_with_finite_weights_is_not_saved_between_log_lines(tmp_path):
    """Saved every step, logged every 4: the NaN loss of step 5 must stop the run before step 5 is saved."""
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="loss is nan at step 5"):
        _run(out, job_kw={"nan_from": 5, "nan_loss_only": True}, log_every=4, save_every=1)
    assert safe_load(out / "checkpoint.pt")["step"] == 4


def test_resume_survives_a_torn_last_log_line(tmp_path):
    out = tmp_path / "run"
    _run(out, stop_after=6)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"type": "train", "step": 7, "lo')  # a crash mid-write
    _, res = _run(out, resume=True)
    assert res.finished
    steps = [json.loads(ln)["step"] for ln in (out / "log.jsonl").read_text().splitlines()]  # every line parses
    assert steps == sorted(steps)


# ----------------------------------------------------------------------------- the pieces
def test_check_finite_parameters_names_the_parameter():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    check_finite_parameters(model, 7)
    with torch.no_grad():
        model[2].bias[1] = float("inf")
    with pytest.raises(FloatingPointError, match=r"weights are not finite at step 7 \(2.bias\)"):
        check_finite_parameters(model, 7)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"\(0.weight, 2.bias\)"):
        check_finite_parameters(model, 7)


def test_check_run_folder(tmp_path):
    assert check_run_folder(tmp_path, resume=False) == tmp_path / "checkpoint.pt"
    with pytest.raises(FileNotFoundError):
        check_run_folder(tmp_path, resume=True)
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    assert check_run_folder(tmp_path, resume=True) == tmp_path / "checkpoint.pt"
    with pytest.raises(FileExistsError):
        check_run_folder(tmp_path, resume=False)


def test_check_resumable_names_every_difference():
    saved = {"lr": 0.1, "seed": 0, "log_every": 20, "output_dir": "a"}
    check_resumable(saved, {"lr": 0.1, "seed": 0, "log_every": 5, "output_dir": "b"}, RESUMABLE_OPTIONS, Path("c.pt"))
    with pytest.raises(ValueError) as e:
        check_resumable(
            saved, {"lr": 0.2, "seed": 1, "log_every": 5, "output_dir": "a", "new": 1}, RESUMABLE_OPTIONS, Path("c.pt")
        )
    assert "cannot resume c.pt" in str(e.value)
    assert "lr: 0.1 -> 0.2, seed: 0 -> 1, new: None -> 1" in str(e.value)
    assert "log_every" not in str(e.value)


def test_run_log_drops_rows_after_the_resume_step(tmp_path):
    rows = [{"type": "train", "step": s, "loss": 1.0 / s} for s in range(1, 11)]
    rows.append({"type": "eval", "step": 8, "mse": 0.5})
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = RunLog(tmp_path, enabled=True, resume_step=6)
    log.write({"type": "train", "step": 7, "loss": 0.25})
    log.close()
    kept = [json.loads(ln) for ln in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert kept == [*rows[:6], {"type": "train", "step": 7, "loss": 0.25}]
    # a fresh run (step 0) and a disabled log (other ranks) leave the file alone
    RunLog(tmp_path, enabled=True, resume_step=0).close()
    RunLog(tmp_path, enabled=False, resume_step=1).write({"type": "train", "step": 9, "loss": 1.0})
    assert [json.loads(ln) for ln in (tmp_path / "log.jsonl").read_text().splitlines()] == kept


def test_stop_flag_catches_sigint_and_sigterm():
    old_int, old_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopFlag() as stop:
        assert not stop.set
        signal.raise_signal(signal.SIGINT)
        assert stop.set
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C interrupts at once
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is old_int
    assert signal.getsignal(signal.SIGTERM) is old_term
    with StopFlag() as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.set
        signal.raise_signal(signal.SIGTERM)  # repeated SIGTERMs only keep the flag set
    assert signal.getsignal(signal.SIGTERM) is old_term


def test_learning_rate_scaling():
    assert TrainOptions(blr=1e-3).learning_rate(512) == pytest.approx(2e-3)
    assert TrainOptions(blr=1e-3).learning_rate(64) == pytest.approx(2.5e-4)
    assert TrainOptions(blr=1e-3, lr=0.3).learning_rate(512) == 0.3


def test_build_scheduler_warmup_then_cosine_with_lr_scale():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr_scale": 0.5}], lr=0.2)
    sched = build_scheduler(opt, total_steps=50, warmup_steps=10, min_lr=0.02)
    lrs = []
    for s in range(51):
        sched.step_update(s)
        lrs.append([g["lr"] for g in opt.param_groups])
    assert lrs[0] == [0.0, 0.0]
    assert lrs[4][0] == pytest.approx(0.2 * 4 / 10)
    assert lrs[10][0] == pytest.approx(0.2)
    assert lrs[30][0] == pytest.approx(0.02 + 0.18 * 0.5 * (1 + math.cos(math.pi * 20 / 40)))
    assert lrs[50][0] == pytest.approx(0.02)
    assert all(lr[1] == pytest.approx(0.5 * lr[0]) for lr in lrs)  # layer decay's per-group scale
    # no warmup: the first step runs at the full rate
    opt2 = torch.optim.SGD([a], lr=0.2)
    sched2 = build_scheduler(opt2, total_steps=5, warmup_steps=0, min_lr=0.0)
    sched2.step_update(0)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.2)


def test_step_seed_is_a_function_of_seed_step_and_rank():
    seeds = {step_seed(s, m, r) for s in range(3) for m in range(200) for r in range(4)}
    assert len(seeds) == 3 * 200 * 4
    assert step_seed(5, 17, 1) == step_seed(5, 17, 1)
    assert all(0 <= s < 2**63 for s in seeds)


def test_epoch_loader_shards_and_counts_whole_accumulation_cycles():
    ds = TensorDataset(torch.arange(50).float().unsqueeze(1), torch.arange(50))
    cpu = torch.device("cpu")
    sampler, loader, spe = epoch_loader(ds, 4, 3, 0, 0, DistInfo(), cpu)
    assert spe == 4
    assert sampler.batches_per_epoch == 12  # 12 batches of 4, whole cycles of 3
    sampler.set_epoch(0)
    first = torch.cat([y for _, y in loader]).tolist()
    assert len(first) == 48
    assert len(set(first)) == 48
    sampler.set_epoch(1)
    assert torch.cat([y for _, y in loader]).tolist() != first  # reshuffled per epoch
    sampler.set_epoch(0, 6)  # a resume mid-epoch skips the batches already done
    assert torch.cat([y for _, y in loader]).tolist() == first[24:]
    # two ranks get disjoint shares of the same order
    shares = []
    for rank in (0, 1):
        s, ld, spe2 = epoch_loader(ds, 4, 1, 0, 0, DistInfo(rank=rank, world_size=2), cpu)
        s.set_epoch(0)
        shares.append(set(torch.cat([y for _, y in ld]).tolist()))
        assert spe2 == 6
    assert not (shares[0] & shares[1])
    assert len(shares[0]) == len(shares[1]) == 24
    with pytest.raises(ValueError, match="too few for batch size 64"):
        epoch_loader(ds, 64, 1, 0, 0, DistInfo(), cpu)


# ----------------------------------------------------------------------------- defaults fitted to the data
def test_adapt_to_data_fits_batch_warmup_and_lr_only_where_not_given():
    from dmae.training.engine import adapt_to_data
    from dmae.training.finetune import FinetuneConfig

    # issue 19: 1,800 images, `--epochs 3` and the fine-tuning recipe's defaults (warmup 5, blr 5e-4 for batch 1024)
    cfg = FinetuneConfig(epochs=3)
    changes = {a.option: a for a in adapt_to_data(cfg, 1800, 1, reference_batch=1024)}
    assert set(changes) == {"warmup_epochs", "lr"}
    assert cfg.warmup_epochs == pytest.approx(0.3)
    assert changes["warmup_epochs"].old == 5.0
    assert changes["lr"].old == pytest.approx(1.25e-4)  # 5e-4 x 64 / 256: the rate that trained nothing
    assert cfg.lr == pytest.approx(2e-3 * math.sqrt(64 / 1024)) == cfg.learning_rate(64)
    assert "--warmup-epochs 5 -> 0.3 (10% of 3 epochs" in str(changes["warmup_epochs"])
    # a small model (the CPU presets) keeps the recipe's lr at its batch: 5e-4 x 1024 / 256
    small = FinetuneConfig(epochs=3)
    adapt_to_data(small, 1800, 1, reference_batch=1024, model_params=1_200_000)
    assert small.lr == pytest.approx(2e-3)
    # given options are never touched, even when they do not fit
    cfg = TrainOptions(epochs=3, warmup_epochs=2.0, batch_size=64, blr=5e-4)
    assert adapt_to_data(cfg, 50, 1, reference_batch=1024) == []
    # a default batch larger than the data set (zero steps: the sampler drops the tail) or one that drops a
    # third of it is resized to spread the images over the steps
    cfg = TrainOptions()
    assert [a.option for a in adapt_to_data(cfg, 50)] == ["batch_size"]
    assert cfg.batch_size == 50
    cfg = TrainOptions()
    adapt_to_data(cfg, 90)
    assert cfg.batch_size == 45
    cfg = TrainOptions()
    assert adapt_to_data(cfg, 1800) == []
    assert cfg.batch_size == 64  # 8 images dropped: fine


def test_adapt_to_data_lowers_a_default_accumulation_first():
    from dataclasses import dataclass

    from dmae.config import default
    from dmae.training.engine import adapt_to_data

    @dataclass
    class Accumulating(TrainOptions):
        accum_iter: int = default(8)

    cfg = Accumulating()
    changes = adapt_to_data(cfg, 200, 1)
    assert [a.option for a in changes] == ["accum_iter"]
    assert cfg.accum_iter == 3  # 3 x 64 of the 200 images


class _FewPoints(Regression):
    def build(self):
        model, ds = super().build()
        return Built(model, torch.utils.data.Subset(ds, range(40)))


def test_a_run_on_fewer_images_than_the_default_batch_trains_and_records_what_it_adapted(tmp_path, capsys):
    out = tmp_path / "run"
    # before: ValueError "40 images are too few for batch size 64"
    cfg = TrainOptions(device="cpu", progress=False, output_dir=str(out), epochs=2, warmup_epochs=0.5, lr=0.05)
    res = train(_FewPoints(cfg))
    assert res.finished
    assert res.total_steps == 2
    assert [a.option for a in res.adapted] == ["batch_size"]
    assert cfg.batch_size == 64  # the caller's config is left as it was; the run's copy was adapted
    printed = capsys.readouterr().out
    assert "adapted to 40 training images" in printed
    assert "--batch-size 64 -> 40" in printed
    saved = (out / "config.yaml").read_text()
    assert "# adapted to 40 training images" in saved
    assert "batch_size: 40" in saved
    assert _log_rows(out, "adapted")[0]["changes"][0] == res.adapted[0].to_dict()
    # the resumed run reads the adapted values from its folder as given: nothing adapts twice
    resumed = build_config(TrainOptions, load_values(out / "config.yaml", TrainOptions), {"resume": True, "epochs": 2})
    assert resumed.given("batch_size")
    assert resumed.batch_size == 40
