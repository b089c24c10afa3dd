import torch

from dmae.checkpoint import load_classifier
from dmae.data import build_dataset, build_transform, dataset_info
from dmae.demo import run_demo
from dmae.finetune import noisy_accuracy
from dmae.report import read_log

from conftest import PICO


def test_demo_wiring_on_a_small_slice(tmp_path, capsys):
    small = {"model": PICO, "train_subset": 512, "eval_images": 64}
    # enough fine-tuning (32 steps) that the classifier depends on its input, so a wrong number shows
    small_ft = {"train_subset": 1024, "val_size": 100, "batch_size": 32, "eval_images": 200, "lr": 1e-2}
    small_cert = {"n": 200, "n0": 20, "skip": 2500, "batch": 256}
    first = run_demo(tmp_path, progress=False, device="cpu", overrides=small, finetune_overrides=small_ft,
                     certify_overrides=small_cert)
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
    assert first["certified_images"] == 4 and (tmp_path / "certified_accuracy.png").is_file()
    log = read_log(tmp_path / "certify" / "certify_sigma0.25.tsv")
    assert (first["certified_acc_0"], first["acr"]) == (log.certified_accuracy(0.0), log.acr)
    out = capsys.readouterr().out
    assert "pixel MSE to the clean image" in out
    assert f"accuracy under noise sigma=0.25: {100 * first['noisy_acc']:.2f}%" in out
    assert "r=0.25" in out and "ACR" in out
    page = (tmp_path / "report.html").read_text()  # the run's HTML report, every section present
    assert f"report: {tmp_path / 'report.html'}" in out
    assert all(f'<h2 id="{sec}">' in page for sec in ("certified", "training", "reconstructions", "per-image", "settings"))
    # a second call reuses the finished runs instead of training again
    again = run_demo(tmp_path, progress=False, device="cpu", overrides=small, finetune_overrides=small_ft,
                     certify_overrides=small_cert)
    assert again == first


DEMO_SCRIPT = """
import functools, sys
import dmae.demo as demo
from dmae.cli import main
demo.run_demo = functools.partial(demo.run_demo, overrides={overrides!r}, finetune_overrides={ft!r},
                                  certify_overrides={cert!r})
sys.exit(main(["demo", "--output-dir", {out!r}, "--device", "cpu", "--no-progress"]))
"""


def _demo_process(out, ft):
    import subprocess
    import sys

    script = DEMO_SCRIPT.format(overrides={"model": PICO, "train_subset": 256, "eval_images": 32}, ft=ft,
                                cert={"n": 100, "n0": 10, "skip": 5000, "batch": 256}, out=str(out))
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def test_sigterm_during_fine_tuning_stops_the_demo_and_the_same_command_resumes(tmp_path):
    """A stage stopped by SIGTERM must stop the pipeline (non-zero exit, how to resume), not certify a half-trained
    model; re-running the same command resumes it and ends with the numbers of an uninterrupted run."""
    import signal
    import time

    ft = {"train_subset": 3000, "val_size": 100, "batch_size": 32, "eval_images": 32, "log_every": 5}
    out = tmp_path / "interrupted"
    proc = _demo_process(out, ft)
    log = out / "finetune" / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.is_file() and log.read_text().strip()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "fine-tuning stopped at step" in err and "run the same `dmae demo` command again to resume" in err
    assert not (out / "certify").exists()  # nothing was certified from the half-trained model
    again = _demo_process(out, ft)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-2000:]
    whole = _demo_process(tmp_path / "whole", ft)
    whole.communicate(timeout=600)
    rows = [(d / "certify" / "certify_sigma0.25.tsv").read_text().splitlines() for d in (out, tmp_path / "whole")]
    assert [r.split("\t")[:5] for r in rows[0]] == [r.split("\t")[:5] for r in rows[1]] and len(rows[0]) == 3
    from safetensors.torch import load_file

    a, b = (load_file(d / "finetune" / "model_last.safetensors") for d in (out, tmp_path / "whole"))
    assert all(torch.equal(a[k], b[k]) for k in a)
