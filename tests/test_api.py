"""dmae.certify: a user's own module and in-memory data set, one call; the same rows as `dmae certify`."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import dmae
from dmae.certification.runner import CertifyConfig, run_certification
from dmae.checkpoint import load_classifier
from dmae.data import build_dataset, build_transform, dataset_info
from dmae.errors import DmaeError


class MyCNN(nn.Module):
    """A user's own classifier: BatchNorm (with running statistics), normalization inside, 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - 0.5) / 0.25)


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(12, 1, 8, 8, generator=g), torch.randint(0, 4, (12,), generator=g))


def _rows(path):
    """A fixed-n log's rows without the time column."""
    return [ln.split("\t")[:-1] for ln in path.read_text().splitlines()]


@pytest.mark.slow
def test_the_readme_snippet_certifies_resumes_and_reports(tmp_path):
    model, data = MyCNN().eval(), _data()
    # the snippet (README, "Python API"): at most 10 lines after imports and the model
    result = dmae.certify(
        model, data, sigma=0.25, n0=100, n_max=1000, sequential="targets", log_dir=tmp_path / "certs", max_images=6
    )
    print(result.table())
    result.html(tmp_path / "report.html")
    # the end of the snippet
    [log] = result.logs
    assert len(log.idx) == 6
    assert log.idx.tolist() == list(range(6))
    assert "r=0" in result.table().text()
    assert "<table" in (tmp_path / "report.html").read_text()
    tsv = tmp_path / "certs" / "sequential_sigma0.25.tsv"
    first = tsv.read_text().splitlines()
    # an interrupted call leaves a torn last line; calling again continues the log to all 12 images
    tsv.write_text("\n".join(first) + "\n11\t2\t")
    again = dmae.certify(model, data, sigma=0.25, n0=100, n_max=1000, sequential="targets", log_dir=tmp_path / "certs")
    lines = tsv.read_text().splitlines()
    assert len(again.logs[0].idx) == 12
    assert [ln.split("\t")[:4] for ln in lines[:7]] == [ln.split("\t")[:4] for ln in first]
    # another model's weights never mix into the log
    other = MyCNN().eval()
    with torch.no_grad():
        other.net[4].bias.add_(1.0)
    with pytest.raises(ValueError, match="weights_sha256"):
        dmae.certify(other, data, sigma=0.25, n0=100, n_max=1000, sequential="targets", log_dir=tmp_path / "certs")


@pytest.mark.slow
def test_the_api_and_the_cli_write_the_same_rows(classifier_run, tmp_path):
    kw = dict(n0=20, n=200, alpha=0.001, skip=1000, seed=3)
    [cli] = run_certification(
        CertifyConfig(
            checkpoint=str(classifier_run),
            sigma=(0.25,),
            batch=128,
            output_dir=str(tmp_path / "cli"),
            device="cpu",
            progress=False,
            **kw,
        )
    )
    model, _ = load_classifier(classifier_run, 10, pool=None)
    info = dataset_info("fashion-mnist")
    test = build_dataset("fashion-mnist", "test", None, build_transform(info, False, model.config.encoder.img_size))
    api = dmae.certify(
        model.eval(),
        test,
        sigma=0.25,
        batch_size=77,
        log_dir=tmp_path / "api",
        skip=kw["skip"],
        n0=kw["n0"],
        n=kw["n"],
        alpha=kw["alpha"],
        seed=kw["seed"],
    )
    assert _rows(api.paths[0]) == _rows(cli.path)
    assert len(_rows(cli.path)) == 11
    assert (
        api.logs[0].meta["weights_sha256"]
        == cli.path.with_suffix(".json").read_text().split('"weights_sha256": "')[1].split('"')[0]
    )  # the module's state dict and its saved file agree


def test_bad_inputs_are_named():
    model = MyCNN().eval()
    with pytest.raises(ValueError, match="alpha must be in"):
        dmae.certify(model, _data(), sigma=0.25, alpha=0.999, n=100)
    with pytest.raises(ValueError, match=r"\[C, H, W\] tensor of \[0, 1\] pixels, got ndarray"):
        dmae.certify(model, [(torch.rand(1, 8, 8).numpy(), 0)], sigma=0.25, n=100)
    with pytest.raises(ValueError, match="floating-point tensor"):
        dmae.certify(
            model, TensorDataset(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.zeros(2)), sigma=0.25, n=100
        )


