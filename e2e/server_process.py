"""pulumi_backend.py as a subprocess, for the e2e tests and the benchmarks (stdlib only)."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

SERVER_SCRIPT = Path(__file__).resolve().parent.parent / "pulumi_backend.py"


class ServerProcess:
    """pulumi_backend.py running as a subprocess; restart() keeps db and port.

    args: extra command-line flags (e.g. ``--auth-token``, ``--lease-seconds``);
    token: the API token request() sends; cafile: the certificate to trust
    when the server serves https (``--tls-cert``); db: the database (default
    ``backend.db`` in ``directory``).
    """

    #: Flags every start gets before ``args``.
    base_args: tuple = ()
    #: The script started (bench_cli.py's ``instant`` backend starts instant_server.py).
    script: Path = SERVER_SCRIPT

    def __init__(self, directory, args=(), token="", cafile=None, db=None):
        self.db = db or directory / "backend.db"  # db: e.g. a postgresql:// URL
        self.log = directory / "server.log"
        self.args, self.token, self.cafile = list(args), token, cafile
        self.port = 0
        self.proc = None
        self.url = None

    def start(self):
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(self.script), "--db", str(self.db),
                 "--host", "127.0.0.1", "--port", str(self.port), *self.base_args, *self.args],
                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                env={k: v for k, v in os.environ.items() if not k.startswith("PULUMI_")})
        timer = threading.Timer(30, self.proc.kill)
        timer.start()
        line = self.proc.stdout.readline().decode(errors="replace").strip()
        timer.cancel()
        match = re.fullmatch(r"pulumi-backend listening on (https?://127\.0\.0\.1:(\d+))", line)
        if not match:
            self.kill()
            raise RuntimeError(f"server did not start: first line {line!r}\n{self.log_tail()}")
        self.url, self.port = match[1], int(match[2])

    def stop(self):
        """SIGTERM (the server drains in-flight requests) and wait for the exit."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.proc.stdout.close()

    def kill(self):
        """SIGKILL: no draining, no clean shutdown of the database."""
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()

    def restart(self):
        self.stop()
        self.start()

    def request(self, method, path, body=None):
        """Return (status, body bytes) of one API call made with the test token."""
        req = urllib.request.Request(
            self.url + path, method=method, data=body,
            headers={"Authorization": f"token {self.token}",
                     "Accept": "application/vnd.pulumi+8",
                     "Content-Type": "application/json"})
        context = None
        if self.url.startswith("https:"):
            import ssl
            context = ssl.create_default_context(cafile=str(self.cafile) if self.cafile else None)
        try:
            with urllib.request.urlopen(req, timeout=30, context=context) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get(self, path):
        """GET path and return the parsed JSON; an error status fails the test."""
        status, body = self.request("GET", path)
        assert status == 200, f"GET {path}: {status} {body[:500]!r}"
        return json.loads(body)

    def log_tail(self, lines=40):
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- the process's own figures, from /proc (Linux) --------------------------

    def cpu_seconds(self) -> float:
        """utime + stime of the server process so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def reset_peak(self) -> None:
        """Reset VmHWM (Linux 4.0+), so that the next reading is one operation's peak."""
        try:
            with open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass  # the peak so far, then

    def peak_rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return 0.0
