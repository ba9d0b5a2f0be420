"""Fixtures for the end-to-end tests that drive the real `pulumi` CLI.

- ``cli``: the CLI binary of one version (tests marked ``core`` run on every
  version in CLI_VERSIONS, the others on the newest only; ids say ``cli=vX``).
  Core tests run once more on the versions of JOURNAL_OPT_IN with
  ``PULUMI_ENABLE_JOURNALING=true`` (ids ``cli=vX+journal``).
- ``server``: pulumi_backend.py as a subprocess on a temporary database and a
  free port, one per test module.
- ``make_server``: a factory of fresh servers for one test, with extra flags
  (``--auth-token``, ``--tls-cert``, ...); ``e2e.use_server(srv)`` points a
  sandbox at one. Tests that kill, restart or flood a server use their own.
- ``e2e``: a per-test sandbox (its own PULUMI_HOME, project folder and
  environment) with helpers to run the CLI and Automation API programs.

Missing CLI or pulumi SDK: the tests skip with a hint (``bash e2e/setup.sh``),
or fail when PULUMI_BACKEND_E2E_REQUIRED=1.
"""

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

E2E_DIR = Path(__file__).resolve().parent
# Newest first; the newest runs every scenario. Keep in step with setup.sh.
#   v3.276.0  newest on the module proxy: journal version 2 (state migrations)
#   v3.260.0  `stack migrate` (v3.254.0, its first, is not on the proxy)
#   v3.224.0  last without journaling by default
#   v3.214.0  batched journaling, opt-in
#   v3.205.0  journaling opt-in, one entry per request
#   v3.182.0  checkpoints only (verbatim and delta). Older ones do not fit: v3.181.0's
#             pkg module needs sdk types of a later release (it does not compile); v3.106.0 and
#             before fail to link with Go 1.26 (pgavlin/text's go:linkname to
#             internal/bytealg); with v3.163.0 the SDK's Automation API refuses inline
#             refresh/destroy (it needs 3.181) and unqualified stacks go to the user's
#             login (the default-organization call came in v3.165)
CLI_VERSIONS = ("v3.276.0", "v3.260.0", "v3.224.0", "v3.214.0", "v3.205.0", "v3.182.0")
# Versions whose journaling is opt-in (PULUMI_ENABLE_JOURNALING=true, v3.204-v3.224).
JOURNAL_OPT_IN = ("v3.224.0", "v3.214.0", "v3.205.0")
TOKEN = "e2e-token"
ORG = "organization"
TEST_TIMEOUT = 300  # seconds; CLI processes of a test still running then are killed
BUILD_WAIT = 3600  # seconds to wait for a CLI that setup.sh builds in the background
# States over this many bytes go to the server as delta checkpoints (non-journal
# CLIs), smaller ones verbatim: small enough that the tests exercise both paths.
CHECKPOINT_CUTOFF = 4096

sys.path.insert(0, str(E2E_DIR))  # e2e_programs, for tests and the provider's unpickling

import matrix  # noqa: E402
from server_process import SERVER_SCRIPT, ServerProcess  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "core: scenario also runs on the older CLI versions")
    config.addinivalue_line("markers", "timeout_seconds(n): the e2e watchdog's limit for a test")
    config.addinivalue_line("markers", "cli_versions(*versions): run on exactly these CLI versions")


def pytest_generate_tests(metafunc):
    if "cli" in metafunc.fixturenames:
        core = metafunc.definition.get_closest_marker("core")
        versions = CLI_VERSIONS[:1]
        if core:
            versions = CLI_VERSIONS + tuple(f"{v}+journal" for v in JOURNAL_OPT_IN)
        only = metafunc.definition.get_closest_marker("cli_versions")
        if only:
            versions = tuple(v for v in CLI_VERSIONS if v in only.args)
        metafunc.parametrize("cli", versions, ids=[f"cli={v}" for v in versions],
                             indirect=True, scope="module")


