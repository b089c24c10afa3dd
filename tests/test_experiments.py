"""``dmae experiment`` / ``dmae experiments`` (dmae.experiments): every shipped experiment, shrunken, end to end."""

import pytest

from dmae.certlog import CERTIFY_HEADER, read_rows
from dmae.cli import main
from dmae.experiments import (ExperimentError, ExperimentOptions, gpu_hours, list_experiments, load_experiment,
                              run_experiment)

PAPER = {"imagenet_vit_base", "imagenet_vit_large", "cifar10_transfer", "linprobe_dmae_vs_mae", "pretrain_epochs",
         "rs_vs_cr", "dmae_vs_mae_finetune", "many_sigma"}


def test_every_paper_experiment_is_shipped_with_an_estimate_and_torchrun_commands(capsys):
    assert PAPER <= set(list_experiments())
    for name in PAPER:
        exp = load_experiment(name)
        hours = gpu_hours(exp)
        assert {s.name for s in exp.stages if s.command in ("pretrain", "certify")} <= set(hours), name
        assert all(h > 0 for h in hours.values()) and {"one_node", "nodes"} <= set(exp.torchrun)
        assert all("torchrun" in c and f"experiment {name}" in c for c in exp.torchrun.values())
    assert main(["experiments"]) == 0
    out = capsys.readouterr().out
    assert all(f"{name}: " in out for name in PAPER) and "estimated GPU-hours" in out


@pytest.mark.parametrize("name", list_experiments())
def test_shrunken_experiment_runs_end_to_end(name, tmp_path):
    """The same stages and code path as the full-scale run, on the pico model and four test images: every group
    of the report gets its table, from every classifier at every sigma."""
    exp = load_experiment(name)
    tables = run_experiment(exp, ExperimentOptions(tmp_path, smoke=True, device="cpu", progress=False))
    assert set(tables) == set(exp.groups)
    sigmas = {r: len(s.sigmas or [None]) for s in exp.stages if s.command == "certify" for r in s.runs}
    for label, runs in exp.groups.items():
        assert len([r for r in tables[label].rows if r["name"] != "best"]) == sum(sigmas[r] for r in runs)
        assert all(r["images"] == 4 for r in tables[label].rows)
    report = (tmp_path / "report.md").read_text()
    assert all(f"## {label}" in report for label in exp.groups)


def test_rerun_skips_what_is_done_and_use_replaces_a_stage(tmp_path, capsys):
    exp = load_experiment("many_sigma")
    opts = ExperimentOptions(tmp_path / "a", smoke=True, device="cpu", progress=False)
    first = run_experiment(exp, opts)
    log = tmp_path / "a" / "certify" / "cr_range" / "certify_sigma0.5.tsv"
    rows = read_rows(log, CERTIFY_HEADER)
    capsys.readouterr()
    again = run_experiment(exp, opts)
    out = capsys.readouterr().out
    assert "pretrain: done" in out and "cr_range: done" in out and "(0 new)" in out
    assert read_rows(log, CERTIFY_HEADER) == rows and again["one model, sigma ~ U[0, 0.75]"].rows == first["one model, sigma ~ U[0, 0.75]"].rows
    report = (tmp_path / "a" / "report.md").read_text()
    assert "| pretrain | pretrain | 4 |" in report and "| cr_range | finetune | 4 |" in report and "val_acc@0.25" in report
    export = tmp_path / "a" / "pretrain" / "model.safetensors"
    assert main(["experiment", "many_sigma", "--smoke", "--use", f"pretrain={export}", "--output-dir", str(tmp_path / "b"),
                 "--device", "cpu", "--no-progress"]) == 0
    assert not (tmp_path / "b" / "pretrain").exists() and (tmp_path / "b" / "cr_range" / "model_last.safetensors").is_file()
    assert "pretrain: using" in capsys.readouterr().out


def test_bad_experiments_and_options_are_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    for text, message in (("stages:\n  a: {command: finetune, init: b}\n  b: {command: pretrain}\n",
                           "stage a refers to 'b', which is not an earlier stage"),
                          ("stages:\n  a: {command: train}\n", "stage a has command 'train'"),
                          ("stages:\n  a: {command: pretrain}\ngroups:\n  g: [a]\n", "group 'g' names 'a', which is not a fine-tuning stage"),
                          ("stages:\n  a: {command: pretrain}\n  c: {command: certify, runs: [a]}\n", "certifies a pretraining stage")):
        bad.write_text(text)
        with pytest.raises(ExperimentError, match=message):
            load_experiment(str(bad))
    for argv, message in ((["experiment", "imagenet_vit_bse"], "unknown experiment 'imagenet_vit_bse'; shipped: "),
                          (["experiment", "many_sigma", "--use", "pretrian=x"], "has no stage 'pretrian'; stages: pretrain"),
                          (["experiment", "many_sigma", "--use", "pretrain"], "--use takes STAGE=PATH, got 'pretrain'"),
                          (["experiment", "many_sigma", "--only", "certify", "--output-dir", str(tmp_path / "x")],
                           "stage certify certifies cr_range, which has not produced")):
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
