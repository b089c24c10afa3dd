"""The documentation runs: every Python block of README.md, CONTRIBUTING.md and docs/*.md is executed (in order,
one namespace and one working folder per file, with tiny stand-ins for the models and data sets a block names and
its sample counts and epochs shrunk), and every `dmae` command in a shell block is parsed by the CLI's own parser.
A block that drifts from the code fails here, naming the file and line."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import dmae
import dmae.api
from dmae import datasets
from dmae.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.M | re.S)


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    code: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with the line their code starts on."""
    text = path.read_text()
    return [Block(path, text.count("\n", 0, m.start(2)) + 1, m.group(1), m.group(2)) for m in FENCE.finditer(text)]


# ----------------------------------------------------------------------------- shell blocks
def commands(code: str) -> list[list[str]]:
    """The `dmae` command lines of a shell block as argument lists (after `dmae`, `-m dmae` or
    `.venv/bin/dmae`); continuation lines joined, comments dropped, shell variables read as 0."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        line = re.sub(r"\$\{?\w+\}?", "0", line)
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote in prose-like shell: not a command
            continue
        for part in " ".join(words).split(" && "):
            argv = part.split()
            for i, w in enumerate(argv):
                if w.endswith("/dmae") or w == "dmae" or (w == "-m" and i + 1 < len(argv) and argv[i + 1] == "dmae"):
                    start = i + (2 if w == "-m" else 1)
                    if start < len(argv) or w != "-m":
                        out.append(argv[start:])
                    break
    return out


SHELL = [b for p in DOC_FILES for b in blocks(p) if b.lang in ("bash", "sh", "shell")]


@pytest.mark.parametrize("block", SHELL, ids=str)
def test_every_dmae_command_in_the_docs_parses(block):
    parser = build_parser()
    for argv in commands(block.code):
        if not argv or argv[0] in ("--help", "-h", "--version") or "--help" in argv:
            continue
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"{block}: `dmae {' '.join(argv)}` does not parse (exit {e.code})")


def test_the_shell_blocks_hold_dmae_commands():
    found = sum(len(commands(b.code)) for b in SHELL)
    assert found >= 40, found  # the parser test above is not vacuous


# ----------------------------------------------------------------------------- Python blocks
class TinyCNN(nn.Module):
    """A stand-in for "your own model": [B, 1, 28, 28] in [0, 1] -> 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 5, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - 0.286) / 0.353)


class Few(Dataset):
    """The first ``n`` images of a data set, its ``classes`` kept (a stand-in for a large set)."""

    def __init__(self, base: Any, n: int) -> None:
        self.base, self.n, self.classes = base, n, base.classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.base[i]


def _shrunk(real: Any, caps: dict[str, int], force: dict[str, Any]) -> Any:
    """``real`` with the keyword arguments in ``caps`` at most their cap (when given) and those in ``force`` set."""

    def call(*args: Any, **kw: Any) -> Any:
        kw = {k: min(v, caps[k]) if k in caps and v is not None else v for k, v in kw.items()}
        return real(*args, **{**kw, **force})

    return call


@pytest.fixture
def stand_ins(monkeypatch, tmp_path):
    """The names the blocks take as given, small; the heavy calls shrunk; the working folder a fresh one."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    real_fmnist = datasets.fashion_mnist
    monkeypatch.setattr(
        datasets,
        "fashion_mnist",
        lambda split="test", *a, **k: Few(real_fmnist(split, *a, **k), 64 if split == "train" else 10),
    )
    few = {"skip": 1, "max_images": 10}  # the stand-in test set holds 10 images
    monkeypatch.setattr(dmae, "certify", _shrunk(dmae.api.certify, {"n": 100, "n0": 50, "n_max": 200}, few))
    monkeypatch.setattr(dmae, "predict", _shrunk(dmae.api.predict, {"n": 100}, few))
    train_force = {"epochs": 1, "batch_size": 32, "progress": False}
    pico = {"model": "dmae_vit_pico_patch4_dec32d1b"}  # the tests' 0.03M-parameter preset
    monkeypatch.setattr(dmae, "pretrain", _shrunk(dmae.api.pretrain, {}, train_force | pico))
    monkeypatch.setattr(dmae, "finetune", _shrunk(dmae.api.finetune, {"val_size": 16}, train_force))
    test, train = datasets.fashion_mnist("test"), datasets.fashion_mnist("train")
    x = test[0][0]
    grid = (x * 255).round() / 255  # an 8-bit image, as the sound mode takes
    ns = {"dmae": dmae, "my_cnn": TinyCNN().eval(), "model": TinyCNN().eval(), "classifier": TinyCNN().eval()}
    ns |= {"my_dataset": test, "test": test, "my_train_set": train, "my_test_set": test}
    ns |= {"x": grid, "xs": grid.unsqueeze(0).repeat(2, 1, 1, 1), "ids": [0, 1], "i": 0}
    ns |= {"sigma": 0.25, "radii": (0.0, 0.25, 0.5), "k": 0, "os": __import__("os")}
    torch.save(
        {"model": dmae.create_model("dmae_vit_pico_patch4_dec32d1b").state_dict()}, "dmae_vit_base_checkpoint.pth"
    )
    return ns


class Tiny(nn.Module):
    """A stand-in classifier of [B, 1, 4, 4] images (the sound mode draws exact noise per pixel: few pixels)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1) - 0.5)


def _before(path: Path, ns: dict[str, Any]) -> None:
    """What a file's blocks assume: the cluster guide's merge runs after all ten shards; the sound mode's
    examples certify 4x4 8-bit images (100,000 exact draws per pixel)."""
    if path.name == "sound.md":
        ns["model"] = Tiny().eval()
        ns["x"] = (torch.arange(16, dtype=torch.float32).reshape(1, 4, 4) * 16) / 255
        ns["xs"] = ns["x"].unsqueeze(0).repeat(2, 1, 1, 1)
    if path.name == "cluster.md":
        for k in range(1, 10):
            dmae.certify(ns["model"], ns["test"], sigma=0.25, n=100_000, log_dir="certs", shard=(k, 10))


PY_FILES = [p for p in DOC_FILES if any(b.lang == "python" for b in blocks(p))]


@pytest.mark.parametrize("path", PY_FILES, ids=lambda p: str(p.relative_to(ROOT)))
@pytest.mark.slow
def test_every_python_block_in_the_docs_runs(path, stand_ins):
    ns = dict(stand_ins)
    _before(path, ns)
    for block in (b for b in blocks(path) if b.lang == "python"):
        try:
            exec(compile(block.code, str(block), "exec"), ns)
        except Exception as e:  # the block's own error, named with its file and line
            pytest.fail(f"{block}: {type(e).__name__}: {e}")


def test_the_python_blocks_are_counted():
    assert sum(b.lang == "python" for p in PY_FILES for b in blocks(p)) >= 9