def pytest_collection_finish(session):
    """Start the suite runs of test_pythons.py now (see its start_runs)."""
    if session.config.option.collectonly:
        return
    selected = [i for i in session.items if getattr(i, "originalname", "") in (
        "test_unit_suite", "test_core_scenarios") and i.module.__name__.endswith("test_pythons")]
    if selected:
        module = selected[0].module
        module.start_runs({(module.SUITES[i.originalname], i.callspec.params["minor"])
                           for i in selected})


def pytest_collection_modifyitems(items):
    """Tests of the older CLIs last (stable): their CLIs may still be building."""
    def older(item):
        param = getattr(getattr(item, "callspec", None), "params", {}).get("cli", CLI_VERSIONS[0])
        return param != CLI_VERSIONS[0]
    items.sort(key=older)


def journal_entries(rows):
    """The entries of an update's stored journal rows ``(batch, data)`` in row order: a
    row holds a batch as the CLI sent it (gzip or not), or, from servers before
    schema 4, one entry."""
    entries = []
    for batch, data in rows:
        data = bytes(data)
        if not batch:
            entries.append(json.loads(data))
        else:
            entries += json.loads(gzip.decompress(data) if data[:2] == b"\x1f\x8b"
                                  else data)["entries"]
    return entries


def wait_for(predicate, what, timeout=90, step=0.05):
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(step)


def unavailable(what):
    """Skip (or fail under PULUMI_BACKEND_E2E_REQUIRED=1) for a missing prerequisite."""
    message = f"{what}; run `bash e2e/setup.sh` and use its virtualenv's python"
    if os.environ.get("PULUMI_BACKEND_E2E_REQUIRED") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def cli_binary(version):
    cache = os.environ.get("PULUMI_BACKEND_CLI_CACHE") or Path.home() / ".cache/pulumi-backend-cli"
    return Path(cache) / version / "pulumi"


def wait_for_build(binary, timeout=BUILD_WAIT):
    """While setup.sh builds this CLI in the background (a ``building`` file
    beside it names the live builder), wait for the binary."""
    marker = binary.parent / "building"
    deadline = time.monotonic() + timeout
    while not os.access(binary, os.X_OK) and time.monotonic() < deadline:
        try:
            os.kill(int(marker.read_text()), 0)
        except (OSError, ValueError):
            return  # no build running (or a stale marker)
        time.sleep(5)


class Cli:
    """One CLI version: the binary and the Automation API's PulumiCommand for it;
    ``journaling``: run it with PULUMI_ENABLE_JOURNALING=true (an opt-in version)."""

    def __init__(self, version, binary, root, journaling=False):
        from pulumi import automation as auto

        self.version, self.binary, self.root = version, binary, root
        self.journaling = journaling
        (root / "bin").mkdir(parents=True)
        (root / "bin" / "pulumi").symlink_to(binary)  # PulumiCommand wants ROOT/bin/pulumi
        self.command = auto.PulumiCommand(root=str(root))


@pytest.fixture(scope="module")
def cli(request, tmp_path_factory):
    version, _, variant = request.param.partition("+")
    binary = cli_binary(version)
    wait_for_build(binary)
    if not os.access(binary, os.X_OK):
        unavailable(f"pulumi CLI {version} not built at {binary}")
    try:
        import pulumi.automation  # noqa: F401
    except ImportError:
        unavailable("the pulumi Python SDK is not installed")
    return Cli(version, binary, tmp_path_factory.mktemp(f"cli-{version}"),
               journaling=variant == "journal")


