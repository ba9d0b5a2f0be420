"""A throwaway PostgreSQL server for the tests of the PostgreSQL store.

``initdb`` and ``pg_ctl`` from the machine's packages (``/usr/lib/postgresql/*/bin``,
installed by e2e/setup.sh) build a cluster in a temporary folder, owned by an
unprivileged user when we run as root (initdb refuses root), listening on
127.0.0.1 on a free port with trust authentication. One server per test
session, shared by test_pulumi_backend.py and e2e/ (the ``postgres`` fixture),
stopped when the session ends; every test gets its own database.

Missing server binaries or psycopg: the tests skip with a hint, or fail when
PULUMI_BACKEND_E2E_REQUIRED=1 (CI).
"""

import atexit
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile

import pytest

SETUP_HINT = 'bash e2e/setup.sh (PostgreSQL server packages, psycopg[binary], psycopg-pool)'
RUN_AS = "nobody"  # an unprivileged user every Debian system has
_server = None
_names = itertools.count(1)


def _missing(what):
    if os.environ.get("PULUMI_BACKEND_E2E_REQUIRED") == "1":
        pytest.fail(f"{what}: run {SETUP_HINT}", pytrace=False)
    pytest.skip(f"{what}: run {SETUP_HINT}")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One cluster in ``root``; ``url(db)`` connects as the superuser ``postgres``."""

    def __init__(self, bindir, durable=False):
        self.bindir = bindir
        # As root the cluster belongs to RUN_AS, who must reach the folder: /tmp, not a
        # TMPDIR that may sit in root's home.
        self.root = tempfile.mkdtemp(prefix="pulumi-backend-pg-",
                                     dir="/tmp" if os.geteuid() == 0 else None)
        self.data = os.path.join(self.root, "data")
        self.port = _free_port()
        self.user = None
        if os.geteuid() == 0:
            self.user = RUN_AS
            pw = pwd.getpwnam(RUN_AS)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200"
        if not durable:  # tests: no fsync (benchmarks pass durable=True)
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", self.data, "-l", os.path.join(self.root, "log"), "-o", opts,
                  "-w", "-t", "60", "start")

    def _run(self, tool, *args):
        cmd = [os.path.join(self.bindir, tool), *args]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=self.root)
        if out.returncode:
            raise RuntimeError(f"{tool} failed: {out.stderr or out.stdout}")

    def url(self, db="postgres"):
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def sql(self, statement, db="postgres"):
        import psycopg
        with psycopg.connect(self.url(db), autocommit=True) as conn:
            cur = conn.execute(statement)
            return cur.fetchall() if cur.description else None

    def create_database(self, prefix="t"):
        """Create an empty database; return its URL."""
        name = f"{prefix}{os.getpid()}_{next(_names)}"
        self.sql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url):
        self.sql(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')

    def stop(self):
        try:
            self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def find_bindir():
    """The newest installed server's bin folder, or None."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                  key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return os.path.dirname(bins[-1]) if bins else None


def server():
    """Return the session's server, starting it on first use (skips when impossible)."""
    global _server
    if _server is None:
        try:
            import psycopg  # noqa: F401
            import psycopg_pool  # noqa: F401
        except ImportError as e:
            _missing(f"{e.name} is not installed")
        bindir = find_bindir()
        if bindir is None:
            _missing("no PostgreSQL server (initdb) under /usr/lib/postgresql")
        _server = PostgresServer(bindir)
        atexit.register(_server.stop)
    return _server


@pytest.fixture
def pg_url():
    """A fresh, empty PostgreSQL database for one test (dropped afterwards)."""
    srv = server()
    url = srv.create_database()
    yield url
    srv.drop_database(url)
