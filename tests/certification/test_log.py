"""The per-image certification log: its row format, torn and malformed lines, resuming and rewriting."""

import pytest

from dmae.certification.log import (
    CERTIFY_HEADER,
    PREDICT_HEADER,
    LogError,
    format_row,
    read_log_rows,
    read_rows,
    write_rows,
)

HEAD = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"


def _log(tmp_path, text, name="log.tsv"):
    f = tmp_path / name
    f.write_text(text)
    return f


def test_format_row():
    # Cohen et al.'s columns: radius with 6 decimals, rounded down (a printed radius never exceeds the certified
    # one: 0.2499996 must not read as 0.25), correct = predict == label, time in seconds
    assert format_row(CERTIFY_HEADER, 12, 3, 3, 0.1234567, 1.23456) == "12\t3\t3\t0.123456\t1\t1.2346\n"
    assert format_row(CERTIFY_HEADER, 1, 0, 0, 0.2499996, 0.5).split("\t")[3] == "0.249999"
    assert format_row(CERTIFY_HEADER, 0, 3, -1, 0.0, 0.5) == "0\t3\t-1\t0.000000\t0\t0.5000\n"  # abstain
    assert format_row(PREDICT_HEADER, 7, 2, 5, 0.9, 0.25) == "7\t2\t5\t0\t0.2500\n"  # no radius column
    assert format_row(PREDICT_HEADER, 7, 2, 2, 0.9, 0.25) == "7\t2\t2\t1\t0.2500\n"
    # a row reads back under its header
    fields = format_row(CERTIFY_HEADER, 4, 1, 1, 0.5, 2.0).split()
    assert dict(zip(CERTIFY_HEADER, fields, strict=True)) == {
        "idx": "4",
        "label": "1",
        "predict": "1",
        "radius": "0.500000",
        "correct": "1",
        "time": "2.0000",
    }


def test_torn_last_line(tmp_path):
    rows = format_row(CERTIFY_HEADER, 0, 1, 1, 0.5, 1.0) + format_row(CERTIFY_HEADER, 1, 2, 2, 0.25, 1.0)
    torn = _log(tmp_path, HEAD + rows + "2\t3\t3\t0.1", "torn.tsv")  # a crash mid-write
    for strict in (True, False):
        assert [r[0] for r in read_log_rows(torn, strict_tail=strict).rows] == ["0", "1"]
    whole = _log(tmp_path, HEAD + rows + "2\t3\t3\t0.100000\t1\t1.0000", "whole.tsv")  # complete, no final newline
    assert [r[0] for r in read_log_rows(whole, strict_tail=False).rows] == ["0", "1", "2"]  # another tool's file
    assert [r[0] for r in read_log_rows(whole, strict_tail=True).rows] == ["0", "1"]  # ours always ends rows
    log = read_log_rows(_log(tmp_path, HEAD + rows, "ok.tsv"), strict_tail=True)
    assert log.header == CERTIFY_HEADER
    assert log.rows[1] == ["1", "2", "2", "0.250000", "1", "1.0000"]


def test_short_middle_line_is_an_error(tmp_path):
    f = _log(tmp_path, HEAD + "0\t1\t1\t0.5\t1\t1.0\n\n1\t2\t2\n2\t1\t1\t0.5\t1\t1.0\n")
    with pytest.raises(LogError, match=f"{f}:4: 3 fields, expected 6"):  # blank line 3 is skipped
        read_log_rows(f)


def test_columns_are_found_by_name(tmp_path):
    f = _log(tmp_path, "idx\tlabel\tpredict\tcorrect\ttime\n0\t1\t1\t1\t0.1\n")
    with pytest.raises(LogError, match=r"lacks columns \['radius'\]"):
        read_log_rows(f, need=CERTIFY_HEADER)
    other = _log(tmp_path, "idx label predict radius correct time extra\n0 1 1 0.5 1 0.1 x\n", "other.tsv")
    log = read_log_rows(other, need=CERTIFY_HEADER)
    assert log.rows == [["0", "1", "1", "0.5", "1", "0.1", "x"]]
    with pytest.raises(LogError, match="is empty"):
        read_log_rows(_log(tmp_path, "", "empty.tsv"))
    with pytest.raises(LogError, match="cannot read"):
        read_log_rows(tmp_path / "missing.tsv")


