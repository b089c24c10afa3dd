from dmae.demo import run_demo

from conftest import PICO


def test_demo_wiring_on_a_small_slice(tmp_path, capsys):
    small = {"model": PICO, "train_subset": 512, "eval_images": 64}
    small_ft = {"train_subset": 128, "val_size": 100, "batch_size": 32, "eval_images": 64}
    small_cert = {"n": 200, "n0": 20, "skip": 2500, "batch": 256}
    first = run_demo(tmp_path, progress=False, device="cpu", overrides=small, finetune_overrides=small_ft,
                     certify_overrides=small_cert)
    assert first["mse_after"] < first["mse_before"]
    assert 0.0 <= first["noisy_acc"] <= 1.0 and first["finetune_steps"] == 4
    assert (tmp_path / "reconstructions.png").is_file()
    assert (tmp_path / "finetune" / "model_best.safetensors").is_file()
    assert first["certified_images"] == 4 and (tmp_path / "certified_accuracy.png").is_file()
    out = capsys.readouterr().out
    assert "pixel MSE to the clean image" in out and "accuracy under noise sigma=0.25" in out
    assert "r=0.25" in out and "ACR" in out
    # a second call reuses the finished runs instead of training again
    again = run_demo(tmp_path, progress=False, device="cpu", overrides=small, finetune_overrides=small_ft,
                     certify_overrides=small_cert)
    assert again == first
