import pytest

from dmae.cli import main
from dmae.report import ReportError, compare, read_log, summarize


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


def test_paired_comparison_on_a_hand_computed_case(tmp_path):
    """10 images; at r = 0.5, a is certified on 8 that b is not and b on 2 that a is not: difference +0.6, the
    per-image differences have 8 x (+1), 2 x (-1), so std (ddof 1) = sqrt((8 * 0.16 + 2 * 2.56) / 9), and the
    exact McNemar p is the two-sided binomial tail of 8 of 10: 2 * 56 / 1024."""
    a_rows = [(i, i % 3, i % 3, 0.6 if i < 8 else 0.1, 1, 0) for i in range(10)]
    b_rows = [(9 - i, (9 - i) % 3, (9 - i) % 3, 0.7 if 9 - i >= 8 else 0.2, 1, 0) for i in range(10)]  # another order
    c = compare(read_log(_write(tmp_path / "a_sigma0.25.tsv", a_rows)),
                read_log(_write(tmp_path / "b_sigma0.25.tsv", b_rows)), radii=(0.0, 0.5))
    assert c.images == 10 and c.acc_a == [1.0, 0.8] and c.acc_b == [1.0, 0.2]
    assert c.diff[0] == 0.0 and c.se[0] == 0.0 and c.p[0] == 1.0
    assert c.diff[1] == pytest.approx(0.6) and c.se[1] == pytest.approx(((8 * 0.16 + 2 * 2.56) / 9) ** 0.5 / 10 ** 0.5)
    assert c.p[1] == pytest.approx(2 * 56 / 1024)
    assert c.acr_diff == pytest.approx((8 * 0.6 + 2 * 0.1 - 8 * 0.2 - 2 * 0.7) / 10)
    assert "| r=0.5 | 80.0 | 20.0 | +60.0 |" in c.markdown()


def test_comparison_refuses_logs_of_different_images(tmp_path, capsys):
    a = _write(tmp_path / "a_sigma0.25.tsv", [(0, 1, 1, 0.4, 1, 0), (20, 2, 2, 0.2, 1, 0)])
    b = _write(tmp_path / "b_sigma0.25.tsv", [(0, 1, 1, 0.4, 1, 0), (50, 2, 2, 0.2, 1, 0)])
    c = _write(tmp_path / "c_sigma0.25.tsv", [(0, 1, 1, 0.4, 1, 0), (20, 3, 3, 0.2, 1, 0)])
    with pytest.raises(ReportError, match=r"not logs of the same images \(e.g. idx 20 is only in a_sigma0.25\)"):
        compare(read_log(a), read_log(b))
    with pytest.raises(ReportError, match=r"give idx 20 different labels \(2 and 3\)"):
        compare(read_log(a), read_log(c))
    dup = _write(tmp_path / "d_sigma0.25.tsv", [(0, 1, 1, 0.4, 1, 0), (0, 1, 1, 0.1, 1, 0), (20, 2, 2, 0.2, 1, 0)]
                 + [(5, 1, 1, 0.1, 1, 0)] * 3)
    with pytest.raises(ReportError, match="d_sigma0.25: idx 0 appears 2 times"):  # e.g. a resumed log of another tool
        compare(read_log(dup), read_log(dup))
    no_idx = _write(tmp_path / "e_sigma0.25.tsv", [(1, 1, 0.4, 1), (2, 2, 0.2, 1)], header="label\tpredict\tradius\tcorrect")
    with pytest.raises(ReportError, match="a_sigma0.25 names its images .* e_sigma0.25 does not"):
        compare(read_log(a), read_log(no_idx))
    assert compare(read_log(no_idx), read_log(no_idx)).diff == [0.0] * 5  # no idx on either side: row order
    swapped = _write(tmp_path / "f_sigma0.25.tsv", [(2, 2, 0.4, 1), (1, 1, 0.2, 1)], header="label\tpredict\tradius\tcorrect")
    with pytest.raises(ReportError, match=r"give row 1 different labels \(1 and 2\)"):
        compare(read_log(no_idx), read_log(swapped))
    longer = _write(tmp_path / "g_sigma0.25.tsv", [(1, 1, 0.4, 1)] * 3, header="label\tpredict\tradius\tcorrect")
    with pytest.raises(ReportError, match="e_sigma0.25 has 2 rows and g_sigma0.25 3"):
        compare(read_log(no_idx), read_log(longer))
    other = tmp_path / "other_sigma0.25.tsv"
    other.write_text(a.read_text())
    other.with_suffix(".json").write_text('{"sigma": 0.25, "data": "cifar10"}')
    a.with_suffix(".json").write_text('{"sigma": 0.25, "data": "fashion-mnist"}')
    with pytest.raises(ReportError, match="a_sigma0.25 certifies fashion-mnist and other_sigma0.25 cifar10"):
        compare(read_log(a), read_log(other))
    assert main(["report", str(a), "--compare"]) == 2
    assert "give at least two, as files or folders of logs (got 1;" in capsys.readouterr().err
    assert main(["report", "--run-dir", str(a)]) == 2  # e.g. log files given after --run-dir
    assert f"--run-dir takes folders, and {a} is a file: give log files before --run-dir" in capsys.readouterr().err
    md = tmp_path / "refused.md"
    assert main(["report", str(a), str(b), "--compare", "--markdown", str(md)]) == 2
    assert "| a_sigma0.25 |" in md.read_text()  # a refused comparison loses none of the other outputs
    same = tmp_path / "x" / "a_sigma0.25.tsv"
    same.parent.mkdir()
    same.write_text(a.read_text())
    md = tmp_path / "t.md"
    assert main(["report", str(a), str(same), "--compare", "--markdown", str(md)]) == 0
    out = capsys.readouterr().out  # equal file names are told apart by their folders
    assert "x/a_sigma0.25" in out and "+0.0" in out and "McNemar p" in md.read_text()


