"""The package's layering (import-linter contracts in pyproject.toml): nothing but the CLI imports workflows,
reporting sits above certification above smoothing, training and certification stay apart, the base imports no
flow. An upward import anywhere in src/dmae fails this test, naming the import chain."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the contracts in ``root/pyproject.toml``, about ``root/src``'s package whatever else
    is installed."""
    lint = Path(sys.executable).parent / "lint-imports"
    assert lint.is_file(), (
        f"{lint} is missing: install the test tools (bash setup.sh test, or pip install -e '.[test]')"
    )
    path = os.pathsep.join(filter(None, [str(root / "src"), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [str(lint), "--no-cache"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_imports_follow_the_layers():
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_an_upward_import_breaks_the_check(tmp_path):
    """The check can fail: the package copied with smoothing importing the workflows (two layers up)."""
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    bounds = tmp_path / "src" / "dmae" / "smoothing" / "bounds.py"
    bounds.write_text(bounds.read_text() + "\nimport dmae.workflows.demo  # an upward import\n")
    proc = lint_imports(tmp_path)
    assert proc.returncode != 0
    assert "smoothing imports no training, certification, reporting or workflows BROKEN" in proc.stdout
    assert "dmae.smoothing.bounds -> dmae.workflows.demo" in proc.stdout
