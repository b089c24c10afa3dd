"""The package's layering (import-linter contracts in pyproject.toml): nothing but the CLI imports workflows,
reporting sits above certification above smoothing, training and certification stay apart, the base imports no
flow. An upward import anywhere in src/dmae fails this test, naming the import chain."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_imports_follow_the_layers():
    lint = Path(sys.executable).parent / "lint-imports"
    assert lint.is_file(), (
        f"{lint} is missing: install the test tools (bash setup.sh test, or pip install -e '.[test]')"
    )
    # the contracts in ROOT/pyproject.toml, about this checkout's package whatever else is installed
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(
        [str(lint), "--no-cache"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout
