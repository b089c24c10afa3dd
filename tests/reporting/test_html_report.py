"""``dmae report --html`` (dmae.reporting.html_report): one self-contained page with every section and image."""

import json
import re

import pytest
import yaml
from PIL import Image

from dmae.certification.log import CERTIFY_HEADER, format_row
from dmae.certification.runner import CertifyConfig, run_certification
from dmae.cli import main
from dmae.reporting.html_report import build_html, discover, pick_examples
from dmae.reporting.report import read_log

SECTIONS = ("certified", "training", "reconstructions", "per-image", "settings")


def _run_folder(classifier_run, tmp_path):
    """A run folder as `dmae demo` leaves it: a pretraining and a fine-tuning run (config + log), a reconstruction
    figure, and fixed-n and sequential certification logs."""
    out = tmp_path / "run"
    for name, rows in (
        (
            "pretrain",
            [
                {"type": "eval", "step": 0, "epoch": 0.0, "mse": 0.3},
                {"type": "train", "step": 2, "epoch": 0.5, "loss": 1.2, "img_per_s": 50.0},
                {"type": "eval", "step": 4, "epoch": 1.0, "mse": 0.05},
            ],
        ),
        (
            "finetune",
            [
                {"type": "train", "step": 2, "epoch": 0.5, "loss": 2.0, "img_per_s": 40.0},
                {"type": "eval", "step": 4, "epoch": 1.0, "val_acc@0.25": 0.5},
            ],
        ),
    ):
        (out / name).mkdir(parents=True)
        (out / name / "config.yaml").write_text(yaml.safe_dump({"sigma": 0.25, "seed": 0, "stage": name}))
        (out / name / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "pretrain" / "model.safetensors").write_bytes(b"")
    Image.new("L", (40, 20), 128).save(out / "reconstructions.png")
    common = dict(checkpoint=str(classifier_run), n0=20, skip=500, batch=512, device="cpu", progress=False)
    run_certification(CertifyConfig(n=500, sequential="targets", output_dir=str(out / "certify"), **common))
    # a fixed-n log with every kind of row (the tiny classifier alone says one class everywhere)
    rows = [(0, 9, 9, 0.61), (1, 2, 2, 0.12), (2, 1, -1, 0.0), (3, 1, 1, 0.33), (4, 4, 6, 0.2), (5, 5, -1, 0.0)]
    log = out / "certify" / "certify_sigma0.25.tsv"
    log.write_text(
        "\t".join(CERTIFY_HEADER) + "\n" + "".join(format_row(CERTIFY_HEADER, i, y, p, r, 0.1) for i, y, p, r in rows)
    )
    log.with_suffix(".json").write_text(
        json.dumps({"mode": "certify", "data": "fashion-mnist", "split": "test", "sigma": 0.25, "n0": 100, "n": 1000})
    )
    return out


@pytest.mark.slow
def test_page_has_every_section_and_embeds_every_image(classifier_run, tmp_path):
    out = _run_folder(classifier_run, tmp_path)
    found = discover([], [out])
    assert [p.name for p in found.training] == ["pretrain", "finetune"]
    assert len(found.logs) == 2
    assert len(found.figures) == 1
    page = build_html(found, "test run")
    for section in SECTIONS:
        assert f'<h2 id="{section}">' in page, section
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs
    assert all(s.startswith("data:image/png;base64,") for s in srcs)  # nothing fetched from anywhere
    assert "http://" not in page
    assert "https://" not in page
    logs = [read_log(p) for p in found.logs]
    n_examples = sum(len(rows) for lg in logs for rows in pick_examples(lg, 4).values())
    # curves per table (fixed-n and sequential are not mixed), 2 training runs, the reconstruction, clean + noisy
    assert len(srcs) == 2 + 2 + 1 + 2 * n_examples
    assert page.count("<h3>") >= 2
    assert "(certify)</h3>" in page
    assert "(sequential)</h3>" in page
    assert "certify_sigma0.25" in page
    assert "sequential_sigma0.25" in page
    assert "samples/img" in page
    seq = read_log(out / "certify" / "sequential_sigma0.25.tsv")
    assert f"Forward passes in all: {6 * 1100 + int(seq.n_samples.sum()):,}" in page
    assert "torch" in page
    assert "stage: finetune" in page
    spent, fixed = 6 * 1100 + int(seq.n_samples.sum()), 6 * 1100 + len(seq) * (20 + 500)  # the samples saved
    assert fixed > spent
    assert f"would have drawn {fixed:,} ({fixed / spent:.1f}x more)" in page
    for kind in ("certified", "abstained", "misclassified"):
        assert f"<h4>{kind} (" in page


