import json
from pathlib import Path

import pytest
import torch

from conftest import PICO
from dmae.checkpoint import load_classifier
from dmae.data import build_dataset, build_transform, dataset_info
from dmae.reporting.report import read_log
from dmae.training.finetune import noisy_accuracy
from dmae.workflows.demo import run_demo

pytestmark = pytest.mark.e2e  # whole workflows: the demo, the experiments, the examples


def test_demo_wiring_on_a_small_slice(tmp_path, capsys):
    small = {"model": PICO, "train_subset": 512, "eval_images": 64, "epochs": 1}
    # enough fine-tuning (32 steps) that the classifier depends on its input, so a wrong number shows
    small_ft = {"train_subset": 1024, "val_size": 100, "batch_size": 32, "eval_images": 200, "lr": 1e-2, "epochs": 1}
    small_cert = {"n": 200, "n0": 20, "skip": 2500, "batch": 256}
    first = run_demo(
        tmp_path,
        progress=False,
        device="cpu",
        from_scratch=True,
        overrides=small,
        finetune_overrides=small_ft,
        certify_overrides=small_cert,
    )
    assert first["mse_after"] < first["mse_before"]
    assert first["finetune_steps"] == 32
    # the printed accuracy is the selected classifier's, measured on the same noise
    model, _ = load_classifier(tmp_path / "finetune" / "model_best.safetensors", 10)
    test = build_dataset("fashion-mnist", "test", None, build_transform(dataset_info("fashion-mnist"), False, 28))
    assert first["noisy_acc"] == noisy_accuracy(model, test, 0.25, seed=0, limit=200, precision="fp32")
    assert first["clean_acc"] == noisy_accuracy(model, test, 0.0, seed=0, limit=200, precision="fp32")
    assert first["noisy_acc"] > 0.2  # above chance (0.1): the wiring carries a trained classifier
    assert (tmp_path / "reconstructions.png").is_file()
    assert (tmp_path / "finetune" / "model_best.safetensors").is_file()
    assert first["certified_images"] == 4
    assert (tmp_path / "certified_accuracy.png").is_file()
    log = read_log(tmp_path / "certify" / "sequential_sigma0.25.tsv")  # sequential CERTIFY, as the demo runs it
    assert (first["certified_acc_0"], first["acr"], first["samples"]) == (
        log.certified_accuracy(0.0),
        log.acr,
        int(log.n_samples.sum()),
    )
    assert first["samples"] < 4 * (20 + 200)
    out = capsys.readouterr().out
    assert "pixel MSE to the clean image" in out
    assert f"accuracy under noise sigma=0.25: {100 * first['noisy_acc']:.2f}%" in out
    assert "r=0.25" in out
    assert "ACR" in out
    assert f"noise samples (forward passes): {first['samples']:,} in all" in out
    assert "fixed-n CERTIFY at n=200" in out
    page = (tmp_path / "report.html").read_text()  # the run's HTML report, every section present
    assert f"report: {tmp_path / 'report.html'}" in out
    assert all(
        f'<h2 id="{sec}">' in page for sec in ("certified", "training", "reconstructions", "per-image", "settings")
    )
    # a second call reuses the finished runs instead of training again
    again = run_demo(
        tmp_path,
        progress=False,
        device="cpu",
        from_scratch=True,
        overrides=small,
        finetune_overrides=small_ft,
        certify_overrides=small_cert,
    )
    assert again == first


DEMO_SCRIPT = """
import functools, signal, sys
# as in a terminal: a job started in the background (nohup, CI runners) inherits SIGINT ignored, and Python then
# installs no KeyboardInterrupt handler; Ctrl-C in a foreground terminal raises KeyboardInterrupt
signal.signal(signal.SIGINT, signal.default_int_handler)
import dmae.workflows.demo as demo
from dmae.cli import main
demo.run_demo = functools.partial(demo.run_demo, overrides={overrides!r}, finetune_overrides={ft!r},
                                  certify_overrides={cert!r})
sys.exit(main(["demo", "--from-scratch", "--output-dir", {out!r}, "--device", "cpu", "--no-progress"]))
"""

# sized so that every stage lasts a few seconds on one thread: long enough to be hit by a signal
SMALL = {"model": PICO, "train_subset": 4096, "eval_images": 32, "batch_size": 32, "log_every": 2, "epochs": 1}
SMALL_FT = {"train_subset": 3000, "val_size": 100, "batch_size": 32, "eval_images": 32, "log_every": 5, "epochs": 1}
SMALL_CERT = {"n": 2000, "n0": 10, "skip": 100, "batch": 32}