class Shapes(TensorDataset):
    """A user's own in-memory data set with class names: bright squares (1) or not (0) on 8x8 noise."""

    classes = ("plain", "square")

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        x, y = torch.rand(n, 1, 8, 8, generator=g) * 0.5, torch.arange(n) % 2
        x[y == 1, :, 2:6, 2:6] = 1.0
        super().__init__(x, y)


@pytest.mark.slow
def test_pretrain_and_finetune_take_a_data_set_of_ones_own(tmp_path):
    from conftest import PICO

    train, test = Shapes(32, 0), Shapes(8, 1)
    kw = dict(model=PICO, batch_size=8, progress=False)
    pre = dmae.pretrain(train, eval_data=test, output_dir=tmp_path / "pre", epochs=2, stop_after=3, **kw)
    assert pre.step == 3
    assert not pre.finished
    assert "data: custom" in (tmp_path / "pre" / "config.yaml").read_text()
    with pytest.raises(ValueError, match="the data or the init weights differ"):  # other images never mix in
        dmae.pretrain(Shapes(32, 5), output_dir=tmp_path / "pre", epochs=2, resume=True, **kw)
    with pytest.raises(FileExistsError, match="pass resume=True to continue it, or choose another output_dir"):
        dmae.pretrain(train, output_dir=tmp_path / "pre", epochs=2, **kw)  # worded as the call, not the CLI
    pre = dmae.pretrain(train, eval_data=test, output_dir=tmp_path / "pre", epochs=2, resume=True, **kw)
    assert pre.finished
    assert pre.eval_end is not None
    assert (tmp_path / "pre" / "model.safetensors").exists()

    with pytest.raises(DmaeError, match="pass num_classes=K"):
        dmae.finetune(TensorDataset(*train.tensors), init=tmp_path / "pre", output_dir=tmp_path / "x")
    with pytest.raises(
        ValueError, match=r"unknown option\(s\) epoch \(epoch: did you mean epochs\?\); FinetuneConfig has: .*epochs"
    ):
        dmae.finetune(train, init=tmp_path / "pre", epoch=3)
    ft = dmae.finetune(
        train, test_data=test, init=str(tmp_path / "pre"), output_dir=tmp_path / "ft", epochs=2, val_size=8, **kw
    )
    assert ft.finished
    assert set(ft.best) >= {"val_acc@0.25", "test_acc@0.25"}
    model = dmae.load_classifier(tmp_path / "ft")
    assert not model.training
    assert model.trained_sigma == 0.25
    assert model.config.num_classes == 2
    result = dmae.certify(model, test, sigma=0.25, n0=20, n=100)
    assert len(result.logs[0]) == 8
    assert result.logs[0].dataset == "custom"


@pytest.mark.slow
def test_predict_load_classifier_compare_and_table(classifier_run, tmp_path):
    model = dmae.load_classifier(classifier_run)
    assert not model.training
    assert model.trained_sigma == 0.25
    kw = dict(n=200, alpha=0.001, skip=1000, seed=3)
    [cli] = run_certification(
        CertifyConfig(
            checkpoint=str(classifier_run),
            sigma=(0.25,),
            output_dir=str(tmp_path / "cli"),
            device="cpu",
            progress=False,
            **kw,
        ),
        "predict",
    )
    api = dmae.predict(model, dmae.datasets.fashion_mnist(), sigma=0.25, log_dir=tmp_path / "api", **kw)
    [log] = api.logs
    assert _rows(log.path) == _rows(cli.path)
    assert len(log.idx) == 10
    assert log.idx.tolist() == list(range(0, 10_000, 1000))
    assert log.accuracy == pytest.approx(sum(r[3] == "1" for r in _rows(log.path)[1:]) / 10)
    assert f"sigma 0.25: 10 images, accuracy {100 * log.accuracy:.1f}%" in str(api)

    a = dmae.certify(model, dmae.datasets.fashion_mnist(), sigma=0.25, n0=20, n=200, skip=2500, log_dir=tmp_path / "a")
    with pytest.warns(dmae.DmaeWarning, match="trained at"):
        b = dmae.certify(
            model, dmae.datasets.fashion_mnist(), sigma=0.5, n0=20, n=200, skip=2500, log_dir=tmp_path / "b"
        )
    cmp = dmae.compare(a, b.paths[0], radii=(0.0, 0.25))
    assert cmp.images == 4
    assert cmp.radii == (0.0, 0.25)
    assert "McNemar p" in str(cmp)
    assert [r["sigma"] for r in dmae.table([a.paths[0], b.logs[0]]).rows[:2]] == [0.25, 0.5]
    assert dmae.read_log(a.paths[0]).radius.tolist() == a.logs[0].radius.tolist()

    encoder_only = tmp_path / "encoder.safetensors"
    from dmae.checkpoint import save_export

    save_export(dmae.create_model("dmae_vit_pico_patch4_dec32d1b"), encoder_only)
    with pytest.raises(DmaeError, match="not a trained classifier"):
        dmae.load_classifier(encoder_only)