def test_comparison_names_tell_the_two_sides_apart(tmp_path, capsys):
    """Two demo runs: both logs are certify/certify_sigma0.25.tsv, so the names take folders until they differ,
    and the header says which is A, which is B, and their sigmas."""
    rows = [(i, i % 3, i % 3, 0.3, 1, 0) for i in range(4)]
    files = []
    for run, sigma in (("run_a", 0.25), ("run_b", 0.5)):
        (tmp_path / run / "certify").mkdir(parents=True)
        f = _write(tmp_path / run / "certify" / "certify_sigma0.25.tsv", rows)
        f.with_suffix(".json").write_text(f'{{"sigma": {sigma}}}')
        files.append(str(f))
    assert main(["report", *files, "--compare"]) == 0
    out = capsys.readouterr().out
    assert ("A = run_a/certify/certify_sigma0.25 (sigma 0.25) vs B = run_b/certify/certify_sigma0.25 (sigma 0.5), "
            "the same 4 images (difference A - B):") in out
    from dmae.report import distinct_names
    assert distinct_names([files[0], files[0], files[1]]) == ["run_a/certify/certify_sigma0.25#1",
                                                              "run_a/certify/certify_sigma0.25#2",
                                                              "run_b/certify/certify_sigma0.25"]
    # the reference scripts' logs have no extension: sigma_0.25 and sigma_0.50 are two names, not two sigma_0
    assert distinct_names(["ref/sigma_0.25", "ref/sigma_0.50"]) == ["sigma_0.25", "sigma_0.50"]