def _demo_process(out):
    import subprocess
    import sys

    script = DEMO_SCRIPT.format(overrides=SMALL, ft=SMALL_FT, cert=SMALL_CERT, out=str(out))
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _outputs(out):
    """What must not depend on interruptions: the certification rows (all columns but time) and the weights."""
    from safetensors.torch import load_file

    rows = (out / "certify" / "sequential_sigma0.25.tsv").read_text().splitlines()
    rows = [r.split("\t") for r in rows]
    time_col = rows[0].index("time")
    return (
        [[v for j, v in enumerate(r) if j != time_col] for r in rows],
        load_file(out / "pretrain" / "model.safetensors"),
        load_file(out / "finetune" / "model_last.safetensors"),
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    proc = _demo_process(out)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-2000:]
    return _outputs(out)


STAGES = {
    "pretraining": ("pretrain/log.jsonl", 2),
    "fine-tuning": ("finetune/log.jsonl", 2),
    "certification": ("certify/sequential_sigma0.25.tsv", 3),
}


@pytest.mark.parametrize(
    "stage,sig",
    [("pretraining", "SIGINT"), ("fine-tuning", "SIGTERM"), ("certification", "SIGTERM"), ("certification", "SIGINT")],
)
def test_demo_interrupted_at_each_stage_resumes_to_the_numbers_of_an_uninterrupted_run(
    tmp_path, uninterrupted, stage, sig
):
    """A stage stopped by SIGINT or SIGTERM stops the demo (exit 130, how to resume, nothing certified from a
    half-trained model); re-running the same command resumes and ends with exactly the rows (time aside) and
    weights of an uninterrupted run."""
    import signal
    import time

    out = tmp_path / "interrupted"
    proc = _demo_process(out)
    watch, lines = STAGES[stage]
    log = out / watch
    deadline = time.time() + 600
    while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= lines):
        time.sleep(0.02)
    assert proc.poll() is None, f"the demo ended before {stage} could be interrupted"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    if stage != "certification":
        assert f"{stage} stopped at step" in err
        assert "run the same `dmae demo` command again to resume" in err
        assert not (out / "certify").exists()  # nothing was certified from a half-trained model
    else:
        rows = (out / "certify" / "sequential_sigma0.25.tsv").read_text().splitlines()
        assert 1 < len(rows) < len(uninterrupted[0]), "interrupted mid-certification, some rows kept"
    again = _demo_process(out)
    _, err = again.communicate(timeout=900)
    assert again.returncode == 0, err[-2000:]
    rows, pre, ft = _outputs(out)
    assert rows == uninterrupted[0]
    assert all(torch.equal(pre[k], uninterrupted[1][k]) for k in pre)
    assert all(torch.equal(ft[k], uninterrupted[2][k]) for k in ft)


# ----------------------------------------------------------------------------- the shipped checkpoint
def test_shipped_checkpoint_is_the_run_of_the_shipped_command():
    """The shipped run folder was made by `dmae pretrain --config demo` (its resolved config is the preset's),
    its weights match the recorded sha256, and re-running that command with the recorded seed and threads
    reproduces its logged training losses (the first 50 steps, checked here): bit for bit on the torch build it
    was made with, to 1e-4 relative on another build, which may order float sums differently."""
    from dmae import config as C
    from dmae.models.external import file_sha256
    from dmae.training.pretrain import PretrainConfig, pretrain
    from dmae.workflows.demo import SHIPPED_DIR, preset_differences, shipped_provenance

    prov = shipped_provenance()
    assert file_sha256(SHIPPED_DIR / "model.safetensors") == prov["sha256"]
    made = C.load_values(SHIPPED_DIR / "config.yaml", PretrainConfig)
    assert preset_differences(made) == {}
    assert preset_differences({**made, "epochs": 19}) == {"epochs": (19, 20)}  # the comparison can fail
    logged = {
        r["step"]: r["loss"]
        for r in map(json.loads, (SHIPPED_DIR / "log.jsonl").read_text().splitlines())
        if r["type"] == "train"
    }
    assert prov["epochs"] == made["epochs"]
    assert max(logged) == made["epochs"] * 468  # 60,000 / 128 steps per epoch
    threads = torch.get_num_threads()
    torch.set_num_threads(prov["threads"])
    try:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            cfg = C.build_config(
                PretrainConfig,
                made,
                {"output_dir": tmp, "stop_after": 50, "progress": False, "device": "cpu", "eval_images": 8},
            )
            pretrain(cfg)
            again = {
                r["step"]: r["loss"]
                for r in map(json.loads, (Path(tmp) / "log.jsonl").read_text().splitlines())
                if r["type"] == "train"
            }
    finally:
        torch.set_num_threads(threads)
    assert again
    if torch.__version__ == prov["torch"]:  # the same build: bit for bit
        assert all(again[s] == logged[s] for s in again), (again, {s: logged[s] for s in again})
    else:  # another torch build may order float sums differently: the same run up to rounding
        assert all(again[s] == pytest.approx(logged[s], rel=1e-4) for s in again), (again, logged)