def test_table_and_compare_take_a_path_a_folder_and_name_logs_apart(tmp_path):
    model, data = MyCNN().eval(), _data()
    for side in ("a", "b"):
        dmae.certify(model, data, sigma=0.25, n0=20, n=100, max_images=4, log_dir=tmp_path / side)
    one = tmp_path / "a" / "certify_sigma0.25.tsv"
    assert [r["name"] for r in dmae.table(str(one)).rows] == ["certify_sigma0.25"]  # one path, not its letters
    rows = dmae.table([tmp_path / "a", tmp_path / "b"]).rows  # folders stand for their logs
    assert [r["name"] for r in rows[:2]] == ["a/certify_sigma0.25", "b/certify_sigma0.25"]
    cmp = dmae.compare(tmp_path / "a", tmp_path / "b" / "certify_sigma0.25.tsv")
    assert (cmp.a, cmp.b) == ("a/certify_sigma0.25", "b/certify_sigma0.25")
    with pytest.raises(DmaeError, match="did you mean epochs"):
        dmae.finetune(data, epoch=2)


def test_a_training_result_prints_without_its_model():
    from dmae.training.engine import TrainResult

    text = repr(TrainResult(output_dir=__import__("pathlib").Path("runs/x"), step=3, total_steps=3, model=MyCNN()))
    assert "step=3" in text
    assert "Conv2d" not in text


def test_the_label_as_the_candidate_through_the_api():
    """``dmae.certify(candidate="label")``: the CLI's code path; rows are the label or -1, no selection samples
    are spent (sequential: n_samples are estimation samples only), and the table says what the rows mean."""
    model, data = MyCNN().eval(), _data()
    fixed = dmae.certify(model, data, sigma=0.25, n=200, candidate="label")
    seq = dmae.certify(model, data, sigma=0.25, n_max=200, sequential="targets", candidate="label")
    for lg in (fixed.logs[0], seq.logs[0]):
        assert lg.candidate == "label"
        assert all(p in (y, -1) for p, y in zip(lg.predict, lg.label, strict=True))
    assert seq.logs[0].n_samples.max() <= 200
    assert "--candidate label" in str(seq.table())
    with pytest.raises(ValueError, match="candidate"):
        dmae.certify(model, data, sigma=0.25, n=200, candidate="labels")


def test_an_api_call_is_told_about_its_own_keywords_not_the_command_lines_flags(tmp_path, capsys):
    model, data = MyCNN().eval(), _data()
    dmae.certify(model, data, sigma=0.25, n0=10, n=50, max_images=2, log_dir=tmp_path)
    with pytest.raises(ValueError, match=r"other settings \(n: 50 -> 60\); use another log_dir$"):
        dmae.certify(model, data, sigma=0.25, n0=10, n=60, max_images=2, log_dir=tmp_path)
    with pytest.raises(ValueError, match=r"^shard=5/3: K must be in 0\.\.2"):
        dmae.certify(model, data, sigma=0.25, n=50, shard=(5, 3), log_dir=tmp_path)
    with pytest.raises(DmaeError, match=r"first \(shard=\(K, N\)\), with the same log_dir$"):
        dmae.certify(model, data, sigma=0.25, n=50, merge=True, log_dir=tmp_path / "no_shards")
    capsys.readouterr()
    dmae.certify(model, data, sigma=0.25, n0=10, n=50, max_images=2)  # no log_dir: the logs are not kept
    out = capsys.readouterr().out
    assert "rows in <a temporary folder: give log_dir to keep the logs>/certify_sigma0.25.tsv" in out
    assert "dmae-certify-" not in out  # the folder is gone when the call returns: never named as if it stayed
    assert "(n=218,105 reaches r = 1)" in out  # the budget note names the keyword, not --n
    # the command line's path keeps its flags
    cfg = CertifyConfig(
        checkpoint="x", output_dir=str(tmp_path), sigma=(0.25,), n0=10, n=60, max=2, progress=False, data="custom"
    )
    from dmae.certification.runner import certify_module

    with pytest.raises(ValueError, match=r"use another --output-dir$"):
        certify_module(model, data, cfg, "certify", None)