class Server(ServerProcess):
    """The tests' server: small states already go as delta checkpoints (see CHECKPOINT_CUTOFF)."""

    base_args = ("--checkpoint-cutoff", str(CHECKPOINT_CUTOFF))

    def __init__(self, directory, args=(), token=TOKEN, cafile=None, db=None):
        super().__init__(directory, args, token=token, cafile=cafile, db=db)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not SERVER_SCRIPT.exists():
        unavailable(f"{SERVER_SCRIPT} does not exist")
    srv = Server(tmp_path_factory.mktemp("server"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def make_server(tmp_path_factory):
    """A factory of fresh servers for one test: ``make_server(*flags, token=..., cafile=...)``.

    Each gets its own database and port; all are stopped when the test ends.
    Switch a sandbox to one with ``e2e.use_server(srv)``.
    """
    if not SERVER_SCRIPT.exists():
        unavailable(f"{SERVER_SCRIPT} does not exist")
    started = []

    def make(*args, token=TOKEN, cafile=None):
        srv = Server(tmp_path_factory.mktemp("server"), args, token=token, cafile=cafile)
        started.append(srv)
        srv.start()
        return srv

    yield make
    for srv in started:
        srv.stop()


class E2E:
    """A test's sandbox: PULUMI_HOME, a project folder (``work``) and helpers."""

    def __init__(self, cli, server, tmp, project):
        self.cli, self.server, self.project = cli, server, project
        self.timed_out = False  # set by the watchdog
        self.work, self.files = tmp / "work", tmp / "files"
        self.work.mkdir()
        self.files.mkdir()
        (self.work / "Pulumi.yaml").write_text(f"name: {project}\nruntime: python\n")
        self.env = {
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), str(cli.binary.parent),
                                     str(E2E_DIR / "bin"), "/usr/local/bin", "/usr/bin", "/bin"]),
            "HOME": str(tmp),
            "TMPDIR": tempfile.gettempdir(),
            "PYTHONPATH": str(E2E_DIR),
            "PULUMI_HOME": str(tmp / "pulumi-home"),
            "PULUMI_SKIP_UPDATE_CHECK": "true",
            "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
            "PULUMI_BACKEND_URL": server.url,
            "PULUMI_ACCESS_TOKEN": TOKEN,
            "E2E_SANDBOX": str(tmp),  # marks this test's processes for the watchdog
        }
        if cli.journaling:
            self.env["PULUMI_ENABLE_JOURNALING"] = "true"

    def use_server(self, server, token=None):
        """Point this sandbox's CLI (and the Automation API) at another server.

        token: the PULUMI_ACCESS_TOKEN to send (default: the server's own token).
        An https server's certificate is trusted through SSL_CERT_FILE.
        """
        self.server = server
        self.env["PULUMI_BACKEND_URL"] = server.url
        self.env["PULUMI_ACCESS_TOKEN"] = token or server.token
        if server.cafile:
            self.env["SSL_CERT_FILE"] = str(server.cafile)
        else:
            self.env.pop("SSL_CERT_FILE", None)

    # -- the CLI -------------------------------------------------------------
    def run(self, *args, check=True, timeout=180):
        """Run `pulumi --non-interactive --cwd WORK ARGS`; return the CompletedProcess."""
        cmd = [str(self.cli.binary), "--non-interactive", "--cwd", str(self.work), *args]
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            pytest.fail(self.explain(f"`pulumi {' '.join(args)}` exited {proc.returncode}",
                                     proc.stdout, proc.stderr), pytrace=False)
        return proc

    def fails(self, *args, match):
        """Run a command that must fail with `match` (a regex) in its output."""
        proc = self.run(*args, check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, self.explain(f"`pulumi {' '.join(args)}` succeeded", out)
        assert re.search(match, out), self.explain(f"no {match!r} in the output", out)
        return out

    def explain(self, what, *outputs):
        text = "\n".join(o for o in outputs if o)
        if self.timed_out:
            what += " (killed by the watchdog: the test ran too long)"
        return f"{what}\n--- CLI output ---\n{text}\n--- server log (tail) ---\n{self.server.log_tail()}"

    # -- the Automation API --------------------------------------------------
    def stack(self, name, spec=None, create=True):
        """An Automation API stack in this project, created or selected."""
        from pulumi import automation as auto
        import e2e_programs

        opts = auto.LocalWorkspaceOptions(
            work_dir=str(self.work), pulumi_home=self.env["PULUMI_HOME"],
            env_vars=self.env, pulumi_command=self.cli.command)
        make = auto.create_stack if create else auto.select_stack
        return make(name, self.project, e2e_programs.build(spec or {}), opts=opts)

    def up(self, stack, spec, **kw):
        """`up` with the program of spec; returns resource_changes (a dict)."""
        import e2e_programs

        return self.call(stack.up, program=e2e_programs.build(spec), **kw).summary.resource_changes

    def call(self, fn, *args, **kw):
        """fn(*args, **kw); a CommandError fails the test with the CLI's output."""
        from pulumi import automation as auto

        try:
            return fn(*args, **kw)
        except auto.errors.CommandError as e:
            pytest.fail(self.explain(f"automation {fn.__name__} failed", str(e)), pytrace=False)

    def spawn(self, op, stack, spec):
        """Start `op` (up/refresh/destroy) on a stack in a child process; return the Popen."""
        job = {"op": op, "stack": stack, "project": self.project, "work_dir": str(self.work),
               "cli_root": str(self.cli.root),
               "env": self.env, "spec": spec}
        path = Path(self.env["HOME"]) / f"job-{stack}-{op}-{os.urandom(4).hex()}.json"
        path.write_text(json.dumps(job))
        return subprocess.Popen([sys.executable, str(E2E_DIR / "e2e_programs.py"), str(path)],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, stdin=subprocess.DEVNULL)

    # -- the server's view ---------------------------------------------------
    def path(self, stack):
        return f"/api/stacks/{ORG}/{self.project}/{stack}"

    def export(self, stack, version=None):
        """The server's deployment of a stack (GET .../export[/version])."""
        return self.server.get(self.path(stack) + "/export" + (f"/{version}" if version else ""))

    def resources(self, stack):
        return self.export(stack)["deployment"].get("resources") or []


def log_size(server):
    try:
        return server.log.stat().st_size
    except OSError:
        return 0


def _timeout(sandbox, marker):
    sandbox.timed_out = True
    _kill_marked(marker)


def _kill_marked(marker):
    """Kill the processes whose environment carries E2E_SANDBOX=marker."""
    needle = f"E2E_SANDBOX={marker}\0".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read() and int(pid) != os.getpid():
                    os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


@pytest.fixture
def e2e(cli, server, tmp_path, request, monkeypatch):
    matrix_out = os.environ.get("PULUMI_BACKEND_MATRIX_OUT")
    # The Automation API starts the CLI with os.environ overlaid by our env:
    # keep the outer PULUMI_* variables out of it.
    for key in list(os.environ):
        if key.startswith("PULUMI_"):
            monkeypatch.delenv(key)
    if server.proc is None or server.proc.poll() is not None:
        server.start()  # an earlier test stopped or killed the module's server: same db and port
    project = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-")[:90]
    sandbox = E2E(cli, server, tmp_path, project)
    limit = getattr(request.node.get_closest_marker("timeout_seconds"), "args", [TEST_TIMEOUT])[0]
    watchdog = threading.Timer(limit, _timeout, [sandbox, str(tmp_path)])
    watchdog.start()
    # The matrix is of one server process per CLI (not of test_replicas' cluster).
    recorded = matrix_out and isinstance(server, ServerProcess)
    before = (matrix.counters(server), log_size(server)) if recorded else None
    yield sandbox
    watchdog.cancel()
    if before and server.proc and server.proc.poll() is None:  # the module's server
        with open(server.log, "rb") as f:
            f.seek(before[1])
            log_text = f.read().decode(errors="replace")
        seen = matrix.protocols(before[0], matrix.counters(server), log_text)
        matrix.record(matrix_out, request.node.originalname, request.node.callspec.id, seen)
    _kill_marked(str(tmp_path))  # children left by a failed test (spawned ups)
