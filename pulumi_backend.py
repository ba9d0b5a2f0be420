#!/usr/bin/env python3
"""pulumi-backend: a self-hosted Pulumi Cloud state backend in one stdlib module.

The real ``pulumi`` CLI logs in to this server (``pulumi login http://HOST:PORT``)
and keeps its stacks, state, history and secrets here, exactly as it would with
Pulumi Cloud.

Run::

    python pulumi_backend.py --db state.db            # serve on 127.0.0.1:8080
    python pulumi_backend.py --help                   # every flag
    python pulumi_backend.py backup --db state.db OUT # online, consistent copy
    python pulumi_backend.py restore --db state.db IN # with the server stopped
    python pulumi_backend.py rotate-master-key --db state.db --new-key-file NEW

Besides the Pulumi Cloud API it serves ``/healthz``, ``/readyz`` and
``/metrics`` (Prometheus) without a token. SIGTERM or SIGINT drains in-flight
requests for up to ``--shutdown-timeout`` seconds, then stops.

Every flag can also be given as an environment variable: ``--db`` is
``PULUMI_BACKEND_DB``, ``--auth-token`` is ``PULUMI_BACKEND_AUTH_TOKEN`` and so on
(upper case, dashes become underscores). A flag wins over its variable.
``PULUMI_BACKEND_MASTER_KEY`` (base64, 32 bytes) may hold the master key
instead of ``--master-key-file``; ``PULUMI_BACKEND_LIBCRYPTO`` names the
libcrypto to load.

Security notes: with no ``--auth-token`` configured any token is accepted, which
is only allowed while bound to a loopback address. Secrets are AES-256-GCM with
a data key per stack, wrapped by a master key kept outside the database. Tokens,
secrets and plaintexts are never logged.

Sections:
  1. Constants and limits
  2. Configuration
  3. Errors
  4. Small utilities
  5. Storage (Store interface, SQLite implementation)
  6. Engine (stacks, update leases, checkpoints, journal replay, events)
  7. Crypto (OpenSSL binding, pure-Python fallback, key management)
  8. Request, response and router
  9. Handlers, by API area
 10. Server lifecycle and main()
"""

from __future__ import annotations

import argparse
import base64
import bisect
import collections
import contextlib
import copy
import ctypes
import ctypes.util
import dataclasses
import datetime
import functools
import gzip
import hashlib
import hmac
import http.server
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import select
import signal
import socket
import sqlite3
import sys
import threading
import time
import urllib.parse
import uuid
import zlib
from typing import Any, Callable, Iterable, Optional

try:  # Unix: one server per database, enforced with a lock file
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "Config", "build_parser", "parse_config",
    "HTTPError", "BadRequest", "Unauthorized", "Forbidden", "NotFound", "MethodNotAllowed",
    "Conflict", "RequestTimeout", "LengthRequired", "PayloadTooLarge", "Unavailable",
    "Store", "SQLiteStore",
    "Engine", "apply_delta", "replay_journal",
    "Crypto", "KeyManager", "Metrics",
    "Request", "Response", "Router", "App",
    "Server", "build_app", "serve", "backup_database", "restore_database", "rotate_master_key",
    "main",
]

__version__ = "0.1.0"

# ==== 1. Constants and limits ===============================================

#: Default SQLite database path.
DEFAULT_DB = "pulumi-backend.db"
#: Default bind address; loopback so that a fresh server is not exposed.
DEFAULT_HOST = "127.0.0.1"
#: Default TCP port.
DEFAULT_PORT = 8080
#: Name of the single organization this server hosts.
DEFAULT_ORG = "organization"
#: Login name of the single user.
DEFAULT_USER = "admin"
#: Largest request body accepted on the wire (bytes).
DEFAULT_MAX_BODY = 256 * 1024 * 1024
#: Largest body after gzip decompression (bytes); stops gzip bombs.
DEFAULT_MAX_DECOMPRESSED = 1024 * 1024 * 1024
#: How long a lease token lives without renewal (seconds); the CLI assumes 300.
DEFAULT_LEASE_SECONDS = 300
#: Versions of a stack kept for history and export/{version}.
DEFAULT_HISTORY_LIMIT = 50
#: States at least this large (bytes) are uploaded as deltas by the CLI.
DEFAULT_CHECKPOINT_CUTOFF = 1024 * 1024
#: Every this many deltas the whole checkpoint is stored, so that rebuilding it
#: from SQLite (after a restart) applies at most this many deltas.
DELTA_CHAIN_LIMIT = 64
#: Bytes of working checkpoints kept in memory for delta application.
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
#: Idle or slow clients are disconnected after this many seconds.
DEFAULT_SOCKET_TIMEOUT = 120.0
#: Seconds a /readyz write probe's outcome is reused.
READY_CHECK_SECONDS = 2.0
#: Seconds a stopping server waits for in-flight requests before closing them.
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
#: Concurrent connections served at once; more are refused with 503.
DEFAULT_MAX_CONNECTIONS = 256
#: Stacks per page of GET /api/user/stacks.
STACK_PAGE_SIZE = 100
#: Events per page of GET .../events.
EVENT_PAGE_SIZE = 1000
#: Responses smaller than this are never gzip-compressed.
GZIP_MIN_RESPONSE = 1024
#: Items per batch-encrypt/decrypt request (the CLI sends at most 1000).
MAX_BATCH_ITEMS = 10000
#: SQLite busy timeout (milliseconds).
BUSY_TIMEOUT_MS = 30000
#: Deployment schema versions this server stores and serves.
MAX_DEPLOYMENT_VERSION = 4
#: Features a version-4 deployment may declare (the CLI refuses others).
KNOWN_FEATURES = frozenset({
    "refreshBeforeUpdate", "views", "hooks", "taint", "replaceWith",
    "snippets-prototype", "extensionParameterization", "byteString",
})
#: Message the Automation API matches to detect concurrent updates.
MSG_UPDATE_CONFLICT = "Conflict: Another update is currently in progress."
#: Message the CLI matches to suggest --force on stack rm.
MSG_STACK_HAS_RESOURCES = "Bad Request: Stack still contains resources."

_NAME_RE = re.compile(r"^(?!\.\.?\Z)[A-Za-z0-9_.-]{1,100}\Z")
_ORG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,38}[A-Za-z0-9]\Z|^[A-Za-z0-9]\Z")
_TAG_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,40}\Z")
_SHA256_HEX_RE = re.compile(r"[0-9a-fA-F]{64}")
_UPDATE_KINDS = ("update", "preview", "refresh", "destroy")
_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_STACK_TYPE = "pulumi:pulumi:Stack"
#: Newest journal-entry format we replay: 2 adds state-migration entries (kind 10).
JOURNAL_VERSION = 2


# ==== 2. Configuration ======================================================

@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the server can be told. Defaults < PULUMI_BACKEND_* < flags."""

    db: str = DEFAULT_DB
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    log_level: str = "info"
    log_format: str = "text"
    org: str = DEFAULT_ORG
    user: str = DEFAULT_USER
    auth_tokens: tuple = ()
    allow_any_token: bool = False
    master_key_file: str = ""
    master_key: bytes = b""
    crypto: str = "auto"
    journaling: bool = True
    checkpoint_cutoff: int = DEFAULT_CHECKPOINT_CUTOFF
    history_limit: int = DEFAULT_HISTORY_LIMIT
    lease_seconds: int = DEFAULT_LEASE_SECONDS
    max_body: int = DEFAULT_MAX_BODY
    max_decompressed: int = DEFAULT_MAX_DECOMPRESSED
    cache_bytes: int = DEFAULT_CACHE_BYTES
    socket_timeout: float = DEFAULT_SOCKET_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    tls_cert: str = ""
    tls_key: str = ""
    public_url: str = ""

    def key_file(self) -> str:
        """Return the master key path: the flag, or ``<db>.key`` beside the database."""
        return self.master_key_file or (os.path.abspath(self.db) + ".key")


def _flag(parser: argparse.ArgumentParser, name: str, help_text: str, **kw: Any) -> None:
    """Add ``--name`` whose default comes from ``PULUMI_BACKEND_NAME`` when set."""
    env = "PULUMI_BACKEND_" + name.upper().replace("-", "_")
    parser.add_argument("--" + name, help=f"{help_text} [env {env}]", **kw)


class _Parser(argparse.ArgumentParser):
    """argparse that raises ValueError, so main() prints one line instead of usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(message)


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser (flags only; environment is merged in parse_config)."""
    p = _Parser(
        prog="pulumi_backend.py",
        description="Self-hosted Pulumi Cloud state backend. `pulumi login http://HOST:PORT`.")
    p.add_argument("command", nargs="?", default="serve",
                   choices=("serve", "backup", "restore", "rotate-master-key"),
                   help="serve (default); backup OUT (online copy of --db); restore BACKUP "
                        "(into --db, server stopped); rotate-master-key")
    p.add_argument("file", nargs="?", help="backup: the file to write; restore: the backup to read")
    p.add_argument("--version", action="version", version=f"pulumi-backend {__version__}")
    _flag(p, "db", f"SQLite database path (default {DEFAULT_DB})")
    _flag(p, "host", f"address to bind (default {DEFAULT_HOST})")
    _flag(p, "port", f"TCP port, 0 picks a free one (default {DEFAULT_PORT})", type=int)
    _flag(p, "log-level", "debug, info, warning or error (default info)")
    _flag(p, "log-format", "text or json (one JSON object per line) (default text)")
    _flag(p, "org", f"name of the single organization (default {DEFAULT_ORG})")
    _flag(p, "user", f"login name reported for the user (default {DEFAULT_USER})")
    _flag(p, "auth-token", "accepted API token; repeat or comma-separate for several",
          action="append")
    _flag(p, "auth-token-file", "file with one accepted API token per line")
    _flag(p, "allow-any-token", "accept any token on a non-loopback address (unsafe)",
          action="store_const", const="1")
    _flag(p, "master-key-file", "32-byte master key file, created 0600 if absent "
          "(default: <db>.key)")
    _flag(p, "new-key-file", "rotate-master-key: the new master key file (created if absent)")
    _flag(p, "crypto", "AES-GCM implementation: auto, openssl or python (default auto)")
    _flag(p, "journaling", "accept journaled updates from new CLIs: on or off (default on)")
    _flag(p, "checkpoint-cutoff", "states this large (bytes) go as deltas "
          f"(default {DEFAULT_CHECKPOINT_CUTOFF})", type=int)
    _flag(p, "history-limit", f"versions kept per stack (default {DEFAULT_HISTORY_LIMIT})",
          type=int)
    _flag(p, "lease-seconds", "an update whose CLI is silent this long is abandoned; the "
          f"CLI renews only every ~2.5 minutes (default {DEFAULT_LEASE_SECONDS})", type=int)
    _flag(p, "max-body", f"largest request body in bytes (default {DEFAULT_MAX_BODY})", type=int)
    _flag(p, "max-decompressed", "largest gzip-decompressed body in bytes "
          f"(default {DEFAULT_MAX_DECOMPRESSED})", type=int)
    _flag(p, "socket-timeout", f"seconds before an idle client is dropped "
          f"(default {DEFAULT_SOCKET_TIMEOUT:g})", type=float)
    _flag(p, "max-connections", f"concurrent connections (default {DEFAULT_MAX_CONNECTIONS})",
          type=int)
    _flag(p, "shutdown-timeout", "seconds a stopping server waits for in-flight requests "
          f"(default {DEFAULT_SHUTDOWN_TIMEOUT:g})", type=float)
    _flag(p, "tls-cert", "PEM certificate: serve https")
    _flag(p, "tls-key", "PEM private key for --tls-cert")
    _flag(p, "public-url", "URL users log in with, if not http(s)://HOST:PORT")
    return p


def _parse_bool(name: str, value: str) -> bool:
    low = value.strip().lower()
    if low in ("1", "true", "on", "yes"):
        return True
    if low in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"--{name} expects on or off, got {value!r}")


def parse_config(argv: list, environ: dict) -> tuple:
    """Return ``(command, Config, extras)`` from flags over environment over defaults.

    Raises ValueError with a one-line message for a bad value.
    """
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    values: dict = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "version"):
            continue
        flag_value = getattr(args, action.dest)
        if flag_value is None:
            env = environ.get("PULUMI_BACKEND_" + action.dest.upper())
            if env is None or env == "":
                continue
            flag_value = [env] if action.dest == "auth_token" else env
            if action.type is not None:
                try:
                    flag_value = action.type(env)
                except ValueError:
                    raise ValueError(f"PULUMI_BACKEND_{action.dest.upper()}: "
                                     f"not a valid number: {env!r}") from None
        values[action.dest] = flag_value

    tokens: list = []
    for item in values.pop("auth_token", None) or []:
        tokens += [t.strip() for t in item.split(",") if t.strip()]
    token_file = values.pop("auth_token_file", None)
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                tokens += [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise ValueError(f"cannot read --auth-token-file {token_file}: {e.strerror}") from None
    new_key_file = values.pop("new_key_file", None)
    kw: dict = {"auth_tokens": tuple(tokens)}
    for key, value in values.items():
        if key in ("allow_any_token", "journaling"):
            value = _parse_bool(key.replace("_", "-"), str(value))
        kw[key] = value
    if environ.get("PULUMI_BACKEND_MASTER_KEY"):
        try:
            kw["master_key"] = base64.b64decode(environ["PULUMI_BACKEND_MASTER_KEY"], validate=True)
        except ValueError:
            raise ValueError("PULUMI_BACKEND_MASTER_KEY is not valid base64") from None
        if len(kw["master_key"]) != 32:
            raise ValueError("PULUMI_BACKEND_MASTER_KEY must hold exactly 32 bytes")
    cfg = Config(**kw)
    _validate_config(cfg)
    return args.command, cfg, {"new_key_file": new_key_file, "file": args.file}


def _validate_config(cfg: Config) -> None:
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ValueError(f"--log-level must be debug, info, warning or error, not {cfg.log_level!r}")
    if cfg.log_format.lower() not in ("text", "json"):
        raise ValueError(f"--log-format must be text or json, not {cfg.log_format!r}")
    if cfg.crypto not in ("auto", "openssl", "python"):
        raise ValueError(f"--crypto must be auto, openssl or python, not {cfg.crypto!r}")
    if not 0 <= cfg.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, not {cfg.port}")
    if not _ORG_RE.match(cfg.org):
        raise ValueError(f"--org {cfg.org!r} is not a valid organization name")
    for name in ("checkpoint_cutoff", "history_limit", "lease_seconds", "max_body",
                 "max_decompressed", "max_connections"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if not cfg.socket_timeout > 0:
        raise ValueError("--socket-timeout must be more than 0 seconds")
    if not cfg.shutdown_timeout >= 0:
        raise ValueError("--shutdown-timeout must be 0 seconds or more")
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if not cfg.auth_tokens and not cfg.allow_any_token and not _is_loopback(cfg.host):
        raise ValueError(f"refusing to bind {cfg.host} without --auth-token: anyone could "
                         "read and change state (give --allow-any-token to insist)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ==== 3. Errors =============================================================

class HTTPError(Exception):
    """An error answered to the client as ``{"code": status, "message": ...}``."""

    status = 500
    reason = "Internal Server Error"

    def __init__(self, message: str = "", headers: Optional[dict] = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict:
        text = self.message
        if not text.startswith(self.reason):
            text = f"{self.reason}: {text}" if text else self.reason
        return {"code": self.status, "message": text}


class BadRequest(HTTPError):
    status, reason = 400, "Bad Request"


class Unauthorized(HTTPError):
    status, reason = 401, "Unauthorized"


class Forbidden(HTTPError):
    status, reason = 403, "Forbidden"


class NotFound(HTTPError):
    status, reason = 404, "Not Found"


class MethodNotAllowed(HTTPError):
    status, reason = 405, "Method Not Allowed"


class Conflict(HTTPError):
    status, reason = 409, "Conflict"


class LengthRequired(HTTPError):
    status, reason = 411, "Length Required"


class RequestTimeout(HTTPError):
    status, reason = 408, "Request Timeout"


class PayloadTooLarge(HTTPError):
    status, reason = 413, "Payload Too Large"


class Unavailable(HTTPError):
    status, reason = 503, "Service Unavailable"


def _storage_error(exc: sqlite3.Error) -> HTTPError:
    """Map a storage failure to the HTTP error the client should see."""
    text = str(exc).lower()
    if isinstance(exc, sqlite3.IntegrityError):
        return Conflict("the request conflicts with stored data")
    if "locked" in text or "busy" in text:
        return Unavailable("the database is busy, retry")
    if "readonly" in text or "read-only" in text or "full" in text or "disk i/o" in text:
        return Unavailable("the database cannot be written right now")
    return HTTPError("")


# ==== 4. Small utilities ====================================================

log = logging.getLogger("pulumi_backend")


class _JSONLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, message, plus an access record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
               .strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
               "level": record.levelname.lower(), "message": record.getMessage()}
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=True)


def _setup_logging(level: str, fmt: str) -> None:
    """Send the module's logger (the only one we use) to stderr as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JSONLogFormatter() if fmt.lower() == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


def _now() -> int:
    """Return the current Unix time in whole seconds."""
    return int(time.time())


def _rfc3339_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _new_id() -> str:
    """Return a fresh URL-safe identifier."""
    return uuid.uuid4().hex


def _dumps(value: Any) -> bytes:
    """Serialize to compact JSON bytes (UTF-8, non-ASCII kept as is)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _loads(data: bytes, what: str = "request body") -> Any:
    """Parse JSON bytes; raise BadRequest with a clear message on malformed input."""
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BadRequest(f"{what} is not valid JSON: {e}") from None


def _gunzip_bounded(data: bytes, limit: int) -> bytes:
    """Decompress gzip ``data`` without ever producing more than ``limit`` bytes.

    Raises PayloadTooLarge past the limit and BadRequest for corrupt input.
    """
    out = bytearray()
    try:
        while data:
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            chunk = data
            while chunk:
                out += d.decompress(chunk, limit + 1 - len(out))
                if len(out) > limit:
                    raise PayloadTooLarge(f"decompressed body exceeds {limit} bytes")
                chunk = d.unconsumed_tail
            if not d.eof:
                raise BadRequest("truncated gzip body")
            data = d.unused_data  # a concatenated gzip member may follow
    except zlib.error as e:
        raise BadRequest(f"invalid gzip body: {e}") from None
    return bytes(out)


def _gzip_bytes(data: bytes, level: int = 1) -> bytes:
    """Gzip-compress with a fixed header time, so equal inputs give equal outputs.

    Level 1 by default (every update stores its state): on state JSON it is about
    2.5-3.5 times as fast as level 6 for 5-20% more bytes.
    """
    return gzip.compress(data, compresslevel=level, mtime=0)


def _b64decode_strict(value: Any, what: str) -> bytes:
    """Decode standard padded base64 or raise BadRequest."""
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise BadRequest(f"{what} is not valid base64") from None


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _require_dict(value: Any, what: str = "request body") -> dict:
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


def _int_field(obj: dict, key: str, default: Optional[int] = None) -> int:
    """Return ``obj[key]`` as a bounded int, or default; BadRequest for a wrong type."""
    value = obj.get(key, default)
    if value is None and default is None:
        raise BadRequest(f"field {key!r} is required")
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > 2**62:
        raise BadRequest(f"field {key!r} must be an integer")
    return value


def _escape_log(text: str) -> str:
    """Escape control characters so a request cannot forge log lines."""
    return text.encode("unicode_escape", "backslashreplace").decode("ascii")


def _metric_value(value: float) -> str:
    """Format a sample value: integers exactly, other numbers with full precision."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _parse_cli_version(user_agent: str) -> str:
    """Return the CLI version from ``pulumi-cli/1 (v3.259.0; linux)``, or ''."""
    m = re.match(r"pulumi-cli/\d+ \((v?[0-9][^;)]*)", user_agent or "")
    return m.group(1) if m else ""


