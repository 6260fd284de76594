"""Check the import contracts of pyproject.toml ([tool.importlinter]) with import-linter.

genprior.callbacks and genprior.datamodules live at the repository root (the design card's
layout) and are mapped into the package at install time, where import-linter's module finder
(grimp), which walks the package's folder, cannot see them. This script assembles the package
as it is installed, out of symbolic links in a temporary folder, puts that folder first on the
import path and runs ``lint-imports`` on it. Exit status: import-linter's (0: contracts kept).

    python scripts/lint_imports.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the package-dir mapping of pyproject.toml: installed name -> folder in the repository
MAPPED = {"callbacks": REPO / "callbacks", "datamodules": REPO / "datamodules", "configs": REPO / "configs"}


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="genprior-imports-") as tmp:
        package = Path(tmp) / "genprior"
        package.mkdir()
        for entry in (REPO / "src" / "genprior").iterdir():
            if entry.name != "__pycache__":
                (package / entry.name).symlink_to(entry)
        for name, folder in MAPPED.items():
            (package / name).symlink_to(folder)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([tmp, os.environ.get("PYTHONPATH", "")])}
        lint = Path(sys.executable).with_name("lint-imports")
        command = [str(lint)] if lint.exists() else [sys.executable, "-m", "importlinter.cli"]
        return subprocess.call([*command, str(REPO / "pyproject.toml")], cwd=REPO, env=env)


if __name__ == "__main__":
    sys.exit(main())