def test_read_rows_for_resuming(tmp_path):
    assert read_rows(tmp_path / "none.tsv", CERTIFY_HEADER) == {}
    r0, r5 = format_row(CERTIFY_HEADER, 0, 1, 1, 0.5, 1.0), format_row(CERTIFY_HEADER, 5, 2, -1, 0.0, 1.0)
    f = _log(tmp_path, HEAD + r5 + r0 + format_row(CERTIFY_HEADER, 5, 2, 2, 0.9, 1.0) + "7\t1\t1")
    assert read_rows(f, CERTIFY_HEADER) == {5: r5, 0: r0}  # the torn row is dropped, the first of a repeat kept
    # in our own file a last line without its newline is torn even with every field (the time may be cut short)
    g = _log(tmp_path, HEAD + r0 + "5\t2\t2\t0.900000\t1\t1.2", "cut.tsv")
    assert read_rows(g, CERTIFY_HEADER) == {0: r0}
    with pytest.raises(LogError, match="not a idx label predict correct time log"):
        read_rows(f, PREDICT_HEADER)
    wide = _log(tmp_path, HEAD + "0\t1\t1\t0.5\t1\t1.0\textra\n", "wide.tsv")
    with pytest.raises(LogError, match="malformed row"):
        read_rows(wide, CERTIFY_HEADER)


def test_write_rows_sorts_and_round_trips(tmp_path):
    rows = {i: format_row(PREDICT_HEADER, i, i % 3, (i * 7) % 3, 0.0, 0.1 * i) for i in (9, 2, 40, 0, 13)}
    path = tmp_path / "predict.tsv"
    path.write_text("old contents\n")
    write_rows(path, PREDICT_HEADER, rows)
    lines = path.read_text().splitlines()
    assert lines[0] == "\t".join(PREDICT_HEADER)
    assert [int(ln.split("\t")[0]) for ln in lines[1:]] == [0, 2, 9, 13, 40]
    assert read_rows(path, PREDICT_HEADER) == rows
    assert [p.name for p in tmp_path.iterdir()] == ["predict.tsv"]  # no temp file left


def test_a_dropped_or_kept_last_line_is_reported(tmp_path):
    """A report must say when a torn last line is not counted (resuming drops it without a word: read_rows)."""
    rows = format_row(CERTIFY_HEADER, 0, 1, 1, 0.5, 1.0) + format_row(CERTIFY_HEADER, 1, 2, 2, 0.25, 1.0)
    torn = _log(tmp_path, HEAD + rows + "2\t3\t3\t0.1", "torn.tsv")
    log = read_log_rows(torn)
    assert len(log.rows) == 2
    assert log.lines == (2, 3)
    assert log.notices == (
        f"{torn}:4: the last line has no newline and 4 of 6 fields (torn by a crash mid-write?): not counted",
    )
    whole = _log(tmp_path, HEAD + rows + "2\t3\t3\t0.100000\t1\t1.0000", "whole.tsv")
    assert read_log_rows(whole).notices == (f"{whole}:4: the last line has no newline; counted (it has all 6 fields)",)
    assert read_log_rows(_log(tmp_path, HEAD + rows, "ok.tsv")).notices == ()
    r0, r1 = rows.splitlines(True)
    assert read_rows(torn, CERTIFY_HEADER) == {0: r0, 1: r1}  # resuming: dropped without a word, as before


def test_unique_images_counts_a_repeated_row_once_and_refuses_two_results(tmp_path):
    """Overlapping shards concatenated (a padded DistributedSampler certifies a few images twice): identical rows
    (the time aside, and numbers compared as numbers) count once, with a notice; two results for one image are
    refused, naming the file, the idx, both lines and the column."""
    from dmae.certification.log import unique_images

    f = _log(
        tmp_path,
        HEAD + "0\t1\t1\t0.5\t1\t0.1\n1\t2\t2\t0.3\t1\t0.1\n0\t1\t1\t0.500000\t1\t9.9\n"
        "2\t3\t-1\t0.0\t0\t0.1\n1\t2\t2\t0.3\t1\t0.2\n0\t1\t1\t0.5\t1\t0.3\n",
        "dup.tsv",
    )
    log, counts = unique_images(f, read_log_rows(f))
    assert [r[0] for r in log.rows] == ["0", "1", "2"]
    assert counts == [3, 2, 1]
    assert log.lines == (2, 3, 5)
    assert log.notices == (
        f"{f}: 3 row(s) repeat an earlier row of the same image (idx 0, 1; e.g. overlapping "
        "shards concatenated): each image counted once",
    )
    g = _log(tmp_path, HEAD + "0\t1\t1\t0.5\t1\t0.1\n1\t2\t2\t0.3\t1\t0.1\n0\t1\t1\t0.45\t1\t0.1\n", "two.tsv")
    with pytest.raises(
        LogError,
        match=rf"{g}: idx 0 appears on lines 2 and 4 with different results "
        r"\(radius 0.5 vs 0.45\)",
    ):
        unique_images(g, read_log_rows(g))
    no_idx = _log(tmp_path, "label predict radius correct\n1 1 0.5 1\n1 1 0.5 1\n", "noidx.tsv")
    log, counts = unique_images(no_idx, read_log_rows(no_idx))  # nothing names the images: rows kept as they are
    assert len(log.rows) == 2
    assert counts == [1, 1]
    assert log.notices == ()
