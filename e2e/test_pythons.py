"""Every CPython the README promises (3.10–3.13), judged by our own suites.

- ``test_version_flag``: ``pulumi_backend.py --version`` under each version
  with warnings as errors: under 3.10 it proves the module has no newer syntax
  (it compiles the whole module), under 3.13 no deprecated import-time call;
- ``test_unit_suite``: ``test_pulumi_backend.py`` under each version other than
  the one running pytest (that one runs it already);
- ``test_core_scenarios``: the real-CLI ``core`` scenarios of ``test_cli.py``
  (newest CLI) under the oldest and the newest version, the server and the
  Automation API programs running on that Python too.

The runs start when collection ends (conftest.py), 3 at a time, and overlap the
rest of the session (they mostly wait on the CLI and on the unit suite's lease
timers); each test waits for its own. A
version not on the machine skips with a message; one found without its
virtualenv (``bash e2e/setup.sh``) fails under PULUMI_BACKEND_E2E_REQUIRED=1.
"""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import pythons
from conftest import CLI_VERSIONS, E2E_DIR, SERVER_SCRIPT, unavailable

ROOT = E2E_DIR.parent
RUNNING = f"{sys.version_info[0]}.{sys.version_info[1]}"
FOUND = [m for m in pythons.MINORS if pythons.find(m)]
# The oldest and newest found, but not the one running: this run covers that one.
EDGES = sorted({FOUND[0], FOUND[-1]} - {RUNNING}) if FOUND else []
RUN_TIMEOUT = 1200  # seconds for one suite run


def _suite_runs():
    """{(suite, minor): argv} of the runs this module makes."""
    runs = {("unit", m): ["-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(ROOT / "test_pulumi_backend.py")]
            for m in FOUND if m != RUNNING}
    for m in EDGES:
        runs[("core", m)] = ["-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(E2E_DIR / "test_cli.py"), "-m", "core",
                             "-k", CLI_VERSIONS[0]]
    return runs


def _run(python, args):
    env = dict(os.environ, PULUMI_BACKEND_E2E_REQUIRED="1")
    env.pop("PULUMI_BACKEND_MATRIX_OUT", None)  # the matrix is of CLI versions, not Pythons
    return subprocess.run([str(python), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL)


_POOL = ThreadPoolExecutor(max_workers=3)
_STARTED: dict = {}  # (suite, minor) -> Future of CompletedProcess
SUITES = {"test_unit_suite": "unit", "test_core_scenarios": "core"}


def start_runs(keys):
    """Start the runs of ``keys`` ((suite, minor) pairs), 3 at a time. conftest.py
    calls this as soon as collection ends: the runs mostly wait (on lease timers,
    on the CLI), so they overlap the rest of the session."""
    for key in sorted(keys, key=lambda k: k[0] != "unit"):
        args = _suite_runs().get(key)
        if args and key not in _STARTED and pythons.venv_python(key[1]).exists():
            _STARTED[key] = _POOL.submit(_run, pythons.venv_python(key[1]), args)


@pytest.fixture(scope="module")
def runs():
    return _STARTED  # started by conftest.py's pytest_collection_finish


def _result(runs, suite, minor):
    if not pythons.find(minor):
        pytest.skip(f"CPython {minor} is not on this machine (pyenv versions or PATH)")
    if (suite, minor) not in runs:
        unavailable(f"no virtualenv {pythons.venv_python(minor)} for CPython {minor}")
    proc = runs[(suite, minor)].result()
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    assert proc.returncode == 0, f"{suite} suite failed under CPython {minor}:\n{tail}"
    print(f"CPython {minor} {suite}: {proc.stdout.strip().splitlines()[-1]}")
    return proc


@pytest.mark.parametrize("minor", pythons.MINORS)
def test_version_flag(minor):
    python = pythons.find(minor)
    if not python:
        pytest.skip(f"CPython {minor} is not on this machine (pyenv versions or PATH)")
    proc = subprocess.run([str(python), "-W", "error", str(SERVER_SCRIPT), "--version"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("pulumi-backend "), proc.stdout
    assert proc.stderr == ""


@pytest.mark.parametrize("minor", [m for m in pythons.MINORS if m != RUNNING])
def test_unit_suite(runs, minor):
    proc = _result(runs, "unit", minor)
    assert " passed" in proc.stdout and " failed" not in proc.stdout


@pytest.mark.parametrize("minor", EDGES or [pythons.MINORS[0]])
def test_core_scenarios(runs, minor):
    proc = _result(runs, "core", minor)
    # Every core scenario ran: none skipped for a missing CLI or SDK.
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
