"""Every script in examples/ runs, shrunken (few images, few steps, small n), so none of them can rot."""

import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = pytest.mark.e2e  # whole workflows: the demo, the experiments, the examples


@pytest.fixture(autouse=True)
def _examples_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


def test_certify_your_model(tmp_path):
    import certify_your_model

    result = certify_your_model.main(
        ["--out", str(tmp_path), "--train-images", "256", "--steps", "20", "--skip", "2000", "--n-max", "200"]
    )
    assert result.logs[0].idx.tolist() == [0, 2000, 4000, 6000, 8000]
    assert str(result.table()).splitlines()[0].split()[:3] == ["log", "sigma", "images"]  # print() shows the table
    assert (tmp_path / "certs" / "sequential_sigma0.25.tsv").is_file()
    assert (tmp_path / "report.html").is_file()


def test_finetune_on_imagefolder(tmp_path, capsys):
    import finetune_on_imagefolder

    finetune_on_imagefolder.main(["--out", str(tmp_path), "--epochs", "1", "--train-images", "60", "--n", "100"])
    out = capsys.readouterr().out
    assert "adapted to" in out
    assert "held-out accuracy under noise:" in out
    rows = (tmp_path / "certs" / "certify_sigma0.25.tsv").read_text().splitlines()
    assert rows[0].startswith("idx\tlabel\tpredict\tradius")
    assert len(rows) == 1 + 20  # every val image


def test_compare_two_classifiers(tmp_path):
    import compare_two_classifiers

    text = compare_two_classifiers.main(
        ["--out", str(tmp_path), "--train-images", "256", "--steps", "5", "20", "--skip", "2000", "--n-max", "200"]
    )
    assert "5 images" in text, text
    assert "ACR" in text, text
    assert sys.modules["certify_your_model"].SmallCNN  # the second example reuses the first's model
