"""--shard K/N and --merge: a certification split over independent jobs gives a single run's rows."""

import json
import shutil
from pathlib import Path

import pytest

import dmae
from conftest import run_torchrun
from dmae.certification.log import CERTIFY_HEADER, SEQUENTIAL_HEADER, read_rows
from dmae.certification.runner import MERGE_KEYS, CertifyConfig, run_certification
from dmae.certification.shards import ShardError, parse_shard
from dmae.checkpoint import load_classifier
from dmae.cli import main
from dmae.data import build_dataset, build_transform, dataset_info
from dmae.reporting.report import read_log

# 12 images (every 500th test image); shard K of 3 holds positions K, K + 3, ...: 4 images each
COMMON = dict(n0=20, alpha=0.001, skip=500, max=12, batch=128, seed=0, device="cpu", progress=False)
KINDS = {"fixed": dict(n=150), "sequential": dict(n=200, sequential="targets")}


def _cfg(run, out, kind="fixed", **over):
    return CertifyConfig(checkpoint=str(run), output_dir=str(out), **{**COMMON, **KINDS[kind], **over})


def _argv(run, out, kind="fixed", *extra):
    argv = ["certify", "--checkpoint", str(run), "--output-dir", str(out), "--n0", "20", "--skip", "500"]
    # the aliases of --n and --max: torchrun's own parser would take those as abbreviations of its options
    argv += ["--max-images", "12", "--batch", "128", "--device", "cpu", "--no-progress"]
    argv += ["--num-samples", "150"] if kind == "fixed" else ["--num-samples", "200", "--sequential", "targets"]
    return argv + list(extra)


def _rows(path: Path) -> dict[int, list[str]]:
    """A log's rows by idx without the time column (the 6th: sequential logs have two more after it)."""
    lines = path.read_text().splitlines()[1:]
    return {int(ln.split("\t")[0]): ln.split("\t")[:5] + ln.split("\t")[6:] for ln in lines}


def _shard(out: Path, k: int, ext: str = "tsv", mode: str = "certify") -> Path:
    return out / f"{mode}_sigma0.25.shard-{k}-of-3.{ext}"


@pytest.fixture(scope="module")
def certified(classifier_run, tmp_path_factory):
    """``certified(kind)``: (a single run's log, the folder of the three shard logs of the same certification, not
    merged), made once per kind of log; tests work on copies."""
    made = {}

    def make(kind: str = "fixed") -> tuple[Path, Path]:
        if kind not in made:
            root = tmp_path_factory.mktemp(kind)
            [single] = run_certification(_cfg(classifier_run, root / "single", kind))
            for k in range(3):
                [res] = run_certification(_cfg(classifier_run, root / "shards", kind, shard=f"{k}/3"))
                assert res.rows_total == 4
                assert res.path.name == _shard(root, k, mode=_mode(kind)).name
            made[kind] = single.path, root / "shards"
        return made[kind]

    return make


@pytest.fixture
def shard_logs(certified):
    return certified("fixed")


def _mode(kind: str) -> str:
    return "sequential" if kind == "sequential" else "certify"