def test_what_else_differs_between_two_logs_is_said(tmp_path, capsys):
    """A comparison names protocol differences, the same weights on both sides and a missing protocol record;
    a best-sigma row (and curve) is only drawn over one classifier's logs of the same images."""
    import json

    from dmae.report import curves_figure

    rows = [(i, i % 3, i % 3, 0.3, 1, 0) for i in range(4)]
    meta = {"sigma": 0.25, "data": "fashion-mnist", "mode": "certify", "n0": 100, "n": 1000, "alpha": 0.001,
            "weights_sha256": "ab" * 32}
    logs = {}
    for name, change in (("a", {}), ("b", {"alpha": 0.01, "n": 10000}), ("c", {"weights_sha256": "cd" * 32})):
        (tmp_path / name).mkdir()
        logs[name] = _write(tmp_path / name / "certify_sigma0.25.tsv", rows)
        logs[name].with_suffix(".json").write_text(json.dumps({**meta, **change}))
    ab = compare(read_log(logs["a"]), read_log(logs["b"]))
    assert ab.notes[0] == ("the certification protocols differ (n 1000 vs 10000; alpha 0.001 vs 0.01): the "
                           "difference mixes the classifiers with the protocols")
    assert "both logs certify the same weights (sha256 abababababab...)" in ab.notes
    assert compare(read_log(logs["a"]), read_log(logs["c"])).notes == []
    bare = _write(tmp_path / "bare_sigma0.25.tsv", rows)
    assert "bare_sigma0.25 has no protocol record" in compare(read_log(logs["a"]), read_log(bare)).notes[0]
    bare.with_suffix(".json").write_text('{"sigma": 0.25}')  # a record without any certification setting
    assert "bare_sigma0.25 has no protocol record" in compare(read_log(logs["a"]), read_log(bare)).notes[0]
    bare.with_suffix(".json").write_text(json.dumps({**meta, "weights_sha256": "ef" * 32, "stop_on_wrong_guess": True}))
    assert compare(read_log(logs["a"]), read_log(bare)).notes == ["certify_sigma0.25 does not record "
                                                                  "stop_on_wrong_guess: not checked"]
    (tmp_path / "two").mkdir()
    for sigma in ("0.25", "0.5"):
        _write(tmp_path / "two" / f"certify_sigma{sigma}.tsv", rows)
    assert main(["report", str(tmp_path / "two"), str(tmp_path / "a"), "--compare"]) == 2
    assert "two holds 2 logs (certify_sigma0.25.tsv, certify_sigma0.5.tsv); give the logs to compare as files" in (
        capsys.readouterr().err)
    # a folder stands for its logs; --compare writes the comparisons as CSV too, and no best row
    out_csv = tmp_path / "t.csv"
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--compare", "--csv", str(out_csv)]) == 0
    printed = capsys.readouterr().out
    assert "note: the certification protocols differ" in printed and "best" not in printed
    paired = (tmp_path / "t_paired.csv").read_text().splitlines()
    assert paired[0].startswith("a,b,sigma_a") and len(paired) == 1 + 6 and paired[-1].split(",")[5] == "acr"
    # the same sigma twice: two classifiers, so no best row and curves named by log
    same = summarize([read_log(logs["a"]), read_log(logs["b"])])
    assert [r["name"] for r in same.rows] == ["certify_sigma0.25"] * 2 and "two logs share a sigma" in same.notes[0]
    other_sigma = _write(tmp_path / "x_sigma0.5.tsv", rows[:3])
    t = summarize([read_log(logs["a"]), read_log(other_sigma)])
    assert "best" not in [r["name"] for r in t.rows] and "different numbers of images (4, 3)" in t.notes[0]
    shifted = _write(tmp_path / "y_sigma0.5.tsv", [(i + 1, *r[1:]) for i, r in enumerate(rows)])
    t = summarize([read_log(logs["a"]), read_log(shifted)])
    assert "best" not in [r["name"] for r in t.rows] and "hold different images (idx columns)" in t.notes[0]
    lg_a, lg_b = read_log(logs["a"]), read_log(logs["b"])
    lg_a.name, lg_b.name = "A", "B"
    labels = curves_figure([lg_a, lg_b]).axes[0].get_legend_handles_labels()[1]
    assert labels == ["A, sigma = 0.25", "B, sigma = 0.25"]
    lg_c = read_log(_write(tmp_path / "z_sigma0.5.tsv", rows))
    lg_c.name = "C"  # different sigma, but compared (best=False): two classifiers, so named
    assert curves_figure([lg_a, lg_c], best=False).axes[0].get_legend_handles_labels()[1] == [
        "A, sigma = 0.25", "C, sigma = 0.5"]
    assert curves_figure([lg_a, lg_c]).axes[0].get_legend_handles_labels()[1] == [
        "sigma = 0.25", "sigma = 0.5", "best sigma"]
