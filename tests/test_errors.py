"""dmae.errors: every error dmae raises on purpose is a DmaeError and keeps the built-in base it had."""

import pytest

from dmae.certification.log import LogError
from dmae.checkpoint import CheckpointError
from dmae.data import DataError
from dmae.errors import (
    DivergedError,
    DmaeError,
    InputError,
    MissingFileError,
    PlatformError,
    RunExistsError,
    StageInterrupted,
)
from dmae.reporting.report import ReportError
from dmae.workflows.experiments import ExperimentError


@pytest.mark.parametrize(
    "error, base",
    [
        (CheckpointError, RuntimeError),
        (DataError, RuntimeError),
        (LogError, ValueError),
        (ReportError, ValueError),
        (ExperimentError, ValueError),
        (StageInterrupted, RuntimeError),
    ],
)
def test_each_error_is_a_dmae_error_and_keeps_its_base(error, base):
    assert issubclass(error, DmaeError)
    assert issubclass(error, base)
    with pytest.raises(DmaeError, match="the offending value"):
        raise error("the offending value")


@pytest.mark.parametrize(
    "error, base",
    [
        (InputError, ValueError),
        (MissingFileError, FileNotFoundError),
        (RunExistsError, FileExistsError),
        (DivergedError, FloatingPointError),
        (PlatformError, RuntimeError),
    ],
)
def test_the_shared_errors_keep_their_builtin_base(error, base):
    assert issubclass(error, DmaeError)
    assert issubclass(error, base)


def test_every_raise_in_the_package_is_a_dmae_error():
    """An AST scan of src/dmae: every `raise Name(...)` names a DmaeError subclass, except the two raises that
    Python's protocols require as they are (a module's missing attribute, an option name `given` does not know)
    and the errors in the definitions of the option classes (a bug in dmae, not a user's input)."""
    import ast
    import builtins
    import importlib
    from pathlib import Path

    import dmae

    allowed = {("__init__.py", "AttributeError"), ("config.py", "KeyError"), ("config.py", "TypeError")}
    src = Path(dmae.__file__).parent
    bad = []
    for path in sorted(p for p in src.rglob("*.py") if p.name != "__main__.py"):  # importing it runs the CLI
        module = "dmae." + ".".join(path.relative_to(src).with_suffix("").parts).removesuffix(".__init__")
        mod = importlib.import_module(module if module != "dmae.__init__" else "dmae")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
                name = node.exc.func.id
                cls = getattr(mod, name, None) or getattr(builtins, name, None)
                if callable(cls) and not isinstance(cls, type):  # a function building the error: what it returns
                    cls = getattr(mod, cls.__annotations__.get("return", ""), None)
                if (path.name, name) in allowed:
                    continue
                if not (isinstance(cls, type) and issubclass(cls, DmaeError)):
                    bad.append(f"{path.relative_to(src)}:{node.lineno} raises {name}")
    assert not bad, bad


def test_a_users_ordinary_mistakes_are_dmae_errors(tmp_path):
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    import dmae

    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    data = TensorDataset(torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.long))
    mistakes = [
        dict(dataset=TensorDataset((torch.rand(4, 1, 4, 4) - 0.5) / 0.25, torch.zeros(4, dtype=torch.long))),
        dict(dataset=TensorDataset(torch.randint(0, 255, (4, 1, 4, 4), dtype=torch.uint8), torch.zeros(4))),
        dict(alpha=0.95),
        dict(dataset=TensorDataset(torch.rand(4, 1, 4, 4), torch.full((4,), 7))),
        dict(sequential=True),
    ]
    for kw in mistakes:
        args = {"dataset": data, "sigma": 0.25, "n0": 10, "n": 50, **kw}
        with pytest.raises(DmaeError):
            dmae.certify(model, args.pop("dataset"), **args)
    dmae.certify(model, data, sigma=0.25, n0=10, n=50, log_dir=tmp_path)
    with pytest.raises(DmaeError, match="n"):  # a log written with other settings
        dmae.certify(model, data, sigma=0.25, n0=10, n=60, log_dir=tmp_path)
    with pytest.raises(DmaeError, match="unknown option"):
        dmae.finetune(data, epoch=3)


def test_messages_inside_an_api_call_are_worded_in_its_terms():
    from dmae.errors import InputError, in_python_terms, python_terms
    from dmae.runtime import DmaeWarning

    names = {"output_dir": "log_dir"}
    assert in_python_terms("pass --resume, or choose another --output-dir", names) == (
        "pass resume=True, or choose another log_dir"
    )
    assert in_python_terms("--warmup-epochs 5 exceeds --epochs 3", names) == "warmup_epochs=5 exceeds epochs=3"
    assert in_python_terms("runs/a--b/x--y.tsv: --merge", names) == "runs/a--b/x--y.tsv: merge=True"  # paths stay
    assert in_python_terms("certify each shard K of N first (--shard K/N), with the same --output-dir", names) == (
        "certify each shard K of N first (shard=(K, N)), with the same log_dir"
    )
    assert in_python_terms("run `dmae certify --shard K/N` with --merge", names) == (
        "run `dmae certify --shard K/N` with merge=True"
    )  # a quoted command stays as typed
    assert str(InputError("--sigma 0.5 is not trained")) == "--sigma 0.5 is not trained"  # outside a call
    with python_terms(**names):
        assert str(InputError("--sigma 0.5 is not trained")) == "sigma=0.5 is not trained"
        assert str(DmaeWarning("use another --output-dir")) == "use another log_dir"
        from dmae.errors import MissingFileError

        e = MissingFileError("--init x.pt does not exist")
        assert str(e) == "init x.pt does not exist"
        assert isinstance(e, FileNotFoundError)
    assert str(InputError("--sigma 0.5")) == "--sigma 0.5"  # the context ends with the call