@pytest.mark.slow
def test_examples_pick_the_right_rows(classifier_run, tmp_path):
    out = _run_folder(classifier_run, tmp_path)
    lg = read_log(out / "certify" / "certify_sigma0.25.tsv")
    picked = pick_examples(lg, 3)
    assert picked == {"certified": [0, 3, 1], "abstained": [2, 5], "misclassified": [4]}
    assert all(lg.correct[i] == 1 for i in picked["certified"])
    assert all(lg.predict[i] == -1 for i in picked["abstained"])
    assert picked["abstained"]
    assert all(lg.predict[i] not in (-1, lg.label[i]) for i in picked["misclassified"])
    radii = [lg.radius[i] for i in picked["certified"]]
    assert radii == sorted(radii, reverse=True)


@pytest.mark.slow
def test_cli_writes_the_page_and_names_bad_inputs(classifier_run, tmp_path, capsys):
    out = _run_folder(classifier_run, tmp_path)
    page = tmp_path / "report.html"
    assert main(["report", "--run-dir", str(out), "--html", str(page), "--title", "my run"]) == 0
    text = capsys.readouterr().out
    assert "wrote html:" in text
    assert "r=0.25" in text  # the table is printed too
    assert "<title>my run</title>" in page.read_text()
    assert main(["report", "--run-dir", str(tmp_path / "nowhere"), "--html", str(page)]) == 2
    assert "no such run folder" in capsys.readouterr().err
    assert main(["report"]) == 2
    assert "give certification logs" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_puts_the_paired_tables_in_the_page(classifier_run, tmp_path, capsys):
    """`dmae report A B --compare --html`: the page holds the paired table under a header that names both
    logs (two runs' certify/sequential_sigma0.25 told apart by their folders)."""
    import shutil

    out = _run_folder(classifier_run, tmp_path)
    other = tmp_path / "run_b" / "certify"
    other.mkdir(parents=True)
    for suffix in (".tsv", ".json"):
        shutil.copy(out / "certify" / f"sequential_sigma0.25{suffix}", other / f"sequential_sigma0.25{suffix}")
    page = tmp_path / "cmp.html"
    assert (
        main(
            ["report", str(out / "certify" / "sequential_sigma0.25.tsv"), str(other), "--compare", "--html", str(page)]
        )
        == 0
    )
    text = page.read_text()
    assert '<h2 id="paired">Paired comparisons</h2>' in text
    assert "<th>McNemar p</th>" in text
    assert "A = run/certify/sequential_sigma0.25 (sigma 0.25) vs B = run_b/certify/sequential_sigma0.25" in text
    assert "Note: both logs certify the same weights" in text
    assert main(["report", str(out / "certify" / "sequential_sigma0.25.tsv"), "--html", str(page)]) == 0
    assert "Paired comparisons" not in page.read_text()  # only when asked


def test_a_bare_tsv_renders_every_section_without_a_raw_error(tmp_path, capsys):
    """A hand-made log (the field's six columns, no JSON) showed `images unavailable: KeyError('data')`: every
    section of the page, --compare and --run-dir included, now renders and says in words what it lacks."""
    (tmp_path / "run").mkdir()
    rows = [(0, 1, 1, 0.5), (1, 2, 2, 0.3), (2, 3, -1, 0.0), (3, 3, 4, 0.2)]
    logs = []
    for f in (tmp_path / "run" / "mine_sigma0.5.tsv", tmp_path / "theirs_sigma0.25.tsv"):
        f.write_text(
            "\t".join(CERTIFY_HEADER)
            + "\n"
            + "".join(format_row(CERTIFY_HEADER, i, y, p, r, 0.1) for i, y, p, r in rows)
        )
        logs.append(str(f))
    page = tmp_path / "p.html"
    for args in ([*logs, "--compare"], [logs[1], "--run-dir", str(tmp_path / "run")]):
        assert main(["report", *args, "--html", str(page)]) == 0
        text = page.read_text()
        assert "Error" not in text
        assert "KeyError" not in text
        for section in SECTIONS:
            assert f'<h2 id="{section}">' in text, section
        assert (
            "images unavailable: no data set recorded (mine_sigma0.5.json beside the log does not exist); the "
            "rows cannot be matched to images"
        ) in text
        assert f"{logs[0]}: no settings recorded (no mine_sigma0.5.json beside it)" in text
    assert "have no protocol record" in capsys.readouterr().out