def test_demo_starts_from_the_shipped_checkpoint_and_never_mixes_it_with_a_run_from_scratch(tmp_path, capsys):
    from safetensors.torch import load_file

    from dmae.workflows.demo import SHIPPED_DIR, shipped_provenance

    tiny_ft = {"train_subset": 256, "val_size": 64, "batch_size": 64, "eval_images": 64, "epochs": 1}
    tiny_cert = {"n": 100, "n0": 10, "skip": 5000, "batch": 100}
    numbers = run_demo(tmp_path, progress=False, device="cpu", finetune_overrides=tiny_ft, certify_overrides=tiny_cert)
    out = capsys.readouterr().out
    assert shipped_provenance()["command"] in out
    assert "dmae demo --from-scratch" in out
    shipped = load_file(SHIPPED_DIR / "model.safetensors")
    copied = load_file(tmp_path / "pretrain" / "model.safetensors")
    assert all(torch.equal(shipped[k], copied[k]) for k in shipped)
    # the printed reconstruction numbers are the shipped run's last evaluation
    last = [json.loads(ln) for ln in (SHIPPED_DIR / "log.jsonl").read_text().splitlines() if '"eval"' in ln][-1]
    assert numbers["mse_after"] == last["mse"] < numbers["noisy_mse"]
    assert (tmp_path / "reconstructions.png").is_file()
    assert numbers["certified_images"] == 2
    with pytest.raises(ValueError, match="holds the shipped checkpoint"):
        run_demo(tmp_path, progress=False, device="cpu", from_scratch=True)
    for first_file in ("log.jsonl", "config.yaml"):  # a run from scratch, or one stopped before its first log line
        scratch = tmp_path / f"scratch_{first_file}"
        (scratch / "pretrain").mkdir(parents=True)
        (scratch / "pretrain" / first_file).write_text("")
        with pytest.raises(ValueError, match="made here"):
            run_demo(scratch, progress=False, device="cpu")
        assert sorted(p.name for p in scratch.iterdir()) == ["pretrain"]  # nothing copied, no temporary folder left
    with pytest.raises(ValueError, match="apply to from_scratch=True only"):
        run_demo(tmp_path / "x", progress=False, device="cpu", epochs=2)


def test_damaged_shipped_weights_are_refused(tmp_path, monkeypatch):
    import shutil

    import dmae.workflows.demo as demo

    copy = tmp_path / "shipped"
    shutil.copytree(demo.SHIPPED_DIR, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr(demo, "SHIPPED_DIR", copy)
    with pytest.raises(ValueError, match="sha256"):
        demo.install_shipped_pretraining(tmp_path / "run" / "pretrain")
    assert not (tmp_path / "run" / "pretrain").exists()


def test_shipped_copy_clears_what_a_killed_copy_left_and_keeps_the_usual_permissions(tmp_path):
    """A copy killed part way (SIGKILL) leaves ``pretrain.tmpXXXX`` with a config.yaml and a log.jsonl: the next
    copy removes it, and the HTML report never lists such a folder as a training run."""
    import os
    import subprocess
    import sys

    from dmae.reporting.html_report import discover
    from dmae.workflows.demo import install_shipped_pretraining

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"pretrain.tmp{int(gone.stdout)}"  # a process that has ended
    stale.mkdir()
    (stale / "config.yaml").write_text("model: x\n")
    (stale / "log.jsonl").write_text("")
    running = tmp_path / f"pretrain.tmp{os.getppid()}"  # a copy whose process still runs
    running.mkdir()
    (tmp_path / "pretrain.tmp_backup").mkdir()  # the user's own folder
    assert discover([], [tmp_path]).training == []
    install_shipped_pretraining(tmp_path / "pretrain")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["pretrain", running.name, "pretrain.tmp_backup"])
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "pretrain").stat().st_mode & 0o777 == 0o777 & ~umask
    assert discover([], [tmp_path]).training == [tmp_path / "pretrain"]


def test_demo_epochs_without_from_scratch_is_refused():
    from dmae.workflows.demo import DemoConfig

    with pytest.raises(ValueError, match="--epochs 3 sets the pretraining of --from-scratch"):
        DemoConfig(epochs=3).validate()
    DemoConfig(epochs=3, from_scratch=True).validate()
