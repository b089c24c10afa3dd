"""The test suite's coverage of ``dmae``, one row per subpackage, from the data a ``--cov`` run leaves in ``.coverage``.

The per-file table pytest-cov prints is long; this groups it the way the code is laid out (README, "How the code is
laid out"): the top-level modules (``api``, ``cli``, ``data``, ``datasets``, ...), then ``models``, ``training``,
``smoothing``, ``certification``, ``reporting`` and ``workflows``. A row counts statements and branches, and its
figure is coverage.py's: (covered statements + covered branches) / (statements + branches). Subprocesses (the CLI
tests, the demo, torchrun workers) are measured too: ``patch = ["subprocess"]`` under ``[tool.coverage.run]``.

    PYTEST_ADDOPTS="--cov=dmae" .venv/bin/python -m pytest -q     # writes .coverage (CI does this)
    .venv/bin/python benchmarks/coverage_by_package.py            # the table, in Markdown
    .venv/bin/python benchmarks/coverage_by_package.py --data-file other/.coverage --csv
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePath

import coverage
from coverage.exceptions import NoDataError

TOP_LEVEL = "dmae (top-level modules)"


@dataclass
class Counts:
    """Statements and branches of a group of files, and how many of each the tests ran."""

    files: int = 0
    statements: int = 0
    covered_statements: int = 0
    branches: int = 0
    covered_branches: int = 0

    def add(self, summary: dict[str, int]) -> None:
        """Add one file's ``summary`` from coverage.py's JSON report."""
        self.files += 1
        self.statements += summary["num_statements"]
        self.covered_statements += summary["covered_lines"]
        self.branches += summary.get("num_branches", 0)
        self.covered_branches += summary.get("covered_branches", 0)

    @property
    def percent(self) -> float:
        total = self.statements + self.branches
        return 100.0 * (self.covered_statements + self.covered_branches) / total if total else 100.0


def package_of(path: str) -> str:
    """``src/dmae/smoothing/core.py`` -> ``smoothing``; a module directly under ``dmae/`` -> :data:`TOP_LEVEL`."""
    parts = PurePath(path).parts
    if "dmae" not in parts:
        raise ValueError(f"{path} is not a file of the dmae package")
    inner = parts[len(parts) - 1 - parts[::-1].index("dmae") + 1 :]  # after the last "dmae" in the path
    return TOP_LEVEL if len(inner) == 1 else inner[0]


def by_package(files: dict[str, dict[str, dict[str, int]]]) -> dict[str, Counts]:
    """Group the ``files`` of coverage.py's JSON report by :func:`package_of`, top-level modules first."""
    groups: dict[str, Counts] = {}
    for path, entry in files.items():
        groups.setdefault(package_of(path), Counts()).add(entry["summary"])
    return dict(sorted(groups.items(), key=lambda kv: (kv[0] != TOP_LEVEL, kv[0])))


def json_files(data_file: Path) -> dict[str, dict[str, dict[str, int]]]:
    """The per-file entries of the JSON report of ``data_file`` (the project's ``[tool.coverage]`` settings apply)."""
    cov = coverage.Coverage(data_file=str(data_file))
    cov.load()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "coverage.json"
        cov.json_report(outfile=str(out))
        return json.loads(out.read_text())["files"]


def table(groups: dict[str, Counts], csv: bool = False) -> str:
    """The rows and a total, as Markdown (or CSV)."""
    head = ["package", "files", "statements", "missed", "branches", "missed branches", "cover %"]
    total = Counts()
    rows = []
    for name, c in groups.items():
        for field in ("files", "statements", "covered_statements", "branches", "covered_branches"):
            setattr(total, field, getattr(total, field) + getattr(c, field))
        rows.append(_cells(name, c))
    rows.append(_cells("total", total))
    if csv:
        return "\n".join(",".join(r) for r in [head, *rows])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _cells(name: str, c: Counts) -> list[str]:
    missed, missed_branches = c.statements - c.covered_statements, c.branches - c.covered_branches
    counts = (c.files, c.statements, missed, c.branches, missed_branches)
    return [name, *map(str, counts), f"{c.percent:.1f}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-file", type=Path, default=Path(".coverage"), help="coverage data (default: .coverage)")
    p.add_argument("--csv", action="store_true", help="CSV instead of a Markdown table")
    args = p.parse_args(argv)
    try:
        files = json_files(args.data_file)
    except NoDataError as e:
        hint = "run the tests with --cov first (see this script's docstring)"
        print(f"coverage_by_package: {args.data_file}: {e} {hint}", file=sys.stderr)
        return 2
    print(table(by_package(files), csv=args.csv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