def test_examples_and_training_curves_say_what_they_leave_out(tmp_path):
    """More of the kind, on a page: an idx or label outside the data set the JSON names is a line on the page
    (not a crash of the whole page), and torn or foreign lines of a training log.jsonl are named, not skipped
    silently."""
    from dmae.reporting.html_report import training_section

    log = tmp_path / "certify_sigma0.25.tsv"
    log.write_text(
        "\t".join(CERTIFY_HEADER)
        + "\n"
        + format_row(CERTIFY_HEADER, 99999, 42, 42, 0.5, 0.1)
        + format_row(CERTIFY_HEADER, 3, 42, 42, 0.4, 0.1)
    )
    log.with_suffix(".json").write_text(
        json.dumps({"mode": "certify", "data": "fashion-mnist", "split": "test", "sigma": 0.25})
    )
    page = build_html(discover([log], []))
    assert "#99999: no such image in a data set of 10000" in page
    assert "#3 42 -> 42, r = 0.400" in page
    run = tmp_path / "ft"
    run.mkdir()
    (run / "log.jsonl").write_text(
        '{"type": "train", "step": 1, "loss": 2.0}\n{"type": "train", "step": 2}\n'
        '[1, 2]\n{"type": "eval", "step": 2, "val_acc": 0.5}\n{"type": "tra'
    )
    html = training_section([run])
    assert f"{run / 'log.jsonl'}: line(s) 3, 5 not read (not a JSON record" in html


def test_label_candidate_logs_say_what_their_rows_mean(tmp_path):
    """A ``--candidate label`` log: the table names each row's candidate and a note says that its rows mean
    "certified correct" (-1: not certified correct), in text, CSV and HTML; the examples are split into certified
    correct and not certified correct (there is no misclassified row)."""
    from dmae.reporting.report import summarize

    rows = [(0, 9, 9, 0.61), (1, 2, -1, 0.0), (2, 1, 1, 0.33), (3, 4, -1, 0.0)]
    logs = []
    for name, candidate in (("label", "label"), ("select", "select")):
        log = tmp_path / name / "certify_sigma0.25.tsv"
        log.parent.mkdir()
        log.write_text(
            "\t".join(CERTIFY_HEADER)
            + "\n"
            + "".join(format_row(CERTIFY_HEADER, i, y, p, r, 0.1) for i, y, p, r in rows)
        )
        meta = {"mode": "certify", "data": "fashion-mnist", "split": "test", "sigma": 0.25, "n0": None, "n": 1000}
        log.with_suffix(".json").write_text(json.dumps({**meta, "candidate": candidate}))
        logs.append(log)
    label, select = read_log(logs[0]), read_log(logs[1])
    table = summarize([label])
    assert table.cells()[0][:4] == ["log", "sigma", "candidate", "images"]
    assert table.cells()[1][0][2] == "label"
    assert any("certified each image's label (--candidate label)" in n for n in table.notes)
    assert "candidate" in table.csv().splitlines()[0]
    assert ",label," in table.csv()
    plain = summarize([select])
    assert "candidate" not in plain.cells()[0]
    assert not any("--candidate" in n for n in plain.notes)
    assert set(pick_examples(label, 4)) == {
        "certified correct",
        "not certified correct (misclassified or not certifiable)",
    }
    page = build_html(discover(logs[:1], []))
    assert "not certified correct: misclassified, or correct but not certifiable" in page
    assert "<th>candidate</th>" in page


def test_the_page_names_a_missing_input_and_says_when_there_are_no_logs(tmp_path):
    from dmae.reporting.html_report import write_html_report

    with pytest.raises(FileNotFoundError, match=r"no such log: .*nope\.tsv"):
        discover([tmp_path / "nope.tsv"], [])
    with pytest.raises(ValueError, match="give certification logs and/or --run-dir folders to report on"):
        write_html_report(tmp_path / "r.html", [], [])
    assert not (tmp_path / "r.html").exists()
    (tmp_path / "run").mkdir()  # a run folder with no logs in it: the tables and the examples say so
    page = build_html(discover([], [tmp_path / "run"]))
    assert page.count("No certification logs in the inputs.") == 2
