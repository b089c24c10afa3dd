"""``dmae experiment`` / ``dmae experiments`` (dmae.workflows.experiments): every shipped experiment, shrunken, end
to end."""

import pytest

from dmae.certification.log import CERTIFY_HEADER, read_rows
from dmae.cli import main
from dmae.workflows.experiments import (
    ExperimentError,
    ExperimentOptions,
    gpu_hours,
    list_experiments,
    load_experiment,
    run_experiment,
)

PAPER = {
    "imagenet_vit_base",
    "imagenet_vit_large",
    "cifar10_transfer",
    "linprobe_dmae_vs_mae",
    "pretrain_epochs",
    "rs_vs_cr",
    "dmae_vs_mae_finetune",
    "many_sigma",
}

pytestmark = pytest.mark.e2e  # whole workflows: the demo, the experiments, the examples


def test_every_paper_experiment_is_shipped_with_an_estimate_and_torchrun_commands(capsys):
    assert set(list_experiments()) >= PAPER
    for name in PAPER:
        exp = load_experiment(name)
        hours = gpu_hours(exp)
        assert {s.name for s in exp.stages if s.command in ("pretrain", "certify")} <= set(hours), name
        assert all(h > 0 for h in hours.values())
        assert {"one_node", "nodes"} <= set(exp.torchrun)
        assert all("torchrun" in c for c in exp.torchrun.values()), name
        assert all(f"experiment {name}" in c for c in exp.torchrun.values()), name
    assert main(["experiments"]) == 0
    out = capsys.readouterr().out
    assert all(f"{name}: " in out for name in PAPER)
    assert "estimated GPU-hours" in out
    assert "paired comparisons: dmae_cr vs dmae_lp; dmae_cr vs scratch_cr;" in out  # fmnist_mini's pairs
    assert "certify of cr_range at sigma 0.25, 0.5, 0.75" in out  # many_sigma certifies one model at three sigma


@pytest.mark.parametrize("name", list_experiments())
def test_shrunken_experiment_runs_end_to_end(name, tmp_path):
    """The same stages and code path as the full-scale run, on the pico model and four test images: every group
    of the report gets its table, from every classifier at every sigma."""
    exp = load_experiment(name)
    tables = run_experiment(exp, ExperimentOptions(tmp_path, smoke=True, device="cpu", progress=False))
    assert set(tables) == set(exp.groups) | {k for k in tables if " vs " in k}
    for a, b in exp.comparisons:  # a paired table per sigma both were certified at
        keys = [k for k in tables if k.startswith(f"{a} vs {b}, sigma ")]
        assert keys, (a, b)
        assert all(tables[k].images == 4 for k in keys), (a, b)
    sigmas = {r: len(s.sigmas or [None]) for s in exp.stages if s.command == "certify" for r in s.runs}
    for label, runs in exp.groups.items():
        assert len([r for r in tables[label].rows if r["name"] != "best"]) == sum(sigmas[r] for r in runs)
        assert all(r["images"] == 4 for r in tables[label].rows)
    report = (tmp_path / "report.md").read_text()
    assert all(f"## {label}" in report for label in exp.groups)
    assert all(f"A = {a}/" in report for a, _ in exp.comparisons)
    assert all(f"vs B = {b}/" in report for _, b in exp.comparisons)
    assert report.count("McNemar p") == len([k for k in tables if " vs " in k])