def _copy(shard_logs, tmp_path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(shard_logs[1], out)
    return out


@pytest.mark.parametrize("kind", ["fixed", "sequential"])
@pytest.mark.slow
def test_killed_shard_resumes_and_the_merge_equals_one_run(classifier_run, certified, tmp_path, capsys, kind):
    mode = _mode(kind)
    single, shards = certified(kind)
    out = _copy((single, shards), tmp_path)
    for k in range(3):  # a shard's rows are the single run's rows of its images: positions k, k + 3, ...
        assert _rows(_shard(out, k, mode=mode)) == {
            i: r for j, (i, r) in enumerate(sorted(_rows(single).items())) if j % 3 == k
        }
    # shard 1 is killed after one row, mid-way through writing the second
    lines = _shard(out, 1, mode=mode).read_text().splitlines()
    _shard(out, 1, mode=mode).write_text("\n".join(lines[:2]) + "\n" + lines[2][:7])
    [res] = run_certification(_cfg(classifier_run, out, kind, shard="1/3"))  # the same command: it continues
    assert res.rows_added == 3
    assert res.rows_total == 4
    header = SEQUENTIAL_HEADER if kind == "sequential" else CERTIFY_HEADER
    assert _rows(_shard(out, 1, mode=mode)) == _rows(_shard(shards, 1, mode=mode))
    assert len(read_rows(_shard(out, 1, mode=mode), header)) == 4
    capsys.readouterr()
    assert main([*_argv(classifier_run, out, kind), "--merge"]) == 0
    assert "merged 3 shard logs (of 3)" in capsys.readouterr().out
    merged = out / f"{mode}_sigma0.25.tsv"
    assert merged.read_text().splitlines()[0] == single.read_text().splitlines()[0]
    assert list(_rows(merged)) == sorted(_rows(merged))
    assert _rows(merged) == _rows(single)
    meta, one = (json.loads(p.with_suffix(".json").read_text()) for p in (merged, single))
    assert {k: meta.get(k) for k in MERGE_KEYS} == {k: one.get(k) for k in MERGE_KEYS}
    assert "shard" not in meta
    assert meta["merge"] == {"shards": 3, "missing": 0}
    assert meta["probe"] == one["probe"]
    lg = dmae.read_log(merged)
    assert len(lg) == 12
    assert not lg.incomplete
    assert lg.notes == []


@pytest.mark.slow
def test_report_reads_unmerged_shards_as_one_log(shard_logs, tmp_path, capsys):
    single, _ = shard_logs
    out = _copy(shard_logs, tmp_path)
    lg = read_log(out / "certify_sigma0.25.tsv")  # not merged: read from the shard logs
    assert lg.idx.tolist() == sorted(_rows(single))
    assert not lg.incomplete
    assert lg.meta.get("shard") is None
    assert lg.acr == pytest.approx(read_log(single).acr)
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "read from its 3 shard logs" in text
    assert "12 of the 12 planned images, complete" in text
    # the shard files given directly read as one log too, once
    assert main(["report", str(_shard(out, 0)), str(_shard(out, 2)), str(_shard(out, 1))]) == 0
    table = capsys.readouterr().out.splitlines()
    assert sum(ln.startswith("certify_sigma0.25 ") for ln in table) == 1


def test_overlapping_shards_are_refused(classifier_run, shard_logs, tmp_path, capsys):
    out = _copy(shard_logs, tmp_path)
    first_row = _shard(out, 0).read_text().splitlines()[1]  # an image of shard 0 copied into shard 2
    with open(_shard(out, 2), "a") as f:
        f.write(first_row + "\n")
    assert main([*_argv(classifier_run, out), "--merge"]) == 2
    err = capsys.readouterr().err
    assert "idx 0 is in two shards" in err
    assert "shard-0-of-3.tsv and certify_sigma0.25.shard-2-of-3.tsv" in err
    assert not (out / "certify_sigma0.25.tsv").exists()
    assert main(["report", str(out)]) == 2
    assert "idx 0 is in two shards" in capsys.readouterr().err


def test_shards_of_other_settings_are_refused_naming_the_key(classifier_run, shard_logs, tmp_path, capsys):
    out = _copy(shard_logs, tmp_path)
    # a shard run refuses to continue a shard log written with other settings (before any sample)
    with pytest.raises(ValueError, match=r"shard-2-of-3.tsv was written with other settings \(n: 150 -> 200\)"):
        run_certification(_cfg(classifier_run, out, shard="2/3", n=200))
    # shard logs whose JSONs differ (one written elsewhere with another n, copied in)
    meta = json.loads(_shard(out, 2, "json").read_text())
    _shard(out, 2, "json").write_text(json.dumps({**meta, "n": 200}))
    assert main([*_argv(classifier_run, out), "--merge"]) == 2
    err = capsys.readouterr().err
    assert "n is 150 in certify_sigma0.25.shard-0-of-3.json and 200 in certify_sigma0.25.shard-2-of-3.json" in err
    # a merge asked with other settings than the shards'
    _shard(out, 2, "json").write_text(json.dumps(meta))
    assert main([*_argv(classifier_run, out, "fixed", "--seed", "1"), "--merge"]) == 2
    assert "other settings than this command's (seed: 0 -> 1)" in capsys.readouterr().err
    # shards of several N
    shutil.copy(_shard(out, 0), out / "certify_sigma0.25.shard-0-of-4.tsv")
    assert main([*_argv(classifier_run, out), "--merge"]) == 2
    assert "N = 3: shards 0, 1, 2; N = 4: shards 0" in capsys.readouterr().err


def test_incomplete_shards_are_refused_then_merged_partially_on_request(classifier_run, shard_logs, tmp_path, capsys):
    out = _copy(shard_logs, tmp_path)
    for ext in ("tsv", "json"):
        _shard(out, 2, ext).unlink()  # shard 2 never started
    lines = _shard(out, 1).read_text().splitlines()
    _shard(out, 1).write_text("\n".join(lines[:3]) + "\n")  # shard 1 stopped after 2 of its 4 images
    assert main([*_argv(classifier_run, out), "--merge"]) == 2
    err = capsys.readouterr().err
    assert "the shards hold 6 of the 12 planned images; 6 missing" in err
    assert "shard 1/3 has 2 of 4 images, shard 2/3 has no log" in err
    assert "--allow-partial" in err
    assert not (out / "certify_sigma0.25.tsv").exists()
    lg = read_log(out / "certify_sigma0.25.tsv")  # the report says so too, in the table itself
    assert lg.incomplete
    assert len(lg) == 6
    assert lg.planned == 12
    assert main(["report", str(out)]) == 0
    assert "certify_sigma0.25 (incomplete)" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="6 missing"):
        assert main([*_argv(classifier_run, out), "--merge", "--allow-partial"]) == 0
    meta = json.loads((out / "certify_sigma0.25.json").read_text())
    assert meta["merge"] == {"shards": 3, "missing": 6}
    lg = read_log(out / "certify_sigma0.25.tsv")
    assert lg.incomplete
    assert any("merged from shard logs with --allow-partial" in n for n in lg.notes)


