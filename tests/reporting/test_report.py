import dataclasses
import re

import numpy as np
import pytest

from dmae.cli import main
from dmae.reporting.report import ReportError, compare, read_log, summarize


def _write(path, rows, header="idx\tlabel\tpredict\tradius\tcorrect\ttime"):
    path.write_text(header + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))
    return path


def test_certified_accuracy_acr_and_abstention(tmp_path):
    # 5 images: radii 0.9 (correct), 0.3 (correct), 0.6 (wrong class), abstain, 0.0 (correct, radius 0)
    p = _write(
        tmp_path / "certify_sigma0.25.tsv",
        [
            (0, 1, 1, 0.9, 1, 0.1),
            (1, 2, 2, 0.3, 1, 0.1),
            (2, 3, 4, 0.6, 0, 0.1),
            (3, 5, -1, 0.0, 0, 0.1),
            (4, 7, 7, 0.0, 1, 0.1),
        ],
    )
    log = read_log(p)
    assert log.sigma == 0.25
    assert len(log) == 5
    assert [log.certified_accuracy(r) for r in (0.0, 0.25, 0.5, 1.0)] == [0.6, 0.4, 0.2, 0.0]
    assert log.acr == pytest.approx((0.9 + 0.3) / 5)
    assert log.abstain_rate == pytest.approx(0.2)


def test_best_sigma_per_radius_row(tmp_path):
    a = _write(tmp_path / "certify_sigma0.25.tsv", [(0, 1, 1, 0.4, 1, 0), (1, 1, 1, 0.2, 1, 0)])
    b = _write(tmp_path / "certify_sigma0.5.tsv", [(0, 1, 1, 0.9, 1, 0), (1, 1, 2, 0.5, 0, 0)])
    t = summarize([read_log(a), read_log(b)], radii=(0.0, 0.25, 0.75))
    rows = {r["name"]: r for r in t.rows}
    assert rows["certify_sigma0.25"]["acc"] == [1.0, 0.5, 0.0]
    assert rows["certify_sigma0.5"]["acc"] == [0.5, 0.5, 0.5]
    assert rows["best"]["acc"] == [1.0, 0.5, 0.5]
    assert rows["best"]["acr"] == pytest.approx(0.45)
    assert "| best | best |" in t.markdown()
    assert "r=0.75" in t.csv().splitlines()[0]