class Scalar(nn.Module):
    """One number per image, not logits [B, K]."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).sum(1) * self.w


@pytest.mark.parametrize(
    ("model", "dataset", "message"),
    [
        (MyCNN, [], "the data set is empty"),
        (MyCNN, [(torch.zeros(8, 8, 1), 0)], r"the images are \[8, 8, 1\]: channels last; give \[C, H, W\]"),
        (
            MyCNN,
            [(torch.zeros(1, 8, 8, dtype=torch.float64), 0)],
            r"the images are torch.float64 and the model's parameters torch.float32: convert one of them",
        ),
        (Scalar, _data(), r"the model returned \(1,\) for one image, expected logits \[1, K\] with K >= 2"),
    ],
    ids=["empty", "channels-last", "float64", "not-logits"],
)
def test_what_cannot_be_certified_is_refused_before_a_sample(model, dataset, message, tmp_path):
    with pytest.raises(DmaeError, match=message):
        dmae.certify(model().eval(), dataset, sigma=0.25, n=100, log_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # refused before a log was claimed


def test_results_without_a_log_dir_say_their_files_are_gone(tmp_path):
    model, data = MyCNN().eval(), _data()
    result = dmae.certify(model, data, sigma=0.25, n0=20, n=100)
    assert result.paths is None
    with pytest.raises(DmaeError, match="the HTML report reads the log files: certify with log_dir=FOLDER"):
        result.html(tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()
    [log] = dmae.predict(model, data, sigma=0.25, n=100).logs
    assert str(log.path) == "(not kept: give log_dir)"
    assert log.label.tolist() == [int(y) for _, y in data]
    assert log.accuracy == pytest.approx(float((log.predict == log.label).mean()))
    assert log.abstention == pytest.approx(float((log.predict == -1).mean()))


def test_a_predict_log_with_a_row_that_is_not_integers_is_named(tmp_path):
    from dmae.api import read_predict_log
    from dmae.certification.log import LogError

    path = tmp_path / "predict_sigma0.25.tsv"
    path.write_text("idx\tlabel\tpredict\tcorrect\ttime\n0\t3\t3\t1\t0.1\n1\t2\tcat\t0\t0.1\n")
    with pytest.raises(LogError, match=r"predict_sigma0.25.tsv: a row that is not integers"):
        read_predict_log(path, 0.25)
    path.write_text("idx\tlabel\tpredict\tcorrect\ttime\n0\t3\t3\t1\t0.1\n5\t2\t-1\t0\t0.1\n")
    log = read_predict_log(path, 0.25)
    assert log.idx.tolist() == [0, 5]
    assert log.predict.tolist() == [3, -1]
    assert log.accuracy == 0.5
    assert log.abstention == 0.5


def test_compare_takes_one_log_a_side(tmp_path):
    model, data = MyCNN().eval(), _data()
    both = dmae.certify(model, data, sigma=(0.25, 0.5), n0=20, n=100, max_images=4, log_dir=tmp_path / "two")
    with pytest.raises(DmaeError, match=r"compare takes one log on each side, got 3 logs"):
        dmae.compare(tmp_path / "two", both.paths[0])


def test_a_built_in_data_set_by_name_takes_the_cli_options():
    """``dmae.pretrain("fashion-mnist", ...)`` / ``dmae.finetune(...)``: options are the CLI's, checked before any
    data is read."""
    with pytest.raises(DmaeError, match=r"unknown option\(s\) nonsense; PretrainConfig has: accum_iter"):
        dmae.pretrain("fashion-mnist", nonsense=1)
    with pytest.raises(DmaeError, match=r"give init \(pretrained weights\) or model \(a preset"):
        dmae.finetune("fashion-mnist")
    with pytest.raises(DmaeError, match=r"unknown option\(s\) nonsense; LinprobeConfig has"):
        dmae.finetune("fashion-mnist", linprobe=True, nonsense=1)
