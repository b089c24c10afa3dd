from dmae.demo import run_demo

from conftest import PICO


def test_demo_wiring_on_a_small_slice(tmp_path, capsys):
    small = {"model": PICO, "train_subset": 512, "eval_images": 64}
    first = run_demo(tmp_path, progress=False, device="cpu", overrides=small)
    assert first["mse_after"] < first["mse_before"]
    assert (tmp_path / "reconstructions.png").is_file()
    out = capsys.readouterr().out
    assert "pixel MSE to the clean image" in out and "before pretraining" in out
    # a second call reuses the finished run instead of training again
    again = run_demo(tmp_path, progress=False, device="cpu", overrides=small)
    assert again == first