def test_reads_logs_of_other_tools_and_cli_outputs(tmp_path, capsys):
    # the reference scripts write the time as a timedelta and name files noise_0.50
    p = _write(tmp_path / "noise_0.50", [(0, 3, 3, 0.512, 1, "0:00:01.234567"), (20, 1, -1, 0.0, 0, "0:00:01.1")])
    assert read_log(p).sigma == 0.5
    md, csv, png = tmp_path / "t.md", tmp_path / "t.csv", tmp_path / "c.png"
    assert (
        main(["report", str(p), "--radii", "0", "0.5", "--markdown", str(md), "--csv", str(csv), "--plot", str(png)])
        == 0
    )
    out = capsys.readouterr().out
    assert "r=0.5" in out
    assert "50.0" in out
    assert md.read_text().startswith("| log |")
    assert csv.read_text().startswith("log,sigma")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_unreadable_logs(tmp_path, capsys):
    bad = _write(tmp_path / "bad.tsv", [(0, 1, 1)], header="idx\tlabel\tpredict")
    with pytest.raises(ReportError, match="lacks columns \\['radius', 'correct'\\]"):
        read_log(bad)
    garbled = _write(tmp_path / "g.tsv", [(0, 1, "x", 0.1, 1, 0), (1, 1, 1, 0.1, 1, 0)])
    with pytest.raises(ReportError, match=r"g\.tsv:2"):
        read_log(garbled)
    assert main(["report", str(tmp_path / "missing.tsv")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_paired_comparison_on_a_hand_computed_case(tmp_path):
    """10 images; at r = 0.5, a is certified on 8 that b is not and b on 2 that a is not: difference +0.6, the
    per-image differences have 8 x (+1), 2 x (-1), so std (ddof 1) = sqrt((8 * 0.16 + 2 * 2.56) / 9), and the
    exact McNemar p is the two-sided binomial tail of 8 of 10: 2 * 56 / 1024."""
    a_rows = [(i, i % 3, i % 3, 0.6 if i < 8 else 0.1, 1, 0) for i in range(10)]
    b_rows = [(9 - i, (9 - i) % 3, (9 - i) % 3, 0.7 if 9 - i >= 8 else 0.2, 1, 0) for i in range(10)]  # another order
    c = compare(
        read_log(_write(tmp_path / "a_sigma0.25.tsv", a_rows)),
        read_log(_write(tmp_path / "b_sigma0.25.tsv", b_rows)),
        radii=(0.0, 0.5),
    )
    assert c.images == 10
    assert c.acc_a == [1.0, 0.8]
    assert c.acc_b == [1.0, 0.2]
    assert c.diff[0] == 0.0
    assert c.se[0] == 0.0
    assert c.p[0] == 1.0
    assert c.diff[1] == pytest.approx(0.6)
    assert c.se[1] == pytest.approx(((8 * 0.16 + 2 * 2.56) / 9) ** 0.5 / 10**0.5)
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
    dup = _write(
        tmp_path / "d_sigma0.25.tsv",
        [(0, 1, 1, 0.4, 1, 0), (0, 1, 1, 0.1, 1, 0), (20, 2, 2, 0.2, 1, 0)] + [(5, 1, 1, 0.1, 1, 0)] * 3,
    )
    with pytest.raises(
        ReportError,
        match=r"d_sigma0.25.tsv: idx 0 appears on lines 2 and 3 with different results "
        r"\(radius 0.4 vs 0.1\)",
    ):  # two certificates of one image: refused
        read_log(dup)
    twice = dataclasses.replace(read_log(a), idx=np.array([0, 0]))  # a log built by hand, not read: compare checks
    with pytest.raises(ReportError, match=r"a_sigma0\.25: idx 0 appears 2 times"):
        compare(twice, twice)
    no_idx = _write(
        tmp_path / "e_sigma0.25.tsv", [(1, 1, 0.4, 1), (2, 2, 0.2, 1)], header="label\tpredict\tradius\tcorrect"
    )
    with pytest.raises(ReportError, match=r"a_sigma0\.25 names its images .* e_sigma0\.25 does not"):
        compare(read_log(a), read_log(no_idx))
    assert compare(read_log(no_idx), read_log(no_idx)).diff == [0.0] * 5  # no idx on either side: row order
    swapped = _write(
        tmp_path / "f_sigma0.25.tsv", [(2, 2, 0.4, 1), (1, 1, 0.2, 1)], header="label\tpredict\tradius\tcorrect"
    )
    with pytest.raises(ReportError, match=r"give row 1 different labels \(1 and 2\)"):
        compare(read_log(no_idx), read_log(swapped))
    longer = _write(tmp_path / "g_sigma0.25.tsv", [(1, 1, 0.4, 1)] * 3, header="label\tpredict\tradius\tcorrect")
    with pytest.raises(ReportError, match=r"e_sigma0\.25 has 2 rows and g_sigma0\.25 3"):
        compare(read_log(no_idx), read_log(longer))
    other = tmp_path / "other_sigma0.25.tsv"
    other.write_text(a.read_text())
    other.with_suffix(".json").write_text('{"sigma": 0.25, "data": "cifar10"}')
    a.with_suffix(".json").write_text('{"sigma": 0.25, "data": "fashion-mnist"}')
    with pytest.raises(ReportError, match=r"a_sigma0\.25 certifies fashion-mnist and other_sigma0\.25 cifar10"):
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
    assert "x/a_sigma0.25" in out
    assert "+0.0" in out
    assert "McNemar p" in md.read_text()


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
    assert (
        "A = run_a/certify/certify_sigma0.25 (sigma 0.25) vs B = run_b/certify/certify_sigma0.25 (sigma 0.5), "
        "the same 4 images (difference A - B):"
    ) in out
    from dmae.reporting.report import distinct_names

    assert distinct_names([files[0], files[0], files[1]]) == [
        "run_a/certify/certify_sigma0.25#1",
        "run_a/certify/certify_sigma0.25#2",
        "run_b/certify/certify_sigma0.25",
    ]
    # the reference scripts' logs have no extension: sigma_0.25 and sigma_0.50 are two names, not two sigma_0
    assert distinct_names(["ref/sigma_0.25", "ref/sigma_0.50"]) == ["sigma_0.25", "sigma_0.50"]


def test_what_else_differs_between_two_logs_is_said(tmp_path, capsys):
    """A comparison names protocol differences, the same weights on both sides and a missing protocol record;
    a best-sigma row (and curve) is only drawn over one classifier's logs of the same images."""
    import json

    from dmae.reporting.report import curves_figure

    rows = [(i, i % 3, i % 3, 0.3, 1, 0) for i in range(4)]
    meta = {
        "sigma": 0.25,
        "data": "fashion-mnist",
        "mode": "certify",
        "n0": 100,
        "n": 1000,
        "alpha": 0.001,
        "weights_sha256": "ab" * 32,
    }
    logs = {}
    for name, change in (("a", {}), ("b", {"alpha": 0.01, "n": 10000}), ("c", {"weights_sha256": "cd" * 32})):
        (tmp_path / name).mkdir()
        logs[name] = _write(tmp_path / name / "certify_sigma0.25.tsv", rows)
        logs[name].with_suffix(".json").write_text(json.dumps({**meta, **change}))
    ab = compare(read_log(logs["a"]), read_log(logs["b"]))
    assert ab.notes[0] == (
        "the certification protocols differ (n 1000 vs 10000; alpha 0.001 vs 0.01): the "
        "difference mixes the classifiers with the protocols"
    )
    assert "both logs certify the same weights (sha256 abababababab...)" in ab.notes
    assert compare(read_log(logs["a"]), read_log(logs["c"])).notes == []
    bare = _write(tmp_path / "bare_sigma0.25.tsv", rows)
    assert "bare_sigma0.25 has no protocol record" in compare(read_log(logs["a"]), read_log(bare)).notes[0]
    bare.with_suffix(".json").write_text('{"sigma": 0.25}')  # a record without any certification setting
    assert "bare_sigma0.25 has no protocol record" in compare(read_log(logs["a"]), read_log(bare)).notes[0]
    bare.with_suffix(".json").write_text(json.dumps({**meta, "weights_sha256": "ef" * 32, "stop_on_wrong_guess": True}))
    assert compare(read_log(logs["a"]), read_log(bare)).notes == [
        "certify_sigma0.25 does not record stop_on_wrong_guess: not checked"
    ]
    (tmp_path / "two").mkdir()
    for sigma in ("0.25", "0.5"):
        _write(tmp_path / "two" / f"certify_sigma{sigma}.tsv", rows)
    assert main(["report", str(tmp_path / "two"), str(tmp_path / "a"), "--compare"]) == 2
    assert "two holds 2 logs (certify_sigma0.25.tsv, certify_sigma0.5.tsv); give the logs to compare as files" in (
        capsys.readouterr().err
    )
    # a folder stands for its logs; --compare writes the comparisons as CSV too, and no best row
    out_csv = tmp_path / "t.csv"
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--compare", "--csv", str(out_csv)]) == 0
    printed = capsys.readouterr().out
    assert "note: the certification protocols differ" in printed
    assert "best" not in printed
    paired = (tmp_path / "t_paired.csv").read_text().splitlines()
    assert paired[0].startswith("a,b,sigma_a")
    assert len(paired) == 1 + 6
    assert paired[-1].split(",")[5] == "acr"
    # the same sigma twice: two classifiers, so no best row and curves named by log
    same = summarize([read_log(logs["a"]), read_log(logs["b"])])
    assert [r["name"] for r in same.rows] == ["certify_sigma0.25"] * 2
    assert "two logs share a sigma" in same.notes[0]
    other_sigma = _write(tmp_path / "x_sigma0.5.tsv", rows[:3])
    t = summarize([read_log(logs["a"]), read_log(other_sigma)])
    assert "best" not in [r["name"] for r in t.rows]
    assert "different numbers of images (4, 3)" in t.notes[0]
    shifted = _write(tmp_path / "y_sigma0.5.tsv", [(i + 1, *r[1:]) for i, r in enumerate(rows)])
    t = summarize([read_log(logs["a"]), read_log(shifted)])
    assert "best" not in [r["name"] for r in t.rows]
    assert "hold different images (idx columns)" in t.notes[0]
    lg_a, lg_b = read_log(logs["a"]), read_log(logs["b"])
    lg_a.name, lg_b.name = "A", "B"
    labels = curves_figure([lg_a, lg_b]).axes[0].get_legend_handles_labels()[1]
    assert labels == ["A, sigma = 0.25", "B, sigma = 0.25"]
    lg_c = read_log(_write(tmp_path / "z_sigma0.5.tsv", rows))
    lg_c.name = "C"  # different sigma, but compared (best=False): two classifiers, so named
    assert curves_figure([lg_a, lg_c], best=False).axes[0].get_legend_handles_labels()[1] == [
        "A, sigma = 0.25",
        "C, sigma = 0.5",
    ]
    assert curves_figure([lg_a, lg_c]).axes[0].get_legend_handles_labels()[1] == [
        "sigma = 0.25",
        "sigma = 0.5",
        "best sigma",
    ]


def test_a_repeated_image_counts_once_in_every_output(tmp_path, capsys):
    """The issue's example: 4 images, 2 of them repeated (overlapping shards concatenated) gave 66.7% at r = 0;
    the log holds 50.0%. Terminal, Markdown, CSV, plot, --compare and --html all count each image once."""
    import re

    from dmae.reporting.report import curves_figure, forward_passes

    rows = [(0, 1, 1, 0.5, 1, 0.1), (1, 2, 2, 0.3, 1, 0.1), (2, 3, -1, 0.0, 0, 0.1), (3, 4, 5, 0.2, 0, 0.1)]
    dup = _write(tmp_path / "dup_sigma0.25.tsv", [*rows, (0, 1, 1, 0.5, 1, 0.2), (1, 2, 2, 0.3, 1, 0.2)])
    (tmp_path / "clean").mkdir()
    clean = _write(tmp_path / "clean" / "certify_sigma0.25.tsv", rows)
    lg = read_log(dup)
    assert len(lg) == 4
    assert lg.certified_accuracy(0.0) == 0.5
    assert lg.acr == pytest.approx(0.2)
    assert list(lg.rows_in_file) == [2, 2, 1, 1]
    md, csv, png, page = (tmp_path / n for n in ("t.md", "t.csv", "t.png", "t.html"))
    assert (
        main(
            [
                "report",
                str(dup),
                str(clean),
                "--compare",
                "--radii",
                "0",
                "0.25",
                "--markdown",
                str(md),
                "--csv",
                str(csv),
                "--plot",
                str(png),
                "--html",
                str(page),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert re.search(r"dup_sigma0.25 +0.25 +4 +50.0 +50.0", out)
    assert "66.7" not in out
    note = "2 row(s) repeat an earlier row of the same image (idx 0, 1; e.g. overlapping shards concatenated)"
    assert out.count(note) == 2  # under the table and under the comparison
    assert "| dup_sigma0.25 | 0.25 | 4 | 50.0 | 50.0 |" in md.read_text()
    assert note in md.read_text()
    assert "dup_sigma0.25,0.25,4,0.500000,0.500000," in csv.read_text()
    assert "the same 4 images" in out
    assert re.search(r"r=0 +50.0 +50.0 +\+0.0", out)
    assert "<td>dup_sigma0.25</td><td>0.25</td><td>4</td><td>50.0</td>" in page.read_text()
    assert note in page.read_text()
    assert curves_figure([lg]).axes[0].lines[0].get_ydata()[0] == 50.0
    lg.meta = {"mode": "certify", "n0": 100, "n": 1000}
    assert forward_passes(lg) == 6 * 1100  # the repeated rows did cost samples


def test_radii_reach_every_output(tmp_path, capsys):
    """`--radii 0 0.5 1 1.5 2 3 --html` printed those radii but the page showed r = 0 ... 1 (the data set's
    default): every output, --run-dir pages and --compare tables included, now has the radii asked for."""
    rows = [(0, 1, 1, 2.5, 1, 0), (1, 2, 2, 1.2, 1, 0), (2, 3, -1, 0.0, 0, 0), (3, 4, 4, 0.7, 1, 0)]
    (tmp_path / "run").mkdir()
    log = _write(tmp_path / "run" / "certify_sigma1.0.tsv", rows)
    other = _write(tmp_path / "other_sigma1.0.tsv", rows)
    radii = ["0", "0.5", "1", "1.5", "2", "3"]
    heads = "".join(f"<th>r={r}</th>" for r in radii)
    outs = {n: tmp_path / n for n in ("t.md", "t.csv", "t.png", "t.html", "run.html", "cmp.html")}
    assert (
        main(
            [
                "report",
                str(log),
                "--radii",
                *radii,
                "--markdown",
                str(outs["t.md"]),
                "--csv",
                str(outs["t.csv"]),
                "--plot",
                str(outs["t.png"]),
                "--html",
                str(outs["t.html"]),
            ]
        )
        == 0
    )
    assert main(["report", "--run-dir", str(tmp_path / "run"), "--radii", *radii, "--html", str(outs["run.html"])]) == 0
    assert main(["report", str(log), str(other), "--compare", "--radii", *radii, "--html", str(outs["cmp.html"])]) == 0
    out = capsys.readouterr().out
    assert "r=3" in out
    assert "| r=3 |" in outs["t.md"].read_text()
    assert ",r=3,acr," in outs["t.csv"].read_text()
    for page in ("t.html", "run.html", "cmp.html"):
        assert heads in outs[page].read_text(), page
    assert "<td>r=3</td>" in outs["cmp.html"].read_text()  # the paired table's rows
    from dmae.reporting.report import curves_figure

    ax = curves_figure([read_log(log)], radii=(0.0, 3.0, 4.0)).axes[0]
    assert ax.get_xlim()[1] >= 4.0  # the axis reaches the largest radius asked for, past the largest certified
    markers = [ln for ln in ax.lines if ln.get_marker() == "o"]
    assert len(markers) == 1
    assert list(markers[0].get_xdata()) == [0.0, 3.0, 4.0]
    assert list(markers[0].get_ydata()) == [75.0, 0.0, 0.0]


def test_a_torn_last_line_is_reported(tmp_path, capsys):
    """A torn last line was dropped without a word: the report says which file and line it did not count."""
    torn = tmp_path / "torn_sigma0.25.tsv"
    torn.write_text(
        "idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\t0.1\n1\t2\t2\t0.3\t1\t0.1\n2\t3\t3\t0.4"
    )  # no newline: a crash mid-write
    md, page = tmp_path / "t.md", tmp_path / "t.html"
    assert main(["report", str(torn), "--markdown", str(md), "--html", str(page)]) == 0
    note = f"{torn}:4: the last line has no newline and 4 of 6 fields (torn by a crash mid-write?): not counted"
    assert note in capsys.readouterr().out
    assert note in md.read_text()
    assert note in page.read_text()
    assert len(read_log(torn)) == 2


def _sequential(path, rows, meta):
    """A sequential CERTIFY log: rows of (idx, label, predict, target radius, n_samples, continuous radius)."""
    import json

    from dmae.certification.log import SEQUENTIAL_HEADER, format_row

    path.write_text(
        "\t".join(SEQUENTIAL_HEADER)
        + "\n"
        + "".join(format_row(SEQUENTIAL_HEADER, i, y, p, r, 0.1, n, rc) for i, y, p, r, n, rc in rows)
    )
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


def test_acr_is_labelled_by_its_radius_and_not_compared_across_protocols(tmp_path, capsys):
    """One classifier certified sequentially and at fixed n: identical certified accuracy, but the sequential
    ACR averages the continuous radius (which stops early). The tables label it, a table mixing both says so,
    and --compare does not call the gap a difference between classifiers."""
    import json
    import math

    meta = {
        "sigma": 0.25,
        "data": "fashion-mnist",
        "split": "test",
        "n0": 100,
        "alpha": 0.001,
        "weights_sha256": "ab" * 32,
        "model": None,
        "input_layer": None,
        "radii": None,
    }
    fixed = [(i, i % 10, i % 10, 0.6 + 0.01 * i, 1, 0) for i in range(8)]
    (tmp_path / "f").mkdir()
    fix = _write(tmp_path / "f" / "certify_sigma0.25.tsv", fixed)
    fix.with_suffix(".json").write_text(json.dumps({**meta, "mode": "certify", "n": 10000, "n_max": None}))
    seq = _sequential(
        tmp_path / "sequential_sigma0.25.tsv",
        [(i, y, p, 0.5, 2000, r - 0.084) for i, y, p, r, _, _ in fixed],
        {**meta, "mode": "sequential", "n": None, "n_max": 10000, "sequential": "targets"},
    )
    t = summarize([read_log(seq)], radii=(0.0, 0.5))
    assert "ACR (continuous)" in t.cells()[0]
    assert t.csv().splitlines()[1].endswith(",radius_continuous")
    assert summarize([read_log(fix)]).cells()[0][-2:] == ["ACR", "abstain"]
    mixed = summarize([read_log(seq), read_log(fix)], radii=(0.0, 0.5))
    head, body = mixed.cells()
    acr = head.index("ACR")  # rows mix the two radii: the column is "ACR" and each continuous cell says so
    assert [b[acr] for b in body] == [f"{read_log(seq).acr:.3f} (continuous)", f"{read_log(fix).acr:.3f}"]
    assert any("not comparable, and their gap measures the protocols, not the classifiers" in n for n in mixed.notes)
    c = compare(read_log(seq), read_log(fix), radii=(0.0, 0.5))
    assert c.diff == [0.0, 0.0]
    assert c.acr_label is None
    assert math.isnan(c.acr_diff)
    assert math.isnan(c.acr_se)
    assert ["ACR (not comparable)", f"{c.acr_a:.3f}", f"{c.acr_b:.3f}", "-", "-", "-"] == c.cells()[1][-1]
    assert any(
        n.startswith("ACR not compared: the ACR of sequential_sigma0.25 averages the continuous radius")
        for n in c.notes
    )
    assert c.csv_rows()[-1][5:] == ["acr (different radii)", f"{c.acr_a:.6f}", f"{c.acr_b:.6f}", "", "", ""]
    assert main(["report", str(seq), str(fix), "--compare"]) == 0
    assert "+0.084" not in capsys.readouterr().out  # the gap that was called a difference between classifiers
    both = compare(read_log(seq), read_log(seq))
    assert both.acr_label == "ACR (continuous)"
    assert both.cells()[1][-1][0] == "ACR (continuous)"


def test_a_comparison_names_every_setting_that_differs(tmp_path, monkeypatch):
    """Logs that differ in input_layer were described as "the same weights": every row setting that differs is
    named (the classifier around the weights, the images, the protocol, a setting certify adds later), the
    training sigma too, and the probe (a description) is not."""
    import json

    import dmae.certification.runner

    rows = [(i, i % 3, i % 3, 0.3, 1, 0) for i in range(4)]
    meta = {
        "sigma": 0.25,
        "data": "fashion-mnist",
        "split": "test",
        "mode": "certify",
        "n0": 100,
        "n": 1000,
        "alpha": 0.001,
        "weights_sha256": "ab" * 32,
        "model": "timm:resnet18",
        "trained_sigma": 0.25,
        "input_layer": "Preprocess(mean=(0.5,), std=(0.5,))",
        "probe": {"clean": 0.9},
        "sound": False,
    }

    def log(name, **change):
        (tmp_path / name).mkdir()
        f = _write(tmp_path / name / "certify_sigma0.25.tsv", rows)
        f.with_suffix(".json").write_text(json.dumps({**meta, **change}))
        return read_log(f)

    a = log("a")
    notes = compare(a, log("b", input_layer="Preprocess(mean=(0,), std=(1,))", probe={"clean": 0.1})).notes
    assert notes == [
        "both logs load the same checkpoint file (sha256 abababababab...) but the classifiers differ "
        "(input_layer Preprocess(mean=(0.5,), std=(0.5,)) vs Preprocess(mean=(0,), std=(1,))): the "
        "difference measures that, not the weights"
    ]
    assert not any("the same weights" in n for n in notes)
    notes = compare(a, log("c", weights_sha256="cd" * 32, model="timm:vit_tiny", trained_sigma=[0.0, 0.75])).notes
    assert notes == [
        "the classifiers also differ in model timm:resnet18 vs timm:vit_tiny; trained_sigma 0.25 vs [0.0, 0.75]"
    ]
    assert (
        compare(a, log("d", split="train"))
        .notes[0]
        .startswith("the logs record different images (split test vs train)")
    )
    assert "(sound False vs True)" in compare(a, log("e", sound=True)).notes[0]
    runner = dmae.certification.runner
    monkeypatch.setattr(runner, "ROW_SETTINGS", (*runner.ROW_SETTINGS, "quantize"))
    assert compare(a, log("f", quantize=8)).notes == [
        "both logs certify the same weights (sha256 abababababab...)",
        "certify_sigma0.25 does not record quantize: not checked",
    ]
    assert compare(a, log("g")).notes == ["both logs certify the same weights (sha256 abababababab...)"]
    half = _write(tmp_path / "h_sigma0.5.tsv", rows)  # a best-sigma row over two protocols says so
    half.with_suffix(".json").write_text(json.dumps({**meta, "sigma": 0.5, "n": 100000}))
    assert summarize([a, read_log(half)]).notes == [
        "note: the best row takes, per radius, the best of logs certified with different protocols (n 1000 vs 100000)"
    ]


def test_what_a_log_holds_is_checked_as_it_is_read(tmp_path, capsys):
    """More of the kind: a correct other than 0 / 1 (ACR and accuracy would disagree), a NaN radius and an idx
    that is not a number (line named), a sidecar JSON that is broken or not an object (file named, no raw
    JSONDecodeError), and rank files of an unmerged distributed run beside the log (their rows are not in it)."""
    head = "idx\tlabel\tpredict\tradius\tcorrect\ttime"
    two = _write(tmp_path / "two_sigma0.25.tsv", [(0, 1, 1, 0.5, 1, 0), (1, 1, 1, 0.5, 2, 0)])
    with pytest.raises(
        ReportError,
        match=rf"{two}:3: radius 0.5, correct 2: a certified radius is a finite number "
        ">= 0 and correct is 0 or 1",
    ):
        read_log(two)
    # rows that contradict themselves (another tool's log): counted as nothing, refused with the line
    for name, row, why in (
        ("wrong", (7, 3, 5, 0.9, 1, 0), "label 3, predict 5, radius 0.9, correct 1"),
        ("abstain", (8, 3, -1, 0.7, 0, 0), "label 3, predict -1, radius 0.7, correct 0"),
        ("neg", (6, 4, 4, -0.3, 1, 0), "radius -0.3, correct 1: a certified radius is a finite"),
    ):
        bad = _write(tmp_path / f"{name}_sigma0.5.tsv", [(0, 1, 1, 0.5, 1, 0), row])
        with pytest.raises(ReportError, match=rf"{bad}:3: {re.escape(why)}"):
            read_log(bad)
    with pytest.raises(ReportError, match=r"nan_sigma0.25.tsv:2: radius nan"):
        read_log(_write(tmp_path / "nan_sigma0.25.tsv", [(0, 1, 1, "nan", 1, 0)]))
    with pytest.raises(ReportError, match=r"x_sigma0.25.tsv:3: idx column"):
        read_log(_write(tmp_path / "x_sigma0.25.tsv", [(0, 1, 1, 0.5, 1, 0), ("a", 1, 1, 0.5, 1, 0)]))
    ok = _write(tmp_path / "ok_sigma0.25.tsv", [(0, 1, 1, 0.5, 1, 0)])
    for text, why in (
        ("{not json", "is not readable JSON"),
        ("[0.25]", "holds a JSON list, expected an object"),
        ('{"sigma": "0.25"}', "sigma '0.25' is not a number"),
    ):
        ok.with_suffix(".json").write_text(text)
        assert main(["report", str(ok)]) == 2
        assert f"{ok.with_suffix('.json')}" in capsys.readouterr().err
        with pytest.raises(ReportError, match=why):
            read_log(ok)
    ok.with_suffix(".json").unlink()
    (tmp_path / "ok_sigma0.25.tsv.rank1").write_text(head + "\n1\t1\t1\t0.5\t1\t0\n")
    assert main(["report", str(ok)]) == 0
    assert (
        f"ok_sigma0.25.tsv.rank1 beside {ok} hold rows of a distributed run not merged into it yet"
        in capsys.readouterr().out
    )


def test_nothing_to_report_or_compare_is_named(tmp_path, capsys):
    from dmae.reporting.report import best_row_refusal, expand_folders, report

    one = read_log(_write(tmp_path / "a_sigma0.25.tsv", [(0, 1, 1, 0.5, 1, 0.1)]))
    with pytest.raises(ReportError, match="no logs to report"):
        summarize([])
    with pytest.raises(ValueError, match="a best-sigma row needs two logs or more, got 1"):
        best_row_refusal([one])
    empty = read_log(_write(tmp_path / "e_sigma0.25.tsv", []))
    with pytest.raises(ReportError, match=r"cannot compare an empty log \(e_sigma0.25: 0 rows, a_sigma0.25: 1 rows\)"):
        compare(empty, one)
    (tmp_path / "none").mkdir()
    with pytest.raises(ReportError, match=r"none is a folder with no certification log \(\*_sigma\*.tsv\) in it"):
        expand_folders([tmp_path / "none"])
    with pytest.raises(ReportError, match=r"--compare compares logs with the first one: give at least two \(got 1\)"):
        report([tmp_path / "a_sigma0.25.tsv"], paired=True)
    assert main(["report", "--run-dir", str(tmp_path), "--markdown", str(tmp_path / "t.md")]) == 2
    err = capsys.readouterr().err
    assert "--markdown writes the table of the log files given; with only --run-dir use --html" in err
    assert not (tmp_path / "t.md").exists()


def test_the_settings_of_a_log_still_in_shards_are_its_first_shards(tmp_path):
    """Before --merge the main log does not exist: its settings are those of shard 0/N, less the shard number."""
    import json

    from dmae.reporting.report import read_meta

    for k in (1, 0):
        shard = _write(tmp_path / f"certify_sigma0.25.shard-{k}-of-2.tsv", [(k, 1, 1, 0.5, 1, 0.1)])
        shard.with_suffix(".json").write_text(json.dumps({"sigma": 0.25, "n": 100 + k, "shard": [k, 2]}))
    assert read_meta(tmp_path / "certify_sigma0.25.tsv") == {"sigma": 0.25, "n": 100}