#: Every metric /metrics exposes: name -> (Prometheus type, help text).
_METRICS = {
    "pulumi_backend_build_info": ("gauge", "Always 1, labelled with the server version."),
    "pulumi_backend_start_time_seconds": ("gauge", "Unix time the server started."),
    "pulumi_backend_http_requests_total": (
        "counter", "HTTP requests answered, by route, method and status."),
    "pulumi_backend_http_request_duration_seconds": (
        "histogram", "Time from request line to response sent, by route."),
    "pulumi_backend_active_updates": ("gauge", "Updates running now with a live lease."),
    "pulumi_backend_stacks": ("gauge", "Stacks stored."),
    "pulumi_backend_database_bytes": (
        "gauge", "Size of the database files on disk (main file, WAL, shared memory)."),
    "pulumi_backend_state_bytes_written_total": (
        "counter", "Bytes of state in committed writes, by table (deployments gzip-compressed)."),
    "pulumi_backend_journal_entries_total": ("counter", "Journal entries committed."),
    "pulumi_backend_checkpoints_total": ("counter", "Checkpoints committed, by upload form."),
    "pulumi_backend_updates_total": ("counter", "Updates ended, by kind and status."),
}


class Metrics:
    """Thread-safe counters and histograms, rendered in the Prometheus text format.

    Series are keyed by metric name and a sorted tuple of label pairs. Gauges
    are not stored: whoever renders passes their current values in.
    """

    #: Upper bounds (seconds) of the request duration histogram buckets.
    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict = {}
        self._histograms: dict = {}

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters.setdefault(name, {})
            series[key] = series.get(key, 0) + amount

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._histograms.setdefault(name, {})
            # One count per bucket (the last one is +Inf), then the sum.
            h = series.setdefault(key, [0] * (len(self.BUCKETS) + 1) + [0.0])
            h[bisect.bisect_left(self.BUCKETS, value)] += 1
            h[-1] += value

    def render(self, current: dict) -> str:
        """Return every metric of ``_METRICS`` as Prometheus text.

        ``current`` holds values read at scrape time (gauges, and counters kept
        elsewhere): metric name -> a number or ``{labels tuple: number}``.
        """
        with self._lock:
            counters = {name: dict(series) for name, series in self._counters.items()}
            histograms = {name: {k: list(h) for k, h in series.items()}
                          for name, series in self._histograms.items()}
        lines = []
        for name, (kind, help_text) in _METRICS.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            if kind == "histogram":
                for key, h in sorted(histograms.get(name, {}).items()):
                    lines += _histogram_lines(name, key, h, self.BUCKETS)
                continue
            series = current[name] if name in current else counters.get(name)
            if series is None:  # a labelled counter before its first event
                continue
            if not isinstance(series, dict):
                series = {(): series}
            for key, value in sorted(series.items()):
                lines.append(f"{name}{_labels(key)} {_metric_value(value)}")
        return "\n".join(lines) + "\n"


def _labels(pairs: tuple) -> str:
    """Render label pairs as ``{a="x",b="y"}`` with Prometheus escaping ('' for none)."""
    if not pairs:
        return ""
    esc = [(k, str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n"))
           for k, v in pairs]
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc) + "}"


def _histogram_lines(name: str, key: tuple, h: list, bounds: tuple) -> list:
    lines, cumulative = [], 0
    for bound, count in zip(bounds + (float("inf"),), h):
        cumulative += count
        le = "+Inf" if bound == float("inf") else f"{bound:g}"
        lines.append(f"{name}_bucket{_labels(key + (('le', le),))} {cumulative}")
    lines.append(f"{name}_sum{_labels(key)} {_metric_value(h[-1])}")
    lines.append(f"{name}_count{_labels(key)} {cumulative}")
    return lines


# ==== 5. Storage ============================================================

class Store:
    """What the engine needs from persistent storage.

    The engine opens a transaction with ``write()`` (exclusive, committed
    durably when the block exits without error) or ``read()`` (a consistent
    snapshot), and passes the handle it gets to the record methods below. So a
    read-check-write sequence such as "is the stack locked? then lock it" is one
    atomic transaction, and no SQL leaves this section.
    """

    def write(self):  # pragma: no cover - interface
        """Return a context manager yielding a handle for one exclusive transaction."""
        raise NotImplementedError

    def read(self):  # pragma: no cover - interface
        """Return a context manager yielding a handle for reads (no writes through it)."""
        raise NotImplementedError

    def after_commit(self, fn: Callable) -> None:  # pragma: no cover - interface
        """Run ``fn`` after the current write transaction commits, before other writers."""
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    # Record methods, implemented by SQLiteStore (handle first, then arguments):
    # meta: get_meta, set_meta
    # stacks: get_stack, get_stack_by_id, list_stacks, insert_stack, update_stack,
    #   delete_stack, project_exists, count_stacks, all_data_keys
    # deployments: get_deployment, put_deployment, prune_versions
    # updates: get_update, insert_update, update_update, count_running_updates, list_history
    # checkpoints: put_checkpoint, checkpoint_rows, clear_checkpoints
    # journal: append_journal, journal_entries, clear_journal
    # events: append_events, list_events


