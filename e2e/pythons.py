"""The CPython 3.10–3.13 interpreters on this machine and their test virtualenvs (stdlib only).

    python3 e2e/pythons.py        prints "MINOR INTERPRETER" for each one found

An interpreter is taken from the pyenv versions folder (``$PYENV_ROOT``,
default ``~/.pyenv``; the newest patch release of each minor) or else from
``PATH`` (pyenv's shims excluded: they fail for versions not selected).
``e2e/setup.sh`` makes a virtualenv beside the main one for each
(``~/.cache/pulumi-backend-venv-py3.10`` ...) with pytest and the pulumi SDK;
``e2e/test_pythons.py`` runs the suites under them.
"""

import os
import re
import sys
from pathlib import Path

MINORS = ("3.10", "3.11", "3.12", "3.13")  # what the README promises


def find(minor):
    """The path of CPython ``minor`` (e.g. "3.10"), or None."""
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    releases = [p for p in root.glob(f"{minor}.*/bin/python{minor}")
                if re.fullmatch(r"\d+\.\d+\.\d+", p.parent.parent.name) and os.access(p, os.X_OK)]
    if releases:
        return max(releases, key=lambda p: tuple(map(int, p.parent.parent.name.split("."))))
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder) / f"python{minor}"
        if folder and "shims" not in Path(folder).parts and os.access(candidate, os.X_OK):
            return candidate
    return None


def venv_python(minor):
    """The python of the test virtualenv for ``minor`` (it may not exist yet)."""
    main = os.environ.get("PULUMI_BACKEND_VENV") or str(Path.home() / ".cache/pulumi-backend-venv")
    return Path(f"{main}-py{minor}") / "bin" / "python"


if __name__ == "__main__":
    for m in MINORS:
        path = find(m)
        if path:
            print(m, path)
        else:
            print(f"pythons.py: CPython {m} not found (pyenv versions or PATH): skipped",
                  file=sys.stderr)