@pytest.mark.parametrize("value", ["3/3", "a/b", "-1/2", "1/0", "2"])
def test_shard_values_are_checked(classifier_run, tmp_path, capsys, value):
    assert main([*_argv(classifier_run, tmp_path), f"--shard={value}"]) == 2
    err = capsys.readouterr().err
    assert f"--shard {value}" in err or f"got {value!r}" in err, err
    with pytest.raises(ValueError, match="--shard"):
        parse_shard(value)


def test_shard_option_combinations_are_checked(classifier_run, tmp_path, capsys):
    assert main([*_argv(classifier_run, tmp_path), "--shard", "0/2", "--merge"]) == 2
    assert "give one of the two" in capsys.readouterr().err
    assert main([*_argv(classifier_run, tmp_path), "--allow-partial"]) == 2
    assert "--allow-partial is only used with --merge" in capsys.readouterr().err
    assert main([*_argv(classifier_run, tmp_path), "--merge"]) == 2  # nothing to merge: said, nothing written
    assert "no shard logs of certify_sigma0.25.tsv" in capsys.readouterr().err
    assert parse_shard(" 2 / 10 ") == (2, 10)
    with pytest.raises(ValueError, match=r"shard must be \(K, N\)"):
        dmae.certify(object(), [], sigma=0.25, shard=(1, 2, 3), log_dir=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs log_dir"):
        dmae.certify(object(), [], sigma=0.25, shard=(0, 2))  # type: ignore[arg-type]


@pytest.mark.slow
def test_the_api_shard_writes_the_cli_shard_rows_and_merges(classifier_run, shard_logs, tmp_path):
    single, cli = shard_logs
    model, _ = load_classifier(classifier_run, 10, pool=None)
    info = dataset_info("fashion-mnist")
    test = build_dataset("fashion-mnist", "test", None, build_transform(info, False, model.config.encoder.img_size))
    kw = dict(sigma=0.25, n0=20, n=150, skip=500, max_images=12, batch_size=77, log_dir=tmp_path / "api")
    res = dmae.certify(model.eval(), test, shard=(1, 3), **kw)
    assert res.paths == [_shard(tmp_path / "api", 1)]
    assert _rows(res.paths[0]) == _rows(_shard(cli, 1))
    assert res.logs[0].idx.tolist() == [500, 2000, 3500, 5000]
    assert not res.logs[0].incomplete  # its share, whole
    with pytest.raises(ShardError, match="8 missing"):
        dmae.certify(model.eval(), test, merge=True, **kw)
    for k in (0, 2):
        dmae.certify(model.eval(), test, shard=f"{k}/3", **kw)
    merged = dmae.certify(model.eval(), test, merge=True, **kw)
    assert merged.paths == [tmp_path / "api" / "certify_sigma0.25.tsv"]
    assert _rows(merged.paths[0]) == _rows(single)
    # PREDICT shards the same way
    pred = dmae.predict(model.eval(), test, sigma=0.25, n=100, skip=500, max_images=12, log_dir=tmp_path / "p")
    part = dmae.predict(
        model.eval(), test, sigma=0.25, n=100, skip=500, max_images=12, log_dir=tmp_path / "p", shard=(2, 3)
    )
    assert part.logs[0].idx.tolist() == pred.logs[0].idx.tolist()[2::3]
    assert part.logs[0].predict.tolist() == pred.logs[0].predict.tolist()[2::3]


@pytest.mark.distributed
def test_a_shard_under_torchrun_splits_its_share_over_the_ranks(classifier_run, shard_logs, tmp_path):
    out = tmp_path / "ddp"
    run_torchrun(_argv(classifier_run, out, "fixed", "--shard", "1/3"))  # two ranks, two images each
    assert _rows(_shard(out, 1)) == _rows(_shard(shard_logs[1], 1))
    assert not list(out.glob("*.rank*"))
