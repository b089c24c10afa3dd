import pytest

from dmae.cli import main
from dmae.report import ReportError, read_log, summarize


def _write(path, rows, header="idx\tlabel\tpredict\tradius\tcorrect\ttime"):
    path.write_text(header + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))
    return path


def test_certified_accuracy_acr_and_abstention(tmp_path):
    # 5 images: radii 0.9 (correct), 0.3 (correct), 0.6 (wrong class), abstain, 0.0 (correct, radius 0)
    p = _write(tmp_path / "certify_sigma0.25.tsv", [(0, 1, 1, 0.9, 1, 0.1), (1, 2, 2, 0.3, 1, 0.1), (2, 3, 4, 0.6, 0, 0.1),
                                                     (3, 5, -1, 0.0, 0, 0.1), (4, 7, 7, 0.0, 1, 0.1)])
    log = read_log(p)
    assert log.sigma == 0.25 and len(log) == 5
    assert [log.certified_accuracy(r) for r in (0.0, 0.25, 0.5, 1.0)] == [0.6, 0.4, 0.2, 0.0]
    assert log.acr == pytest.approx((0.9 + 0.3) / 5) and log.abstain_rate == pytest.approx(0.2)


def test_best_sigma_per_radius_row(tmp_path):
    a = _write(tmp_path / "certify_sigma0.25.tsv", [(0, 1, 1, 0.4, 1, 0), (1, 1, 1, 0.2, 1, 0)])
    b = _write(tmp_path / "certify_sigma0.5.tsv", [(0, 1, 1, 0.9, 1, 0), (1, 1, 2, 0.5, 0, 0)])
    t = summarize([read_log(a), read_log(b)], radii=(0.0, 0.25, 0.75))
    rows = {r["name"]: r for r in t.rows}
    assert rows["certify_sigma0.25"]["acc"] == [1.0, 0.5, 0.0]
    assert rows["certify_sigma0.5"]["acc"] == [0.5, 0.5, 0.5]
    assert rows["best"]["acc"] == [1.0, 0.5, 0.5] and rows["best"]["acr"] == pytest.approx(0.45)
    assert "| best | best |" in t.markdown() and "r=0.75" in t.csv().splitlines()[0]


def test_reads_logs_of_other_tools_and_cli_outputs(tmp_path, capsys):
    # the reference scripts write the time as a timedelta and name files noise_0.50
    p = _write(tmp_path / "noise_0.50", [(0, 3, 3, 0.512, 1, "0:00:01.234567"), (20, 1, -1, 0.0, 0, "0:00:01.1")])
    assert read_log(p).sigma == 0.5
    md, csv, png = tmp_path / "t.md", tmp_path / "t.csv", tmp_path / "c.png"
    assert main(["report", str(p), "--radii", "0", "0.5", "--markdown", str(md), "--csv", str(csv), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "r=0.5" in out and "50.0" in out
    assert md.read_text().startswith("| log |") and csv.read_text().startswith("log,sigma")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_unreadable_logs(tmp_path, capsys):
    bad = _write(tmp_path / "bad.tsv", [(0, 1, 1)], header="idx\tlabel\tpredict")
    with pytest.raises(ReportError, match="lacks columns \\['radius', 'correct'\\]"):
        read_log(bad)
    garbled = _write(tmp_path / "g.tsv", [(0, 1, "x", 0.1, 1, 0), (1, 1, 1, 0.1, 1, 0)])
    with pytest.raises(ReportError, match="g.tsv:2"):
        read_log(garbled)
    assert main(["report", str(tmp_path / "missing.tsv")]) == 2
    assert "cannot read" in capsys.readouterr().err