def test_rerun_skips_what_is_done_and_use_replaces_a_stage(tmp_path, capsys):
    exp = load_experiment("many_sigma")
    opts = ExperimentOptions(tmp_path / "a", smoke=True, device="cpu", progress=False)
    first = run_experiment(exp, opts)
    log = tmp_path / "a" / "certify" / "cr_range" / "certify_sigma0.5.tsv"
    rows = read_rows(log, CERTIFY_HEADER)
    capsys.readouterr()
    again = run_experiment(exp, opts)
    out = capsys.readouterr().out
    assert "pretrain: done" in out
    assert "cr_range: done" in out
    assert "(0 new)" in out
    assert read_rows(log, CERTIFY_HEADER) == rows
    assert again["one model, sigma ~ U[0, 0.75]"].rows == first["one model, sigma ~ U[0, 0.75]"].rows
    report = (tmp_path / "a" / "report.md").read_text()
    assert "| pretrain | pretrain | 4 |" in report
    assert "| cr_range | finetune | 4 |" in report
    assert "val_acc@0.25" in report
    export = tmp_path / "a" / "pretrain" / "model.safetensors"
    assert (
        main(
            [
                "experiment",
                "many_sigma",
                "--smoke",
                "--use",
                f"pretrain={export}",
                "--output-dir",
                str(tmp_path / "b"),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    assert not (tmp_path / "b" / "pretrain").exists()
    assert (tmp_path / "b" / "cr_range" / "model_last.safetensors").is_file()
    assert "pretrain: using" in capsys.readouterr().out


def test_bad_experiments_and_options_are_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    for text, message in (
        (
            "stages:\n  a: {command: finetune, init: b}\n  b: {command: pretrain}\n",
            "stage a refers to 'b', which is not an earlier stage",
        ),
        ("stages:\n  a: {command: train}\n", "stage a has command 'train'"),
        (
            "- a\n- b\n",
            r"bad.yaml is not a mapping of keys \(comparisons, groups, notes, paper, "
            r"stages, title, torchrun\): it holds a list",
        ),
        (
            "stages:\n  a: {command: finetune}\n  c: {command: certify, runs: [a], sigmas: ['0.25']}\n",
            r"stage c has sigmas \['0.25'\]; give a list of numbers > 0",
        ),
        (
            "stages:\n  a: {command: finetune}\ncomparison:\n  - [a, a]\n",
            r"unknown keys \['comparison'\]; an experiment takes comparisons, groups",
        ),
        (
            "stages:\n  a: {command: pretrain}\ngroups:\n  g: [a]\n",
            "group 'g' names 'a', which is not a fine-tuning stage",
        ),
        ("stages:\n  a: {command: pretrain}\n  c: {command: certify, runs: [a]}\n", "certifies a pretraining stage"),
        (
            "stages:\n  a: {command: finetune}\n  c: {command: certify, runs: [a]}\ncomparisons:\n  - [a, b]\n",
            r"comparison \['a', 'b'\] must be two different classifier stages that a certify stage "
            r"certifies \(a\)",
        ),
        (
            "stages:\n  a: {command: finetune}\n  c: {command: certify, runs: [a]}\ncomparisons:\n  - [a, a]\n",
            r"comparison \['a', 'a'\] must be two different",
        ),
        (
            "stages:\n  a: {command: finetune}\n  b: {command: finetune}\n"
            "  c: {command: certify, runs: [a], set: {skip: 20}}\n  d: {command: certify, runs: [b], set: {skip: 1}}\n"
            "comparisons:\n  - [a, b]\n",
            r"comparison \[a, b\] pairs runs certified on different test images \(a by c: skip=20, max=None, "
            r"split=None; b by d: skip=1, max=None, split=None\)",
        ),
    ):
        bad.write_text(text)
        with pytest.raises(ExperimentError, match=message):
            load_experiment(str(bad))
    for argv, message in (
        (["experiment", "imagenet_vit_bse"], "unknown experiment 'imagenet_vit_bse'; shipped: "),
        (["experiment", "many_sigma", "--use", "pretrian=x"], "has no stage 'pretrian'; stages: pretrain"),
        (["experiment", "many_sigma", "--use", "pretrain"], "--use takes STAGE=PATH, got 'pretrain'"),
        (
            ["experiment", "many_sigma", "--only", "certify", "--output-dir", str(tmp_path / "x")],
            "stage certify certifies cr_range, which has not produced",
        ),
    ):
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err


def test_estimates_and_paper_recipes_at_full_scale(monkeypatch, tmp_path):
    """Pinned numbers: the ViT-B pretraining estimate (1,100 epochs x 1,281,167 images at 3,517 images/s) and the
    full-scale settings each stage resolves to, with the effective batch kept under any number of processes."""
    from dmae.workflows.experiments import certify_configs, training_config

    exp = load_experiment("imagenet_vit_base")
    assert round(gpu_hours(exp)["pretrain"], 1) == round(1100 * 1_281_167 / 3517 / 3600, 1) == 111.3
    assert round(gpu_hours(exp)["certify"], 2) == round(3 * 1000 * 10_100 / 11_087 / 3600, 2)
    opts = ExperimentOptions(tmp_path, device="cpu", data_root="/data/imagenet")
    for world, pre, ft in (("8", (256, 2), (128, 1)), ("32", (128, 1), (32, 1)), ("1", (256, 16), (128, 8))):
        monkeypatch.setenv("WORLD_SIZE", world)
        p = training_config(exp, exp.stage("pretrain"), opts)
        f = training_config(exp, exp.stage("cr_sigma1.0"), opts)
        assert (p.batch_size, p.accum_iter) == pre
        assert (f.batch_size, f.accum_iter) == ft
    assert (p.model, p.epochs, p.sigma, p.loss, p.blr, p.data_root) == (
        "dmae_vit_base_patch16_dec512d8b",
        1100,
        0.25,
        "all",
        1.5e-4,
        "/data/imagenet",
    )
    assert (f.sigma, f.method, f.epochs, f.layer_decay, f.init) == (
        1.0,
        "cr",
        100,
        0.65,
        str(tmp_path / "pretrain" / "model.safetensors"),
    )
    [_, _, c100] = certify_configs(exp, exp.stage("certify"), opts)
    assert (c100.skip, c100.n0, c100.n, c100.alpha, c100.data, c100.sigma) == (50, 100, 10_000, 0.001, "imagenet", None)
    mae = load_experiment("dmae_vs_mae_finetune")
    m = training_config(mae, mae.stage("mae"), opts)
    assert (m.sigma, m.loss) == (0.0, "masked")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ExperimentError, match="effective batch 4096 is not a multiple of 3 process"):
        training_config(exp, exp.stage("pretrain"), opts)


def test_repeated_use_stale_runs_and_unknown_keys(tmp_path, capsys):
    from dmae.workflows.experiments import ExperimentConfig

    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    a.write_bytes(b"")
    b.write_bytes(b"")
    exp = load_experiment("linprobe_dmae_vs_mae")
    from dmae import config as C
    from dmae.cli import build_parser

    ns = build_parser().parse_args(["experiment", "linprobe_dmae_vs_mae", "--use", f"dmae={a}", "--use", f"mae={b}"])
    cfg = C.build_config(ExperimentConfig, {}, {k: v for k, v in vars(ns).items() if k not in ("command", "func")})
    assert cfg.options(exp).use == {"dmae": str(a), "mae": str(b)}  # both, not just the last
    with pytest.raises(ExperimentError, match=r"--use dmae=/nowhere: no such file"):
        ExperimentConfig(name="linprobe_dmae_vs_mae", use=("dmae=/nowhere",)).options(exp)
    # a finished smoke stage is not taken for the full-scale one
    small = load_experiment("many_sigma")
    run_experiment(
        small, ExperimentOptions(tmp_path / "x", smoke=True, device="cpu", progress=False, only=["pretrain"])
    )
    with pytest.raises(
        ExperimentError, match=r"stage pretrain is finished but was run with other options: .*epochs: 1 -> 1100"
    ):
        run_experiment(small, ExperimentOptions(tmp_path / "x", device="cpu", progress=False, only=["pretrain"]))
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  a: {command: pretrain, sett: {epochs: 2}}\n")
    with pytest.raises(ExperimentError, match=r"stage a has unknown keys \['sett'\]"):
        load_experiment(str(bad))
    bad.write_text("stages:\n  a: {command: pretrain, set: {epoch: 2}}\n")
    with pytest.raises(ExperimentError, match=r"stage a sets unknown options \['epoch'\] of dmae pretrain"):
        load_experiment(str(bad))
    bad.write_text(
        "stages:\n  a: {command: finetune, set: {sigma: 0.25, model: dmae_vit_pico_patch4_dec32d1b}}\n"
        "  c: {command: certify, runs: [a], set: {num_sample: 10}}\n"
    )
    with pytest.raises(ExperimentError, match=r"stage c sets unknown options \['num_sample'\] of dmae certify"):
        load_experiment(str(bad))


def test_report_ignores_side_files(tmp_path):
    """A `.nonfinite.tsv` beside a log (images whose logits were NaN) is not a log."""
    from dmae.reporting.report import find_logs

    (tmp_path / "c" / "r").mkdir(parents=True)
    for name in ("certify_sigma0.25.tsv", "certify_sigma0.25.nonfinite.tsv", "certify_sigma0.25.tsv.rank1"):
        (tmp_path / "c" / "r" / name).write_text("")
    assert [p.name for p in find_logs(tmp_path)] == ["certify_sigma0.25.tsv"]


def test_comparisons_say_why_they_are_missing(tmp_path):
    """A comparison whose logs hold different images (one certification stopped part way), or no common sigma,
    becomes a line saying so; the rest of the report still comes out."""
    from dmae.reporting.report import read_log
    from dmae.workflows.experiments import comparison_lines

    def log(name, sigma, idx):
        path = tmp_path / name / f"certify_sigma{sigma}.tsv"
        path.parent.mkdir(exist_ok=True)
        path.write_text(
            "idx\tlabel\tpredict\tradius\tcorrect\ttime\n" + "".join(f"{i}\t1\t1\t0.3\t1\t0\n" for i in idx)
        )
        return read_log(path)

    whole, part, other = log("a", 0.25, [0, 20, 40]), log("b", 0.25, [0, 20]), log("c", 0.5, [0, 20, 40])
    tables = {}
    lines = comparison_lines("a", [whole], "b", [part], tables)
    assert not tables
    assert "not comparable (" in lines[0]
    assert "rerun the experiment" in lines[0]
    assert "idx 40 is only in certify_sigma0.25" in lines[0]
    assert "no sigma in common (a: 0.25; c: 0.5)" in comparison_lines("a", [whole], "c", [other], tables)[0]
    assert "not both certified yet" in comparison_lines("a", [whole], "d", [], tables)[0]
    assert "two certification logs at one sigma" in comparison_lines("a", [whole, whole], "c", [other], tables)[0]
    lines = comparison_lines("a", [whole], "b", [log("b", 0.25, [40, 0, 20])], tables)
    assert list(tables) == ["a vs b, sigma 0.25"]
    assert "| r=0.25 | 100.0 | 100.0 | +0.0 |" in lines[0]