_SCHEMA = [
    # version 1
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
    CREATE TABLE stacks (
        id TEXT PRIMARY KEY,
        org TEXT NOT NULL, project TEXT NOT NULL, name TEXT NOT NULL,
        created INTEGER NOT NULL,
        tags TEXT NOT NULL DEFAULT '{}',
        version INTEGER NOT NULL DEFAULT 0,
        active_update TEXT NOT NULL DEFAULT '',
        resource_count INTEGER NOT NULL DEFAULT 0,
        last_update INTEGER,
        data_key BLOB NOT NULL,
        UNIQUE (org, project, name));
    CREATE TABLE deployments (
        stack_id TEXT NOT NULL REFERENCES stacks(id) ON DELETE CASCADE,
        version INTEGER NOT NULL,
        data BLOB NOT NULL,
        size INTEGER NOT NULL,
        resource_count INTEGER NOT NULL,
        PRIMARY KEY (stack_id, version));
    CREATE TABLE updates (
        id TEXT PRIMARY KEY,
        stack_id TEXT NOT NULL REFERENCES stacks(id) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        dry_run INTEGER NOT NULL,
        status TEXT NOT NULL,
        created INTEGER NOT NULL,
        started INTEGER,
        ended INTEGER,
        version INTEGER NOT NULL DEFAULT 0,
        base_version INTEGER NOT NULL DEFAULT 0,
        program TEXT NOT NULL DEFAULT '{}',
        journal INTEGER NOT NULL DEFAULT 0,
        lease_token TEXT NOT NULL DEFAULT '',
        lease_expires INTEGER NOT NULL DEFAULT 0,
        cli_version TEXT NOT NULL DEFAULT '',
        resource_changes TEXT,
        resource_count INTEGER);
    CREATE INDEX updates_by_stack ON updates (stack_id, created);
    CREATE TABLE checkpoints (
        update_id TEXT NOT NULL REFERENCES updates(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        data BLOB NOT NULL,
        hash TEXT NOT NULL,
        PRIMARY KEY (update_id, seq));
    CREATE TABLE journal (
        update_id TEXT NOT NULL REFERENCES updates(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (update_id, seq));
    CREATE TABLE events (
        update_id TEXT NOT NULL REFERENCES updates(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (update_id, seq));
    """,
]


class SQLiteStore(Store):
    """SQLite in WAL mode: one writer connection behind a lock, pooled readers.

    Why one writer: SQLite allows a single writer at a time anyway, and keeping
    every write on one connection under our own lock turns "database is locked"
    into ordinary queueing. Readers use their own connections (WAL lets them run
    beside the writer) and are returned to a small pool, because the threading
    server starts a thread per connection and per-thread connections would leak.
    """

    POOL_SIZE = 8

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.RLock()
        self._on_commit: list = []
        self._pool: list = []
        self._pool_lock = threading.Lock()
        # Bytes of state committed, by table, for /metrics. The keys are fixed
        # so a scrape can read the dict while the writer updates it.
        self.bytes_written = dict.fromkeys(("deployments", "checkpoints", "journal"), 0)
        self._uncommitted_bytes: dict = {}
        self._writer = self._connect()
        self._migrate()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=BUSY_TIMEOUT_MS / 1000)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a commit is on disk before we answer, even across a power loss.
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.row_factory = sqlite3.Row
        return conn

    def _migrate(self) -> None:
        with self.write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            current = row[0] if row else 0
            if current > len(_SCHEMA):
                raise RuntimeError(f"database schema {current} is newer than this server "
                                   f"({len(_SCHEMA)}); upgrade pulumi_backend.py")
            for version in range(current, len(_SCHEMA)):
                for stmt in _SCHEMA[version].split(";"):
                    if stmt.strip():
                        db.execute(stmt)
            db.execute("DELETE FROM schema_version")
            db.execute("INSERT INTO schema_version VALUES (?)", (len(_SCHEMA),))

    class _Txn:
        def __init__(self, store: "SQLiteStore"):
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            self.store._lock.acquire()
            try:
                self.store._writer.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.store._lock.release()
                raise
            return self.store._writer

        def __exit__(self, exc_type, exc, tb) -> None:
            callbacks, self.store._on_commit = self.store._on_commit, []
            written, self.store._uncommitted_bytes = self.store._uncommitted_bytes, {}
            writer = self.store._writer
            try:
                if exc_type is None:
                    try:
                        writer.execute("COMMIT")
                    except sqlite3.Error:
                        if writer.in_transaction:  # e.g. disk full at commit time
                            writer.execute("ROLLBACK")
                        raise
                    for table, size in written.items():
                        self.store.bytes_written[table] += size
                    for fn in callbacks:  # still under the lock: no writer can interleave
                        fn()
                elif writer.in_transaction:
                    writer.execute("ROLLBACK")
            finally:
                self.store._lock.release()

    def write(self) -> "_Txn":
        """Return a context manager for one exclusive transaction on the writer."""
        return SQLiteStore._Txn(self)

    def after_commit(self, fn: Callable) -> None:
        """Run ``fn`` once the current write transaction has committed (never on rollback)."""
        self._on_commit.append(fn)

    class _Reader:
        def __init__(self, store: "SQLiteStore"):
            self.store = store
            self.conn: Optional[sqlite3.Connection] = None

        def __enter__(self) -> sqlite3.Connection:
            with self.store._pool_lock:
                self.conn = self.store._pool.pop() if self.store._pool else None
            if self.conn is None:
                self.conn = self.store._connect()
            return self.conn

        def __exit__(self, exc_type, exc, tb) -> None:
            conn, self.conn = self.conn, None
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            with self.store._pool_lock:
                if len(self.store._pool) < SQLiteStore.POOL_SIZE:
                    self.store._pool.append(conn)
                    return
            conn.close()

    def read(self) -> "_Reader":
        """Return a context manager lending a pooled reader connection."""
        return SQLiteStore._Reader(self)

    def close(self) -> None:
        with self._lock:
            self._writer.close()
        with self._pool_lock:
            for conn in self._pool:
                conn.close()
            self._pool.clear()

    def _count_written(self, table: str, size: int) -> None:
        # Called inside a write transaction; counted only once it commits.
        self._uncommitted_bytes[table] = self._uncommitted_bytes.get(table, 0) + size

    def database_bytes(self) -> int:
        """Return the bytes the database files take on disk (main, WAL, shared memory)."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                total += os.path.getsize(self.path + suffix)
            except OSError:
                pass
        return total

    # -- meta ---------------------------------------------------------------

    def get_meta(self, db, key: str) -> Optional[bytes]:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, db, key: str, value: bytes) -> None:
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- stacks -------------------------------------------------------------

    def get_stack(self, db, org: str, project: str, name: str) -> Optional[dict]:
        row = db.execute("SELECT * FROM stacks WHERE org = ? AND project = ? AND name = ?",
                         (org, project, name)).fetchone()
        return dict(row) if row else None

    def get_stack_by_id(self, db, stack_id: str) -> Optional[dict]:
        row = db.execute("SELECT * FROM stacks WHERE id = ?", (stack_id,)).fetchone()
        return dict(row) if row else None

    def list_stacks(self, db, org: Optional[str], project: Optional[str], after: tuple,
                    limit: int) -> list:
        """Return stacks ordered by (org, project, name) strictly after ``after``."""
        sql = "SELECT * FROM stacks WHERE (org, project, name) > (?, ?, ?)"
        args: list = list(after)
        if org is not None:
            sql += " AND org = ?"
            args.append(org)
        if project is not None:
            sql += " AND project = ?"
            args.append(project)
        sql += " ORDER BY org, project, name LIMIT ?"
        args.append(limit)
        return [dict(r) for r in db.execute(sql, args)]

    def insert_stack(self, db, stack: dict) -> None:
        cols = ",".join(stack)
        db.execute(f"INSERT INTO stacks ({cols}) VALUES ({','.join('?' * len(stack))})",
                   tuple(stack.values()))

    def update_stack(self, db, stack_id: str, **fields: Any) -> None:
        _check_columns(fields, _STACK_COLUMNS)
        sets = ", ".join(f"{k} = ?" for k in fields)
        db.execute(f"UPDATE stacks SET {sets} WHERE id = ?", (*fields.values(), stack_id))

    def delete_stack(self, db, stack_id: str) -> None:
        db.execute("DELETE FROM stacks WHERE id = ?", (stack_id,))

    def project_exists(self, db, org: str, project: str) -> bool:
        return db.execute("SELECT 1 FROM stacks WHERE org = ? AND project = ? LIMIT 1",
                          (org, project)).fetchone() is not None

    def count_stacks(self, db) -> int:
        return db.execute("SELECT count(*) FROM stacks").fetchone()[0]

    def all_data_keys(self, db) -> list:
        return [(r[0], r[1]) for r in db.execute("SELECT id, data_key FROM stacks")]

    # -- deployments --------------------------------------------------------

    def get_deployment(self, db, stack_id: str, version: Optional[int] = None) -> Optional[dict]:
        """Return the row of ``version`` (or the newest) with its gzip ``data``."""
        if version is None:
            row = db.execute("SELECT * FROM deployments WHERE stack_id = ? "
                             "ORDER BY version DESC LIMIT 1", (stack_id,)).fetchone()
        else:
            row = db.execute("SELECT * FROM deployments WHERE stack_id = ? AND version = ?",
                             (stack_id, version)).fetchone()
        return dict(row) if row else None

    def put_deployment(self, db, stack_id: str, version: int, data_gz: bytes, size: int,
                       resource_count: int) -> None:
        db.execute("INSERT OR REPLACE INTO deployments "
                   "(stack_id, version, data, size, resource_count) VALUES (?, ?, ?, ?, ?)",
                   (stack_id, version, data_gz, size, resource_count))
        self._count_written("deployments", len(data_gz))

    def prune_versions(self, db, stack_id: str, keep_from: int, keep_previews: int) -> None:
        """Forget deployments and finished updates older than version ``keep_from``.

        The newest deployment is always kept, whatever its number; of finished
        previews (which have no version) the newest ``keep_previews`` are kept.
        """
        db.execute("DELETE FROM deployments WHERE stack_id = ? AND version < ? AND version < "
                   "(SELECT MAX(version) FROM deployments WHERE stack_id = ?)",
                   (stack_id, keep_from, stack_id))
        db.execute("DELETE FROM updates WHERE stack_id = ? AND dry_run = 0 AND version < ? "
                   "AND status NOT IN ('not started', 'running')", (stack_id, keep_from))
        db.execute("DELETE FROM updates WHERE stack_id = ? AND dry_run = 1 "
                   "AND status NOT IN ('not started', 'running') AND id NOT IN ("
                   "SELECT id FROM updates WHERE stack_id = ? AND dry_run = 1 "
                   "ORDER BY created DESC LIMIT ?)",
                   (stack_id, stack_id, keep_previews))

    # -- updates ------------------------------------------------------------

    def get_update(self, db, update_id: str) -> Optional[dict]:
        row = db.execute("SELECT * FROM updates WHERE id = ?", (update_id,)).fetchone()
        return dict(row) if row else None

    def insert_update(self, db, update: dict) -> None:
        cols = ",".join(update)
        db.execute(f"INSERT INTO updates ({cols}) VALUES ({','.join('?' * len(update))})",
                   tuple(update.values()))

    def update_update(self, db, update_id: str, **fields: Any) -> None:
        _check_columns(fields, _UPDATE_COLUMNS)
        sets = ", ".join(f"{k} = ?" for k in fields)
        db.execute(f"UPDATE updates SET {sets} WHERE id = ?", (*fields.values(), update_id))

    def count_running_updates(self, db, now: int) -> int:
        """Return how many updates are running with a live lease at Unix time ``now``."""
        return db.execute("SELECT count(*) FROM updates WHERE status = 'running' "
                          "AND lease_expires >= ?", (now,)).fetchone()[0]

    def list_history(self, db, stack_id: str, limit: int, offset: int) -> list:
        """Return finished non-preview updates, newest version first."""
        return [dict(r) for r in db.execute(
            "SELECT * FROM updates WHERE stack_id = ? AND dry_run = 0 AND started IS NOT NULL "
            "ORDER BY version DESC, created DESC LIMIT ? OFFSET ?", (stack_id, limit, offset))]

    # -- checkpoints (working state of a running update) ---------------------

    def put_checkpoint(self, db, update_id: str, seq: int, kind: str, data: bytes,
                       digest: str) -> None:
        if kind == "full":
            # A full document replaces everything before it: nothing older is needed.
            db.execute("DELETE FROM checkpoints WHERE update_id = ?", (update_id,))
        db.execute("INSERT OR REPLACE INTO checkpoints (update_id, seq, kind, data, hash) "
                   "VALUES (?, ?, ?, ?, ?)", (update_id, seq, kind, data, digest))
        self._count_written("checkpoints", len(data))

    def checkpoint_rows(self, db, update_id: str) -> list:
        return [dict(r) for r in db.execute(
            "SELECT seq, kind, data, hash FROM checkpoints WHERE update_id = ? ORDER BY seq",
            (update_id,))]

    def clear_checkpoints(self, db, update_id: str) -> None:
        db.execute("DELETE FROM checkpoints WHERE update_id = ?", (update_id,))

    # -- journal ------------------------------------------------------------

    def append_journal(self, db, update_id: str, entries: Iterable) -> None:
        """Store ``(sequenceID, json bytes)`` pairs; a repeated sequenceID keeps the first."""
        entries = list(entries)
        db.executemany("INSERT OR IGNORE INTO journal (update_id, seq, data) VALUES (?, ?, ?)",
                       ((update_id, seq, data) for seq, data in entries))
        self._count_written("journal", sum(len(data) for _, data in entries))

    def journal_entries(self, db, update_id: str) -> list:
        return [r[0] for r in db.execute(
            "SELECT data FROM journal WHERE update_id = ? ORDER BY seq", (update_id,))]

    def clear_journal(self, db, update_id: str) -> None:
        db.execute("DELETE FROM journal WHERE update_id = ?", (update_id,))

    # -- events -------------------------------------------------------------

    def append_events(self, db, update_id: str, events: Iterable) -> None:
        db.executemany("INSERT OR IGNORE INTO events (update_id, seq, data) VALUES (?, ?, ?)",
                       ((update_id, seq, data) for seq, data in events))

    def list_events(self, db, update_id: str, after: int, limit: int) -> list:
        return [(r[0], r[1]) for r in db.execute(
            "SELECT seq, data FROM events WHERE update_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (update_id, after, limit))]


_STACK_COLUMNS = frozenset({"org", "project", "name", "tags", "version", "active_update",
                            "resource_count", "last_update", "data_key"})
_UPDATE_COLUMNS = frozenset({"status", "started", "ended", "version", "base_version", "journal",
                             "lease_token", "lease_expires", "cli_version", "resource_changes",
                             "resource_count", "program"})


def _check_columns(fields: dict, allowed: frozenset) -> None:
    """Guard the only place column names reach SQL text: they come from our code only."""
    unknown = set(fields) - allowed
    if unknown:
        raise ValueError(f"unknown columns {sorted(unknown)}")


# ==== 6. Engine =============================================================
# Stacks, update leases, working checkpoints (full, verbatim, delta), journal
# replay, events and history. Every method that acknowledges a write commits it
# through the Store before returning, so "200" always means "durable".

def apply_delta(prev: bytes, edits: Any) -> bytes:
    """Apply the CLI's text edits (byte spans of ``prev``) and return the new bytes.

    Edits from CLIs before v3.68 carry line/column points with offset -1; their
    offsets are recomputed from the lines of ``prev``. Raises BadRequest for
    malformed, unordered or out-of-range edits.
    """
    if not isinstance(edits, list):
        raise BadRequest("deploymentDelta must be a list of edits")
    line_starts: Optional[list] = None
    spans = []
    for edit in edits:
        if not isinstance(edit, dict) or not isinstance(edit.get("Span"), dict):
            raise BadRequest("each delta edit needs a Span")
        text = edit.get("NewText", "")
        if not isinstance(text, str):
            raise BadRequest("NewText must be a string")
        start, end = edit["Span"].get("start"), edit["Span"].get("end")
        if not isinstance(start, dict) or not isinstance(end, dict):
            raise BadRequest("a delta Span needs start and end points")
        if _legacy_point(start) or _legacy_point(end):
            if line_starts is None:
                line_starts = [0] + [i + 1 for i, b in enumerate(prev) if b == 0x0A]
            s, t = _line_offset(line_starts, len(prev), start), _line_offset(line_starts, len(prev), end)
        else:
            s, t = _int_field(start, "offset"), _int_field(end, "offset")
        spans.append((s, t, text.encode("utf-8")))
    out = bytearray()
    pos = 0
    for s, t, text in spans:
        if not pos <= s <= t <= len(prev):
            raise BadRequest(f"delta edit [{s}, {t}) is out of order or out of range")
        out += prev[pos:s]
        out += text
        pos = t
    out += prev[pos:]
    return bytes(out)


def _legacy_point(point: dict) -> bool:
    offset, line = point.get("offset", -1), point.get("line", 1)
    if not isinstance(line, int):
        raise BadRequest("a delta point's line must be an integer")
    return not isinstance(offset, int) or offset < 0 or (offset == 0 and line > 1)


def _line_offset(line_starts: list, size: int, point: dict) -> int:
    line, column = _int_field(point, "line"), _int_field(point, "column", 1)
    if line == len(line_starts) + 1 and column <= 1:
        return size
    if not 1 <= line <= len(line_starts) or column < 1:
        raise BadRequest(f"delta point line {line} column {column} is outside the document")
    return line_starts[line - 1] + column - 1


class _JournalReplayer:
    """Rebuild a deployment from a base and journal entries, as the CLI's replayer does.

    ``*Old`` fields index the base's resources; ``*New`` fields name operation
    IDs of entries earlier in this update. New resources (in completion order)
    come first, then the surviving base resources.
    """

    def __init__(self, base: dict):
        self.base = base
        self.has_refresh = False
        self.needs_byte_string = False
        self._reset()

    def _reset(self) -> None:
        self.new_res: list = []
        self.op_index: dict = {}
        self.remove_new: set = set()
        self.del_base: set = set()
        self.replace_base: dict = {}
        self.mark_delete: set = set()
        self.mark_pending: set = set()
        self.incomplete: dict = {}
        self.extensions: dict = {}

    def _new(self, op_id: Any) -> Optional[int]:
        index = self.op_index.get(op_id)
        if index is None:
            log.warning("journal refers to unknown operation %s; entry part skipped", op_id)
        return index

    def add(self, e: dict) -> None:
        if e.get("requiresByteString"):
            self.needs_byte_string = True
        kind, op = e.get("kind"), e.get("operationID")
        state = e.get("state")
        if kind == 0:  # begin
            self.incomplete[op] = e
        elif kind == 1:  # success
            self.incomplete.pop(op, None)
            if state is not None:
                self.new_res.append(state)
                self.op_index[op] = len(self.new_res) - 1
            if e.get("removeOld") is not None:
                self.del_base.add(e["removeOld"])
            if e.get("removeNew") is not None:
                self.remove_new.add(e["removeNew"])
            if e.get("deleteOld") is not None:
                self.mark_delete.add(e["deleteOld"])
            for field, flag in (("deleteNew", "delete"), ("pendingReplacementNew",
                                                          "pendingReplacement")):
                if e.get(field) is not None:
                    index = self._new(e[field])
                    if index is not None:
                        self.new_res[index][flag] = True
            if e.get("pendingReplacementOld") is not None:
                self.mark_pending.add(e["pendingReplacementOld"])
            if e.get("isRefresh"):
                self.has_refresh = True
        elif kind == 3:  # refresh-success
            self.incomplete.pop(op, None)
            self.has_refresh = True
            if e.get("removeOld") is not None:
                if state is None:
                    self.del_base.add(e["removeOld"])
                else:
                    self.replace_base[e["removeOld"]] = state
            if e.get("removeNew") is not None:
                if state is None:
                    self.remove_new.add(e["removeNew"])
                else:
                    index = self._new(e["removeNew"])
                    if index is not None:
                        self.new_res[index] = state
        elif kind == 2:  # failure
            self.incomplete.pop(op, None)
        elif kind == 4:  # outputs
            if state is not None and e.get("removeOld") is not None:
                self.replace_base[e["removeOld"]] = state
            if state is not None and e.get("removeNew") is not None:
                index = self._new(e["removeNew"])
                if index is not None:
                    self.new_res[index] = state
        elif kind == 5:  # write: a new base, before anything else changes
            self.base = e.get("newSnapshot") or {}
        elif kind == 6:  # secrets-manager
            provider = e.get("secretsProvider")
            if self.base.get("secrets_providers") != provider:
                self.base["secrets_providers"] = provider
        elif kind == 9:  # snippets
            self.base["snippets"] = e.get("snippets")
        elif kind == 7:  # rebuilt-base-state: fold everything so far into a new base
            self.base = self.generate()["deployment"]
            self._reset()
        elif kind == 8:  # extension-parameterize
            if e.get("extensionRef") is not None:
                self.extensions[e["extensionRef"]] = e.get("extension")
        elif kind == 10:  # state migration (journal version 2)
            self._migrate(e)

    def _migrate(self, e: dict) -> None:
        """Apply a state migration as the CLI's replayer does: the base is laid out
        anew from retained base resources and inserted ``states``, patches replace
        retained base and earlier new resources whole, and the base indexes that
        earlier entries recorded follow their resources. All or nothing."""
        if e.get("version") != 2:
            raise BadRequest("a state migration journal entry must use version 2")
        if self.base.get("pending_operations"):
            raise BadRequest("a state migration cannot be applied with pending base operations")
        for op_id, begin in self.incomplete.items():
            if begin.get("operation"):  # a same step's begin has none: harmless
                raise BadRequest(f"a state migration cannot be applied with incomplete "
                                 f"operation {op_id}")
        base, states = self.base.get("resources") or [], e.get("states") or []
        moved = self._migration_layout(e.get("layout") or [], len(base), len(states))
        base_patches: dict = {}
        for patch in e.get("baseStatePatches") or []:
            index = patch.get("index")
            if index not in moved or index in base_patches:
                raise BadRequest(f"state migration base patch index {index} is not retained "
                                 "by the layout or patched twice")
            base_patches[index] = patch.get("state")
        # A copy of this replayer that shares what the migration only reads.
        staged = _JournalReplayer(dict(self.base))
        staged.__dict__.update(self.__dict__, base=staged.base, new_res=list(self.new_res))
        for patch in e.get("newStatePatches") or []:
            op_id = patch.get("operationID")
            if op_id in self.remove_new or op_id not in self.op_index:
                raise BadRequest(f"state migration new-state patch references unknown or "
                                 f"removed operation {op_id}")
            staged.new_res[self.op_index[op_id]] = patch.get("state")
        _check_inserted_states(states, set(self.extensions) | set(self.base.get("extensions")
                                                                   or {}))
        staged.base["resources"] = [
            states[item["stateIndex"]] if item.get("baseIndex") is None
            else base_patches.get(item["baseIndex"], base[item["baseIndex"]])
            for item in e.get("layout") or []]
        for name in ("del_base", "mark_delete", "mark_pending"):
            setattr(staged, name, {moved[i] for i in getattr(self, name) if i in moved})
        staged.replace_base = {moved[i]: r for i, r in self.replace_base.items()
                               if i in moved and i not in base_patches}
        # Generating normalises resources in place: check a copy of the staged replay.
        prospective = copy.deepcopy(staged).generate()["deployment"]
        _check_integrity(prospective.get("resources") or [])
        self.__dict__.update(staged.__dict__)

    @staticmethod
    def _migration_layout(layout: list, base_count: int, state_count: int) -> dict:
        """Check a migration layout; return {old base index: new base index}."""
        moved: dict = {}
        placed: set = set()
        for position, item in enumerate(layout):
            base, state = item.get("baseIndex"), item.get("stateIndex")
            if (base is None) == (state is None):
                raise BadRequest(f"state migration layout item {position} must name one base "
                                 "resource or one inserted state")
            if base is not None:
                if not 0 <= base < base_count or base in moved:
                    raise BadRequest(f"state migration layout places base index {base} of "
                                     f"{base_count} badly or twice")
                moved[base] = position
            else:
                if not 0 <= state < state_count or state in placed:
                    raise BadRequest(f"state migration layout places inserted state {state} of "
                                     f"{state_count} badly or twice")
                placed.add(state)
        if not state_count or len(placed) != state_count:
            raise BadRequest(f"state migration layout places {len(placed)} of {state_count} "
                             "inserted states")
        return moved

    def generate(self, cli_version: str = "") -> dict:
        """Return the untyped deployment ``{"version", ["features"], "deployment"}``."""
        features: set = set()
        dropped = {self.op_index[o] for o in self.remove_new if o in self.op_index}
        resources = [r for i, r in enumerate(self.new_res) if i not in dropped]
        for i, res in enumerate(self.base.get("resources") or []):
            if i in self.del_base:
                continue
            if i in self.replace_base:
                resources.append(self.replace_base[i])
                continue
            res = dict(res)
            if i in self.mark_pending:
                res["pendingReplacement"] = True
            if i in self.mark_delete:
                res["delete"] = True
            resources.append(res)
        operations = [e["operation"] for e in self.incomplete.values() if e.get("operation")]
        operations += [op for op in self.base.get("pending_operations") or []
                       if op.get("type") == "creating"]
        if self.has_refresh:
            resources = _rebuild_dependencies(resources)
        for res in resources + [op.get("resource") or {} for op in operations]:
            _resource_features(res, features)
        if self.needs_byte_string and (resources or operations):  # as the CLI's ApplyFeatures
            features.add("byteString")
        deployment: dict = {"manifest": {
            "time": _rfc3339_now(),
            "magic": hashlib.sha256(cli_version.encode()).hexdigest() if cli_version else "",
            "version": cli_version}}
        if self.base.get("secrets_providers"):
            deployment["secrets_providers"] = self.base["secrets_providers"]
        if resources:
            deployment["resources"] = resources
        if operations:
            deployment["pending_operations"] = operations
        deployment["metadata"] = self.base.get("metadata") or {}
        if self.base.get("snippets"):
            deployment["snippets"] = self.base["snippets"]
            features.add("snippets-prototype")
        extensions = dict(self.extensions)
        extensions.update(self.base.get("extensions") or {})
        if extensions:
            deployment["extensions"] = extensions
        _normalize_urn_references(deployment)
        out: dict = {"version": 4 if features else 3}
        if features:
            out["features"] = sorted(features)
        out["deployment"] = deployment
        return out


def replay_journal(base: dict, entries: Iterable, cli_version: str = "") -> dict:
    """Replay journal ``entries`` (sorted by sequenceID) over the ``base`` deployment.

    ``base`` is a DeploymentV3 object and is not modified. Returns the untyped
    deployment the update produced.
    """
    replayer = _JournalReplayer(json.loads(json.dumps(base)))
    for entry in entries:
        replayer.add(entry)
    return replayer.generate(cli_version)


def _check_inserted_states(states: list, extensions: set) -> None:
    """Refuse resources a state migration may not insert (the CLI's own checks)."""
    urns: set = set()
    for state in states:
        urn = state.get("urn") or ""
        parts = urn.split("::")
        if not urn.startswith("urn:pulumi:") or len(parts) < 4:
            raise BadRequest(f"state migration inserts a resource with invalid URN {urn!r}")
        if state.get("type") != parts[2].rsplit("$", 1)[-1]:
            raise BadRequest(f"state migration inserted state {urn} has type {state.get('type')}")
        if state.get("delete") or state.get("viewOf"):
            raise BadRequest(f"state migration inserted state {urn} is marked for deletion "
                             "or is a view")
        if state.get("custom") and not state.get("id"):
            raise BadRequest(f"state migration inserted custom state {urn} has no physical ID")
        if state.get("extensionRef") and state["extensionRef"] not in extensions:
            raise BadRequest(f"state migration inserted state {urn} references unknown "
                             f"extension {state['extensionRef']}")
        if urn in urns:
            raise BadRequest(f"state migration inserts duplicate resource {urn}")
        urns.add(urn)


def _check_integrity(resources: list) -> None:
    """The CLI's snapshot integrity rules on references: a resource's parent,
    dependencies, property dependencies, deleted-with and provider come before it."""
    seen: set = set()
    providers: set = set()
    for res in resources:
        urn = res.get("urn")
        refs = [res.get("parent"), res.get("deletedWith"), *(res.get("dependencies") or [])]
        for deps in (res.get("propertyDependencies") or {}).values():
            refs += deps or []
        missing = [r for r in refs if r and r not in seen]
        if missing:
            raise BadRequest(f"resource {urn} refers to missing dependency {missing[0]}")
        provider = res.get("provider")
        if provider and provider not in providers and not res.get("pendingReplacement"):
            raise BadRequest(f"resource {urn} refers to unknown provider {provider}")
        if (res.get("type") or "").startswith("pulumi:providers:"):
            providers.add(f"{urn}::{res.get('id', '')}")
        seen.add(urn)


def _resource_features(res: dict, features: set) -> None:
    """Add the deployment features that resource ``res`` needs."""
    for field, feature in (("refreshBeforeUpdate", "refreshBeforeUpdate"), ("viewOf", "views"),
                           ("resourceHooks", "hooks"), ("taint", "taint"),
                           ("replaceWith", "replaceWith"),
                           ("extensionRef", "extensionParameterization"),
                           ("snippetID", "snippets-prototype")):
        if res.get(field):
            features.add(feature)


def _rebuild_dependencies(resources: list) -> list:
    """Drop references to resources that a refresh deleted (resources in dependency order)."""
    seen: set = set()
    out = []
    for res in resources:
        res = dict(res)
        if res.get("dependencies"):
            res["dependencies"] = [d for d in res["dependencies"] if d in seen]
        if res.get("propertyDependencies"):
            res["propertyDependencies"] = {
                k: [d for d in v if d in seen] for k, v in res["propertyDependencies"].items()
                if any(d in seen for d in v or [])}
        if res.get("replaceWith"):
            res["replaceWith"] = [d for d in res["replaceWith"] if d in seen]
        if res.get("deletedWith") not in seen:
            res.pop("deletedWith", None)
        for key in ("dependencies", "propertyDependencies", "replaceWith"):
            if key in res and not res[key]:
                del res[key]
        seen.add(res.get("urn"))
        out.append(res)
    for res in out:  # a resource whose parent is gone loses it, as in the CLI
        if res.get("parent") and res["parent"] not in seen:
            del res["parent"]
    return out


def _urn_qualified_type(urn: str) -> str:
    parts = urn.split("::")
    return parts[2] if len(parts) >= 4 else ""


def _normalize_urn_references(deployment: dict) -> None:
    """Rewrite aliased URNs to the current ones and drop ``aliases``, as the CLI does."""
    resources = deployment.get("resources") or []
    aliased: dict = {}
    for res in resources:
        for alias in res.get("aliases") or []:
            if aliased.get(alias, res["urn"]) != res["urn"]:
                raise BadRequest(f"two resources have the same alias {alias!r}")
            aliased[alias] = res["urn"]
        parent = aliased.get(res.get("parent", ""))
        if parent and _urn_qualified_type(parent) != _STACK_TYPE:
            parts = res["urn"].split("::")
            if len(parts) >= 4:
                own_type = parts[2].rsplit("$", 1)[-1]
                aliased[res["urn"]] = "::".join(
                    parts[:2] + [f"{_urn_qualified_type(parent)}${own_type}"] + parts[3:])
    if not aliased:
        for res in resources:
            res.pop("aliases", None)
        return

    def fix(urn: Any) -> Any:
        return aliased.get(urn, urn)

    for res in resources:
        res["urn"] = fix(res["urn"])
        for key in ("parent", "deletedWith", "viewOf"):
            if res.get(key):
                res[key] = fix(res[key])
        if res.get("provider"):
            urn, sep, ident = res["provider"].rpartition("::")
            if sep:
                res["provider"] = f"{fix(urn)}::{ident}"
        if res.get("dependencies"):
            res["dependencies"] = [fix(d) for d in res["dependencies"]]
        if res.get("propertyDependencies"):
            res["propertyDependencies"] = {k: [fix(d) for d in v or []]
                                           for k, v in res["propertyDependencies"].items()}
        res.pop("aliases", None)
    for snippet in deployment.get("snippets") or []:
        if isinstance(snippet.get("references"), dict):
            snippet["references"] = {k: fix(v) for k, v in snippet["references"].items()}


def _empty_deployment() -> bytes:
    """Return the state of a stack that was never updated."""
    return _dumps({"version": 3, "deployment": {
        "manifest": {"time": _rfc3339_now(), "magic": "", "version": ""}}})


def _check_untyped_deployment(doc: Any) -> dict:
    """Validate an UntypedDeployment; return it or raise BadRequest."""
    doc = _require_dict(doc, "deployment")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not \
            1 <= version <= MAX_DEPLOYMENT_VERSION:
        raise BadRequest(f"deployment version must be between 1 and {MAX_DEPLOYMENT_VERSION}")
    if not isinstance(doc.get("deployment"), dict):
        raise BadRequest("deployment must be a JSON object")
    features = doc.get("features")
    features = [] if features is None else features
    if not isinstance(features, list) or any(
            not isinstance(f, str) or f not in KNOWN_FEATURES for f in features):
        raise BadRequest(f"unknown deployment features {features!r}")
    resources = doc["deployment"].get("resources")
    resources = [] if resources is None else resources
    if not isinstance(resources, list) or any(not isinstance(r, dict) for r in resources):
        raise BadRequest("deployment resources must be a list of objects")
    return doc


def _count_resources(doc: dict) -> int:
    return len(doc.get("deployment", {}).get("resources") or [])


def _rename_in_deployment(doc: Any, old: tuple, new: tuple) -> Any:
    """Rewrite stack and project names in every URN of ``doc`` and in its service
    secrets provider; ``old``/``new`` are ``(project, stack)``.
    """
    old_prefix = f"urn:pulumi:{old[1]}::{old[0]}::"
    new_prefix = f"urn:pulumi:{new[1]}::{new[0]}::"
    root = f"{_STACK_TYPE}::"  # the root resource is named <project>-<stack>: rename it too
    new_root = f"{root}{new[0]}-{new[1]}"

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            if not value.startswith(old_prefix):
                return value
            rest = value[len(old_prefix):]
            return new_prefix + (new_root if rest.startswith(root) else rest)
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return value

    doc = walk(doc)
    provider = doc.get("deployment", {}).get("secrets_providers") or {}
    if provider.get("type") == "service" and isinstance(provider.get("state"), dict):
        provider["state"]["project"], provider["state"]["stack"] = new
    return doc


class _WorkingCache:
    """The latest checkpoint bytes of running updates, bounded LRU by size.

    Deltas apply to these bytes instead of rebuilding them from SQLite, so the
    work per delta is proportional to the change plus one hash. A miss (after a
    restart or an eviction) rebuilds from the stored rows.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: "collections.OrderedDict[str, tuple]" = collections.OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, update_id: str) -> Optional[tuple]:
        with self._lock:
            item = self._items.get(update_id)
            if item is not None:
                self._items.move_to_end(update_id)
            return item

    def put(self, update_id: str, seq: int, data: bytes, digest: str) -> None:
        with self._lock:
            self._drop(update_id)
            if len(data) > self.max_bytes:
                return
            self._items[update_id] = (seq, data, digest)
            self._size += len(data)
            while self._size > self.max_bytes:
                self._drop(next(iter(self._items)))

    def discard(self, update_id: str) -> None:
        with self._lock:
            self._drop(update_id)

    def _drop(self, update_id: str) -> None:
        item = self._items.pop(update_id, None)
        if item is not None:
            self._size -= len(item[1])


_VERBATIM_RE = re.compile(rb'^\s*\{"version":\s*\d+,\s*"untypedDeployment":')
_VERBATIM_TAIL_RE = re.compile(rb',\s*"sequenceNumber":\s*(-?\d+)\s*\}\s*$')


def _split_verbatim(body: bytes) -> tuple:
    """Return ``(sequenceNumber, exact bytes of untypedDeployment)`` of a verbatim upload."""
    head, tail = _VERBATIM_RE.match(body), _VERBATIM_TAIL_RE.search(body)
    if head and tail and head.end() < tail.start():
        seq = int(tail.group(1))
        if abs(seq) > 2**62:
            raise BadRequest("sequenceNumber is out of range")
        return seq, body[head.end():tail.start()].strip()
    req = _require_dict(_loads(body))  # unusual field order: find the value's bytes
    if "untypedDeployment" not in req:
        raise BadRequest("untypedDeployment is required")
    text = body.decode("utf-8")
    key = text.index('"untypedDeployment"')
    start = text.index(":", key) + 1
    while text[start] in " \t\r\n":
        start += 1
    _, end = json.JSONDecoder().raw_decode(text, start)
    return _int_field(req, "sequenceNumber"), text[start:end].encode("utf-8")


class Engine:
    """Operations of the API on stacks, state, updates and secrets."""

    def __init__(self, cfg: Config, store: SQLiteStore, keys: "KeyManager"):
        self.cfg = cfg
        self.store = store
        self.keys = keys
        self.working = _WorkingCache(cfg.cache_bytes)
        self._data_keys: dict = {}
        self._data_keys_lock = threading.Lock()
        self.metrics = Metrics()
        self._ready_lock = threading.Lock()
        self._ready_checked = -math.inf  # monotonic time of the last write probe
        self._ready_error: Optional[sqlite3.Error] = None
        for form in ("full", "verbatim", "delta"):  # present from the first scrape
            self.metrics.inc("pulumi_backend_checkpoints_total", 0, form=form)
        self.metrics.inc("pulumi_backend_journal_entries_total", 0)

    # -- stacks -------------------------------------------------------------

    def _check_names(self, org: str, project: str, stack: Optional[str] = None) -> None:
        if org != self.cfg.org:
            raise NotFound(f"organization '{org}' not found")
        if not _NAME_RE.match(project):
            raise BadRequest(f"invalid project name {project!r}")
        if stack is not None and not _NAME_RE.match(stack):
            raise BadRequest(f"invalid stack name {stack!r}")

    def stack(self, db, org: str, project: str, name: str) -> dict:
        """Return the stack row or raise NotFound."""
        self._check_names(org, project, name)
        row = self.store.get_stack(db, org, project, name)
        if row is None:
            raise NotFound(f"stack '{org}/{project}/{name}' not found")
        return row

    def create_stack(self, org: str, project: str, body: dict) -> dict:
        name = body.get("stackName")
        if not isinstance(name, str):
            raise BadRequest("stackName is required")
        self._check_names(org, project, name)
        tags = _check_tags(body.get("tags") or {})
        if body.get("config") is not None:
            raise BadRequest("remote (ESC) stack configuration is not supported by this server")
        initial = _empty_deployment()
        if body.get("state") is not None:
            initial = _dumps(_check_untyped_deployment(body["state"]))
        stack_id = _new_id()
        data_key = self.keys.wrap_data_key(stack_id, secrets.token_bytes(32))
        with self.store.write() as db:
            if self.store.get_stack(db, org, project, name) is not None:
                raise Conflict(f"stack '{org}/{project}/{name}' already exists")
            self.store.insert_stack(db, {
                "id": stack_id, "org": org, "project": project, "name": name,
                "created": _now(), "tags": json.dumps(tags), "data_key": data_key})
            self.store.put_deployment(db, stack_id, 0, _gzip_bytes(initial), len(initial),
                                      _count_resources(_loads(initial)))
        log.info("created stack %s/%s/%s", org, project, name)
        return {}

    def stack_json(self, db, row: dict) -> dict:
        update = self._running_update(db, row)
        out = {"id": row["id"], "orgName": row["org"], "projectName": row["project"],
               "stackName": row["name"], "activeUpdate": row["active_update"],
               "tags": json.loads(row["tags"]), "version": row["version"]}
        if update is not None:
            out["currentOperation"] = {"kind": update["kind"], "author": self.cfg.user,
                                       "started": update["started"] or update["created"]}
        return out

    def stack_summary(self, db, row: dict) -> dict:
        out = {"id": row["id"], "orgName": row["org"], "projectName": row["project"],
               "stackName": row["name"], "resourceCount": row["resource_count"]}
        if self._running_update(db, row) is not None:
            out["lastUpdate"] = 0  # the CLI shows "in progress"
        elif row["last_update"] is not None:
            out["lastUpdate"] = row["last_update"]
        return out

    def list_stacks(self, query: dict) -> dict:
        org = query.get("organization")
        if org is not None and org != self.cfg.org:
            return {"stacks": [], "continuationToken": None}
        project, tag_name, tag_value = (query.get("project"), query.get("tagName"),
                                        query.get("tagValue"))
        after = _decode_page_token(query.get("continuationToken"))
        stacks: list = []
        with self.store.read() as db:
            while True:
                rows = self.store.list_stacks(db, org, project, after, STACK_PAGE_SIZE)
                for row in rows:
                    after = (row["org"], row["project"], row["name"])
                    tags = json.loads(row["tags"])
                    if tag_name is not None and (tag_name not in tags or (
                            tag_value is not None and tags[tag_name] != tag_value)):
                        continue
                    stacks.append(self.stack_summary(db, row))
                    if len(stacks) == STACK_PAGE_SIZE:
                        break
                if len(stacks) == STACK_PAGE_SIZE or len(rows) < STACK_PAGE_SIZE:
                    break
            # A full page may have stopped mid-batch: look for anything after it.
            more = len(stacks) == STACK_PAGE_SIZE and bool(
                self.store.list_stacks(db, org, project, after, 1))
        # Null (never "") when done: the CLI loops while a token comes back.
        return {"stacks": stacks,
                "continuationToken": _encode_page_token(after) if more else None}

    def get_stack(self, org: str, project: str, name: str) -> dict:
        with self.store.read() as db:
            return self.stack_json(db, self.stack(db, org, project, name))

    def project_exists(self, org: str, project: str) -> bool:
        self._check_names(org, project)
        with self.store.read() as db:
            return self.store.project_exists(db, org, project)

    def delete_stack(self, org: str, project: str, name: str, force: bool) -> None:
        with self.store.write() as db:
            row = self.stack(db, org, project, name)
            self._lock_stack(db, row)
            if row["resource_count"] > 0 and not force:
                raise BadRequest(MSG_STACK_HAS_RESOURCES)
            self.store.delete_stack(db, row["id"])
        log.info("deleted stack %s/%s/%s", org, project, name)

    def rename_stack(self, org: str, project: str, name: str, body: dict) -> None:
        new_name, new_project = body.get("newName"), body.get("newProject")
        new_name = name if new_name in (None, "") else new_name
        new_project = project if new_project in (None, "") else new_project
        if not isinstance(new_name, str) or not isinstance(new_project, str):
            raise BadRequest("newName and newProject must be strings")
        self._check_names(org, new_project, new_name)
        with self.store.write() as db:
            row = self.stack(db, org, project, name)
            if (new_project, new_name) == (project, name):
                return
            self._lock_stack(db, row)
            if self.store.get_stack(db, org, new_project, new_name) is not None:
                raise Conflict(f"stack '{org}/{new_project}/{new_name}' already exists")
            self.store.update_stack(db, row["id"], project=new_project, name=new_name)
            # The latest state names the stack in URNs and in its secrets provider;
            # rewrite it so the next update neither replaces everything nor asks
            # the old name to decrypt.
            dep = self.store.get_deployment(db, row["id"])
            doc = _rename_in_deployment(_loads(gzip.decompress(dep["data"]), "stored state"),
                                       (project, name), (new_project, new_name))
            data = _dumps(doc)
            self.store.put_deployment(db, row["id"], dep["version"], _gzip_bytes(data),
                                      len(data), dep["resource_count"])
        log.info("renamed stack %s/%s/%s to %s/%s", org, project, name, new_project, new_name)

    def set_tags(self, org: str, project: str, name: str, tags: Any) -> None:
        tags = _check_tags(tags)
        with self.store.write() as db:
            row = self.stack(db, org, project, name)
            self.store.update_stack(db, row["id"], tags=json.dumps(tags))

    # -- state --------------------------------------------------------------

    def export(self, org: str, project: str, name: str, version: Optional[int]) -> bytes:
        """Return the gzip bytes of the stack's latest (or given) deployment."""
        if version is not None and version < 1:
            raise BadRequest("version must be a positive integer")
        with self.store.read() as db:
            row = self.stack(db, org, project, name)
            abandoned = self._abandoned_update(db, row) is not None
        if abandoned:  # its acknowledged work becomes the latest state first
            self._finish_abandoned(org, project, name)
        with self.store.read() as db:
            row = self.stack(db, org, project, name)
            dep = self.store.get_deployment(db, row["id"], version)
        if dep is None:
            raise NotFound(f"version {version} of stack '{org}/{project}/{name}' not found")
        return dep["data"]

    def import_deployment(self, org: str, project: str, name: str, body: bytes,
                          cli_version: str) -> str:
        doc = _check_untyped_deployment(_loads(body))
        data = body.strip()
        with self.store.write() as db:
            row = self.stack(db, org, project, name)
            self._lock_stack(db, row)
            update_id, version = _new_id(), row["version"] + 1
            t = _now()
            self.store.insert_update(db, {
                "id": update_id, "stack_id": row["id"], "kind": "import", "dry_run": 0,
                "status": "succeeded", "created": t, "started": t, "ended": t,
                "version": version, "base_version": row["version"], "cli_version": cli_version,
                "resource_count": _count_resources(doc)})
            self._save_version(db, row, version, data, _count_resources(doc))
        log.info("imported state into %s/%s/%s as version %d", org, project, name, version)
        return update_id

    def _save_version(self, db, row: dict, version: int, data: bytes, resources: int) -> None:
        """Store ``data`` as ``version`` of the stack and make it the latest."""
        self.store.put_deployment(db, row["id"], version, _gzip_bytes(data), len(data), resources)
        self.store.update_stack(db, row["id"], version=version, resource_count=resources,
                                last_update=_now())
        self.store.prune_versions(db, row["id"], version - self.cfg.history_limit + 1,
                                  self.cfg.history_limit)

    # -- secrets ------------------------------------------------------------

    def _data_key(self, row: dict) -> bytes:
        with self._data_keys_lock:
            key = self._data_keys.get(row["id"])
            if key is None:
                key = self.keys.unwrap_data_key(row["id"], row["data_key"])
                self._data_keys[row["id"]] = key
            return key

    def _stack_key(self, org: str, project: str, name: str) -> bytes:
        with self.store.read() as db:
            return self._data_key(self.stack(db, org, project, name))

    def encrypt(self, org: str, project: str, name: str, plaintexts: list) -> list:
        key = self._stack_key(org, project, name)
        return [self.keys.crypto.seal(key, p) for p in plaintexts]

    def decrypt(self, org: str, project: str, name: str, ciphertexts: list) -> list:
        key = self._stack_key(org, project, name)
        out = []
        for c in ciphertexts:
            try:
                out.append(self.keys.crypto.open(key, c))
            except ValueError:
                raise BadRequest("a ciphertext could not be decrypted with this stack's key") \
                    from None
        return out

    # -- updates: create, start, lease ---------------------------------------

    def _running_update(self, db, row: dict) -> Optional[dict]:
        """Return the stack's running update, or None (also when its lease lapsed)."""
        if not row["active_update"]:
            return None
        update = self.store.get_update(db, row["active_update"])
        if update is None or update["status"] != "running":
            return None
        if update["lease_expires"] < _now():
            return None
        return update

    def _abandoned_update(self, db, row: dict) -> Optional[dict]:
        """Return the stack's update that is still running but whose lease lapsed."""
        if not row["active_update"]:
            return None
        update = self.store.get_update(db, row["active_update"])
        if update is None or update["status"] != "running" or update["lease_expires"] >= _now():
            return None
        return update

    def _lock_stack(self, db, row: dict) -> None:
        """Raise Conflict while another update holds the stack; finish an abandoned one."""
        abandoned = self._abandoned_update(db, row)
        if abandoned is not None:
            log.warning("update %s abandoned (lease expired); finishing it as failed",
                        abandoned["id"])
            self._finish(db, row, abandoned, "failed")
            row.update(self.store.get_stack_by_id(db, row["id"]))
        elif self._running_update(db, row) is not None:
            raise Conflict(MSG_UPDATE_CONFLICT)

    def _finish_abandoned(self, org: str, project: str, name: str) -> None:
        with self.store.write() as db:
            row = self.stack(db, org, project, name)
            if self._abandoned_update(db, row) is not None:
                self._lock_stack(db, row)

    def create_update(self, org: str, project: str, name: str, kind: str, body: dict) -> dict:
        if kind not in _UPDATE_KINDS:
            raise NotFound(f"unknown update kind {kind!r}")
        options = body.get("options")
        options = {} if options is None else options
        if not isinstance(options, dict):
            raise BadRequest("options must be an object")
        dry_run = kind == "preview" or bool(options.get("dryRun"))
        program = {k: body.get(k) for k in ("name", "runtime", "main", "description", "config",
                                             "metadata")}
        with self.store.write() as db:
            row = self.stack(db, org, project, name)
            update_id = _new_id()
            self.store.insert_update(db, {
                "id": update_id, "stack_id": row["id"], "kind": kind, "dry_run": int(dry_run),
                "status": "not started", "created": _now(), "program": json.dumps(program)})
        return {"updateID": update_id}

    def start_update(self, org: str, project: str, name: str, update_id: str, body: dict,
                     cli_version: str) -> dict:
        tags = body.get("tags")
        if tags is not None:
            tags = _check_tags(tags)
        wants_journal = body.get("journalVersion") or 0
        with self.store.write() as db:
            row = self.stack(db, org, project, name)
            update = self._update_of(db, row, update_id)
            if update["status"] != "not started":
                raise Conflict("the update has already been started")
            if not update["dry_run"]:
                self._lock_stack(db, row)  # may finish an abandoned update: a new version
            t = _now()
            fields: dict = {"status": "running", "started": t, "cli_version": cli_version,
                            "lease_token": secrets.token_urlsafe(32),
                            "lease_expires": t + self.cfg.lease_seconds,
                            "base_version": row["version"], "version": row["version"]}
            if not update["dry_run"]:
                fields["version"] = row["version"] + 1
                # The newest format both sides know: a v3.274 CLI offers 2, older ones 1.
                fields["journal"] = (int(min(wants_journal, JOURNAL_VERSION))
                                     if self.cfg.journaling and isinstance(wants_journal, int)
                                     and wants_journal >= 1 else 0)
                self.store.update_stack(db, row["id"], active_update=update_id)
            if tags is not None:
                self.store.update_stack(db, row["id"], tags=json.dumps(tags))
            self.store.update_update(db, update_id, **fields)
        log.info("started %s %s on %s/%s/%s (version %d, %s)", update["kind"], update_id, org,
                 project, name, fields["version"],
                 "dry run" if update["dry_run"] else
                 (f"journal v{fields['journal']}" if fields.get("journal") else "checkpoints"))
        return {"version": fields["version"], "token": fields["lease_token"],
                "tokenExpiration": fields["lease_expires"],
                "journalVersion": fields.get("journal", 0)}

    def _update_of(self, db, row: dict, update_id: str) -> dict:
        update = self.store.get_update(db, update_id)
        if update is None or update["stack_id"] != row["id"]:
            raise NotFound(f"update '{update_id}' not found")
        return update

    def _leased_update(self, db, org: str, project: str, name: str, update_id: str,
                       token: str) -> tuple:
        """Return ``(stack, update)`` if ``token`` is the live lease of that update; else 403."""
        row = self.stack(db, org, project, name)
        update = self._update_of(db, row, update_id)
        if not update["lease_token"] or not hmac.compare_digest(
                update["lease_token"].encode(), token.encode()):
            raise Forbidden("the update token is not valid for this update")
        if update["status"] != "running":
            raise Forbidden("the update is no longer running")
        if update["lease_expires"] < _now():
            raise Forbidden("the update lease has expired")
        # The CLI assumes 5-minute leases and renews late; every accepted call
        # of a busy update also extends its lease, so a shorter --lease-seconds
        # only ever ends updates whose CLI went quiet.
        expires = _now() + self.cfg.lease_seconds
        if expires > update["lease_expires"]:
            self.store.update_update(db, update_id, lease_expires=expires)
            update["lease_expires"] = expires
        return row, update

    def check_lease_token(self, org, project, name, update_id, token: str) -> None:
        """Raise Forbidden unless ``token`` is (or, once finished, was) that update's lease.

        Liveness (running, not expired) is checked by each call under the write lock.
        """
        with self.store.read() as db:
            row = self.stack(db, org, project, name)
            update = self._update_of(db, row, update_id)
        if not update["lease_token"] or not hmac.compare_digest(
                update["lease_token"].encode(), token.encode()):
            raise Forbidden("the update token is not valid for this update")

    def renew_lease(self, org, project, name, update_id, token, body: dict) -> dict:
        duration = _int_field(body, "duration", self.cfg.lease_seconds)
        if duration < 1:
            raise BadRequest("duration must be a positive number of seconds")
        duration = max(1, min(duration, self.cfg.lease_seconds))
        with self.store.write() as db:
            _, update = self._leased_update(db, org, project, name, update_id, token)
            expires = _now() + duration
            self.store.update_update(db, update_id, lease_expires=expires)
        return {"token": update["lease_token"], "tokenExpiration": expires}

    # -- updates: state uploads -------------------------------------------

    def _checkpointed_update(self, db, org, project, name, update_id, token) -> tuple:
        row, update = self._leased_update(db, org, project, name, update_id, token)
        if update["dry_run"]:
            raise BadRequest("previews do not save state")
        return row, update

    def _working(self, db, update_id: str) -> Optional[tuple]:
        """Return ``(seq, bytes, sha256)`` of the update's latest checkpoint, or None."""
        item = self.working.get(update_id)
        if item is not None:
            return item
        rows = self.store.checkpoint_rows(db, update_id)
        if not rows:
            return None
        data = b""
        for r in rows:
            data = r["data"] if r["kind"] == "full" else apply_delta(data, _loads(r["data"]))
        item = (rows[-1]["seq"], data, rows[-1]["hash"])
        self.working.put(update_id, *item)
        return item

    def checkpoint_full(self, org, project, name, update_id, token, body: bytes) -> None:
        req = _require_dict(_loads(body))
        if req.get("isInvalid"):  # legacy "invalidate": keep the last good checkpoint
            with self.store.write() as db:
                self._checkpointed_update(db, org, project, name, update_id, token)
            return
        doc = {"version": req.get("version")}
        if req.get("features"):
            doc["features"] = req["features"]
        doc["deployment"] = req.get("deployment")
        data = _dumps(_check_untyped_deployment(doc))
        digest = hashlib.sha256(data).hexdigest()
        with self.store.write() as db:
            self._checkpointed_update(db, org, project, name, update_id, token)
            current = self._working(db, update_id)
            seq = current[0] + 1 if current else 1
            self.store.put_checkpoint(db, update_id, seq, "full", data, digest)
            self.store.after_commit(lambda: self.working.put(update_id, seq, data, digest))
        self.metrics.inc("pulumi_backend_checkpoints_total", form="full")

    def checkpoint_verbatim(self, org, project, name, update_id, token, body: bytes) -> None:
        seq, data = _split_verbatim(body)
        _check_untyped_deployment(_loads(data, "untypedDeployment"))
        digest = hashlib.sha256(data).hexdigest()
        with self.store.write() as db:
            self._checkpointed_update(db, org, project, name, update_id, token)
            current = self._working(db, update_id)
            if current is not None and seq < current[0]:
                raise Conflict(f"sequence number {seq} is older than the last saved "
                               f"{current[0]}")
            self.store.put_checkpoint(db, update_id, seq, "full", data, digest)
            self.store.after_commit(lambda: self.working.put(update_id, seq, data, digest))
        self.metrics.inc("pulumi_backend_checkpoints_total", form="verbatim")

    def checkpoint_delta(self, org, project, name, update_id, token, body: bytes) -> None:
        req = _require_dict(_loads(body))
        seq = _int_field(req, "sequenceNumber")
        expected = req.get("checkpointHash")
        if not isinstance(expected, str) or not _SHA256_HEX_RE.fullmatch(expected):
            raise BadRequest("checkpointHash must be a SHA-256 hex digest")
        with self.store.write() as db:
            self._checkpointed_update(db, org, project, name, update_id, token)
            current = self._working(db, update_id)
            if current is None:
                raise Conflict("no checkpoint to apply a delta to; send it verbatim")
            last_seq, prev, last_hash = current
            if seq == last_seq:
                if hmac.compare_digest(expected.lower(), last_hash):
                    return  # a retry of the delta we already applied
                raise Conflict(f"sequence number {seq} was already saved with another hash")
            if seq != last_seq + 1:
                raise Conflict(f"sequence number {seq} does not follow {last_seq}")
            edits = req.get("deploymentDelta")
            data = apply_delta(prev, edits)
            digest = hashlib.sha256(data).hexdigest()
            if not hmac.compare_digest(digest, expected.lower()):
                raise Conflict("checkpointHash does not match the state after applying the delta")
            if seq % DELTA_CHAIN_LIMIT == 0:  # bound the rebuild work after a restart
                self.store.put_checkpoint(db, update_id, seq, "full", data, digest)
            else:
                self.store.put_checkpoint(db, update_id, seq, "delta", _dumps(edits), digest)
            self.store.after_commit(lambda: self.working.put(update_id, seq, data, digest))
        self.metrics.inc("pulumi_backend_checkpoints_total", form="delta")

    def journal_append(self, org, project, name, update_id, token, body: bytes) -> int:
        req = _require_dict(_loads(body))
        entries = req.get("entries")
        if not isinstance(entries, list):
            raise BadRequest("entries must be a list")
        entries = [_check_journal_entry(entry) for entry in entries]
        rows = [(entry["sequenceID"], _dumps(entry)) for entry in entries]
        with self.store.write() as db:
            _, update = self._checkpointed_update(db, org, project, name, update_id, token)
            if not update["journal"]:
                raise BadRequest("this update was not started with journaling")
            for entry in entries:  # entries no newer than the format agreed at start
                if entry.get("version", 1) > update["journal"]:
                    raise BadRequest(f"journal entry {entry['sequenceID']} has version "
                                     f"{entry['version']}; this update accepts up to "
                                     f"{update['journal']}")
            self.store.append_journal(db, update_id, rows)
        self.metrics.inc("pulumi_backend_journal_entries_total", len(rows))
        return len(rows)

    # -- updates: events ----------------------------------------------------

    def events_append(self, org, project, name, update_id, token, body: bytes) -> None:
        req = _require_dict(_loads(body))
        events = req.get("events")
        if not isinstance(events, list):
            raise BadRequest("events must be a list")
        rows, changes = [], None
        for event in events:
            event = _require_dict(event, "engine event")
            seq = _int_field(event, "sequence")
            if seq < 0:
                raise BadRequest("event sequence must not be negative")
            summary = event.get("summaryEvent")
            if isinstance(summary, dict) and isinstance(summary.get("resourceChanges"), dict):
                changes = summary["resourceChanges"]
            rows.append((seq, _dumps(event)))
        with self.store.write() as db:
            self._leased_update(db, org, project, name, update_id, token)
            self.store.append_events(db, update_id, rows)
            if changes is not None:
                self.store.update_update(db, update_id, resource_changes=json.dumps(changes))

    def list_events(self, org, project, name, update_id, token: Optional[str]) -> dict:
        after = -1
        if token:
            if not (token.isascii() and token.isdigit()) or len(token) > 18:
                raise BadRequest("invalid continuationToken")
            after = int(token)
        with self.store.read() as db:
            row = self.stack(db, org, project, name)
            update = self._update_of(db, row, update_id)
            page = self.store.list_events(db, update_id, after, EVENT_PAGE_SIZE)
        events = [_loads(data, "stored event") for _, data in page]
        last = page[-1][0] if page else after
        running = update["status"] in ("not started", "running")
        more = running or len(page) == EVENT_PAGE_SIZE
        return {"events": events, "continuationToken": str(last) if more else None}

    # -- updates: completion ------------------------------------------------

    def complete(self, org, project, name, update_id, token, body: dict) -> None:
        status = body.get("status")
        if status not in ("succeeded", "failed", "cancelled"):
            raise BadRequest("status must be succeeded, failed or cancelled")
        with self.store.write() as db:
            row = self.stack(db, org, project, name)
            update = self._update_of(db, row, update_id)
            if update["status"] != "running" and update["lease_token"] and hmac.compare_digest(
                    update["lease_token"].encode(), token.encode()):
                if update["status"] == status:
                    return  # a retried complete
                raise Conflict("The Update has already completed")
            row, update = self._leased_update(db, org, project, name, update_id, token)
            self._finish(db, row, update, status)

    def cancel(self, org, project, name, update_id) -> None:
        with self.store.write() as db:
            row = self.stack(db, org, project, name)
            update = self._update_of(db, row, update_id)
            if update["status"] not in ("not started", "running"):
                raise Conflict("The Update has already completed")
            self._finish(db, row, update, "cancelled")
            self.store.update_update(db, update_id, lease_token="")  # revoked: later calls 403
        log.info("cancelled update %s of %s/%s/%s", update_id, org, project, name)

    def _finish(self, db, row: dict, update: dict, status: str) -> None:
        """End ``update`` with ``status``; for a real update, store its final state.

        If that state cannot be built, a completing update gets Conflict (and
        stays open, its journal intact); a cancelled or abandoned one ends as
        failed without a new version, keeping its rows for inspection.
        """
        fields: dict = {"status": status, "ended": _now()}
        self.store.after_commit(lambda: self.metrics.inc(
            "pulumi_backend_updates_total", kind=update["kind"], status=status))
        if not update["dry_run"] and update["status"] == "running":
            try:
                data, count = self._final_state(db, update)
            except Conflict as e:
                if status == "succeeded":
                    raise
                log.error("update %s ends without a new version: %s", update["id"], e.message)
                self.store.update_update(db, update["id"], **fields)
                return
            fields["resource_count"] = count
            self._save_version(db, row, update["version"], data, count)
            self.store.clear_checkpoints(db, update["id"])
            self.store.clear_journal(db, update["id"])
            self.working.discard(update["id"])
        self.store.update_update(db, update["id"], **fields)

    def _final_state(self, db, update: dict) -> tuple:
        """Return ``(bytes, resource count)`` of the state an update produced (its base
        if it saved none)."""
        base = self.store.get_deployment(db, update["stack_id"], update["base_version"])
        base_bytes = gzip.decompress(base["data"]) if base else _empty_deployment()
        base_count = base["resource_count"] if base else 0
        if update["journal"]:
            entries = [json.loads(e) for e in self.store.journal_entries(db, update["id"])]
            if not entries:
                return base_bytes, base_count
            try:
                # The parsed base is ours alone: replay over it without replay_journal's
                # copy (a 10 MB state is ~10 MB of Python objects per copy).
                replayer = _JournalReplayer(json.loads(base_bytes).get("deployment") or {})
                for entry in entries:
                    replayer.add(entry)
                doc = replayer.generate(update["cli_version"])
                del entries, replayer  # replaced base resources and begin entries: free them
                return _dumps(doc), _count_resources(doc)
            except (HTTPError, ValueError, KeyError, TypeError, IndexError,
                    AttributeError) as e:
                raise Conflict(f"the update's journal cannot be replayed: {e}") from None
        working = self._working(db, update["id"])
        if working is None:
            return base_bytes, base_count
        try:
            doc = _check_untyped_deployment(json.loads(working[1]))
        except (ValueError, BadRequest):
            raise Conflict("the update's last checkpoint is not a valid deployment") from None
        return working[1], _count_resources(doc)

    # -- updates: reading ---------------------------------------------------

    def update_results(self, org, project, name, update_id) -> dict:
        with self.store.read() as db:
            row = self.stack(db, org, project, name)
            update = self._update_of(db, row, update_id)
        status = {"cancelled": "failed"}.get(update["status"], update["status"])
        out: dict = {"status": status, "events": []}
        if update["status"] in ("not started", "running"):
            out["continuationToken"] = update_id
        return out

    def history(self, org, project, name, page_size: int, page: int) -> dict:
        with self.store.read() as db:
            row = self.stack(db, org, project, name)
            if page_size > 0:
                updates = self.store.list_history(db, row["id"], page_size,
                                                  (max(page, 1) - 1) * page_size)
            else:
                updates = self.store.list_history(db, row["id"], -1, 0)
        return {"updates": [self._update_info(u) for u in updates]}

    def latest_update(self, org, project, name) -> dict:
        with self.store.read() as db:
            row = self.stack(db, org, project, name)
            updates = self.store.list_history(db, row["id"], 1, 0)
        if not updates:
            raise NotFound(f"stack '{org}/{project}/{name}' has no updates")
        return {"info": self._update_info(updates[0])}

    @staticmethod
    def _update_info(update: dict) -> dict:
        program = json.loads(update["program"] or "{}")
        metadata = program.get("metadata") or {}
        result = {"running": "in-progress", "not started": "not-started",
                  "cancelled": "failed"}.get(update["status"], update["status"])
        info = {"kind": update["kind"], "startTime": update["started"] or update["created"],
                "message": metadata.get("message") or "",
                "environment": metadata.get("environment") or {},
                "config": program.get("config") or {}, "result": result,
                "endTime": update["ended"] or 0, "version": update["version"],
                "updateID": update["id"]}
        if update["resource_changes"]:
            info["resourceChanges"] = json.loads(update["resource_changes"])
        if update["resource_count"]:
            info["resourceCount"] = update["resource_count"]
        return info

    # -- operations ---------------------------------------------------------

    def check_writable(self) -> None:
        """Raise sqlite3.Error unless a tiny write commits.

        The outcome is reused for READY_CHECK_SECONDS, so probes (which need
        no token) cannot queue writes and fsyncs in front of real updates.
        """
        with self._ready_lock:
            if time.monotonic() - self._ready_checked >= READY_CHECK_SECONDS:
                try:
                    with self.store.write() as db:
                        self.store.set_meta(db, "ready_check", str(_now()).encode())
                    self._ready_error = None
                except sqlite3.Error as e:
                    self._ready_error = e
                self._ready_checked = time.monotonic()
            if self._ready_error is not None:
                raise self._ready_error

    def gauges(self) -> dict:
        """Return the current values of the gauges /metrics exposes."""
        with self.store.read() as db:
            stacks = self.store.count_stacks(db)
            running = self.store.count_running_updates(db, _now())
        written = {(("table", t),): n for t, n in self.store.bytes_written.items()}
        return {"pulumi_backend_stacks": stacks, "pulumi_backend_active_updates": running,
                "pulumi_backend_database_bytes": self.store.database_bytes(),
                "pulumi_backend_state_bytes_written_total": written}


def _check_resource(value: Any, what: str) -> None:
    if not isinstance(value, dict) or not isinstance(value.get("urn"), str) \
            or not isinstance(value.get("type", ""), str):
        raise BadRequest(f"{what} must be a resource object with a string urn")


def _check_journal_entry(entry: Any) -> dict:
    """Validate one journal entry's shape; what only the whole journal can show (such
    as two resources claiming one alias) is caught when the update completes."""
    entry = _require_dict(entry, "journal entry")
    seq, kind = _int_field(entry, "sequenceID"), _int_field(entry, "kind")
    version = _int_field(entry, "version", 1)
    if seq < 1 or not 0 <= kind <= 10 or not 1 <= version <= JOURNAL_VERSION:
        raise BadRequest(f"journal entry {seq} has an invalid sequenceID, kind or version")
    if kind == 10:
        _check_state_migration_entry(entry, seq, version)
    _int_field(entry, "operationID", 0)
    for key in ("removeOld", "removeNew", "deleteOld", "deleteNew", "pendingReplacementOld",
                "pendingReplacementNew"):
        if entry.get(key) is not None:
            _int_field(entry, key)
    if entry.get("state") is not None:
        _check_resource(entry["state"], f"journal entry {seq} state")
    if entry.get("operation") is not None:
        op = _require_dict(entry["operation"], f"journal entry {seq} operation")
        _check_resource(op.get("resource"), f"journal entry {seq} operation resource")
    if kind == 5:
        snapshot = _require_dict(entry.get("newSnapshot"), f"journal entry {seq} newSnapshot")
        resources = snapshot.get("resources") or []
        if not isinstance(resources, list):
            raise BadRequest(f"journal entry {seq} newSnapshot resources must be a list")
        for res in resources:
            _check_resource(res, f"journal entry {seq} newSnapshot resource")
    if entry.get("secretsProvider") is not None:
        _require_dict(entry["secretsProvider"], f"journal entry {seq} secretsProvider")
    if entry.get("snippets") is not None and not isinstance(entry["snippets"], list):
        raise BadRequest(f"journal entry {seq} snippets must be a list")
    if kind == 8 and not isinstance(entry.get("extensionRef"), str):
        raise BadRequest(f"journal entry {seq} needs a string extensionRef")
    return entry


def _check_state_migration_entry(entry: dict, seq: int, version: int) -> None:
    """Shape of a kind-10 entry; its meaning is checked when it is replayed."""
    if version != 2:
        raise BadRequest(f"journal entry {seq}: a state migration must use version 2")
    for key in ("layout", "states", "baseStatePatches", "newStatePatches"):
        if not isinstance(entry.get(key) or [], list):
            raise BadRequest(f"journal entry {seq} {key} must be a list")
    for item in entry.get("layout") or []:
        item = _require_dict(item, f"journal entry {seq} layout item")
        for key in ("baseIndex", "stateIndex"):
            if item.get(key) is not None:
                _int_field(item, key)
    for state in entry.get("states") or []:
        _check_resource(state, f"journal entry {seq} state")
    for key, index in (("baseStatePatches", "index"), ("newStatePatches", "operationID")):
        for patch in entry.get(key) or []:
            patch = _require_dict(patch, f"journal entry {seq} {key} item")
            _int_field(patch, index)
            _check_resource(patch.get("state"), f"journal entry {seq} {key} state")


def _check_tags(tags: Any) -> dict:
    tags = _require_dict(tags, "tags")
    for k, v in tags.items():
        if not _TAG_NAME_RE.match(k):
            raise BadRequest(f"invalid tag name {k!r}")
        if not isinstance(v, str) or len(v) > 256:
            raise BadRequest(f"tag {k!r} must have a string value of at most 256 characters")
    return tags


def _encode_page_token(key: tuple) -> str:
    return base64.urlsafe_b64encode(_dumps(list(key))).decode("ascii").rstrip("=")


def _decode_page_token(token: Optional[str]) -> tuple:
    if not token:
        return ("", "", "")
    try:
        key = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, TypeError, RecursionError):
        raise BadRequest("invalid continuationToken") from None
    if not (isinstance(key, list) and len(key) == 3 and all(isinstance(k, str) for k in key)):
        raise BadRequest("invalid continuationToken")
    return tuple(key)


# ==== 7. Crypto =============================================================
# AES-256-GCM through the system's libcrypto (ctypes), or a pure-Python
# implementation giving identical bytes. Ciphertexts are
#   version (1 byte, 0x01) || nonce (12) || ciphertext || tag (16)
# Per-stack data keys are wrapped by the master key with the stack id as
# associated data, so a wrapped key cannot be moved to another stack.

_CIPHERTEXT_VERSION = 1
_NONCE_LEN, _TAG_LEN, _KEY_LEN = 12, 16, 32
_EVP_CTRL_GCM_SET_IVLEN, _EVP_CTRL_GCM_GET_TAG, _EVP_CTRL_GCM_SET_TAG = 0x9, 0x10, 0x11


class _OpenSSLGCM:
    """AES-256-GCM through libcrypto's EVP interface (OpenSSL 1.1 and 3.x)."""

    name = "openssl"

    def __init__(self, lib: ctypes.CDLL):
        c_p, c_i, c_cp = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
        self.lib = lib
        for fn, args, res in (
                ("EVP_CIPHER_CTX_new", [], c_p),
                ("EVP_CIPHER_CTX_free", [c_p], None),
                ("EVP_aes_256_gcm", [], c_p),
                ("EVP_EncryptInit_ex", [c_p, c_p, c_p, c_cp, c_cp], c_i),
                ("EVP_DecryptInit_ex", [c_p, c_p, c_p, c_cp, c_cp], c_i),
                ("EVP_EncryptUpdate", [c_p, c_p, ctypes.POINTER(c_i), c_cp, c_i], c_i),
                ("EVP_DecryptUpdate", [c_p, c_p, ctypes.POINTER(c_i), c_cp, c_i], c_i),
                ("EVP_EncryptFinal_ex", [c_p, c_p, ctypes.POINTER(c_i)], c_i),
                ("EVP_DecryptFinal_ex", [c_p, c_p, ctypes.POINTER(c_i)], c_i),
                ("EVP_CIPHER_CTX_ctrl", [c_p, c_i, c_i, c_p], c_i),
                ("ERR_clear_error", [], None)):
            f = getattr(lib, fn)
            f.argtypes, f.restype = args, res

    def _run(self, encrypt: bool, key: bytes, nonce: bytes, data: bytes, aad: bytes,
             tag: bytes = b"") -> tuple:
        lib = self.lib
        ctx = lib.EVP_CIPHER_CTX_new()
        if not ctx:
            raise MemoryError("EVP_CIPHER_CTX_new failed")
        try:
            init = lib.EVP_EncryptInit_ex if encrypt else lib.EVP_DecryptInit_ex
            update = lib.EVP_EncryptUpdate if encrypt else lib.EVP_DecryptUpdate
            final = lib.EVP_EncryptFinal_ex if encrypt else lib.EVP_DecryptFinal_ex
            n = ctypes.c_int(0)
            ok = (init(ctx, lib.EVP_aes_256_gcm(), None, None, None) == 1
                  and lib.EVP_CIPHER_CTX_ctrl(ctx, _EVP_CTRL_GCM_SET_IVLEN, len(nonce), None) == 1
                  and init(ctx, None, None, key, nonce) == 1)
            if ok and aad:
                ok = update(ctx, None, ctypes.byref(n), aad, len(aad)) == 1
            out = ctypes.create_string_buffer(len(data) + 16)
            ok = ok and update(ctx, out, ctypes.byref(n), data, len(data)) == 1
            size = n.value
            if ok and not encrypt:
                tag_buf = ctypes.create_string_buffer(tag, len(tag))
                ok = lib.EVP_CIPHER_CTX_ctrl(ctx, _EVP_CTRL_GCM_SET_TAG, len(tag), tag_buf) == 1
            ok = ok and final(ctx, ctypes.cast(ctypes.byref(out, size), ctypes.c_void_p),
                              ctypes.byref(n)) == 1
            if not ok:
                raise ValueError("AES-GCM operation failed (wrong key or tampered data)")
            size += n.value
            tag_out = b""
            if encrypt:
                tag_buf = ctypes.create_string_buffer(_TAG_LEN)
                if lib.EVP_CIPHER_CTX_ctrl(ctx, _EVP_CTRL_GCM_GET_TAG, _TAG_LEN, tag_buf) != 1:
                    raise ValueError("could not read the GCM tag")
                tag_out = tag_buf.raw
            return out.raw[:size], tag_out
        except ValueError:
            lib.ERR_clear_error()
            raise
        finally:
            lib.EVP_CIPHER_CTX_free(ctx)

    def encrypt(self, key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> tuple:
        return self._run(True, key, nonce, plaintext, aad)

    def decrypt(self, key: bytes, nonce: bytes, ciphertext: bytes, tag: bytes,
                aad: bytes) -> bytes:
        return self._run(False, key, nonce, ciphertext, aad, tag)[0]


def _load_libcrypto(explicit: str = "") -> Optional[ctypes.CDLL]:
    """Find a usable libcrypto: explicit path, the one _hashlib loaded, then by name."""
    candidates = [explicit] if explicit else []
    try:
        import _hashlib  # noqa: F401  (loads libcrypto into this process)
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            for line in maps:
                path = line.split()[-1] if line.split() else ""
                if "libcrypto" in os.path.basename(path) and path not in candidates:
                    candidates.append(path)
    except (ImportError, OSError):
        pass
    for name in ("libcrypto.so.3", "libcrypto.so.1.1", ctypes.util.find_library("crypto"),
                 "libcrypto.dylib"):
        if name and name not in candidates:
            candidates.append(name)
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
            getattr(lib, "EVP_aes_256_gcm")  # sentinel: the EVP API is there
            return lib
        except (OSError, AttributeError):
            continue
    return None


# -- pure-Python AES-256-GCM (the fallback) ---------------------------------

def _aes_tables() -> tuple:
    sbox = [0] * 256
    p = q = 1
    while True:  # walk the multiplicative group of GF(2^8) to build the S-box
        p = p ^ ((p << 1) & 0xFF) ^ (0x1B if p & 0x80 else 0)
        q ^= q << 1
        q ^= q << 2
        q ^= q << 4
        q &= 0xFF
        if q & 0x80:
            q ^= 0x09
        x = q ^ ((q << 1) | (q >> 7)) ^ ((q << 2) | (q >> 6)) ^ ((q << 3) | (q >> 5)) \
            ^ ((q << 4) | (q >> 4))
        sbox[p] = (x ^ 0x63) & 0xFF
        if p == 1:
            break
    sbox[0] = 0x63

    def xtime(a: int) -> int:
        return ((a << 1) ^ 0x1B) & 0xFF if a & 0x80 else a << 1

    # T-table: one 32-bit word per S-box output combining SubBytes and MixColumns.
    t0 = []
    for a in sbox:
        a2 = xtime(a)
        t0.append((a2 << 24) | (a << 16) | (a << 8) | (a2 ^ a))
    rot = [t0]
    for _ in range(3):
        rot.append([((w >> 8) | (w << 24)) & 0xFFFFFFFF for w in rot[-1]])
    return sbox, rot


class _PythonGCM:
    """AES-256-GCM in pure Python; identical bytes to OpenSSL, much slower."""

    name = "python"

    def __init__(self):
        self.sbox, self.t = _aes_tables()

    def _round_keys(self, key: bytes) -> list:
        sbox, words = self.sbox, [int.from_bytes(key[i:i + 4], "big") for i in range(0, 32, 4)]
        rcon = 1
        for i in range(8, 60):
            w = words[i - 1]
            if i % 8 == 0:
                w = ((w << 8) | (w >> 24)) & 0xFFFFFFFF
                w = (sbox[w >> 24] << 24) | (sbox[(w >> 16) & 255] << 16) | \
                    (sbox[(w >> 8) & 255] << 8) | sbox[w & 255]
                w ^= rcon << 24
                rcon = ((rcon << 1) ^ 0x1B) & 0xFF if rcon & 0x80 else rcon << 1
            elif i % 8 == 4:
                w = (sbox[w >> 24] << 24) | (sbox[(w >> 16) & 255] << 16) | \
                    (sbox[(w >> 8) & 255] << 8) | sbox[w & 255]
            words.append(words[i - 8] ^ w)
        return words

    def _encrypt_block(self, rk: list, block: int) -> int:
        t0, t1, t2, t3 = self.t
        sbox = self.sbox
        s = [((block >> (96 - 32 * i)) & 0xFFFFFFFF) ^ rk[i] for i in range(4)]
        for r in range(1, 14):
            s = [t0[s[i] >> 24] ^ t1[(s[(i + 1) % 4] >> 16) & 255] ^
                 t2[(s[(i + 2) % 4] >> 8) & 255] ^ t3[s[(i + 3) % 4] & 255] ^ rk[4 * r + i]
                 for i in range(4)]
        out = 0
        for i in range(4):
            w = (sbox[s[i] >> 24] << 24) | (sbox[(s[(i + 1) % 4] >> 16) & 255] << 16) | \
                (sbox[(s[(i + 2) % 4] >> 8) & 255] << 8) | sbox[s[(i + 3) % 4] & 255]
            out = (out << 32) | (w ^ rk[56 + i])
        return out

    @staticmethod
    def _gmul(x: int, h: int) -> int:
        z, r = 0, 0xE1 << 120
        for i in range(127, -1, -1):
            if (x >> i) & 1:
                z ^= h
            h = (h >> 1) ^ r if h & 1 else h >> 1
        return z

    def _ghash(self, h: int, aad: bytes, data: bytes) -> int:
        y = 0
        for chunk in (aad, data):
            for i in range(0, len(chunk), 16):
                block = chunk[i:i + 16].ljust(16, b"\0")
                y = self._gmul(y ^ int.from_bytes(block, "big"), h)
        return self._gmul(y ^ ((len(aad) * 8) << 64 | len(data) * 8), h)

    def _ctr(self, rk: list, j0: int, data: bytes) -> bytes:
        out = bytearray()
        counter = j0
        for i in range(0, len(data), 16):
            counter = (counter & ~0xFFFFFFFF) | ((counter + 1) & 0xFFFFFFFF)
            stream = self._encrypt_block(rk, counter).to_bytes(16, "big")
            out += bytes(a ^ b for a, b in zip(data[i:i + 16], stream))
        return bytes(out)

    def _setup(self, key: bytes, nonce: bytes) -> tuple:
        rk = self._round_keys(key)
        h = self._encrypt_block(rk, 0)
        if len(nonce) == 12:
            j0 = int.from_bytes(nonce + b"\0\0\0\1", "big")
        else:
            j0 = self._ghash(h, b"", nonce)
        return rk, h, j0

    def encrypt(self, key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> tuple:
        rk, h, j0 = self._setup(key, nonce)
        ct = self._ctr(rk, j0, plaintext)
        tag = self._encrypt_block(rk, j0) ^ self._ghash(h, aad, ct)
        return ct, tag.to_bytes(16, "big")

    def decrypt(self, key: bytes, nonce: bytes, ciphertext: bytes, tag: bytes,
                aad: bytes) -> bytes:
        rk, h, j0 = self._setup(key, nonce)
        expected = (self._encrypt_block(rk, j0) ^ self._ghash(h, aad, ciphertext)).to_bytes(16, "big")
        if not hmac.compare_digest(expected, tag):
            raise ValueError("AES-GCM authentication failed (wrong key or tampered data)")
        return self._ctr(rk, j0, ciphertext)


class Crypto:
    """Versioned AES-256-GCM sealing over one implementation (OpenSSL or Python)."""

    def __init__(self, mode: str = "auto", libcrypto: str = ""):
        self.impl: Any = None
        if mode in ("auto", "openssl"):
            lib = _load_libcrypto(libcrypto)
            if lib is not None:
                try:
                    self.impl = _OpenSSLGCM(lib)
                except AttributeError:
                    self.impl = None
            if self.impl is None and mode == "openssl":
                raise RuntimeError("--crypto openssl: no usable libcrypto found "
                                   "(set PULUMI_BACKEND_LIBCRYPTO to its path)")
        if self.impl is None:
            self.impl = _PythonGCM()
        self.name = self.impl.name

    def seal(self, key: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
        """Encrypt with a fresh random nonce; return version || nonce || ct || tag."""
        if len(key) != _KEY_LEN:
            raise ValueError("AES-256 needs a 32-byte key")
        nonce = secrets.token_bytes(_NONCE_LEN)
        ct, tag = self.impl.encrypt(key, nonce, plaintext, aad)
        return bytes([_CIPHERTEXT_VERSION]) + nonce + ct + tag

    def open(self, key: bytes, blob: bytes, aad: bytes = b"") -> bytes:
        """Decrypt ``seal`` output; raise ValueError if it is malformed or was altered."""
        if len(key) != _KEY_LEN:
            raise ValueError("AES-256 needs a 32-byte key")
        # The length check guarantees a whole 16-byte tag: OpenSSL alone would
        # accept a truncated one.
        if len(blob) < 1 + _NONCE_LEN + _TAG_LEN or blob[0] != _CIPHERTEXT_VERSION:
            raise ValueError("not a ciphertext of this server")
        nonce, body = blob[1:1 + _NONCE_LEN], blob[1 + _NONCE_LEN:]
        ct, tag = body[:-_TAG_LEN], body[-_TAG_LEN:]
        return self.impl.decrypt(key, nonce, ct, tag, aad)


_CANARY = b"pulumi-backend master key canary"


class KeyManager:
    """The master key and the per-stack data keys it wraps."""

    def __init__(self, crypto: Crypto, master_key: bytes):
        if len(master_key) != _KEY_LEN:
            raise ValueError("the master key must be exactly 32 bytes")
        self.crypto = crypto
        self._master = master_key

    @staticmethod
    def load_or_create(path: str) -> bytes:
        """Read the 32-byte key at ``path``, creating it (mode 0600) when absent."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            with open(path, "rb") as f:
                key = f.read()
            if len(key) != _KEY_LEN:
                raise ValueError(f"master key file {path} must hold exactly 32 bytes") from None
            return key
        key = secrets.token_bytes(_KEY_LEN)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        # The database will depend on this key: make its directory entry durable too.
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return key

    def wrap_data_key(self, stack_id: str, data_key: bytes) -> bytes:
        return self.crypto.seal(self._master, data_key, b"stack:" + stack_id.encode())

    def unwrap_data_key(self, stack_id: str, wrapped: bytes) -> bytes:
        return self.crypto.open(self._master, wrapped, b"stack:" + stack_id.encode())

    def check_canary(self, store: SQLiteStore) -> None:
        """Create the canary on first start; refuse a master key that cannot open it."""
        with store.write() as db:
            canary = store.get_meta(db, "canary")
            if canary is None:
                store.set_meta(db, "canary", self.crypto.seal(self._master, _CANARY))
                return
        try:
            ok = self.crypto.open(self._master, canary) == _CANARY
        except ValueError:
            ok = False
        if not ok:
            raise ValueError("the master key does not match this database "
                             "(wrong --master-key-file or PULUMI_BACKEND_MASTER_KEY)")

    def rotate(self, store: SQLiteStore, new_master: bytes) -> int:
        """Rewrap every data key and the canary under ``new_master`` in one transaction."""
        self.check_canary(store)
        new = KeyManager(self.crypto, new_master)
        with store.write() as db:
            rows = store.all_data_keys(db)
            for stack_id, wrapped in rows:
                store.update_stack(db, stack_id, data_key=new.wrap_data_key(
                    stack_id, self.unwrap_data_key(stack_id, wrapped)))
            store.set_meta(db, "canary", self.crypto.seal(new_master, _CANARY))
        return len(rows)


# ==== 8. Request, response and router =======================================

@dataclasses.dataclass
class Request:
    """One parsed HTTP request, as handlers see it."""

    method: str
    path: str
    query: dict
    headers: Any
    body: bytes = b""
    params: dict = dataclasses.field(default_factory=dict)
    route: str = ""  # the handler's name once routed: the route label of metrics
    auth_kind: str = ""
    token: str = ""

    @property
    def accepts_gzip(self) -> bool:
        for part in (self.headers.get("Accept-Encoding") or "").split(","):
            coding, _, params = part.partition(";")
            if coding.strip().lower() in ("gzip", "x-gzip"):
                q = params.strip().lower()
                return not (q.startswith("q=") and q[2:].strip() in ("0", "0.0", "0.00", "0.000"))
        return False

    @property
    def cli_version(self) -> str:
        return _parse_cli_version(self.headers.get("User-Agent", ""))

    def json(self) -> dict:
        """Return the body as a JSON object ({} when empty)."""
        if not self.body.strip():
            return {}
        return _require_dict(_loads(self.body))

    def q(self, key: str) -> Optional[str]:
        values = self.query.get(key)
        return values[-1] if values else None


@dataclasses.dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    gzipped: bool = False
    headers: dict = dataclasses.field(default_factory=dict)


def _json_response(value: Any, status: int = 200) -> Response:
    return Response(status, _dumps(value))


def _obj(required: tuple = (), **props: Any) -> dict:
    """A JSON schema for an object with ``props``, for the OpenAPI document."""
    schema: dict = {"type": "object", "properties": props}
    if required:
        schema["required"] = list(required)
    return schema


_STR, _INT, _BOOL, _ANY_OBJECT = ({"type": "string"}, {"type": "integer"}, {"type": "boolean"},
                                  {"type": "object"})
_NULLABLE_STR = {"type": "string", "nullable": True}
_STR_MAP = {"type": "object", "additionalProperties": _STR}
_EMPTY = {"type": "object", "properties": {}}  # what a handler returning None answers: {}


def _list_of(item: dict) -> dict:
    return {"type": "array", "items": item}


_ERROR_SCHEMA = _obj(("code", "message"), code=_INT, message=_STR)
_UNTYPED_DEPLOYMENT = _obj(("version", "deployment"), version=_INT, features=_list_of(_STR),
                           deployment=_ANY_OBJECT)


class Router:
    """A small explicit route table.

    Routes are segment patterns such as ``/api/stacks/{orgName}/{projectName}``.
    A path is matched against every route of its length; routes with a literal
    segment where another has a parameter win (a literal ``updates/latest``
    beats a pattern ``updates/{version}``). A path that matches only with another
    method gives 405 with ``Allow``; HEAD falls back to GET.
    """

    def __init__(self):
        self._routes: list = []
        self._docs: list = []

    def add(self, method: str, pattern: str, handler: Callable, auth: str = "token",
            body: Optional[dict] = None, query: tuple = (), response: Optional[dict] = None,
            op: str = "", tag: str = "Miscellaneous") -> None:
        """Route ``method pattern`` to ``handler``; the rest describes it for OpenAPI.

        ``body``/``response`` are JSON schemas of the request and of the 200
        answer (None: no JSON body); ``op`` is the operationId (Pulumi Cloud's,
        so ``pulumi api <op>`` works here too) and ``tag`` groups the listing.
        """
        segments = tuple(pattern.strip("/").split("/"))
        specificity = tuple(0 if s.startswith("{") else 1 for s in segments)
        self._routes.append((specificity, segments, method, handler, auth))
        self._routes.sort(key=lambda r: r[0], reverse=True)
        self._docs.append((method, pattern, handler, auth, body, query, response,
                           op or handler.__name__, tag))

    def openapi(self, title: str, version: str) -> dict:
        """Return an OpenAPI 3.0 document describing every route."""
        paths: dict = {}
        seen: set = set()
        for method, pattern, handler, auth, body, query, response, op_id, tag in self._docs:
            while op_id in seen:
                op_id += "_"
            seen.add(op_id)
            paths.setdefault(pattern, {})[method.lower()] = _operation(
                pattern, handler, auth, body, query, response, op_id, tag)
        auth_scheme = {"type": "apiKey", "in": "header", "name": "Authorization"}
        return {"openapi": "3.0.3", "info": {"title": title, "version": version},
                "paths": paths, "components": {"securitySchemes": {
                    "tokenAuth": dict(auth_scheme, description="token <api token>"),
                    "updateAuth": dict(auth_scheme, description="update-token <lease token>")}}}

    def match(self, method: str, path: str) -> tuple:
        """Return ``(handler, auth, params)``; raise NotFound or MethodNotAllowed."""
        parts = tuple(urllib.parse.unquote(p) for p in path.strip("/").split("/"))
        allowed: set = set()
        for _, segments, route_method, handler, auth in self._routes:
            params = _match_segments(segments, parts)
            if params is None:
                continue
            if route_method == method or (method == "HEAD" and route_method == "GET"):
                return handler, auth, params
            allowed.add(route_method)
        if allowed:
            allow = ", ".join(sorted(allowed | ({"HEAD"} if "GET" in allowed else set())))
            raise MethodNotAllowed(f"{method} is not allowed here", {"Allow": allow})
        raise NotFound(f"no route for {path}")


def _operation(pattern: str, handler: Callable, auth: str, body: Optional[dict], query: tuple,
               response: Optional[dict], op_id: str, tag: str) -> dict:
    """One OpenAPI operation object; ``pulumi api list`` shows its tag and summary."""
    doc = (handler.__doc__ or "").strip()
    params = [{"name": p[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
              for p in pattern.split("/") if p.startswith("{")]
    params += [{"name": q, "in": "query", "required": False, "schema": {"type": "string"}}
               for q in query]
    ok: dict = {"description": "OK"}
    if response is not None:
        ok["content"] = {"application/json": {"schema": response}}
    op: dict = {"operationId": op_id, "summary": doc.splitlines()[0] if doc else op_id,
                "tags": [tag], "parameters": params, "responses": {
                    "200": ok, "default": {"description": "error", "content": {
                        "application/json": {"schema": _ERROR_SCHEMA}}}}}
    if auth != "none":
        op["security"] = [{auth + "Auth": []}]
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


def _match_segments(segments: tuple, parts: tuple) -> Optional[dict]:
    if len(segments) != len(parts):
        return None
    params = {}
    for seg, part in zip(segments, parts):
        if seg.startswith("{"):
            if not part:
                return None
            params[seg[1:-1]] = part
        elif seg != part:
            return None
    return params


# ==== 9. Handlers, by API area ==============================================

# The JSON the handlers answer, for the OpenAPI document. Property names are
# those of Pulumi Cloud's schemas (a contract test compares them), and a unit
# test checks real answers against them, so they cannot drift from the code.
_CAPABILITIES = _obj(("capabilities",), capabilities=_list_of(_obj(
    ("capability",), capability=_STR, version=_INT, configuration=_ANY_OBJECT)))
_USER = _obj(id=_STR, githubLogin=_STR, name=_STR, email=_STR, avatarUrl=_STR,
             organizations=_list_of(_obj(githubLogin=_STR, name=_STR, avatarUrl=_STR)),
             identities=_list_of(_STR), siteAdmin=_BOOL)
_DEFAULT_ORG = _obj(GitHubLogin=_STR, Messages=_list_of(_ANY_OBJECT))
_STACK_NAMES = {"id": _STR, "orgName": _STR, "projectName": _STR, "stackName": _STR}
_STACK_LIST = _obj(("stacks", "continuationToken"), continuationToken=_NULLABLE_STR,
                   stacks=_list_of(_obj(tuple(_STACK_NAMES), **_STACK_NAMES, lastUpdate=_INT,
                                        resourceCount=_INT)))
_STACK = _obj((*_STACK_NAMES, "activeUpdate", "tags", "version"), **_STACK_NAMES,
              activeUpdate=_NULLABLE_STR, tags=_STR_MAP, version=_INT,
              currentOperation=_obj(kind=_STR, author=_STR, started=_INT))
_UPDATE_INFO = _obj(
    kind=_STR, startTime=_INT, message=_STR, environment=_STR_MAP, config=_ANY_OBJECT,
    result=_STR, endTime=_INT, version=_INT, updateID=_STR,
    resourceChanges={"type": "object", "additionalProperties": _INT}, resourceCount=_INT)
_UPDATE_PROGRAM = _obj(name=_STR, runtime=_STR, main=_STR, description=_STR,
                       options=_obj(dryRun=_BOOL), config=_ANY_OBJECT, metadata=_ANY_OBJECT)
_EVENTS = _obj(("events", "continuationToken"), events=_list_of(_ANY_OBJECT),
               continuationToken=_NULLABLE_STR)
_LEASE = {"token": _STR, "tokenExpiration": _INT}
_OPENAPI_DOC = _obj(("openapi", "info", "paths"), openapi=_STR, info=_ANY_OBJECT,
                    paths=_ANY_OBJECT, components=_ANY_OBJECT)


class App:
    """Routes API requests to the engine and turns results into responses."""

    def __init__(self, cfg: Config, engine: Engine):
        self.cfg = cfg
        self.engine = engine
        self.router = Router()
        self._tokens = [t.encode() for t in cfg.auth_tokens]
        self.started = time.time()
        self.draining = False  # set when the server starts to stop: /readyz answers 503
        self._add_routes()

    def _add_routes(self) -> None:
        # Path parameters carry Pulumi Cloud's names, and operationIds are
        # its ones, so the document lines up with the published spec.
        SP = "/api/stacks/{orgName}/{projectName}/{stackName}"
        r = functools.partial(self.router.add, tag="Operations", auth="none")
        r("GET", "/healthz", self.healthz, op="Healthz", response=_obj(("status",), status=_STR))
        r("GET", "/readyz", self.readyz, op="Readyz", response=_obj(("status",), status=_STR))
        r("GET", "/metrics", self.metrics, op="Metrics")
        r = functools.partial(self.router.add, tag="Service")
        r("GET", "/api/capabilities", self.capabilities, auth="none", op="Capabilities",
          response=_CAPABILITIES)
        r("GET", "/api/openapi/pulumi-spec.json", self.openapi, auth="none",
          op="FetchRestSpecification", response=_OPENAPI_DOC)
        r("GET", "/api/openapi", self.openapi, auth="none", op="GetOpenAPIDocument",
          response=_OPENAPI_DOC)
        r = functools.partial(self.router.add, tag="Users")
        r("GET", "/api/user", self.user, op="GetCurrentUser", response=_USER)
        r("GET", "/api/user/organizations/default", self.default_org,
          op="GetDefaultOrganization", response=_DEFAULT_ORG)
        r("GET", "/api/user/stacks", self.list_stacks, op="ListUserStacks", query=(
            "organization", "project", "tagName", "tagValue", "continuationToken"),
          response=_STACK_LIST)
        r = functools.partial(self.router.add, tag="Stacks")
        r("HEAD", "/api/stacks/{orgName}/{projectName}", self.project_exists, op="ProjectExists")
        r("POST", "/api/stacks/{orgName}/{projectName}", self.create_stack, op="CreateStack",
          body=_obj(("stackName",), stackName=_STR, tags=_STR_MAP, teams=_list_of(_STR),
                    state=_UNTYPED_DEPLOYMENT), response=_EMPTY)
        r("GET", SP, self.get_stack, op="GetStack", response=_STACK)
        r("DELETE", SP, self.delete_stack, op="DeleteStack", query=("force",), response=_EMPTY)
        r("POST", SP + "/rename", self.rename_stack, op="RenameStack",
          body=_obj(newName=_STR, newProject=_STR), response=_EMPTY)
        r("PATCH", SP + "/tags", self.set_tags, op="UpdateStackTags", body=_STR_MAP,
          response=_EMPTY)
        r = functools.partial(self.router.add, tag="State")
        r("GET", SP + "/export", self.export, op="ExportStack", response=_UNTYPED_DEPLOYMENT)
        r("GET", SP + "/export/{version}", self.export, op="ExportStackAtVersion",
          response=_UNTYPED_DEPLOYMENT)
        r("POST", SP + "/import", self.import_state, op="ImportStack", body=_UNTYPED_DEPLOYMENT,
          response=_obj(("updateId",), updateId=_STR))
        r = functools.partial(self.router.add, tag="Secrets")
        r("POST", SP + "/encrypt", self.encrypt, op="EncryptValue",
          body=_obj(("plaintext",), plaintext=_STR),
          response=_obj(("ciphertext",), ciphertext=_STR))
        r("POST", SP + "/decrypt", self.decrypt, op="DecryptValue",
          body=_obj(("ciphertext",), ciphertext=_STR),
          response=_obj(("plaintext",), plaintext=_STR))
        r("POST", SP + "/batch-encrypt", self.batch_encrypt, op="BatchEncryptValue",
          body=_obj(("plaintexts",), plaintexts=_list_of(_STR)),
          response=_obj(("ciphertexts",), ciphertexts=_list_of(_STR)))
        r("POST", SP + "/batch-decrypt", self.batch_decrypt, op="BatchDecryptValue",
          body=_obj(("ciphertexts",), ciphertexts=_list_of(_STR)),
          response=_obj(("plaintexts",), plaintexts=_STR_MAP))
        r("POST", SP + "/decrypt/log-decryption", self.log_decryption, op="LogOnlyDecryptValue",
          body=_obj(secretName=_STR), response=_EMPTY)
        r("POST", SP + "/decrypt/log-batch-decryption", self.log_decryption,
          op="LogOnlyBatchDecryptValue", body=_obj(commandName=_STR), response=_EMPTY)
        r = functools.partial(self.router.add, tag="Updates")
        r("GET", SP + "/updates", self.history, op="GetStackUpdates", query=("pageSize", "page"),
          response=_obj(("updates",), updates=_list_of(_UPDATE_INFO)))
        r("GET", SP + "/updates/latest", self.latest_update, op="GetLatestStackUpdate",
          response=_obj(("info",), info=_UPDATE_INFO))
        for kind in _UPDATE_KINDS:
            self._add_update_routes(r, SP, kind)

    def _add_update_routes(self, r: Callable, sp: str, kind: str) -> None:
        """The routes of one kind of update, under ``SP/<kind>`` as Pulumi Cloud has them.

        The CLI says ``update/{id}`` for every kind once an update exists; the
        published API names the kind. All of them reach the same update.
        """
        up = f"{sp}/{kind}/{{updateID}}"
        r("POST", f"{sp}/{kind}", self._create_update(kind), op="CreateUpdateFor" + kind.title(),
          body=_UPDATE_PROGRAM, response=_obj(("updateID",), updateID=_STR))
        r("POST", up, self.start_update, op="StartUpdateFor" + kind.title(),
          body=_obj(tags=_STR_MAP, journalVersion=_INT),
          response=_obj(("version",), version=_INT, journalVersion=_INT, **_LEASE))
        r("GET", up, self.update_status, op="GetUpdateStatusFor" + kind.title(),
          query=("continuationToken",), response=_obj(
              ("status", "events"), status=_STR, events=_list_of(_ANY_OBJECT),
              continuationToken=_STR))
        r("GET", up + "/events", self.list_events, op="GetEngineEvents_" + kind,
          query=("continuationToken",), response=_EVENTS)
        r("POST", up + "/cancel", self.cancel_update, op="CancelUpdate_" + kind, response=_EMPTY)
        r("POST", up + "/renew_lease", self.renew_lease, auth="update",
          op="RenewUpdateLease_" + kind, body=_obj(token=_STR, duration=_INT),
          response=_obj(tuple(_LEASE), **_LEASE))
        # Previews save no state (the engine would answer 400), and Pulumi
        # Cloud has no checkpoint routes for them either.
        if kind != "preview":
            r("PATCH", up + "/checkpoint", self.checkpoint, auth="update",
              op="PatchUpdateCheckpoint_" + kind, body=_obj(
                  ("version", "deployment"), isInvalid=_BOOL, version=_INT,
                  features=_list_of(_STR), deployment=_ANY_OBJECT), response=_EMPTY)
            r("PATCH", up + "/checkpointverbatim", self.checkpoint_verbatim, auth="update",
              op="PatchUpdateVerbatimCheckpoint_" + kind, body=_obj(
                  ("version", "untypedDeployment", "sequenceNumber"), version=_INT,
                  untypedDeployment=_UNTYPED_DEPLOYMENT, sequenceNumber=_INT), response=_EMPTY)
            r("PATCH", up + "/checkpointdelta", self.checkpoint_delta, auth="update",
              op="PatchUpdateCheckpointDelta_" + kind, body=_obj(
                  ("version", "checkpointHash", "sequenceNumber", "deploymentDelta"),
                  version=_INT, checkpointHash=_STR, sequenceNumber=_INT,
                  deploymentDelta=_list_of(_ANY_OBJECT)), response=_EMPTY)
        r("PATCH", up + "/journalentries", self.journal_entries, auth="update",
          op="CreateJournalEntries_" + kind,
          body=_obj(("entries",), entries=_list_of(_ANY_OBJECT)), response=_EMPTY)
        r("POST", up + "/events/batch", self.events_batch, auth="update",
          op="RecordEngineEventBatch_" + kind,
          body=_obj(("events",), events=_list_of(_ANY_OBJECT)), response=_EMPTY)
        r("POST", up + "/complete", self.complete, auth="update", op="CompleteUpdate_" + kind,
          body=_obj(("status",), status={"type": "string",
                                         "enum": ["succeeded", "failed", "cancelled"]}),
          response=_EMPTY)

    # -- dispatch -----------------------------------------------------------

    def resolve(self, req: Request) -> Callable:
        """Return the handler of ``req`` once its route and credentials check out.

        Needs only the request line and headers, so the server refuses unknown
        routes and callers before it reads (and decompresses) any body.
        """
        handler, auth, req.params = self.router.match(req.method, req.path)
        req.route = handler.__name__
        self._authenticate(req, auth)
        return handler

    def dispatch(self, req: Request, handler: Optional[Callable] = None) -> Response:
        """Route (unless ``handler`` is given) and run ``req``; failures become error responses."""
        try:
            if handler is None:
                handler = self.resolve(req)
            result = handler(req)
            return result if isinstance(result, Response) else _json_response(
                {} if result is None else result)
        except HTTPError as e:
            return Response(e.status, _dumps(e.body()), headers=e.headers)
        except sqlite3.Error as e:
            err = _storage_error(e)
            if err.status == 500:
                log.exception("storage error on %s %s", req.method, _escape_log(req.path))
                return Response(500, b"Internal Server Error", "text/plain")
            log.warning("storage error on %s %s: %s", req.method, _escape_log(req.path), e)
            return Response(err.status, _dumps(err.body()))
        except Exception:  # noqa: BLE001 - the one place that catches everything
            log.exception("unexpected error on %s %s", req.method, _escape_log(req.path))
            return Response(500, b"Internal Server Error", "text/plain")

    def _authenticate(self, req: Request, auth: str) -> None:
        """Check the Authorization header against what the route needs.

        API routes take ``token <t>``; the update routes take only
        ``update-token <t>`` (checked against the lease by the engine), and a
        bad lease is 403, never 401, which would send the user to log in.
        """
        if auth == "none":
            return
        scheme, _, token = (req.headers.get("Authorization") or "").strip().partition(" ")
        token = token.strip()
        if auth == "update":
            if scheme != "update-token" or not token:
                raise Forbidden("this call needs the update's lease token")
            # A cheap read before the body is read and parsed: a made-up lease
            # token costs us no more than one lookup.
            self.engine.check_lease_token(*self._up(req), token)
        else:
            if scheme != "token" or not token:
                raise Unauthorized("No credentials provided or are invalid.")
            if self._tokens and not self._known_token(token.encode()):
                raise Unauthorized("No credentials provided or are invalid.")
        req.auth_kind, req.token = scheme, token

    def _known_token(self, token: bytes) -> bool:
        match = False
        for known in self._tokens:  # compare with every token: no early exit
            match |= hmac.compare_digest(known, token)
        return match

    # -- operations ---------------------------------------------------------

    def healthz(self, req: Request) -> dict:
        """The process is alive and serving requests."""
        return {"status": "ok"}

    def readyz(self, req: Request) -> dict:
        """Ready: a small write commits (503 while stopping or when writes fail)."""
        if self.draining:
            raise Unavailable("the server is shutting down")
        try:
            self.engine.check_writable()
        except sqlite3.Error as e:
            raise Unavailable(f"the database cannot take writes: {e}") from None
        return {"status": "ready"}

    def metrics(self, req: Request) -> Response:
        """Counters, gauges and latency histograms in the Prometheus text format."""
        current = self.engine.gauges()
        current["pulumi_backend_build_info"] = {(("version", __version__),): 1}
        current["pulumi_backend_start_time_seconds"] = self.started
        return Response(200, self.engine.metrics.render(current).encode(),
                        "text/plain; version=0.0.4; charset=utf-8")

    def record(self, req: Request, status: int, seconds: float) -> None:
        """Count a finished request for /metrics."""
        route = req.route or "unmatched"
        method = req.method if req.method in _HTTP_METHODS else "other"  # bounded labels
        self.engine.metrics.inc("pulumi_backend_http_requests_total", route=route,
                                method=method, status=str(status))
        self.engine.metrics.observe("pulumi_backend_http_request_duration_seconds", seconds,
                                    route=route)

    # -- identity -----------------------------------------------------------

    def capabilities(self, req: Request) -> dict:
        """The optional features this server offers the CLI."""
        caps = [
            {"capability": "delta-checkpoint-uploads-v2", "version": 2,
             "configuration": {"checkpointCutoffSizeBytes": self.cfg.checkpoint_cutoff}},
            {"capability": "batch-encrypt"},
            {"capability": "deployment-schema-version", "version": 1,
             "configuration": {"version": MAX_DEPLOYMENT_VERSION}},
        ]
        return {"capabilities": caps}

    def openapi(self, req: Request) -> dict:
        """This OpenAPI document, generated from the route table."""
        return self.router.openapi("pulumi-backend", __version__)

    def user(self, req: Request) -> dict:
        """The user the API tokens act as, and their organization."""
        return {"id": self.cfg.user, "githubLogin": self.cfg.user, "name": self.cfg.user,
                "email": "", "avatarUrl": "",
                "organizations": [{"githubLogin": self.cfg.org, "name": self.cfg.org,
                                   "avatarUrl": ""}],
                "identities": [], "siteAdmin": False}

    def default_org(self, req: Request) -> dict:
        """The user's default organization (this server's only one)."""
        return {"GitHubLogin": self.cfg.org, "Messages": []}

    # -- stacks -------------------------------------------------------------

    def _sp(self, req: Request) -> tuple:
        p = req.params
        return p["orgName"], p["projectName"], p["stackName"]

    def list_stacks(self, req: Request) -> dict:
        """One page of stack summaries, filtered by project or tag."""
        return self.engine.list_stacks({k: req.q(k) for k in (
            "organization", "project", "tagName", "tagValue", "continuationToken")})

    def project_exists(self, req: Request) -> Response:
        """200 if the project has a stack, else 404."""
        org, project = req.params["orgName"], req.params["projectName"]
        if not self.engine.project_exists(org, project):
            raise NotFound(f"project '{org}/{project}' not found")
        return Response(200, b"")

    def create_stack(self, req: Request) -> dict:
        """Create a stack, empty or with an initial state."""
        return self.engine.create_stack(req.params["orgName"], req.params["projectName"],
                                        req.json())

    def get_stack(self, req: Request) -> dict:
        """The stack: names, tags, version, operation in progress."""
        return self.engine.get_stack(*self._sp(req))

    def delete_stack(self, req: Request) -> None:
        """Delete the stack (with resources only if force=true)."""
        force = (req.q("force") or "false").lower() == "true"
        self.engine.delete_stack(*self._sp(req), force)

    def rename_stack(self, req: Request) -> None:
        """Rename the stack or move it to another project."""
        self.engine.rename_stack(*self._sp(req), req.json())

    def set_tags(self, req: Request) -> None:
        """Replace all of the stack's tags."""
        self.engine.set_tags(*self._sp(req), _loads(req.body or b"{}"))

    # -- state --------------------------------------------------------------

    def export(self, req: Request) -> Response:
        """The stack's state (latest, or at a version)."""
        version = req.params.get("version")
        if version is not None:
            if not (version.isascii() and version.isdigit()) or len(version) > 18:
                raise BadRequest("version must be a positive integer")
            version = int(version)
        data = self.engine.export(*self._sp(req), version)
        if req.accepts_gzip:
            return Response(200, data, gzipped=True)  # stored bytes, as they are
        return Response(200, gzip.decompress(data))

    def import_state(self, req: Request) -> dict:
        """Replace the stack's state; recorded as an "import" update."""
        return {"updateId": self.engine.import_deployment(*self._sp(req), req.body,
                                                          req.cli_version)}

    # -- secrets ------------------------------------------------------------

    def encrypt(self, req: Request) -> dict:
        """Encrypt a secret with the stack's key."""
        plaintext = _b64decode_strict(req.json().get("plaintext"), "plaintext")
        return {"ciphertext": _b64encode(self.engine.encrypt(*self._sp(req), [plaintext])[0])}

    def decrypt(self, req: Request) -> dict:
        """Decrypt a secret of the stack."""
        ciphertext = _b64decode_strict(req.json().get("ciphertext"), "ciphertext")
        return {"plaintext": _b64encode(self.engine.decrypt(*self._sp(req), [ciphertext])[0])}

    def batch_encrypt(self, req: Request) -> dict:
        """Encrypt many secrets with the stack's key."""
        items = _batch(req.json(), "plaintexts")
        plain = [_b64decode_strict(p, "plaintext") for p in items]
        return {"ciphertexts": [_b64encode(c) for c in self.engine.encrypt(*self._sp(req), plain)]}

    def batch_decrypt(self, req: Request) -> dict:
        """Decrypt many secrets of the stack, keyed by ciphertext."""
        items = _batch(req.json(), "ciphertexts")
        unique = list(dict.fromkeys(items))  # the CLI may repeat a ciphertext
        blobs = [_b64decode_strict(c, "ciphertext") for c in unique]
        plain = self.engine.decrypt(*self._sp(req), blobs)
        # Keyed by the strings exactly as sent: the CLI looks each one up.
        return {"plaintexts": {c: _b64encode(p) for c, p in zip(unique, plain)}}

    def log_decryption(self, req: Request) -> None:
        """Log that the CLI showed secrets of the stack in plaintext."""
        self.engine.get_stack(*self._sp(req))  # 404 for an unknown stack
        log.info("secrets of %s were shown in plaintext", "/".join(self._sp(req)))

    # -- updates ------------------------------------------------------------

    def _up(self, req: Request) -> tuple:
        return (*self._sp(req), req.params["updateID"])

    def _create_update(self, kind: str) -> Callable:
        """The handler creating updates of ``kind`` (its route names the kind)."""
        def create_update(req: Request) -> dict:
            return self.engine.create_update(*self._sp(req), kind, req.json())
        create_update.__doc__ = f"Create an update of kind {kind}; a second call starts it."
        return create_update

    def start_update(self, req: Request) -> dict:
        """Start the update (locking the stack) and hand out its lease."""
        return self.engine.start_update(*self._up(req), req.json(), req.cli_version)

    def update_status(self, req: Request) -> dict:
        """The update's status."""
        return self.engine.update_results(*self._up(req))

    def list_events(self, req: Request) -> dict:
        """One page of the update's engine events."""
        return self.engine.list_events(*self._up(req), req.q("continuationToken"))

    def cancel_update(self, req: Request) -> None:
        """Cancel the update and unlock the stack."""
        self.engine.cancel(*self._up(req))

    def renew_lease(self, req: Request) -> dict:
        """Extend the update's lease."""
        return self.engine.renew_lease(*self._up(req), req.token, req.json())

    def checkpoint(self, req: Request) -> None:
        """Save the update's working state, as a whole deployment."""
        self.engine.checkpoint_full(*self._up(req), req.token, req.body)

    def checkpoint_verbatim(self, req: Request) -> None:
        """Save the update's working state, as the CLI serialized it."""
        self.engine.checkpoint_verbatim(*self._up(req), req.token, req.body)
        log.debug("verbatim checkpoint (%d bytes) for %s", len(req.body), req.params["updateID"])

    def checkpoint_delta(self, req: Request) -> None:
        """Save the update's working state, as edits of the last one."""
        self.engine.checkpoint_delta(*self._up(req), req.token, req.body)
        log.debug("delta checkpoint (%d bytes) for %s", len(req.body), req.params["updateID"])

    def journal_entries(self, req: Request) -> None:
        """Append to the update's journal (replayed at the end)."""
        count = self.engine.journal_append(*self._up(req), req.token, req.body)
        log.debug("%d journal entries (%d bytes) for %s", count, len(req.body),
                  req.params["updateID"])

    def events_batch(self, req: Request) -> None:
        """Record a batch of the update's engine events."""
        self.engine.events_append(*self._up(req), req.token, req.body)

    def complete(self, req: Request) -> None:
        """Finish the update: save its state and unlock the stack."""
        self.engine.complete(*self._up(req), req.token, req.json())

    def history(self, req: Request) -> dict:
        """The stack's updates, newest first, optionally paged."""
        try:
            page_size, page = int(req.q("pageSize") or 0), int(req.q("page") or 1)
        except ValueError:
            raise BadRequest("page and pageSize must be integers") from None
        if not (0 <= page_size <= 10000 and 1 <= page <= 10**9):
            raise BadRequest("page or pageSize out of range")
        return self.engine.history(*self._sp(req), page_size, page)

    def latest_update(self, req: Request) -> dict:
        """The stack's newest update."""
        return self.engine.latest_update(*self._sp(req))


def _batch(body: dict, key: str) -> list:
    items = body.get(key)
    if not isinstance(items, list):
        raise BadRequest(f"{key} must be a list")
    if len(items) > MAX_BATCH_ITEMS:
        raise PayloadTooLarge(f"at most {MAX_BATCH_ITEMS} {key} per request")
    if not all(isinstance(item, str) for item in items):
        raise BadRequest(f"{key} must be base64 strings")
    return items


# ==== 10. Server lifecycle and main() =======================================

class _Handler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive; every request goes through ``App.dispatch``."""

    protocol_version = "HTTP/1.1"
    server_version = "pulumi-backend/" + __version__
    sys_version = ""
    server: "Server"

    def setup(self) -> None:
        self.request.settimeout(self.server.cfg.socket_timeout)
        # Headers and body go out in two writes; without this, Nagle's algorithm
        # and the client's delayed ACK add ~40 ms to every keep-alive response.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hasattr(self.request, "do_handshake"):  # TLS: in this thread, not in accept()
            self.server.watch(self.request)
            try:
                self.request.do_handshake()
            finally:
                self.server.unwatch(self.request)
        super().setup()

    def handle(self) -> None:
        try:
            self.close_connection = True
            if self._wait_for_request():
                self._handle_one()
            while not self.close_connection and self._wait_for_request():
                self._handle_one()
        except (ConnectionError, socket.timeout, OSError) as e:
            log.debug("connection ended: %s", e)

    def _handle_one(self) -> None:
        # The socket timeout bounds each read; this deadline bounds the whole
        # request, so a client trickling a byte at a time cannot hold a thread.
        self.server.watch(self.request)
        try:
            self.handle_one_request()
        finally:
            self.server.unwatch(self.request)

    def _wait_for_request(self) -> bool:
        """Wait until the client sends a request; False when the server stops or it idles."""
        deadline = time.monotonic() + self.server.cfg.socket_timeout
        while not self.server.stopping.is_set():
            if getattr(self.request, "pending", lambda: 0)():
                return True
            try:
                ready = _select_readable(self.request, 0.25)
            except (OSError, ValueError):
                return False
            if ready:
                return True
            if time.monotonic() > deadline:
                return False
        return False

    def do_GET(self) -> None:
        self._serve()

    _body_left_unread = False

    def finish(self) -> None:
        super().finish()
        if self._body_left_unread:
            self._drain_input()

    def _drain_input(self) -> None:
        """Drop what the client still sends, for up to a second, before the socket closes.

        Closing with unread input makes the kernel reset the connection, and a
        client still sending its body would then lose our error response.
        """
        try:
            self.request.shutdown(socket.SHUT_WR)  # the response is complete: send FIN
            deadline = time.monotonic() + 1.0
            while deadline > time.monotonic() and _select_readable(
                    self.request, deadline - time.monotonic()):
                if not self.request.recv(65536):
                    break
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str) -> Any:
        # Any other method (TRACE, PROPFIND, ...) goes to the router too: 405, not 501.
        if name.startswith("do_") and name[3:].isalpha() and name[3:].isupper():
            return self._serve
        raise AttributeError(name)

    def _read_body(self) -> bytes:
        cfg = self.server.cfg
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            raise LengthRequired("chunked request bodies are not supported; send Content-Length")
        lengths = {v.strip() for v in self.headers.get_all("Content-Length") or ()}
        if len(lengths) > 1:
            self.close_connection = True
            raise BadRequest("conflicting Content-Length headers")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise BadRequest("invalid Content-Length") from None
        if length < 0:
            self.close_connection = True
            raise BadRequest("invalid Content-Length")
        if length > cfg.max_body:
            self.close_connection = True  # the unread body makes the connection unusable
            raise PayloadTooLarge(f"request body exceeds {cfg.max_body} bytes")
        try:
            body = self.rfile.read(length) if length else b""
        except TimeoutError:
            self.close_connection = True
            raise RequestTimeout("the request body did not arrive in time") from None
        if len(body) != length:
            self.close_connection = True
            raise BadRequest("request body shorter than Content-Length")
        encoding = (self.headers.get("Content-Encoding") or "").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            body = _gunzip_bounded(body, cfg.max_decompressed)
        elif encoding not in ("", "identity"):
            raise BadRequest(f"unsupported Content-Encoding {encoding!r}")
        return body

    def _serve(self) -> None:
        started = time.monotonic()
        url = urllib.parse.urlsplit(self.path)
        req = Request(self.command, url.path, urllib.parse.parse_qs(url.query), self.headers)
        try:
            handler = self.server.app.resolve(req)
            req.body = self._read_body()
            self.server.unwatch(self.request)  # the request is in: handling may take long
            resp = self.server.app.dispatch(req, handler)
        except HTTPError as e:
            if (self.headers.get("Content-Length", "0").strip() not in ("", "0")
                    or self.headers.get("Transfer-Encoding")):
                self.close_connection = True  # a body may be left unread
                self._body_left_unread = True
            resp = Response(e.status, _dumps(e.body()), headers=e.headers)
        try:
            self._send(req, resp)
        finally:  # also when the client went away before the answer
            seconds = time.monotonic() - started
            self.server.app.record(req, resp.status, seconds)
            self._log_access(req, resp, seconds)
        if self.server.stopping.is_set():
            self.close_connection = True

    def _log_access(self, req: Request, resp: Response, seconds: float) -> None:
        # The path only: no query string, headers or body, so no token or secret.
        path = _escape_log(req.path)
        log.info("%s %s %s %d %d %.1fms", self.client_address[0], req.method, path,
                 resp.status, len(resp.body), seconds * 1000, extra={"fields": {
                     "remote": self.client_address[0], "method": req.method, "path": path,
                     "route": req.route, "status": resp.status, "bytes": len(resp.body),
                     "ms": round(seconds * 1000, 1)}})

    def _send(self, req: Request, resp: Response) -> None:
        body, gzipped = resp.body, resp.gzipped
        if not gzipped and req.accepts_gzip and len(body) >= GZIP_MIN_RESPONSE:
            body, gzipped = _gzip_bytes(body, 5), True
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        for key, value in resp.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """Errors found while parsing the request line/headers, in the CLI's JSON shape."""
        self.close_connection = True
        body = _dumps({"code": code, "message": message or http.HTTPStatus(code).phrase})
        try:
            self.send_response(code, message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD" and code >= 200 and code not in (204, 304):
                self.wfile.write(body)
        except OSError:
            pass

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        pass  # _log_access logs each request, without its query string

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: %s", _escape_log(format % args))


def _select_readable(sock: socket.socket, timeout: float) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


class Server(http.server.ThreadingHTTPServer):
    """The threading server, with a connection cap and a draining shutdown."""

    daemon_threads = False
    block_on_close = True
    request_queue_size = 128  # listen backlog; socketserver's 5 resets bursts of clients
    allow_reuse_address = True

    def __init__(self, cfg: Config, app: App):
        self.cfg = cfg
        self.app = app
        self.stopping = threading.Event()
        self._active_lock = threading.Lock()
        self._idle = threading.Condition(self._active_lock)  # notified as connections end
        self._connections: set = set()  # sockets being served, under _active_lock
        self._deadlines: dict = {}
        self._closed = threading.Event()
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        self.address_family = family
        super().__init__((cfg.host, cfg.port), _Handler)
        if cfg.tls_cert:
            import ssl
            try:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
            except (OSError, ssl.SSLError):
                self.socket.close()
                raise
            self.socket = ctx.wrap_socket(self.socket, server_side=True,
                                          do_handshake_on_connect=False)
        threading.Thread(target=self._reap_slow_requests, name="reaper", daemon=True).start()

    @property
    def url(self) -> str:
        if self.cfg.public_url:
            return self.cfg.public_url.rstrip("/")
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.cfg.tls_cert else 'http'}://{host}:{port}"

    def watch(self, sock: socket.socket) -> None:
        """Start the clock on a request being read from ``sock``."""
        with self._active_lock:
            self._deadlines[sock] = time.monotonic() + self.cfg.socket_timeout

    def unwatch(self, sock: socket.socket) -> None:
        with self._active_lock:
            self._deadlines.pop(sock, None)

    def _reap_slow_requests(self) -> None:
        """Disconnect clients whose request has not fully arrived by its deadline."""
        while not self._closed.wait(1.0):
            t = time.monotonic()
            with self._active_lock:
                late = [s for s, deadline in self._deadlines.items() if deadline < t]
                for sock in late:
                    del self._deadlines[sock]
            for sock in late:
                log.warning("dropping a client that sent its request too slowly")
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def server_close(self) -> None:
        """Stop listening, give in-flight requests ``shutdown_timeout`` seconds, cut the rest."""
        self.stopping.set()  # idle keep-alive connections close now
        self.socket.close()  # new clients are refused at once instead of queueing
        deadline = time.monotonic() + self.cfg.shutdown_timeout
        with self._idle:
            while self._connections and deadline > time.monotonic():
                self._idle.wait(deadline - time.monotonic())
            stuck = list(self._connections)
        if stuck:
            log.warning("closing %d connection(s) still busy after %gs", len(stuck),
                        self.cfg.shutdown_timeout)
            for sock in stuck:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            # Their threads end at their next read or write; a write to SQLite in
            # progress still commits or rolls back whole (the store closes after it).
            self.block_on_close = False
        self._closed.set()
        super().server_close()

    def process_request(self, request, client_address) -> None:
        with self._active_lock:
            full = len(self._connections) >= self.cfg.max_connections
            if not full:
                self._connections.add(request)
        if full:
            self._refuse(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._active_lock:
                self._connections.discard(request)
                self._idle.notify_all()

    def _refuse(self, request) -> None:
        body = _dumps({"code": 503, "message": "Service Unavailable: too many connections"})
        try:
            request.settimeout(1)
            if hasattr(request, "do_handshake"):
                request.do_handshake()
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            b"Connection: close\r\nRetry-After: 1\r\nContent-Length: "
                            + str(len(body)).encode() + b"\r\n\r\n" + body)
        except OSError:
            pass
        self.shutdown_request(request)
        log.warning("refused a connection: %d already open", self.cfg.max_connections)

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], OSError):  # e.g. a failed TLS handshake
            log.debug("connection from %s failed: %s", client_address[0], sys.exc_info()[1])
        else:
            log.exception("error while serving a connection")

    def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, close idle connections."""
        self.app.draining = True
        self.stopping.set()
        self.shutdown()


def build_app(cfg: Config, environ: Optional[dict] = None) -> tuple:
    """Open the store and keys and return ``(store, app)``; raise ValueError on bad setup."""
    environ = os.environ if environ is None else environ
    db_dir = os.path.dirname(os.path.abspath(cfg.db))
    if not os.path.isdir(db_dir):
        raise ValueError(f"cannot open database {cfg.db}: folder {db_dir} does not exist")
    try:
        store = SQLiteStore(cfg.db)
    except (sqlite3.Error, RuntimeError) as e:  # RuntimeError: a schema newer than ours
        raise ValueError(f"cannot open database {cfg.db}: {e}") from None
    try:
        crypto = Crypto(cfg.crypto, environ.get("PULUMI_BACKEND_LIBCRYPTO", ""))
        master = cfg.master_key or KeyManager.load_or_create(cfg.key_file())
        keys = KeyManager(crypto, master)
        keys.check_canary(store)
    except (OSError, RuntimeError) as e:
        store.close()
        raise ValueError(f"cannot set up secrets: {e}") from None
    except ValueError:
        store.close()
        raise
    return store, App(cfg, Engine(cfg, store, keys))


@contextlib.contextmanager
def _database_lock(path: str):
    """Hold ``<db>.lock`` exclusively for the block; ValueError if another process holds it.

    Two servers on one database would each trust their own cache of running
    updates, so serve, restore and rotate-master-key take this lock first. It
    is a separate file because SQLite's own locks on the database file would be
    dropped if we opened and closed that file ourselves. The kernel releases
    the lock when the process dies, however it dies.
    """
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    lock_path = os.path.realpath(path) + ".lock"  # every spelling of the path: one lock
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError as e:
        raise ValueError(f"cannot open {lock_path}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another pulumi-backend process is using {path}; "
                             "stop it first") from None
        except OSError as e:  # e.g. ENOLCK: a file system without locks
            raise ValueError(f"cannot lock {lock_path}: {e.strerror}") from None
        yield
    finally:
        os.close(fd)


def _open_read_only(path: str) -> sqlite3.Connection:
    """Open an existing database without writing to it; ValueError if there is none."""
    if not os.path.isfile(path):
        raise ValueError(f"no database at {path}")
    conn = sqlite3.connect("file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro",
                           uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backup_database(cfg: Config, out: Optional[str]) -> int:
    """Copy ``cfg.db`` to the new file ``out``: one consistent, self-contained file.

    Works while the server runs. SQLite's backup API copies in one step under
    a single read transaction, so the copy is a snapshot: a write committing
    meanwhile is wholly in or out. The copy is written beside ``out`` (mode
    0600: it holds the stacks' wrapped keys and state), checked, and linked
    into place, so ``out`` is never half written. An existing ``out`` is never
    replaced: with the two paths mixed up, that would be the live database.
    Returns an exit code.
    """
    if not out:
        raise ValueError("backup needs the file to write: backup --db DB OUT")
    if os.path.lexists(out):
        raise ValueError(f"{out} exists; backups never overwrite a file, give a new name")
    src = _open_read_only(cfg.db)
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        dst = sqlite3.connect(tmp, isolation_level=None)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode = DELETE")  # one file, no -wal beside it
            check = dst.execute("PRAGMA integrity_check").fetchone()[0]
            stacks = dst.execute("SELECT count(*) FROM stacks").fetchone()[0]
        finally:
            dst.close()
        if check != "ok":
            raise ValueError(f"the copy failed its integrity check: {check}")
        _fsync_path(tmp)
        os.link(tmp, out)  # unlike rename, fails if out appeared meanwhile
        _fsync_path(os.path.dirname(os.path.abspath(out)))
    except (sqlite3.Error, OSError) as e:
        raise ValueError(f"backup of {cfg.db} to {out} failed: {e}") from None
    finally:
        src.close()
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"backed up {stacks} stacks to {out} ({os.path.getsize(out)} bytes). The master key "
          f"is not in it: keep a copy of {cfg.key_file()} (or PULUMI_BACKEND_MASTER_KEY).")
    return 0


def _check_backup(conn: sqlite3.Connection, master_key: bytes, crypto: Crypto) -> int:
    """Check a backup is whole, ours, not too new, and opens with the key; return its stacks."""
    if conn.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
        raise ValueError("it fails SQLite's integrity check")
    try:
        version = conn.execute("SELECT version FROM schema_version").fetchone()[0]
        canary = conn.execute("SELECT value FROM meta WHERE key = 'canary'").fetchone()
        stacks = conn.execute("SELECT count(*) FROM stacks").fetchone()[0]
    except (sqlite3.Error, TypeError):
        raise ValueError("it is not a pulumi-backend database") from None
    if version > len(_SCHEMA):
        raise ValueError(f"it has schema {version}, newer than this server's {len(_SCHEMA)}; "
                         "upgrade pulumi_backend.py first")
    if canary is not None:
        try:
            crypto.open(master_key, canary[0])
        except ValueError:
            raise ValueError("it was made under another master key: give that key "
                             "(--master-key-file or PULUMI_BACKEND_MASTER_KEY)") from None
    return stacks


def restore_database(cfg: Config, source: Optional[str], environ: dict) -> int:
    """Replace the contents of ``cfg.db`` with the backup ``source``; return an exit code.

    The caller holds the database lock, so no server runs. The backup is
    checked first, including that the configured master key opens it. The
    target is put in rollback-journal mode (which folds its WAL in) and the
    copy is one transaction: a failure leaves the old database as it was.
    """
    if not source:
        raise ValueError("restore needs the backup to read: restore --db DB BACKUP")
    if os.path.exists(cfg.db) and os.path.exists(source) and os.path.samefile(cfg.db, source):
        raise ValueError("the backup is the database itself")
    if not cfg.master_key and not os.path.exists(cfg.key_file()):
        raise ValueError(f"no master key at {cfg.key_file()}: put the key the backup was made "
                         "with there first (or give --master-key-file)")
    try:
        master = cfg.master_key or KeyManager.load_or_create(cfg.key_file())
        crypto = Crypto(cfg.crypto, environ.get("PULUMI_BACKEND_LIBCRYPTO", ""))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"cannot set up secrets: {e}") from None
    src = _open_read_only(source)
    try:
        try:
            stacks = _check_backup(src, master, crypto)
        except (ValueError, sqlite3.Error) as e:
            raise ValueError(f"cannot restore from {source}: {e}") from None
        try:
            dst = sqlite3.connect(cfg.db, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
            try:
                dst.execute("PRAGMA journal_mode = DELETE")
                src.backup(dst)
            finally:
                dst.close()
        except sqlite3.Error as e:
            raise ValueError(f"cannot restore into {cfg.db} ({e}); it is unchanged. If it is "
                             "damaged, move it and its -wal and -shm files aside and restore "
                             "again") from None
    finally:
        src.close()
    try:
        SQLiteStore(cfg.db).close()  # WAL mode and schema migrations, as the server expects
    except (sqlite3.Error, RuntimeError) as e:
        raise ValueError(f"restored {source} into {cfg.db}, but it does not open: {e}") from None
    print(f"restored {stacks} stacks from {source} into {cfg.db}")
    return 0


def rotate_master_key(cfg: Config, new_key_file: Optional[str], environ: dict) -> int:
    """Rewrap every data key under the key in ``new_key_file``; return an exit code."""
    if not new_key_file:
        print("pulumi_backend.py: error: rotate-master-key needs --new-key-file", file=sys.stderr)
        return 2
    store, app = build_app(cfg, environ)
    try:
        new_key = KeyManager.load_or_create(new_key_file)
        count = app.engine.keys.rotate(store, new_key)
    finally:
        store.close()
    print(f"rewrapped {count} stack keys; start the server with --master-key-file {new_key_file}")
    return 0


def _one_malloc_arena() -> None:
    """Ask glibc for a single malloc arena (no-op elsewhere).

    Each connection has its own thread, and glibc gives threads their own
    arenas: a multi-megabyte state freed in one thread's arena is not reused by
    the next thread, so peak RSS grew with every update. The GIL serializes
    most allocation anyway, so one arena costs no concurrency.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mallopt(-8, 1)  # M_ARENA_MAX


def serve(cfg: Config, environ: dict) -> int:
    """Run the server until SIGTERM or SIGINT; return an exit code."""
    store, app = build_app(cfg, environ)
    try:
        server = Server(cfg, app)
    except OSError as e:
        store.close()
        raise ValueError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - e.g. a bad TLS certificate
        store.close()
        raise ValueError(f"cannot start the server: {e}") from None

    def on_signal(signum, frame) -> None:
        log.info("signal %d: draining and stopping", signum)
        threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _one_malloc_arena()
    log.info("secrets: AES-256-GCM via %s", app.engine.keys.crypto.name)
    print(f"pulumi-backend listening on {server.url}", flush=True)
    try:
        server.serve_forever(poll_interval=0.25)
    finally:
        server.server_close()  # waits (bounded) for in-flight requests
        store.close()
        log.info("stopped")
    return 0


def main(argv: Optional[list] = None, environ: Optional[dict] = None) -> int:
    """Run the command line; return the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    environ = dict(os.environ) if environ is None else environ
    try:
        command, cfg, extras = parse_config(argv, environ)
    except ValueError as e:
        print(f"pulumi_backend.py: error: {e}", file=sys.stderr)
        return 2
    if extras["file"] and command not in ("backup", "restore"):
        print(f"pulumi_backend.py: error: unexpected argument {extras['file']!r}", file=sys.stderr)
        return 2
    _setup_logging(cfg.log_level, cfg.log_format)
    try:
        if command == "backup":
            return backup_database(cfg, extras["file"])
        with _database_lock(cfg.db):
            if command == "restore":
                return restore_database(cfg, extras["file"], environ)
            if command == "rotate-master-key":
                return rotate_master_key(cfg, extras["new_key_file"], environ)
            return serve(cfg, environ)
    except ValueError as e:
        print(f"pulumi_backend.py: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
