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
    python pulumi_backend.py import-diy --db state.db file:///path/to/diy  # stacks + history
    python pulumi_backend.py --db state.db --backup-dir /backups --backup-interval 1h
    python pulumi_backend.py rotate-master-key --db state.db --new-key-file NEW
    python pulumi_backend.py --db postgresql://USER@HOST/DB --master-key-file KEY  # a replica
    python pulumi_backend.py copy --from state.db --to postgresql://USER@HOST/DB  # servers stopped
    python pulumi_backend.py user add alice --role admin --db state.db   # also while serving
    python pulumi_backend.py token create --user alice --db state.db    # printed once
    python pulumi_backend.py team grant devs 'app/*' write --db state.db
    python pulumi_backend.py audit --since 7d --db state.db             # JSON lines

Besides the Pulumi Cloud API it serves ``/healthz``, ``/readyz`` and
``/metrics`` (Prometheus) without a token, and a web console at ``/`` (sign in
with a token or the company's OIDC provider, ``--sso-config``; org admins
administer users, teams and tokens there; ``--console off`` turns it off;
section 11). SIGTERM or
SIGINT drains in-flight requests for up to ``--shutdown-timeout`` seconds, then
stops.

Every flag can also be given as an environment variable: ``--db`` is
``PULUMI_BACKEND_DB``, ``--auth-token`` is ``PULUMI_BACKEND_AUTH_TOKEN`` and so on
(upper case, dashes become underscores). A flag wins over its variable.
``PULUMI_BACKEND_MASTER_KEY`` (base64, 32 bytes) may hold the master key
instead of ``--master-key-file``; ``PULUMI_BACKEND_LIBCRYPTO`` names the
libcrypto to load.

Security notes: with no ``--auth-token`` configured and no users or stored
tokens, any token is accepted as the admin, which is only allowed while bound to a
loopback address (or with ``--allow-any-token``). Once users or stored tokens
exist, only they and ``--auth-token`` tokens (org admins) get in, for good: the
database remembers it, and with every identity removed nobody gets in. Refused
tokens are throttled per address (``--auth-failure-limit``, then 429); stored tokens
are SHA-256 hashes, and stack permissions come from team grants (section 8).
A token option given but empty (or a token file with only blank and ``#``
lines) is an error, never "any token". Secrets are AES-256-GCM with a data key
per stack, wrapped by a master key kept outside the database; a master key that
does not open the stack keys stops the server at start. The database and its
-wal, -shm and lock files are 0600. Tokens, secrets and plaintexts are never
logged. No byte of a request body is read before its route and credentials
check out (but the console's sign-in form, at most 16 KiB, after its Origin);
a route that takes no body refuses one, and the request line and headers have
``--header-timeout`` seconds. The console keeps sessions by the SHA-256 of
their id, masks every secret, and takes forms only with this server's Origin
and a CSRF token. Requests naming another host than the server's (loopback
names, IP addresses, the --public-url host, ``--allowed-host``) get 421, against
DNS rebinding (section 9).

Webhooks (section 8) post to no loopback, link-local or cloud metadata address
unless ``--webhook-allow`` names its network, follow no redirect, and keep their
shared secrets sealed by the master key.

``pulumi login`` in a browser goes through the console's /cli-login (section 11),
which after a confirmation hands a new personal token to the CLI on ``localhost``
only. With ``--console-host`` that name serves the console and every other name of
the server the API (sections 9 and 10).

Sections:
  1. Constants and limits
  2. Configuration
  3. Errors
  4. Small utilities
  5. Storage (Store interface, SQLite and PostgreSQL implementations)
  6. Engine (stacks, history; UpdateLifecycle: leases, checkpoints, journal replay,
     events; SearchIndex)
  7. Crypto (OpenSSL binding, pure-Python fallback, key management)
  8. Identity and access (users, teams, tokens, permissions, audit log, OIDC, single
     sign-on, webhooks, admin commands)
  9. Request, response and router
 10. Handlers, by API area
 11. Web console (pages at /, sign-in and SSO sessions, CLI login, administration);
     build_app()
 12. Backups and replication (backup, restore, copy, rotate-master-key, schedule)
 13. Import from DIY backends
 14. Server lifecycle and main()
"""

from __future__ import annotations

import abc
import argparse
import array
import base64
import bisect
import collections
import contextlib
import copy
import csv
import ctypes
import ctypes.util
import dataclasses
import datetime
import fnmatch
import functools
import gc
import gzip
import hashlib
import heapq
import hmac
import html
import http.client
import http.server
import io
import ipaddress
import itertools
import json
import logging
import math
import os
import re
import secrets
import selectors
import signal
import socket
import sqlite3
import stat
import struct
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
import zlib
from typing import Any, Callable, Iterable, Iterator, Optional

try:  # Unix: one server per database, enforced with a lock file
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "Config", "build_parser", "parse_config",
    "HTTPError", "BadRequest", "Unauthorized", "Forbidden", "NotFound", "MethodNotAllowed",
    "Conflict", "RequestTimeout", "LengthRequired", "PayloadTooLarge", "TooManyRequests",
    "MisdirectedRequest", "Unimplemented", "Unavailable",
    "Store", "SQLiteStore", "PostgresStore", "open_store", "is_postgres_url",
    "Engine", "UpdateLifecycle", "SearchIndex", "apply_delta", "replay_journal",
    "Crypto", "KeyManager", "Metrics",
    "Principal", "Identity", "AuditLog", "SingleSignOn", "Webhooks",
    "Request", "Response", "Route", "Router", "App", "Console",
    "Server", "build_app", "serve", "backup_database", "restore_database", "rotate_master_key",
    "copy_database",
    "BackupScheduler", "import_diy",
    "main",
]

__version__ = "0.1.0"

# ==== 1. Constants and limits ===============================================
# Every number the server lives by, named once: defaults of flags, limits of
# reads and bodies, and the tuning of storage, caches and the console. Nothing
# here computes; any section may read them.

#: Default SQLite database path.
DEFAULT_DB = "pulumi-backend.db"
#: Default bind address; loopback so that a fresh server is not exposed.
DEFAULT_HOST = "127.0.0.1"
#: Default TCP port.
DEFAULT_PORT = 8080
#: Accepted API tokens shorter than this get a warning at start-up.
MIN_TOKEN_LENGTH = 16
#: Name of the single organization this server hosts.
DEFAULT_ORG = "organization"
#: Login name of the single user.
DEFAULT_USER = "admin"
#: Largest request body accepted on the wire (bytes).
DEFAULT_MAX_BODY = 256 * 1024 * 1024
#: Largest body after gzip decompression (bytes); stops gzip bombs.
DEFAULT_MAX_DECOMPRESSED = 1024 * 1024 * 1024
#: Most gzip members in one request body (the CLI sends one); each costs a
#: decompressor, so a body of empty members must not be unbounded work.
MAX_GZIP_MEMBERS = 1024
#: How long a lease token lives without renewal (seconds); the CLI assumes 300.
DEFAULT_LEASE_SECONDS = 300
#: Versions of a stack kept for history and export/{version}.
DEFAULT_HISTORY_LIMIT = 50
#: States at least this large (bytes) are uploaded as deltas by the CLI.
DEFAULT_CHECKPOINT_CUTOFF = 1024 * 1024
#: Every this many deltas the whole checkpoint is stored, so that rebuilding it
#: from SQLite (after a restart) applies at most this many deltas.
DELTA_CHAIN_LIMIT = 64
#: A checkpoint delta is applied outside the write lock; if the working state
#: changed meanwhile it is applied again, up to this many times in all (then 409).
DELTA_ATTEMPTS = 3
#: Bytes of working checkpoints kept in memory for delta application.
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
#: Journaled updates replayed in memory as their batches arrive, at most at once
#: (more are replayed from the stored rows when they complete), and the share of
#: the cache's bytes that the journal they keep may take together (64 MB; their
#: parsed entries take a few times that): the replay that would pass it gives up.
LIVE_REPLAYS = 8
LIVE_REPLAY_SHARE = 0.25
#: Seconds `complete` waits for an in-memory replay to catch up before it
#: replays the stored rows instead; and that a reader of the state waits for a
#: final state being stored in the background.
LIVE_REPLAY_WAIT = 30.0
#: An update's uploads from this size on are handled one at a time (Route.gated).
INGEST_GATE_BYTES = 256 * 1024
#: Idle or slow clients are disconnected after this many seconds.
DEFAULT_SOCKET_TIMEOUT = 120.0
#: Seconds a client has for its request line and headers (from connecting, or
#: from its first byte on a kept-alive connection): a half-sent request must
#: not hold one of the --max-connections slots for long.
DEFAULT_HEADER_TIMEOUT = 10.0
#: Seconds an idle kept-alive connection stays open for its next request.
DEFAULT_KEEPALIVE_TIMEOUT = 60.0
#: Largest body accepted, read and ignored, by a route that takes none (a
#: client may send ``{}``); a larger one is refused before it is read.
MAX_IGNORED_BODY = 64
#: Largest body of a token-free route that takes one (the OIDC token exchange):
#: nobody is known yet, so it gets little.
MAX_ANONYMOUS_BODY = 64 * 1024
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
#: A page of GET .../events also ends at about this many bytes of JSON: big
#: events (a 600-resource update's are ~30 KB each) come back in more pages of
#: a few milliseconds each, not one of 30 MB.
EVENT_PAGE_BYTES = 512 * 1024
#: Strings at least this long in engine events are stored once per stack, by
#: their SHA-256: every update repeats each resource's inputs and outputs.
EVENT_VALUE_MIN_CHARS = 512
#: zlib level of stored engine event batches and values (1: cheapest CPU on the
#: CLI's critical path; the big repeats are taken out by hash, not by zlib).
EVENT_ZLIB_LEVEL = 1
#: A stored state is gzip of independently compressed segments (section 4,
#: ``_gzip_segments``), so that an update copies the segments its base has
#: unchanged instead of compressing them again. A resource of this size or more
#: is a segment of its own: the engine reorders unchanged resources, and alone it
#: loses little of zlib's 32 KB window. Smaller resources are grouped, about
#: STATE_SEGMENT_BYTES a group: a group ends after a resource of n bytes when its
#: CRC-32 says so, with chance n / STATE_SEGMENT_BYTES, so a changed resource
#: moves no cut but its own; at STATE_SEGMENT_MAX_BYTES it ends anyway.
STATE_SEGMENT_ALONE_BYTES = 8 * 1024
STATE_SEGMENT_BYTES = 64 * 1024
STATE_SEGMENT_MAX_BYTES = 1024 * 1024
#: Most free pages one write transaction gives back to the file system
#: (SQLite's incremental vacuum after history is pruned): 2 MB of 4 KB pages.
#: Moving a page costs ~50 us, so no completing update pays more than ~25 ms for
#: a big free list; SQLite reuses free pages for new rows meanwhile.
VACUUM_PAGES_PER_PRUNE = 512
#: Responses smaller than this are never gzip-compressed.
GZIP_MIN_RESPONSE = 1024
#: Deepest nesting of arrays and objects accepted in a JSON document. Real states
#: nest a few dozen levels; this bound keeps every recursive step on stored
#: documents (parsing, serializing, renaming) far inside Python's default
#: recursion limit of 1000 frames, so nothing accepted can fail later.
MAX_JSON_DEPTH = 512
#: Items per batch-encrypt/decrypt request (the CLI sends at most 1000).
MAX_BATCH_ITEMS = 10000
#: SQLite busy timeout (milliseconds); Litestream asks for at least 5000.
BUSY_TIMEOUT_MS = 30000
#: Most connections one server holds to PostgreSQL (``--db postgresql://...``).
PG_POOL_SIZE = 10
#: Seconds a request waits for a free PostgreSQL connection before a 503.
PG_POOL_TIMEOUT = 30.0
#: Key of the transaction-level advisory lock every PostgreSQL write takes
#: (see PostgresStore); any constant works, this one spells "pulumi_b".
PG_WRITE_LOCK = 0x70756C756D695F62
#: application_name of a server's PostgreSQL sessions (``copy`` refuses while any is there).
PG_APP_NAME = "pulumi-backend"
#: What to install for ``--db postgresql://...`` (e2e/setup.sh pins the versions tested).
PG_INSTALL_HINT = 'pip install "psycopg[binary]" psycopg-pool'
#: WAL pages after which a commit checkpoints (SQLite's default); 0 leaves
#: checkpoints to Litestream (--wal-autocheckpoint).
DEFAULT_WAL_AUTOCHECKPOINT = 1000
#: Deployment schema versions this server stores and serves.
MAX_DEPLOYMENT_VERSION = 4
#: Features a version-4 deployment may declare (the CLI refuses others).
KNOWN_FEATURES = frozenset({
    "refreshBeforeUpdate", "views", "hooks", "taint", "replaceWith",
    "snippets-prototype", "extensionParameterization", "byteString",
})
#: Seconds between scheduled backups (--backup-interval).
DEFAULT_BACKUP_INTERVAL = 3600.0
#: Scheduled backups kept; older ones are removed (--backup-keep).
DEFAULT_BACKUP_KEEP = 24
#: Message the Automation API matches to detect concurrent updates.
MSG_UPDATE_CONFLICT = "Conflict: Another update is currently in progress."
#: Message the CLI matches to suggest --force on stack rm.
MSG_STACK_HAS_RESOURCES = "Bad Request: Stack still contains resources."

#: Seconds between writes of a token's lastUsed time (a write per request costs an fsync).
TOKEN_TOUCH_SECONDS = 60
#: Longest token lifetime ``token create --expires`` and the token APIs accept (seconds).
MAX_TOKEN_SECONDS = 10 * 366 * 86400
#: Clock skew allowed when checking an OIDC token's exp, nbf and iat (seconds).
OIDC_CLOCK_SKEW = 60
#: Lifetime of a token from an OIDC exchange when neither side asks for less (seconds).
OIDC_DEFAULT_SECONDS = 2 * 3600
#: Largest OIDC token (JWT) accepted, in bytes.
MAX_JWT_BYTES = 16 * 1024
#: Seconds a JWKS fetched from an issuer's ``jwksUrl`` is reused.
JWKS_CACHE_SECONDS = 300
#: Largest JWKS document fetched from a ``jwksUrl`` (bytes).
MAX_JWKS_BYTES = 1024 * 1024
#: Seconds a failed JWKS fetch is remembered: exchanges meanwhile are refused without one.
JWKS_FAILURE_SECONDS = 30
#: Shortest time between two fetches of a ``jwksUrl`` for tokens whose ``kid`` it lacks
#: (a rotation), so that tokens with made-up key ids cannot drive fetches (seconds).
JWKS_REFETCH_SECONDS = 60
#: Seconds a JWKS fetch may take in all (connection, TLS, reading), and an exchange waits.
JWKS_FETCH_SECONDS = 5
#: Deepest nesting of a JWT's header or claims, checked before parsing them.
MAX_JWT_DEPTH = 32
#: Largest OIDC ``exp``, ``nbf`` or ``iat`` taken for a time (9999-12-31T23:59:59Z).
MAX_JWT_TIME = 253402300799
#: Audit events per page of GET /api/orgs/{orgName}/auditlogs.
AUDIT_PAGE_SIZE = 100
#: Days audit events are kept by default (--audit-retention-days; 0 keeps them all).
DEFAULT_AUDIT_RETENTION_DAYS = 90
#: Longest target, user agent and description an audit row keeps (characters).
MAX_AUDIT_FIELD = 1024
#: ... and of a row written for a caller nobody knows (a refused token or sign-in).
MAX_AUDIT_FAILURE_FIELD = 200
#: Refused credentials recorded per client address and minute; more are counted
#: and recorded as one row ("N more failures") when the minute is over.
AUDIT_FAILURES_PER_MINUTE = 10
#: Refused tokens and sign-ins one client address may have per minute before it
#: is answered 429 until the minute is over (--auth-failure-limit; 0: no limit).
DEFAULT_AUTH_FAILURE_LIMIT = 20
#: Seconds of the windows in which failures per address are counted.
AUTH_FAILURE_WINDOW = 60.0
#: Client addresses whose failures are tracked at once (IPv6 ones by /64); the
#: oldest window is dropped beyond this, so a flood of addresses costs bounded memory.
MAX_TRACKED_ADDRESSES = 10000
#: Newest audit events in one GET .../auditlogs/v2/export (CSV or CEF, no paging).
AUDIT_EXPORT_MAX_EVENTS = 100000
#: Most time buckets of one GET /api/orgs/{orgName}/resources/summary.
USAGE_MAX_BUCKETS = 10000
#: Stored engine events one filtered (``urn=``) page of GET .../events reads at most.
EVENT_FILTER_SCAN = 20000
#: Seconds a web console session lasts after sign-in (section 11).
CONSOLE_SESSION_SECONDS = 12 * 3600
#: Largest form the console takes (sign in, tokens), in bytes.
MAX_CONSOLE_FORM = 16 * 1024
#: Stacks per page of the console's stack list.
CONSOLE_STACK_PAGE = 100
#: Resources per page of the console's resource search.
CONSOLE_SEARCH_PAGE = 50
#: Updates per page of a stack's Activity tab.
CONSOLE_HISTORY_PAGE = 25
#: Engine events read for one update page (a 600-resource update has ~2,000).
CONSOLE_MAX_EVENTS = 50000
#: Seconds between reloads of the page of a running update.
CONSOLE_REFRESH_SECONDS = 3
#: Deliveries the console shows per webhook.
CONSOLE_WEBHOOK_DELIVERIES = 10
#: Longest token description and nonce `pulumi login` may send to /cli-login (the
#: CLI's are ~60 and 64 characters); bounded so the sign-in's ``next`` keeps them.
MAX_CLI_LOGIN_DESCRIPTION, MAX_CLI_LOGIN_NONCE = 300, 256
#: Seconds between a webhook delivery's attempts (section 8): a failed first
#: attempt is retried 10 s later, then 60 s, then 300 s; when these are spent the
#: delivery is failed (--webhook-retry-delays).
WEBHOOK_RETRY_DELAYS = (10.0, 60.0, 300.0)
#: Seconds one webhook request may take (connecting, sending, each read).
WEBHOOK_TIMEOUT = 10.0
#: Bytes of a receiver's answer kept with a delivery.
WEBHOOK_RESPONSE_EXCERPT = 4096
#: Deliveries kept per webhook; older ones go as new ones come.
WEBHOOK_DELIVERIES_KEPT = 100
#: Deliveries of one webhook that may wait to be sent; a new event beyond them is
#: stored as failed ("not sent"), so a dead receiver cannot grow the queue for ever.
WEBHOOK_PENDING_MAX = 1000
#: Webhook deliveries in flight at once (a thread each): a hanging receiver holds one.
WEBHOOK_CONCURRENCY = 4
#: Webhooks per organization and per stack.
MAX_WEBHOOKS = 100
#: Largest body of a webhook's create or edit request (bytes).
MAX_WEBHOOK_BODY = 64 * 1024
#: Seconds the delivery worker sleeps when nothing is due (a new event wakes it).
WEBHOOK_POLL_SECONDS = 1.0
#: Resources per page of a resource search when the caller names no ``size``.
SEARCH_PAGE_SIZE = 50
#: Largest ``size`` of a resource search page.
SEARCH_MAX_PAGE_SIZE = 1000
#: Results reachable with ``page``/``size`` (Pulumi Cloud's window); ``cursor`` goes on.
SEARCH_MAX_WINDOW = 10000
#: Longest resource search query (characters), and most terms in one.
MAX_SEARCH_QUERY = 4096
MAX_SEARCH_TERMS = 64
#: Deepest nesting of parentheses in a search query.
MAX_SEARCH_DEPTH = 16

_NAME_RE = re.compile(r"^(?!\.\.?\Z)[A-Za-z0-9_.-]{1,100}\Z")
_ORG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,38}[A-Za-z0-9]\Z|^[A-Za-z0-9]\Z")
_TAG_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,40}\Z")
_SHA256_HEX_RE = re.compile(r"[0-9a-fA-F]{64}")
_UPDATE_KINDS = ("update", "preview", "refresh", "destroy")
_ADMIN_COMMANDS = ("user", "team", "token", "audit")
_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_STACK_TYPE = "pulumi:pulumi:Stack"
#: Most compressed bytes fed to zlib at once when a request body is gunzipped
#: (it returns at most 16 times as much per call).
_GUNZIP_INPUT_STEP = 64 * 1024
#: Bodies from this size on are parsed with the cyclic GC held off (see _gc_paused).
_GC_PAUSE_BYTES = 256 * 1024
#: Newest journal-entry format we replay: 2 adds state-migration entries (kind 10).
JOURNAL_VERSION = 2


# ==== 2. Configuration ======================================================
# The command line and its PULUMI_BACKEND_* variables become one frozen Config,
# validated once (_validate_config) before anything opens a file or a socket.
# Every other section reads the Config (and environ) it is given; none reads
# sys.argv or os.environ itself, but section 7 for PULUMI_BACKEND_LIBCRYPTO.

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
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_address: int = 0  # 0: automatic, see _per_address_cap
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    tls_cert: str = ""
    tls_key: str = ""
    public_url: str = ""
    allowed_hosts: tuple = ()  # more names the server answers to (see _AllowedHosts)
    backup_dir: str = ""
    backup_interval: float = DEFAULT_BACKUP_INTERVAL
    backup_keep: int = DEFAULT_BACKUP_KEEP
    wal_autocheckpoint: int = DEFAULT_WAL_AUTOCHECKPOINT
    default_stack_permission: str = "none"
    oidc_issuers: str = ""
    sso_config: str = ""  # the console's single sign-on provider (see SingleSignOn)
    audit_log: str = ""
    audit_retention_days: int = DEFAULT_AUDIT_RETENTION_DAYS
    auth_failure_limit: int = DEFAULT_AUTH_FAILURE_LIMIT
    console: bool = True
    console_host: str = ""  # the console's own host name; the API answers on the others
    webhook_allow: tuple = ()  # networks (CIDR) webhooks may reach though private by policy
    webhook_retry_delays: tuple = WEBHOOK_RETRY_DELAYS

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
                   choices=("serve", "backup", "restore", "rotate-master-key", "import-diy",
                            "copy", *_ADMIN_COMMANDS),
                   help="serve (default); backup OUT (online copy of --db); import-diy SOURCE "
                        "(a DIY backend's stacks with their history, into --db); restore BACKUP "
                        "(into --db, server stopped); rotate-master-key; copy --from DB --to DB "
                        "(SQLite file or postgresql:// URL, servers stopped); user, team, token "
                        "and audit administer access (server running or not)")
    p.add_argument("file", nargs="?", help="backup: the file to write; restore: the backup to "
                   "read; import-diy: the DIY backend folder or file:// URL")
    p.add_argument("words", nargs="*", help="user/team/token: the action and its arguments")
    p.add_argument("--version", action="version", version=f"pulumi-backend {__version__}")
    _flag(p, "db", f"SQLite database path (default {DEFAULT_DB}), or a postgresql:// URL "
          f"(needs {PG_INSTALL_HINT})")
    _flag(p, "host", f"address to bind (default {DEFAULT_HOST})")
    _flag(p, "port", f"TCP port, 0 picks a free one (default {DEFAULT_PORT})", type=int)
    _flag(p, "log-level", "debug, info, warning or error (default info)")
    _flag(p, "log-format", "text or json (one JSON object per line) (default text)")
    _flag(p, "org", f"name of the single organization (default {DEFAULT_ORG})")
    _flag(p, "user", f"login name reported for --auth-token callers (default {DEFAULT_USER}); "
          "token create: the user the token is for")
    _flag(p, "auth-token", "accepted API token; repeat or comma-separate for several",
          action="append")
    _flag(p, "auth-token-file", "file with one accepted API token per line "
          "(blank lines and # comments skipped)")
    _flag(p, "allow-any-token", "accept any token on a non-loopback address (unsafe)",
          action="store_const", const="1")
    _flag(p, "master-key-file", "32-byte master key file, created 0600 if absent "
          "(default: <db>.key)")
    # adm_: like the admin options, command arguments without a PULUMI_BACKEND_ variable
    p.add_argument("--from", dest="adm_from", metavar="DB",
                   help="copy: the database to read (SQLite file or postgresql:// URL)")
    p.add_argument("--to", dest="adm_to", metavar="DB",
                   help="copy: the new database to fill (SQLite file or postgresql:// URL)")
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
    _flag(p, "header-timeout", "seconds a client has to send its request line and headers, "
          f"at most --socket-timeout (default {DEFAULT_HEADER_TIMEOUT:g})", type=float)
    _flag(p, "keepalive-timeout", "seconds an idle kept-alive connection stays open, at most "
          f"--socket-timeout (default {DEFAULT_KEEPALIVE_TIMEOUT:g})", type=float)
    _flag(p, "max-connections", f"concurrent connections (default {DEFAULT_MAX_CONNECTIONS})",
          type=int)
    _flag(p, "max-connections-per-address", "concurrent connections from one client address "
          "(one IPv6 /64); behind a reverse proxy every connection comes from the proxy "
          "(default: half of --max-connections)", type=int)
    _flag(p, "shutdown-timeout", "seconds a stopping server waits for in-flight requests "
          f"(default {DEFAULT_SHUTDOWN_TIMEOUT:g})", type=float)
    _flag(p, "tls-cert", "PEM certificate: serve https")
    _flag(p, "tls-key", "PEM private key for --tls-cert")
    _flag(p, "public-url", "URL users log in with, if not http(s)://HOST:PORT")
    _flag(p, "allowed-host", "a host name clients use to reach this server (the Host "
          "header), besides loopback names, IP addresses and the --public-url host; "
          "repeat or comma-separate; *.example.com takes its subdomains", action="append")
    _flag(p, "backup-dir", "take scheduled backups into this folder (default: none)")
    _flag(p, "backup-interval", "time between scheduled backups: 30s, 15m, 1h, 1d "
          "(default 1h)")
    _flag(p, "backup-keep", f"scheduled backups kept (default {DEFAULT_BACKUP_KEEP})", type=int)
    _flag(p, "wal-autocheckpoint", "WAL pages after which a commit checkpoints; 0 when "
          f"Litestream replicates the database (default {DEFAULT_WAL_AUTOCHECKPOINT})", type=int)
    _flag(p, "dry-run", "import-diy: print what would be imported, change nothing",
          action="store_const", const="1")
    _flag(p, "overwrite", "import-diy: replace stacks that exist here (default: skip them)",
          action="store_const", const="1")
    _flag(p, "ignore-locks", "import-diy: import locked stacks too (their lock is stale)",
          action="store_const", const="1")
    _flag(p, "default-stack-permission", "what org members may do on every stack without a "
          "team grant: none, read or write (default none)")
    _flag(p, "oidc-issuers", "JSON file of trusted OIDC issuers for `pulumi login --oidc-token`")
    _flag(p, "sso-config", "JSON file of the OIDC provider people sign in to the console "
          "with (single sign-on, IdP groups as teams)")
    _flag(p, "audit-log", "also append every audit event to this file as a JSON line")
    _flag(p, "console", "serve the read-only web console at /: on or off (default on)")
    _flag(p, "console-host", "serve the console only on this host name (the Host header) "
          "and the API on the others, e.g. app.example.com beside api.example.com: "
          "`pulumi login https://api.example.com` then finds the console (default: both "
          "on every name)")
    _flag(p, "audit-retention-days", "drop audit events older than this many days; 0 keeps "
          f"them all (default {DEFAULT_AUDIT_RETENTION_DAYS})", type=int)
    _flag(p, "auth-failure-limit", "refused tokens and sign-ins per client address and minute "
          f"before it gets 429 for the rest of the minute; 0: no limit (default "
          f"{DEFAULT_AUTH_FAILURE_LIMIT})", type=int)
    _flag(p, "webhook-allow", "let webhooks reach this network (CIDR) though it is loopback, "
          "link-local or a cloud metadata address; repeat or comma-separate", action="append")
    _flag(p, "webhook-retry-delays", "seconds between a webhook delivery's attempts, "
          "comma-separated durations (default 10s,60s,300s)")
    # Options of the administration commands (no PULUMI_BACKEND_* variables).
    p.add_argument("--name", dest="adm_name", help="user add: display name; token create: "
                   "the token's name")
    p.add_argument("--email", dest="adm_email", help="user add: e-mail address")
    p.add_argument("--role", dest="adm_role", help="user add: admin or member (default member)")
    p.add_argument("--description", dest="adm_description", help="team create, token create")
    p.add_argument("--team", dest="adm_team", help="token create: a team token of this team")
    p.add_argument("--org-token", dest="adm_org_token", action="store_true",
                   help="token create: an organization token")
    p.add_argument("--admin", dest="adm_admin", action="store_true",
                   help="token create --org-token: with admin rights")
    p.add_argument("--expires", dest="adm_expires", help="token create: lifetime such as 90d, "
                   "12h or never (default never)")
    p.add_argument("--since", dest="adm_since", help="audit: events from this time on "
                   "(2026-01-31, 2026-01-31T12:00:00Z, or 7d/12h/30m ago)")
    return p


def _parse_bool(name: str, value: str) -> bool:
    low = value.strip().lower()
    if low in ("1", "true", "on", "yes"):
        return True
    if low in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"--{name} expects on or off, got {value!r}")


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _parse_duration(name: str, value: str) -> float:
    """Return seconds from ``90``, ``30s``, ``15m``, ``1h`` or ``1d``; ValueError otherwise."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*", str(value).lower())
    if not m:
        raise ValueError(f"--{name} expects a duration such as 30s, 15m, 1h or 1d, "
                         f"got {value!r}")
    return float(m[1]) * _DURATION_UNITS.get(m[2] or "s", 1)


def _parse_networks(name: str, values: list) -> tuple:
    """Return the CIDR networks of repeated or comma-separated values; ValueError otherwise."""
    out = []
    for item in values:
        for text in filter(None, (t.strip() for t in item.split(","))):
            try:
                out.append(str(ipaddress.ip_network(text, strict=False)))
            except ValueError:
                raise ValueError(f"--{name} expects networks such as 127.0.0.1/32 or "
                                 f"10.0.0.0/8, got {text!r}") from None
    return tuple(out)


def parse_config(argv: list, environ: dict) -> tuple:
    """Return ``(command, Config, extras)`` from flags over environment over defaults.

    Raises ValueError with a one-line message for a bad value.
    """
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    values: dict = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "version") \
                or action.dest.startswith("adm_"):
            continue
        flag_value = getattr(args, action.dest)
        if flag_value is None:
            env = environ.get("PULUMI_BACKEND_" + action.dest.upper())
            # An empty variable counts as unset, except a token one: set but
            # empty there must not mean "accept any token".
            if env is None or (env == "" and action.dest not in ("auth_token",
                                                                 "auth_token_file")):
                continue
            flag_value = [env] if action.dest in ("auth_token", "allowed_host",
                                                  "webhook_allow") else env
            if action.type is not None:
                try:
                    flag_value = action.type(env)
                except ValueError:
                    raise ValueError(f"PULUMI_BACKEND_{action.dest.upper()}: "
                                     f"not a valid number: {env!r}") from None
        values[action.dest] = flag_value

    tokens = _parse_tokens(values.pop("auth_token", None), values.pop("auth_token_file", None))
    new_key_file = values.pop("new_key_file", None)
    import_options = {key: _parse_bool(key.replace("_", "-"), str(values.pop(key, "0")))
                      for key in ("dry_run", "overwrite", "ignore_locks")}
    kw: dict = {"auth_tokens": tuple(tokens),
                "allowed_hosts": _parse_allowed_hosts(values.pop("allowed_host", None))}
    if args.command != "serve" and "audit_retention_days" not in values:
        # The default retention is the server's: `user add` or `import-diy` run
        # without the server's flags must not prune what it keeps.
        kw["audit_retention_days"] = 0
    for key, value in values.items():
        if key in ("allow_any_token", "journaling", "console"):
            value = _parse_bool(key.replace("_", "-"), str(value))
        if key == "backup_interval":
            value = _parse_duration("backup-interval", value)
        if key == "webhook_allow":
            value = _parse_networks("webhook-allow", value)
        if key == "console_host":
            value = str(value).strip().lower().rstrip(".")
        if key == "webhook_retry_delays":
            value = tuple(_parse_duration("webhook-retry-delays", v)
                          for v in str(value).split(",") if v.strip())
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
    extras = {"new_key_file": new_key_file, "file": args.file,
              "copy": (args.adm_from, args.adm_to)}
    if args.command == "import-diy":
        extras["import"] = import_options
    if args.command in _ADMIN_COMMANDS:
        extras["admin"] = {k[4:]: v for k, v in vars(args).items() if k.startswith("adm_")}
        extras["admin"]["user"] = args.user  # token create --user: only from the command line
        extras["words"] = ([args.file] if args.file else []) + args.words
    elif args.words:
        raise ValueError(f"unexpected argument {args.words[0]!r}")
    return args.command, cfg, extras


def _parse_tokens(items: Optional[list], token_file: Optional[str]) -> list:
    """Return the tokens of ``--auth-token`` values and ``--auth-token-file``.

    Either option given but holding no token is a ValueError: an empty token
    list means "accept any token", so a blank secret or an empty file must not
    silently open the server.
    """
    tokens: list = []
    for item in items or []:
        tokens += [t.strip() for t in item.split(",") if t.strip()]
    if items is not None and not tokens:
        raise ValueError("--auth-token (PULUMI_BACKEND_AUTH_TOKEN) is empty: give the token, "
                         "or leave the option out to accept any token on loopback")
    if token_file is None:
        return tokens
    if not token_file:
        raise ValueError("--auth-token-file (PULUMI_BACKEND_AUTH_TOKEN_FILE) is empty: name "
                         "the file, or leave the option out")
    try:
        with open(token_file, encoding="utf-8") as f:
            found = [t for t in (line.strip() for line in f) if t and not t.startswith("#")]
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or "not UTF-8 text"
        raise ValueError(f"cannot read --auth-token-file {token_file}: {reason}") from None
    if not found:
        raise ValueError(f"--auth-token-file {token_file} holds no token: put one token per "
                         "line in it (blank lines and # comments are skipped)")
    return tokens + found


_ALLOWED_HOST_RE = re.compile(r"(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
                              r"(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\Z")


def _parse_allowed_hosts(items: Optional[list]) -> tuple:
    """Return the lower-case names of ``--allowed-host`` values; ValueError for one that
    is not a host name, ``*.name`` or an IP address (a scheme or port is a mistake)."""
    names: list = []
    for item in items or []:
        for name in (n.strip().lower().rstrip(".") for n in item.split(",")):
            if not name:
                continue
            try:
                ipaddress.ip_address(name)
            except ValueError:
                if not _ALLOWED_HOST_RE.match(name):
                    raise ValueError(f"--allowed-host expects a host name such as "
                                     f"pulumi.example.com or *.example.com, without scheme "
                                     f"or port, not {name[:100]!r}") from None
            names.append(name)
    if items is not None and not names:
        raise ValueError("--allowed-host (PULUMI_BACKEND_ALLOWED_HOST) is empty: give a "
                         "host name, or leave the option out")
    return tuple(names)


def _short_token_count(cfg: Config) -> int:
    """Return how many accepted tokens are shorter than MIN_TOKEN_LENGTH (for a warning)."""
    return sum(len(t) < MIN_TOKEN_LENGTH for t in cfg.auth_tokens)


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
    if cfg.max_connections_per_address < 0:
        raise ValueError("--max-connections-per-address must be 0 (automatic) or more")
    for name in ("socket_timeout", "header_timeout", "keepalive_timeout"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be more than 0 seconds")
    if not cfg.backup_interval >= 1:
        raise ValueError("--backup-interval must be at least 1 second")
    if cfg.wal_autocheckpoint < 0:
        raise ValueError("--wal-autocheckpoint must be 0 (off) or more pages")
    if cfg.backup_keep < 1:
        raise ValueError("--backup-keep must be at least 1")
    if not cfg.shutdown_timeout >= 0:
        raise ValueError("--shutdown-timeout must be 0 seconds or more")
    if cfg.default_stack_permission not in ("none", "read", "write"):
        raise ValueError("--default-stack-permission must be none, read or write, "
                         f"not {cfg.default_stack_permission!r}")
    if len(cfg.webhook_retry_delays) > 10 or any(
            not 0 <= d <= 86400 for d in cfg.webhook_retry_delays):
        raise ValueError("--webhook-retry-delays takes at most 10 delays of at most 1 day")
    if cfg.audit_retention_days < 0:
        raise ValueError("--audit-retention-days must be 0 (keep all) or more")
    if cfg.auth_failure_limit < 0:
        raise ValueError("--auth-failure-limit must be 0 (no limit) or more")
    if cfg.console_host and (cfg.console_host.startswith("*.") or _is_ip(cfg.console_host)
                             or not _ALLOWED_HOST_RE.match(cfg.console_host)):
        raise ValueError("--console-host expects a host name such as app.example.com, "
                         f"without scheme or port, not {cfg.console_host[:100]!r}")
    if cfg.console_host and not cfg.console:
        raise ValueError("--console-host names the console's host: it needs --console on")
    if is_postgres_url(cfg.db):
        _validate_postgres_config(cfg)
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if not cfg.auth_tokens and not cfg.allow_any_token and not _is_loopback(cfg.host):
        raise ValueError(f"refusing to bind {cfg.host} without --auth-token: anyone could "
                         "read and change state (give --allow-any-token to insist)")


def _validate_postgres_config(cfg: Config) -> None:
    """Refuse what cannot work on a database shared by replicas."""
    if not cfg.master_key_file and not cfg.master_key:
        raise ValueError("a postgresql:// --db needs --master-key-file or "
                         "PULUMI_BACKEND_MASTER_KEY: every replica must use the same key")
    if cfg.backup_dir:
        raise ValueError("--backup-dir backs up SQLite files; back up PostgreSQL with its "
                         "own tools (pg_dump, base backups), or `copy` to a SQLite file")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ==== 3. Errors =============================================================
# HTTPError and a subclass per status: the one way any section says "refuse
# this request". Section 10 turns them into {"code","message"} answers, and
# _storage_error maps database errors (busy -> 503, integrity -> 409).

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


class MisdirectedRequest(HTTPError):
    status, reason = 421, "Misdirected Request"


class TooManyRequests(HTTPError):
    """429: the client failed too often; ``Retry-After`` says when to come back."""

    status, reason = 429, "Too Many Requests"

    def __init__(self, message: str, retry_after: int):
        super().__init__(message, {"Retry-After": str(max(1, int(retry_after)))})


class Unimplemented(HTTPError):
    status, reason = 501, "Not Implemented"


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
# Helpers with no state that several sections share: JSON read and written as
# the CLI's Go decoder does (strict, bounded nesting), bounded gzip, times and
# ids, log escaping, and the Prometheus metrics registry. Depends on 1-3 only.

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
    """Serialize to compact JSON bytes (UTF-8, non-ASCII kept as is, or all escaped
    where a lone surrogate, which UTF-8 cannot hold, is in the value)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # stored before input was strict: answer, never 500
        return json.dumps(value, separators=(",", ":")).encode("ascii")


def _dumps_chunks(value: Any, depth: int = 3) -> Iterator:
    """Yield ``_dumps(value)`` in pieces: the top ``depth`` levels of objects and
    arrays are taken apart, deeper values are serialized whole (a state: one piece
    per resource).

    Serializing a 10 MB state in one call holds the GIL for ~100 ms, stalling
    every request thread; pieces let them in, and a consumer that compresses them
    as they come never holds the whole text.
    """
    if depth and isinstance(value, dict):
        yield b"{"
        for i, (key, item) in enumerate(value.items()):
            yield (b"," if i else b"") + _dumps(key) + b":"
            yield from _dumps_chunks(item, depth - 1)
        yield b"}"
    elif depth == 1 and isinstance(value, list):  # a resource, with its comma: one piece
        yield b"["
        for i, item in enumerate(value):
            yield (b"," if i else b"") + _dumps(item)
        yield b"]"
    elif depth and isinstance(value, list):
        yield b"["
        for i, item in enumerate(value):
            if i:
                yield b","
            yield from _dumps_chunks(item, depth - 1)
        yield b"]"
    else:
        yield _dumps(value)


def _gzip_chunks(chunks: Iterable, level: int = 1) -> tuple:
    """Return ``(gzip bytes, uncompressed size)`` of the concatenated ``chunks``, as
    ``_gzip_bytes`` would compress them (fixed header time)."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)  # 31: a gzip header and trailer
    out, size = [], 0
    for chunk in chunks:
        size += len(chunk)
        out.append(compressor.compress(chunk))
    out.append(compressor.flush())
    return b"".join(out), size


#: The gzip extra subfield that lists a stored state's segments (``_gzip_segments``),
#: and the size of one entry: 16 bytes of the segment's SHA-256, 4 of its length.
_SEGMENT_INDEX_ID = b"PB"
_SEGMENT_ENTRY = struct.Struct("<16sI")
_GZIP_EXTRA_MAX = 0xFFFF - 4 - 1  # the extra field less our subfield's head and version byte


def _gzip_segments(chunks: Iterable, reusable: Optional[dict] = None,
                   level: int = 1) -> tuple:
    """Return ``(gzip bytes, uncompressed size)`` of the concatenated ``chunks`` (a
    state from ``_dumps_chunks``), compressed as independent segments.

    Each segment has its own compressor and ends with a sync flush, so its bytes
    decompress the same wherever they stand; the gzip header's extra field lists
    each segment's digest and length (any gzip reader skips it). A segment whose
    digest is in ``reusable`` (``_gzip_segment_index`` of the base state) is
    copied, not compressed again.
    """
    reusable = reusable or {}
    pieces, index, group = [], [], []
    crc = size = group_size = 0

    def add_segment(raw: bytes) -> None:
        digest = hashlib.sha256(raw).digest()[:16]
        piece = reusable.get(digest)
        if piece is None:
            compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
            piece = compressor.compress(raw) + compressor.flush(zlib.Z_SYNC_FLUSH)
        pieces.append(piece)
        index.append(_SEGMENT_ENTRY.pack(digest, len(piece)))

    for chunk in chunks:
        crc, size = zlib.crc32(chunk, crc), size + len(chunk)
        if len(chunk) >= STATE_SEGMENT_ALONE_BYTES:
            if group:
                add_segment(b"".join(group))
                group, group_size = [], 0
            add_segment(chunk)
            continue
        group.append(chunk)
        group_size += len(chunk)
        if (zlib.crc32(chunk) & 0xFFFFF) * STATE_SEGMENT_BYTES < len(chunk) << 20 \
                or group_size >= STATE_SEGMENT_MAX_BYTES:
            add_segment(b"".join(group))
            group, group_size = [], 0
    if group:
        add_segment(b"".join(group))
    # Past what the extra field holds, segments are still whole but not listed.
    listed = b"\x01" + b"".join(index[:_GZIP_EXTRA_MAX // _SEGMENT_ENTRY.size])
    extra = _SEGMENT_INDEX_ID + struct.pack("<H", len(listed)) + listed
    header = (b"\x1f\x8b\x08\x04" + bytes(4) + b"\x00\xff"  # FEXTRA, no time, OS unknown
              + struct.pack("<H", len(extra)) + extra)
    trailer = b"\x03\x00" + struct.pack("<II", crc, size & 0xFFFFFFFF)  # a last, empty block
    return b"".join([header, *pieces, trailer]), size


def _gzip_segment_index(data: bytes) -> dict:
    """Return ``{digest: compressed bytes}`` of the segments a stored state lists
    (``_gzip_segments``): views of ``data``, nothing copied. Empty for a state
    compressed otherwise; an entry that does not fit ``data`` ends the list."""
    if data[:4] != b"\x1f\x8b\x08\x04" or len(data) < 12:
        return {}
    end = 12 + int.from_bytes(data[10:12], "little")
    extra, pos, listed = data[12:end], 0, b""
    while pos + 4 <= len(extra):
        length = int.from_bytes(extra[pos + 2:pos + 4], "little")
        if extra[pos:pos + 2] == _SEGMENT_INDEX_ID and extra[pos + 4:pos + 5] == b"\x01":
            listed = extra[pos + 5:pos + 4 + length]
            break
        pos += 4 + length
    view, found, offset = memoryview(data), {}, end
    for start in range(0, len(listed) - _SEGMENT_ENTRY.size + 1, _SEGMENT_ENTRY.size):
        digest, length = _SEGMENT_ENTRY.unpack_from(listed, start)
        if offset + length > len(data) - 10:  # the last block and the trailer follow
            break
        found[digest] = view[offset:offset + length]
        offset += length
    return found


#: Field names the server reads from the objects the CLI sends and reads back.
#: Go's decoder matches struct fields case-insensitively, so "Deployment" is
#: refused at those levels: the CLI would read it where the server did not.
_READ_FIELDS = {name.casefold(): name for name in (
    "stackName tags config state newName newProject options dryRun name runtime main "
    "description metadata message environment journalVersion duration isInvalid version "
    "features deployment untypedDeployment sequenceNumber checkpointHash deploymentDelta "
    "Span NewText start end offset line column entries events sequence summaryEvent "
    "resourceChanges status plaintext ciphertext plaintexts ciphertexts manifest resources "
    "secrets_providers pending_operations snippets extensions urn type parent dependencies "
    "propertyDependencies replaceWith deletedWith provider aliases viewOf "
    "refreshBeforeUpdate resourceHooks taint extensionRef snippetID delete "
    "pendingReplacement resource kind sequenceID operationID operation removeOld removeNew "
    "deleteOld deleteNew pendingReplacementOld pendingReplacementNew isRefresh newSnapshot "
    "secretsProvider extension requiresByteString").split()}
_SURROGATE_ESCAPE_RE = re.compile(rb"\\u[dD][89a-fA-F]")
_NOT_JSON_MARK = bytes(sorted(set(range(256)) - set(b'"[]{}:')))
#: With escapes: the marks, a backslash and every byte a backslash can escape.
_NOT_MARK_OR_ESCAPE = bytes(sorted(set(range(256)) - set(b'"[]{}:\\/bfnrtu')))
_NESTING_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as signed bytes


def _loads(data: bytes, what: str = "request body") -> Any:
    """Parse strict JSON bytes or raise BadRequest.

    Strict as the CLI's Go decoder: UTF-8 without a byte order mark, no NaN or
    Infinity, no number beyond a float64, no duplicate key, no lone surrogate,
    and at most MAX_JSON_DEPTH levels of nesting. What the server accepts, it
    can store, replay and hand back to the CLI.
    """
    members = 0

    def count(obj: dict) -> dict:  # far cheaper than an object_pairs_hook on big states
        nonlocal members
        members += len(obj)
        return obj

    try:
        text = data.decode("utf-8")  # strict: UTF-16/32 bodies and bad bytes fail here
        with _gc_paused() if len(data) >= _GC_PAUSE_BYTES else contextlib.nullcontext():
            value = json.loads(text, parse_constant=_json_constant, parse_float=_json_float,
                               parse_int=_json_int, object_hook=count)
    except UnicodeDecodeError as e:
        raise BadRequest(f"{what} is not UTF-8: {e}") from None
    except RecursionError:
        raise BadRequest(f"{what} nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:
        raise BadRequest(f"{what} is not valid JSON: {e}") from None
    del text  # as big as ``data``: gone before the scans below make their copies
    depth, pairs = _json_shape(data, members)
    if depth > MAX_JSON_DEPTH:
        raise BadRequest(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    if pairs != members:  # a key repeats: parse again to name it
        try:
            json.loads(data.decode("utf-8"), object_pairs_hook=_json_object)
        except ValueError as e:
            raise BadRequest(f"{what} is not valid JSON: {e}") from None
    # Go never writes \ud800-\udfff escapes for valid text: look closer only if one is there.
    if _SURROGATE_ESCAPE_RE.search(data):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(f"{what} holds a lone surrogate (an unpaired \\ud800-\\udfff "
                             "escape)") from None
    return value


class _GCPause:
    """Holds Python's cyclic garbage collector off while any thread parses a big body.

    json.loads makes no reference cycles, yet each container it builds counts
    towards the next collection, whose passes over the growing tree take a
    quarter to a third of the parse of an object-heavy state. Counted, so that
    overlapping parses in several threads turn it back on only after the last.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._holders = 0
        self._was_enabled = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._holders == 0:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._holders += 1
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0 and self._was_enabled:
                    gc.enable()


_gc_paused = _GCPause()


def _json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _json_float(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):
        raise ValueError(f"number {literal[:40]} is out of range")
    return value


def _json_int(literal: str) -> int:
    if len(literal) > 300:
        _json_float(literal)  # out of a float64's range is out of Go's
    return int(literal)


def _json_object(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {key!r}")
    return obj


def _json_shape(data: bytes, members: int) -> tuple:
    """Return ``(nesting depth, number of object members)`` of ``data`` (valid JSON),
    or ``(0, members)`` when a glance shows neither can exceed MAX_JSON_DEPTH or
    ``members``, the keys its parsed objects hold.

    With C-speed byte operations only (a walk of a parsed 10 MB state costs ~5
    times as much): once escaped backslashes and quotes are gone, quotes
    alternate opening and closing strings; dropping two adjacent quotes keeps that
    parity for every mark after them, so strings without marks can go first.
    Outside strings, each colon is a member.
    """
    if b"\\" in data:
        # Only the marks and escapes are kept (no copy of the whole body): each
        # backslash still has the byte it escapes right after it.
        marks = _kept_bytes(data, _NOT_MARK_OR_ESCAPE)
        marks = marks.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, b"\\/bfnrtu")
    else:
        marks = _kept_bytes(data, _NOT_JSON_MARK)
    # Escapes hold no bracket or colon: these counts are the whole body's.
    if marks.count(b"[") + marks.count(b"{") <= MAX_JSON_DEPTH and marks.count(b":") == members:
        return 0, members
    marks = marks.replace(b'""', b"")
    outside = b"".join(marks.split(b'"')[0::2])
    return _nesting_depth(outside.translate(None, b":")), outside.count(b":")


def _kept_bytes(data: bytes, delete: bytes) -> bytes:
    """Return ``data.translate(None, delete)``, which first allocates all of ``data``:
    256 KiB at a time, that copy stays small."""
    step = 1 << 18
    if len(data) <= step:
        return data.translate(None, delete)
    return b"".join(data[i:i + step].translate(None, delete) for i in range(0, len(data), step))


def _nesting_depth(brackets: bytes) -> int:
    """Return the deepest nesting of ``brackets`` (balanced ``[]{}`` only), or for a
    shallow one an upper bound of it below MAX_JSON_DEPTH."""
    # A pass drops the innermost pairs, 1 or 2 levels: a few passes that empty
    # it cost far less than the exact walk below (~25 ns a bracket).
    rest = brackets
    for passes in range(1, 17):
        rest = rest.replace(b"{}", b"").replace(b"[]", b"")
        if not rest:
            return 2 * passes
    steps = array.array("b", brackets.translate(_NESTING_STEP))
    return max(itertools.accumulate(steps), default=0)


def _gunzip_bounded(data: bytes, limit: int) -> bytes:
    """Decompress gzip ``data`` without ever producing more than ``limit`` bytes.

    Raises PayloadTooLarge past the limit and BadRequest for corrupt input or
    more than MAX_GZIP_MEMBERS members. Linear in ``data``: zlib copies what a
    call leaves unconsumed, so it gets slices of a view, small at first.
    """
    out = io.BytesIO()  # getvalue() hands over its buffer: no second copy
    view = memoryview(data)
    pos = size = members = 0
    try:
        while pos < len(view):  # a concatenated gzip member may follow
            members += 1
            if members > MAX_GZIP_MEMBERS:
                raise BadRequest(f"gzip body has more than {MAX_GZIP_MEMBERS} members")
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            step = 64
            while not d.eof:
                chunk = view[pos:pos + step]
                piece = d.decompress(chunk, min(limit + 1 - size, 16 * step))
                size += len(piece)
                if size > limit:
                    raise PayloadTooLarge(f"decompressed body exceeds {limit} bytes")
                if not chunk and not piece and not d.eof:
                    raise BadRequest("truncated gzip body")
                out.write(piece)
                # At the end of a member both hold the rest of ``chunk``.
                pos += len(chunk) - len(d.unused_data if d.eof else d.unconsumed_tail)
                step = min(2 * step, _GUNZIP_INPUT_STEP)
    except zlib.error as e:
        raise BadRequest(f"invalid gzip body: {e}") from None
    return out.getvalue()


def _gzip_bytes(data: bytes, level: int = 1) -> bytes:
    """Gzip-compress with a fixed header time, so equal inputs give equal outputs.

    Level 1 by default (every update stores its state): on state JSON it is about
    2.5-3.5 times as fast as level 6 for 5-20% more bytes.
    """
    return gzip.compress(data, compresslevel=level, mtime=0)


def _release_free_memory() -> None:
    """Return the C heap's free pages to the system (glibc; a no-op elsewhere).

    A state's buffers are freed in another order than they were made, and the
    holes they leave keep the resident size tens of MB above what is live.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _gunzip_stored(data: bytes) -> bytes:
    """Decompress gzip bytes this server stored (a state) into one buffer.

    gzip.decompress grows its output in blocks and joins them: it peaks near
    three times the state, _gunzip_bounded at one.
    """
    return _gunzip_bounded(data, sys.maxsize)


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


def _loads_body(body: bytes) -> dict:
    """Parse a request body that must be a JSON object (see _loads); BadRequest if not."""
    return _check_field_names(_require_dict(_loads(body)), "request body")


def _check_field_names(obj: dict, what: str) -> dict:
    """Return ``obj``, or raise BadRequest for a case variant of a field the server reads."""
    for key in obj:
        field = _READ_FIELDS.get(key.casefold())
        if field is not None and field != key:
            raise BadRequest(f"{what} has a field {key!r}: did you mean {field!r}? "
                             "(field names are case-sensitive)")
    return obj


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
    "pulumi_backend_db_pool_size": (
        "gauge", "PostgreSQL connections this server holds (only with a postgresql:// --db)."),
    "pulumi_backend_db_pool_available": (
        "gauge", "Of those, connections idle now (only with a postgresql:// --db)."),
    "pulumi_backend_db_pool_waiting": (
        "gauge", "Requests waiting for a connection (only with a postgresql:// --db)."),
    "pulumi_backend_last_backup_success_timestamp_seconds": (
        "gauge", "Unix time of the newest scheduled backup (only with --backup-dir)."),
    "pulumi_backend_backup_failures_total": (
        "counter", "Scheduled backups that failed (only with --backup-dir)."),
    "pulumi_backend_webhook_deliveries_total": (
        "counter", "Webhook delivery attempts, by result (succeeded, retried, failed)."),
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

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set a gauge kept here (rather than passed in at render time)."""
        with self._lock:
            self._counters.setdefault(name, {})[tuple(sorted(labels.items()))] = value

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


def _tty(value: Any) -> str:
    """``value`` as text for an admin's terminal, where what members chose (token names,
    user agents) must not move the cursor, retitle the window or forge rows.

    Every character str.isprintable() refuses but the space (C0 with newline and tab,
    DEL, C1 with CSI \\x9b, bidi overrides, line separators, unassigned code points)
    becomes a \\xNN, \\uNNNN or \\UNNNNNNNN escape; a backslash is doubled, so that an
    escape in the output was one in the text.
    """
    out = []
    for char in str(value):
        code = ord(char)
        if char == "\\":
            out.append("\\\\")
        elif char.isprintable() or char == " ":
            out.append(char)
        else:
            out.append(f"\\x{code:02x}" if code < 0x100 else
                       f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


# ==== 5. Storage ============================================================
# Persistence behind one declared contract, Store (an ABC: every method the
# other sections call). _SQLRecords holds the SQL both databases run;
# SQLiteStore (WAL, one writer behind a lock, readers of their own) and
# PostgresStore (psycopg, imported only for a postgresql:// URL) add
# connections and transactions. No SQL leaves this section.

class Store(abc.ABC):
    """What the engine needs from persistent storage: every method that code
    outside this section calls on a store. SQLiteStore and PostgresStore
    implement them all (the record methods once, in _SQLRecords); a test checks
    both against this list and the module's calls against it.

    The engine opens a transaction with ``write()`` (exclusive, committed
    durably when the block exits without error) or ``read()`` (a consistent
    snapshot), and passes the handle it gets to the record methods below. So a
    read-check-write sequence such as "is the stack locked? then lock it" is one
    atomic transaction, and no SQL leaves this section. Any method may raise
    ``sqlite3.Error`` (PostgreSQL's errors are raised as the same classes:
    IntegrityError for a duplicate, OperationalError when busy or unreachable).
    """

    #: True when other processes may write the same database (PostgreSQL
    #: replicas): in-memory caches of stored rows must then be validated.
    shared = False
    #: Bytes of state committed, by table ("deployments", "checkpoints",
    #: "journal"), for /metrics.
    bytes_written: dict

    # -- transactions and the database as a whole ----------------------------

    @abc.abstractmethod
    def write(self):
        """Return a context manager yielding a handle for one exclusive transaction."""

    @abc.abstractmethod
    def read(self):
        """Return a context manager yielding a handle for reads (no writes through it)."""

    @abc.abstractmethod
    def after_commit(self, fn: Callable) -> None:
        """Run ``fn`` after the current write transaction commits, before other writers."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close every connection; the store is unusable afterwards."""

    @abc.abstractmethod
    def database_bytes(self) -> int:
        """Return the size of the database on disk in bytes, for /metrics."""

    @abc.abstractmethod
    def pool_stats(self) -> dict:
        """Return the connection pool's gauges by name ({} without a pool), for /metrics."""

    @abc.abstractmethod
    def other_servers(self, db) -> int:
        """Return how many other servers are connected to the database (0 if it cannot tell)."""

    # -- meta ---------------------------------------------------------------

    @abc.abstractmethod
    def get_meta(self, db, key: str) -> Optional[bytes]:
        """Return the value stored under ``key``, or None."""

    @abc.abstractmethod
    def set_meta(self, db, key: str, value: bytes) -> None:
        """Store ``value`` under ``key``, replacing any value there."""

    # -- stacks -------------------------------------------------------------

    @abc.abstractmethod
    def get_stack(self, db, org: str, project: str, name: str) -> Optional[dict]:
        """Return the stack's row, or None."""

    @abc.abstractmethod
    def get_stack_by_id(self, db, stack_id: str) -> Optional[dict]:
        """Return the row of the stack with id ``stack_id``, or None."""

    @abc.abstractmethod
    def list_stacks(self, db, org: Optional[str], project: Optional[str], after: tuple,
                    limit: int) -> list:
        """Return up to ``limit`` stack rows ordered by (org, project, name) after ``after``."""

    @abc.abstractmethod
    def insert_stack(self, db, stack: dict) -> None:
        """Insert a stack row (column -> value); IntegrityError if the name is taken."""

    @abc.abstractmethod
    def update_stack(self, db, stack_id: str, **fields: Any) -> None:
        """Set ``fields`` of the stack; ValueError for a column that is not the stack's."""

    @abc.abstractmethod
    def delete_stack(self, db, stack_id: str) -> None:
        """Delete the stack with its deployments, updates and everything of theirs."""

    @abc.abstractmethod
    def project_exists(self, db, org: str, project: str) -> bool:
        """Return whether ``org`` has a stack in ``project``."""

    @abc.abstractmethod
    def count_stacks(self, db) -> int:
        """Return the number of stacks."""

    @abc.abstractmethod
    def all_data_keys(self, db) -> list:
        """Return ``(stack id, wrapped data key)`` of every stack."""

    @abc.abstractmethod
    def one_data_key(self, db) -> Optional[tuple]:
        """Return ``(stack id, wrapped data key)`` of some stack, or None if there is none."""

    # -- deployments --------------------------------------------------------

    @abc.abstractmethod
    def get_deployment(self, db, stack_id: str, version: Optional[int] = None) -> Optional[dict]:
        """Return the row of ``version`` (or the newest) with its gzip ``data``, or None."""

    @abc.abstractmethod
    def put_deployment(self, db, stack_id: str, version: int, data_gz: bytes, size: int,
                       resource_count: int, skeleton: Optional[bytes] = None) -> None:
        """Store (or replace) the stack's state ``version``."""

    @abc.abstractmethod
    def drop_full_copies(self, db, stack_id: str, below: int) -> None:
        """Empty the gzip copy of the stack's versions below ``below`` that have a skeleton."""

    @abc.abstractmethod
    def prune_versions(self, db, stack_id: str, keep_from: int, keep_previews: int) -> None:
        """Forget deployments and finished updates older than version ``keep_from``."""

    # -- updates ------------------------------------------------------------

    @abc.abstractmethod
    def get_update(self, db, update_id: str) -> Optional[dict]:
        """Return the update's row, or None."""

    @abc.abstractmethod
    def update_by_version(self, db, stack_id: str, version: int) -> Optional[dict]:
        """Return the row of the stack's non-preview update that made ``version``, or None."""

    @abc.abstractmethod
    def resource_counts(self, db, org: str, since: int, until: int) -> list:
        """Return ``(stack id, end time, resource count)`` of the finished non-preview
        updates of ``org``'s stacks: each stack's last before ``since``, then every one
        up to ``until``, by time."""

    @abc.abstractmethod
    def insert_update(self, db, update: dict) -> None:
        """Insert an update row (column -> value); IntegrityError if the id exists."""

    @abc.abstractmethod
    def update_update(self, db, update_id: str, **fields: Any) -> None:
        """Set ``fields`` of the update; ValueError for a column that is not an update's."""

    @abc.abstractmethod
    def count_running_updates(self, db, now: int) -> int:
        """Return how many updates are running with a live lease at Unix time ``now``."""

    @abc.abstractmethod
    def list_history(self, db, stack_id: str, limit: int, offset: int) -> list:
        """Return finished non-preview update rows, newest first (all when ``limit < 0``)."""

    # -- checkpoints --------------------------------------------------------

    @abc.abstractmethod
    def put_checkpoint(self, db, update_id: str, seq: int, kind: str, data: bytes,
                       digest: str) -> None:
        """Store checkpoint ``seq`` of the update (a "full" one drops those before it)."""

    @abc.abstractmethod
    def last_checkpoint(self, db, update_id: str) -> Optional[tuple]:
        """Return ``(seq, hash)`` of the update's latest checkpoint row, or None."""

    @abc.abstractmethod
    def checkpoint_rows(self, db, update_id: str) -> list:
        """Return the update's checkpoint rows (seq, kind, data, hash) in order."""

    @abc.abstractmethod
    def clear_checkpoints(self, db, update_id: str) -> None:
        """Delete the update's checkpoints."""

    # -- journal ------------------------------------------------------------

    @abc.abstractmethod
    def append_journal(self, db, update_id: str, batch: bytes) -> None:
        """Store one batch of journal entries after the update's others."""

    @abc.abstractmethod
    def journal_rows(self, db, update_id: str) -> list:
        """Return ``(batch, data)`` of the update's journal rows in arrival order."""

    @abc.abstractmethod
    def count_journal(self, db, update_id: str) -> int:
        """Return the number of the update's journal rows."""

    @abc.abstractmethod
    def clear_journal(self, db, update_id: str) -> None:
        """Delete the update's journal rows."""

    # -- events -------------------------------------------------------------

    @abc.abstractmethod
    def append_events(self, db, stack_id: str, update_id: str, batch: "_EventBatch") -> None:
        """Store a batch of events; a sequence already stored keeps its first copy."""

    @abc.abstractmethod
    def put_values(self, db, stack_id: str, update_id: str, values: "_Values") -> None:
        """Store long strings (SHA-256 -> string) once per stack, used by ``update_id``."""

    @abc.abstractmethod
    def known_values(self, db, stack_id: str, hashes: Iterable) -> set:
        """Return which of ``hashes`` the stack's stored values hold."""

    @abc.abstractmethod
    def stack_values(self, db, stack_id: str, hashes: Iterable) -> dict:
        """Return the stored JSON of the stack's values ``hashes`` (bytes hash -> bytes)."""

    @abc.abstractmethod
    def list_events(self, db, update_id: str, after: int, limit: int,
                    max_bytes: int = 1 << 62) -> list:
        """Return up to ``limit`` ``(sequence, event)`` pairs after ``after``, in order."""

    @abc.abstractmethod
    def events_after(self, db, update_id: str, seq: int) -> bool:
        """Return whether the update has an event stored with a sequence after ``seq``."""

    # -- identity (section 8): users, teams, grants, tokens, audit ------------

    @abc.abstractmethod
    def identity_in_use(self, db) -> bool:
        """Return whether any user or stored token exists."""

    @abc.abstractmethod
    def get_user(self, db, login: str) -> Optional[dict]:
        """Return the user's row, or None."""

    @abc.abstractmethod
    def list_users(self, db) -> list:
        """Return every user row, by login."""

    @abc.abstractmethod
    def insert_user(self, db, user: dict) -> None:
        """Insert a user; IntegrityError if the login exists."""

    @abc.abstractmethod
    def set_user_role(self, db, login: str, role: str) -> None:
        """Set the user's role."""

    @abc.abstractmethod
    def delete_user(self, db, login: str) -> None:
        """Delete the user with its personal tokens and memberships."""

    @abc.abstractmethod
    def get_team(self, db, name: str) -> Optional[dict]:
        """Return the team's row, or None."""

    @abc.abstractmethod
    def list_teams(self, db) -> list:
        """Return every team row, by name."""

    @abc.abstractmethod
    def insert_team(self, db, team: dict) -> None:
        """Insert a team; IntegrityError if the name exists."""

    @abc.abstractmethod
    def update_team(self, db, name: str, display_name: str, description: str) -> None:
        """Set the team's display name and description."""

    @abc.abstractmethod
    def delete_team(self, db, name: str) -> None:
        """Delete the team with its tokens, members and grants."""

    @abc.abstractmethod
    def team_members(self, db, team: str) -> list:
        """Return the user rows of the team's members, by login."""

    @abc.abstractmethod
    def user_teams(self, db, login: str) -> list:
        """Return the names of the user's teams, sorted."""

    @abc.abstractmethod
    def add_member(self, db, team: str, login: str) -> None:
        """Make the user a member of the team (nothing if it is one)."""

    @abc.abstractmethod
    def remove_member(self, db, team: str, login: str) -> bool:
        """Remove the user from the team; return whether it was a member."""

    @abc.abstractmethod
    def grants(self, db, teams: Iterable) -> list:
        """Return ``(team, pattern, permission)`` of every grant to one of ``teams``."""

    @abc.abstractmethod
    def set_grant(self, db, team: str, pattern: str, permission: int) -> None:
        """Grant ``permission`` on ``pattern`` to ``team``; 0 removes the grant."""

    @abc.abstractmethod
    def token_by_hash(self, db, digest: str) -> Optional[dict]:
        """Return the row of the token whose SHA-256 is ``digest``, or None."""

    @abc.abstractmethod
    def get_token(self, db, token_id: str) -> Optional[dict]:
        """Return the token's row, or None."""

    @abc.abstractmethod
    def list_tokens(self, db, kind: Optional[str] = None, owner: Optional[str] = None) -> list:
        """Return the token rows of ``kind`` and ``owner`` (None: any), oldest first."""

    @abc.abstractmethod
    def insert_token(self, db, token: dict) -> None:
        """Insert a token row (column -> value); IntegrityError if id or hash exists."""

    @abc.abstractmethod
    def delete_token(self, db, token_id: str) -> bool:
        """Delete the token; return whether it existed."""

    @abc.abstractmethod
    def touch_token(self, db, token_id: str, when: int) -> None:
        """Record that the token was used at Unix time ``when``."""

    @abc.abstractmethod
    def delete_expired_tokens(self, db, now: int, created_by_prefix: str) -> int:
        """Delete expired tokens whose creator starts with the prefix; return how many."""

    @abc.abstractmethod
    def append_audit(self, db, event: dict) -> int:
        """Append one audit event; return its id."""

    @abc.abstractmethod
    def list_audit(self, db, before_id: int, since: int, until: int, event: Optional[str],
                   actor: Optional[str], limit: int, ascending: bool = False,
                   target: Optional[str] = None) -> list:
        """Return up to ``limit`` audit rows with ``since <= time <= until``, by id (of
        ``target`` or below it, ``target/...``, when given)."""

    @abc.abstractmethod
    def prune_audit(self, db, before: int) -> int:
        """Delete audit events older than ``before``; return how many."""

    # -- console sessions (section 11) ----------------------------------------

    @abc.abstractmethod
    def insert_session(self, db, digest: str, token_hash: str, created: int,
                       expires: int) -> None:
        """Store a console session (by the SHA-256 of its id), dropping expired ones."""

    @abc.abstractmethod
    def get_session(self, db, digest: str) -> Optional[dict]:
        """Return the console session's row, or None."""

    @abc.abstractmethod
    def delete_session(self, db, digest: str) -> None:
        """Delete the console session."""

    @abc.abstractmethod
    def console_stacks(self, db, org: str) -> list:
        """Return ``(id, project, name, tags, resource_count)`` of every stack of ``org``."""

    @abc.abstractmethod
    def latest_updates(self, db, stack_ids: list) -> dict:
        """Return the newest non-preview update of each stack (by id) that has one."""

    # -- webhooks and their deliveries (section 8) ------------------------------

    @abc.abstractmethod
    def insert_webhook(self, db, hook: dict) -> None:
        """Store a new webhook (IntegrityError if its name is taken)."""

    @abc.abstractmethod
    def get_webhook(self, db, name: str) -> Optional[dict]:
        """Return the webhook's row, or None."""

    @abc.abstractmethod
    def list_webhooks(self, db, org: str, stack_id: Optional[str]) -> list:
        """Return the org's webhooks (``stack_id`` None) or the stack's, oldest first."""

    @abc.abstractmethod
    def update_webhook(self, db, name: str, **fields: Any) -> None:
        """Set the given columns of the webhook."""

    @abc.abstractmethod
    def delete_webhook(self, db, name: str) -> bool:
        """Delete the webhook and its deliveries; return whether it existed."""

    @abc.abstractmethod
    def webhooks_for_stack(self, db, org: str, stack_id: str) -> list:
        """Return the active webhooks of the org and of the stack."""

    @abc.abstractmethod
    def webhook_secrets(self, db) -> list:
        """Return ``(name, sealed secret)`` of every webhook that has a secret."""

    @abc.abstractmethod
    def insert_delivery(self, db, delivery: dict) -> None:
        """Store a delivery, dropping the webhook's oldest finished ones beyond
        WEBHOOK_DELIVERIES_KEPT (pending ones are all kept); past WEBHOOK_PENDING_MAX
        pending ones, a new one is stored as failed."""

    @abc.abstractmethod
    def get_delivery(self, db, delivery_id: str) -> Optional[dict]:
        """Return the delivery's row, or None."""

    @abc.abstractmethod
    def list_deliveries(self, db, hook: str, limit: int) -> list:
        """Return the webhook's deliveries, newest first."""

    @abc.abstractmethod
    def due_deliveries(self, db, now_ms: int, limit: int) -> list:
        """Return up to ``limit`` pending deliveries due at ``now_ms``, oldest due first."""

    @abc.abstractmethod
    def update_delivery(self, db, delivery_id: str, **fields: Any) -> None:
        """Set the given columns of the delivery."""

    # -- resource search index (SearchIndex, section 6) ------------------------

    @abc.abstractmethod
    def replace_search_rows(self, db, stack_id: str, version: int, rows: list) -> None:
        """Make ``rows`` (tuples in _SEARCH_COLUMNS order) the stack's index, of ``version``."""

    @abc.abstractmethod
    def search_indexed_version(self, db, stack_id: str) -> Optional[int]:
        """Return the stored version the stack's index rows are of (None: not indexed)."""

    @abc.abstractmethod
    def stacks_to_index(self, db, limit: int) -> list:
        """Return ids of stacks whose index is missing or older than their newest state."""

    @abc.abstractmethod
    def search_resources(self, db, where: str, params: list, stack_ids: Optional[list],
                         order: str, limit: int, offset: int) -> tuple:
        """Return ``(total, rows)`` of index rows matching ``where`` (SQL that SearchIndex
        builds from its own column names, values bound as ``params``), of the stacks
        ``stack_ids`` (None: all), in ``order``, one page."""

    # -- whole-database copy (the ``copy`` command, section 14) ---------------

    @abc.abstractmethod
    def count_rows(self, db, table: str) -> int:
        """Return the number of rows of ``table``; ValueError for an unknown table."""

    @abc.abstractmethod
    def table_batches(self, db, table: str, size: int = 500) -> Iterator:
        """Yield ``(columns, rows)`` batches of every row of ``table``."""

    @abc.abstractmethod
    def insert_rows(self, db, table: str, columns: list, rows: list) -> None:
        """Insert ``rows`` into ``table``; ValueError for an unknown table or column."""

    @abc.abstractmethod
    def after_copy(self, db) -> None:
        """Bring id counters past rows copied in with their ids."""


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
    # version 2: identity and access (section 8)
    """
    CREATE TABLE users (
        login TEXT PRIMARY KEY,
        name TEXT NOT NULL DEFAULT '',
        email TEXT NOT NULL DEFAULT '',
        role TEXT NOT NULL CHECK (role IN ('admin', 'member')),
        created INTEGER NOT NULL);
    CREATE TABLE teams (
        name TEXT PRIMARY KEY,
        display_name TEXT NOT NULL DEFAULT '',
        description TEXT NOT NULL DEFAULT '',
        created INTEGER NOT NULL);
    CREATE TABLE team_members (
        team TEXT NOT NULL REFERENCES teams(name) ON DELETE CASCADE,
        login TEXT NOT NULL REFERENCES users(login) ON DELETE CASCADE,
        PRIMARY KEY (team, login));
    CREATE TABLE grants (
        team TEXT NOT NULL REFERENCES teams(name) ON DELETE CASCADE,
        pattern TEXT NOT NULL,
        permission INTEGER NOT NULL,
        PRIMARY KEY (team, pattern));
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        hash TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL CHECK (kind IN ('personal', 'team', 'org')),
        owner TEXT NOT NULL,
        name TEXT NOT NULL DEFAULT '',
        description TEXT NOT NULL DEFAULT '',
        admin INTEGER NOT NULL DEFAULT 0,
        created_by TEXT NOT NULL DEFAULT '',
        created INTEGER NOT NULL,
        last_used INTEGER NOT NULL DEFAULT 0,
        expires INTEGER NOT NULL DEFAULT 0);
    CREATE INDEX tokens_by_owner ON tokens (kind, owner);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        time INTEGER NOT NULL,
        actor TEXT NOT NULL DEFAULT '',
        token_id TEXT NOT NULL DEFAULT '',
        token_name TEXT NOT NULL DEFAULT '',
        source_ip TEXT NOT NULL DEFAULT '',
        user_agent TEXT NOT NULL DEFAULT '',
        event TEXT NOT NULL,
        target TEXT NOT NULL DEFAULT '',
        outcome TEXT NOT NULL,
        description TEXT NOT NULL DEFAULT '');
    CREATE INDEX audit_by_time ON audit (time);
    ALTER TABLE updates ADD COLUMN requested_by TEXT NOT NULL DEFAULT '';
    """,
    # version 3: web console sessions (section 11), by the SHA-256 of their id
    """
    CREATE TABLE console_sessions (
        hash TEXT PRIMARY KEY,
        token_hash TEXT NOT NULL,
        created INTEGER NOT NULL,
        expires INTEGER NOT NULL);
    """,
    # version 4: engine events stored compressed. A row of event_batches holds
    # the events first_seq..seq (the last) of one update, zlib of a JSON array
    # sorted by sequence; rows of one update never overlap. Strings of at least
    # EVENT_VALUE_MIN_CHARS in them are "\0" + the SHA-256 of an event_values
    # row of the stack (each update repeats every resource's inputs and
    # outputs); event_refs says which updates use which, so pruned history
    # takes its values along. Rows of the version 1 events table stay readable.
    """
    CREATE TABLE event_batches (
        update_id TEXT NOT NULL REFERENCES updates(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        first_seq INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (update_id, seq));
    CREATE TABLE event_values (
        stack_id TEXT NOT NULL REFERENCES stacks(id) ON DELETE CASCADE,
        hash TEXT NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (stack_id, hash));
    CREATE TABLE event_refs (
        update_id TEXT NOT NULL REFERENCES updates(id) ON DELETE CASCADE,
        hash TEXT NOT NULL,
        PRIMARY KEY (update_id, hash));
    CREATE INDEX event_refs_by_hash ON event_refs (hash);
    """,
    # version 5: a journal row holds a whole batch as the CLI sent it (batch = 1); an
    # update whose final state is still being stored after `complete` answered
    # (pending = 1); a state built from a journal also keeps a skeleton (zlib of its
    # JSON with long strings as event_values references, as events are): once a
    # newer version is stored, that is all a history version keeps (data = '')
    """
    ALTER TABLE journal ADD COLUMN batch INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE updates ADD COLUMN pending INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE deployments ADD COLUMN skeleton BLOB;
    """,
    # webhooks (section 8): an org's (stack_id NULL) or a stack's (gone with it); the
    # secret sealed by the master key. A delivery is one event sent to one webhook,
    # with its latest attempt; pending ones are due at next_attempt (ms).
    """
    CREATE TABLE webhooks (
        name TEXT PRIMARY KEY,
        org TEXT NOT NULL,
        stack_id TEXT REFERENCES stacks(id) ON DELETE CASCADE,
        display_name TEXT NOT NULL,
        url TEXT NOT NULL,
        active INTEGER NOT NULL DEFAULT 1,
        format TEXT NOT NULL DEFAULT 'raw',
        filters TEXT NOT NULL DEFAULT '[]',
        event_groups TEXT NOT NULL DEFAULT '[]',
        secret BLOB,
        created INTEGER NOT NULL);
    CREATE INDEX webhooks_by_scope ON webhooks (org, stack_id);
    CREATE TABLE webhook_deliveries (
        id TEXT PRIMARY KEY,
        hook TEXT NOT NULL REFERENCES webhooks(name) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        event TEXT NOT NULL,
        payload TEXT NOT NULL,
        created INTEGER NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt INTEGER NOT NULL DEFAULT 0,
        sent INTEGER NOT NULL DEFAULT 0,
        duration INTEGER NOT NULL DEFAULT 0,
        request_url TEXT NOT NULL DEFAULT '',
        request_headers TEXT NOT NULL DEFAULT '',
        response_code INTEGER NOT NULL DEFAULT 0,
        response_headers TEXT NOT NULL DEFAULT '',
        response_body TEXT NOT NULL DEFAULT '',
        error TEXT NOT NULL DEFAULT '');
    CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt);
    CREATE INDEX webhook_deliveries_by_hook ON webhook_deliveries (hook, created);
    """,
    # version 7: the resource search index (SearchIndex, section 6): one row per
    # resource of each stack's newest stored state, rewritten with it; times in
    # Unix milliseconds (created is NULL when the state has none). search_stacks
    # says which stored version the rows are of: a stack without a row there (an
    # older database, a DIY import) is indexed before the next search answers.
    """
    CREATE TABLE search_resources (
        stack_id TEXT NOT NULL REFERENCES stacks(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        urn TEXT NOT NULL,
        type TEXT NOT NULL,
        short_type TEXT NOT NULL,
        name TEXT NOT NULL,
        package TEXT NOT NULL,
        module TEXT NOT NULL,
        project TEXT NOT NULL,
        stack TEXT NOT NULL,
        custom INTEGER NOT NULL,
        protected INTEGER NOT NULL,
        deleted INTEGER NOT NULL,
        pending TEXT NOT NULL,
        resource_id TEXT NOT NULL,
        parent_urn TEXT NOT NULL,
        provider_urn TEXT NOT NULL,
        created INTEGER,
        modified INTEGER NOT NULL,
        PRIMARY KEY (stack_id, seq));
    CREATE INDEX search_resources_by_modified ON search_resources (modified);
    CREATE TABLE search_stacks (
        stack_id TEXT PRIMARY KEY REFERENCES stacks(id) ON DELETE CASCADE,
        version INTEGER NOT NULL);
    """,
]


def _private_file(path: str, create: bool = False) -> None:
    """Make ``path`` readable by its owner only (0600), creating it empty if asked.

    The database holds plaintext outputs and wrapped stack keys. A file that
    exists with group or other access (from an older version, or made by hand)
    is tightened with a warning; one we cannot change is left with a warning.
    """
    if create:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode) or not mode & 0o077:
        return
    try:
        os.chmod(path, stat.S_IMODE(mode) & 0o700)
    except OSError as e:
        log.warning("%s is readable by other users (mode %04o) and cannot be changed: %s",
                    path, stat.S_IMODE(mode), e.strerror)
        return
    log.warning("%s was readable by other users (mode %04o); it is now %04o", path,
                stat.S_IMODE(mode), stat.S_IMODE(mode) & 0o700)


def _private_database(path: str) -> None:
    """Create the database file 0600 if absent and take others' access off it and its
    -wal and -shm files.

    SQLite creates -wal and -shm with the main file's mode (whatever the umask),
    so a 0600 database keeps them 0600. Changing the process umask instead
    would affect every thread; the folder's mode is left as it is.
    """
    real = os.path.realpath(path)  # SQLite puts -wal and -shm beside the link's target
    _private_file(real, create=True)
    for suffix in ("-wal", "-shm"):
        _private_file(real + suffix)


#: A stored event value's reference in a batch's JSON: a string "\0" + SHA-256
#: (group 2) where a value starts (after group 1). Object keys are never references.
_EVENT_REF_RE = re.compile(rb'([\[,:])"\\u0000([0-9a-f]{64})"(?!:)')


class _Values(dict):
    """The long strings skeletons refer to (SHA-256 hex -> string), collected by
    _event_skeleton. ``refs`` remembers each string's reference: a value that
    repeats (an event's old and new inputs and outputs) is hashed once.
    ``packed`` holds the zlib of those the stack lacked when looked up before
    the write lock (pack_missing); put_values does the rest."""

    def __init__(self):
        super().__init__()
        self.refs: dict = {}
        self.packed: dict = {}

    def pack_missing(self, known: set) -> None:
        """Compress the values not in ``known`` (before the write lock)."""
        self.packed = {h: _packed_json(v) for h, v in self.items() if h not in known}


def _packed_json(value: Any) -> bytes:
    """The zlib of ``value``'s JSON: how event batches, values and skeletons are stored."""
    return zlib.compress(_dumps(value), EVENT_ZLIB_LEVEL)


def _event_skeleton(value: Any, values: _Values) -> Any:
    """Return ``value`` with its long strings replaced by references, collected in
    ``values`` (hash -> string). A string that starts with NUL is always one, so
    that no string of the event reads as a reference."""
    if isinstance(value, str):
        if len(value) < EVENT_VALUE_MIN_CHARS and not value.startswith("\0"):
            return value
        ref = values.refs.get(value)
        if ref is None:
            digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
            values[digest] = value
            ref = values.refs[value] = "\0" + digest
        return ref
    # One frame per level (comprehensions would add one): MAX_JSON_DEPTH must fit.
    if isinstance(value, dict):
        return dict(zip(value, map(_event_skeleton, value.values(), itertools.repeat(values))))
    if isinstance(value, list):
        return list(map(_event_skeleton, value, itertools.repeat(values)))
    return value


class _EventBatch:
    """A batch of engine events as stored, made before the write lock is taken: the
    first copy of each sequence as a skeleton, in order, the zlib of them, and the
    long strings they refer to."""

    def __init__(self, events: Iterable):
        first: dict = {}
        for seq, event in events:
            first.setdefault(seq, event)
        self.values = _Values()
        self.events = {seq: _event_skeleton(event, self.values)
                       for seq, event in sorted(first.items(), key=lambda item: item[0])}
        self.data = _packed_json(list(self.events.values()))


def _stored_event(data: bytes) -> Any:
    """Parse an event row of schema version 1, also one stored before input was
    strict (a lone surrogate, a repeated key); BadRequest if it is not JSON."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return _loads(data, "stored event")  # raises, naming what is wrong


def _chunks(items: list, size: int = 500) -> Iterator:
    """Yield slices of ``items`` short enough for one statement's bound parameters."""
    for i in range(0, len(items), size):
        yield items[i:i + size]


class _SQLRecords(Store):
    """The record methods of both stores: SQL that SQLite runs as written and
    PostgreSQL runs through ``_PGHandle`` (``?`` placeholders, ``INSERT OR ...``)."""

    def _migrate(self) -> None:
        """Create or upgrade the schema; RuntimeError if the database is newer than us.

        In one write transaction, so two servers (or replicas) starting at once
        migrate once.
        """
        with self.write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            current = row[0] if row else 0
            if current > len(_SCHEMA):
                raise RuntimeError(f"database schema {current} is newer than this server "
                                   f"({len(_SCHEMA)}); upgrade pulumi_backend.py")
            for version in range(current, len(_SCHEMA)):
                for stmt in self._schema_statements(version):
                    db.execute(stmt)
            db.execute("DELETE FROM schema_version")
            db.execute("INSERT INTO schema_version VALUES (?)", (len(_SCHEMA),))

    def _schema_statements(self, version: int) -> list:
        """The statements that bring the schema from ``version`` to the next one."""
        return [stmt for stmt in _SCHEMA[version].split(";") if stmt.strip()]

    def _count_written(self, table: str, size: int) -> None:
        # Called inside a write transaction; counted only once it commits.
        self._uncommitted_bytes[table] = self._uncommitted_bytes.get(table, 0) + size

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

    def one_data_key(self, db) -> Optional[tuple]:
        """Return ``(stack id, wrapped data key)`` of some stack, or None if there is none."""
        return _one_data_key(db)

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
                       resource_count: int, skeleton: Optional[bytes] = None) -> None:
        db.execute("INSERT OR REPLACE INTO deployments "
                   "(stack_id, version, data, size, resource_count, skeleton) "
                   "VALUES (?, ?, ?, ?, ?, ?)",
                   (stack_id, version, data_gz, size, resource_count, skeleton))
        self._count_written("deployments", len(data_gz) + len(skeleton or b""))

    def drop_full_copies(self, db, stack_id: str, below: int) -> None:
        """Empty the gzip copy of the stack's versions below ``below`` that have a skeleton."""
        db.execute("UPDATE deployments SET data = ? WHERE stack_id = ? AND version < ? "
                   "AND skeleton IS NOT NULL AND length(data) > 0", (b"", stack_id, below))

    def prune_versions(self, db, stack_id: str, keep_from: int, keep_previews: int) -> None:
        """Forget deployments and finished updates older than version ``keep_from``.

        The newest deployment is always kept, whatever its number; of finished
        previews (which have no version) the newest ``keep_previews`` are kept.
        Event values no kept update uses go with them, and some of the space
        freed goes back to the file system.
        """
        db.execute("DELETE FROM deployments WHERE stack_id = ? AND version < ? AND version < "
                   "(SELECT MAX(version) FROM deployments WHERE stack_id = ?)",
                   (stack_id, keep_from, stack_id))
        doomed = [r[0] for r in db.execute(
            "SELECT id FROM updates WHERE stack_id = ? "
            "AND status NOT IN ('not started', 'running') AND ("
            "(dry_run = 0 AND version < ?) OR (dry_run = 1 AND id NOT IN ("
            "SELECT id FROM updates WHERE stack_id = ? AND dry_run = 1 "
            "ORDER BY created DESC LIMIT ?)))", (stack_id, keep_from, stack_id, keep_previews))]
        hashes: set = set()
        for chunk in _chunks(doomed):
            marks = ",".join("?" * len(chunk))
            hashes.update(r[0] for r in db.execute(
                f"SELECT hash FROM event_refs WHERE update_id IN ({marks})", chunk))
            db.execute(f"DELETE FROM updates WHERE id IN ({marks})", chunk)
        db.executemany(
            "DELETE FROM event_values WHERE stack_id = ? AND hash = ? AND NOT EXISTS ("
            "SELECT 1 FROM event_refs r JOIN updates u ON u.id = r.update_id "
            "WHERE r.hash = ? AND u.stack_id = ?)",
            [(stack_id, h, h, stack_id) for h in sorted(hashes)])
        self._give_back_space(db)

    def _give_back_space(self, db) -> None:
        """Return free pages to the file system, if the store needs telling (SQLite)."""

    # -- updates ------------------------------------------------------------

    def get_update(self, db, update_id: str) -> Optional[dict]:
        row = db.execute("SELECT * FROM updates WHERE id = ?", (update_id,)).fetchone()
        return dict(row) if row else None

    def update_by_version(self, db, stack_id: str, version: int) -> Optional[dict]:
        row = db.execute("SELECT * FROM updates WHERE stack_id = ? AND version = ? AND "
                         "dry_run = 0 AND version > 0 ORDER BY created DESC LIMIT 1",
                         (stack_id, version)).fetchone()
        return dict(row) if row else None

    def resource_counts(self, db, org: str, since: int, until: int) -> list:
        # Two statements: the baseline (each stack's newest row before the window),
        # then the window's rows in time order.
        finished = ("u.dry_run = 0 AND u.ended IS NOT NULL AND u.resource_count IS NOT NULL "
                    "AND u.version > 0")
        before = db.execute(
            "SELECT stack_id, ended, resource_count FROM updates WHERE id IN (SELECT (SELECT "
            f"u.id FROM updates u WHERE u.stack_id = s.id AND {finished} AND u.ended < ? "
            "ORDER BY u.ended DESC, u.version DESC LIMIT 1) FROM stacks s WHERE s.org = ?)",
            (since, org)).fetchall()
        during = db.execute(
            "SELECT u.stack_id, u.ended, u.resource_count FROM updates u JOIN stacks s ON "
            f"s.id = u.stack_id WHERE s.org = ? AND {finished} AND u.ended >= ? "
            "AND u.ended <= ? ORDER BY u.ended, u.version", (org, since, until)).fetchall()
        return [tuple(r) for r in before] + [tuple(r) for r in during]

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
        """Return finished non-preview updates, newest version first (all when ``limit < 0``)."""
        limit = limit if limit >= 0 else 2 ** 62  # PostgreSQL refuses SQLite's LIMIT -1
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

    def last_checkpoint(self, db, update_id: str) -> Optional[tuple]:
        """Return ``(seq, hash)`` of the update's latest checkpoint row, or None."""
        row = db.execute("SELECT seq, hash FROM checkpoints WHERE update_id = ? "
                         "ORDER BY seq DESC LIMIT 1", (update_id,)).fetchone()
        return (row[0], row[1]) if row else None

    def checkpoint_rows(self, db, update_id: str) -> list:
        return [dict(r) for r in db.execute(
            "SELECT seq, kind, data, hash FROM checkpoints WHERE update_id = ? ORDER BY seq",
            (update_id,))]

    def clear_checkpoints(self, db, update_id: str) -> None:
        db.execute("DELETE FROM checkpoints WHERE update_id = ?", (update_id,))

    # -- journal ------------------------------------------------------------

    def append_journal(self, db, update_id: str, batch: bytes) -> None:
        """Store one batch of entries (a request body, maybe gzip) after the update's others.

        Rows are numbered in arrival order; the replay sorts entries by sequenceID
        and keeps the first copy of a repeated one.
        """
        db.execute("INSERT INTO journal (update_id, seq, data, batch) VALUES (?, (SELECT "
                   "COALESCE(MAX(seq), 0) + 1 FROM journal WHERE update_id = ?), ?, 1)",
                   (update_id, update_id, batch))
        self._count_written("journal", len(batch))

    def journal_rows(self, db, update_id: str) -> list:
        """Return ``(batch, data)`` of the update's journal rows in arrival order (rows of
        versions before 4 hold one entry each, ``batch`` 0)."""
        return [(r[0], r[1]) for r in db.execute(
            "SELECT batch, data FROM journal WHERE update_id = ? ORDER BY seq", (update_id,))]

    def count_journal(self, db, update_id: str) -> int:
        return db.execute("SELECT count(*) FROM journal WHERE update_id = ?",
                          (update_id,)).fetchone()[0]

    def clear_journal(self, db, update_id: str) -> None:
        db.execute("DELETE FROM journal WHERE update_id = ?", (update_id,))

    # -- events -------------------------------------------------------------

    def append_events(self, db, stack_id: str, update_id: str, batch: _EventBatch) -> None:
        """Store a batch of events as one compressed row (schema version 4).

        A sequence already stored keeps its first copy. A batch overlapping
        stored ones (not the CLI's: it numbers its batches apart) is merged
        with them into one row, so that rows never interleave and a page reads
        them in the order of their last sequence.
        """
        if not batch.events:
            return
        first, last = min(batch.events), max(batch.events)
        stored = db.execute("SELECT seq, first_seq, data FROM event_batches WHERE update_id = ? "
                            "AND seq >= ? AND first_seq <= ?", (update_id, first, last)).fetchall()
        if any(r[0] == last and r[1] == first for r in stored):
            return  # the same batch again (a retry): the first copy stays
        events, data = batch.events, batch.data
        if stored:
            events = dict(events)
            for r in stored:
                events.update((e["sequence"], e) for e in json.loads(zlib.decompress(r[2])))
                db.execute("DELETE FROM event_batches WHERE update_id = ? AND seq = ?",
                           (update_id, r[0]))
            events = dict(sorted(events.items(), key=lambda item: item[0]))
            data = _packed_json(list(events.values()))
        self.put_values(db, stack_id, update_id, batch.values)
        db.execute("INSERT INTO event_batches (update_id, seq, first_seq, data) "
                   "VALUES (?, ?, ?, ?)", (update_id, max(events), min(events), data))

    def put_values(self, db, stack_id: str, update_id: str, values: _Values) -> None:
        """Store long strings (SHA-256 -> string) once per stack, and that ``update_id``
        uses them (its events or its state: pruning it lets them go). Values packed
        before the lock are checked again here: a prune may have taken them since."""
        known = self.known_values(db, stack_id, values)
        db.executemany("INSERT OR IGNORE INTO event_values (stack_id, hash, data) "
                       "VALUES (?, ?, ?)",
                       [(stack_id, h, values.packed.get(h) or _packed_json(v))
                        for h, v in values.items() if h not in known])
        db.executemany("INSERT OR IGNORE INTO event_refs (update_id, hash) VALUES (?, ?)",
                       [(update_id, h) for h in values])

    def known_values(self, db, stack_id: str, hashes: Iterable) -> set:
        """Return which of ``hashes`` the stack's stored values hold."""
        known: set = set()
        for chunk in _chunks(list(hashes)):
            known.update(r[0] for r in db.execute(
                "SELECT hash FROM event_values WHERE stack_id = ? "
                f"AND hash IN ({','.join('?' * len(chunk))})", (stack_id, *chunk)))
        return known

    def stack_values(self, db, stack_id: str, hashes: Iterable) -> dict:
        """Return the stored JSON of the stack's values ``hashes`` (bytes hash -> bytes)."""
        found: dict = {}
        for chunk in _chunks(sorted(hashes)):
            found.update((r[0].encode(), zlib.decompress(r[1])) for r in db.execute(
                "SELECT hash, data FROM event_values WHERE stack_id = ? "
                f"AND hash IN ({','.join('?' * len(chunk))})", (stack_id, *chunk)))
        return found

    def list_events(self, db, update_id: str, after: int, limit: int,
                    max_bytes: int = 1 << 62) -> list:
        """Return up to ``limit`` ``(sequence, event)`` pairs after ``after``, in order,
        ending early at about ``max_bytes`` of JSON (at least one event)."""
        events = self._batched_events(db, update_id, after, limit, max_bytes)
        legacy = db.execute("SELECT seq, data FROM events WHERE update_id = ? AND seq > ? "
                            "ORDER BY seq LIMIT ?", (update_id, after, limit)).fetchall()
        if not legacy:
            return events
        # Stored before schema version 4, one uncompressed row per event.
        merged = {r[0]: _stored_event(r[1]) for r in legacy}
        for seq, event in events:
            merged.setdefault(seq, event)
        return sorted(merged.items(), key=lambda item: item[0])[:limit]

    def events_after(self, db, update_id: str, seq: int) -> bool:
        """Return whether the update has an event stored with a sequence after ``seq``."""
        return any(db.execute(f"SELECT 1 FROM {table} WHERE update_id = ? AND seq > ? LIMIT 1",
                              (update_id, seq)).fetchone()
                   for table in ("event_batches", "events"))

    def _batched_events(self, db, update_id: str, after: int, limit: int,
                        max_bytes: int) -> list:
        out: list = []
        last, size = after, 0.0
        values: dict = {}  # a resource's values recur in its events of later batches
        while True:
            rows = db.execute("SELECT seq, data FROM event_batches WHERE update_id = ? "
                              "AND seq > ? ORDER BY seq LIMIT 16", (update_id, last)).fetchall()
            for last, data in rows:
                text = zlib.decompress(data)
                values.update(self._event_values(db, update_id, {
                    m[2] for m in _EVENT_REF_RE.finditer(text) if m[2] not in values}))
                text = _EVENT_REF_RE.sub(lambda m: m[1] + values.get(m[2], b"null"), text)
                batch = json.loads(text)
                events = [(e["sequence"], e) for e in batch if e["sequence"] > after]
                # Big events: only as many as the budget has room for (a page has one).
                each = len(text) / len(batch)
                room = min(limit - len(out), int((max_bytes - size) / each))
                room = room or (0 if out else 1)
                out.extend(events[:room])
                size += each * min(room, len(events))
                if len(out) >= limit or size >= max_bytes or room < len(events):
                    return out
            if not rows:
                return out

    def _event_values(self, db, update_id: str, hashes: set) -> dict:
        """Return the stored JSON of the event values ``hashes`` (bytes hash -> bytes)."""
        row = db.execute("SELECT stack_id FROM updates WHERE id = ?", (update_id,)).fetchone()
        found = self.stack_values(db, row[0], (h.decode() for h in hashes)) if row else {}
        if len(found) < len(hashes):  # never expected: the event reads null there
            log.error("update %s: %d stored event values are missing", update_id,
                      len(hashes) - len(found))
        return found

    # -- identity: users, teams, grants, tokens, audit ------------------------

    def identity_in_use(self, db) -> bool:
        """Return whether any user or stored token exists (then only real tokens get in)."""
        return db.execute("SELECT EXISTS (SELECT 1 FROM users) "
                          "OR EXISTS (SELECT 1 FROM tokens)").fetchone()[0] == 1

    def get_user(self, db, login: str) -> Optional[dict]:
        row = db.execute("SELECT * FROM users WHERE login = ?", (login,)).fetchone()
        return dict(row) if row else None

    def list_users(self, db) -> list:
        return [dict(r) for r in db.execute("SELECT * FROM users ORDER BY login")]

    def insert_user(self, db, user: dict) -> None:
        db.execute("INSERT INTO users (login, name, email, role, created) VALUES (?, ?, ?, ?, ?)",
                   (user["login"], user["name"], user["email"], user["role"], user["created"]))

    def set_user_role(self, db, login: str, role: str) -> None:
        db.execute("UPDATE users SET role = ? WHERE login = ?", (role, login))

    def delete_user(self, db, login: str) -> None:
        db.execute("DELETE FROM tokens WHERE kind = 'personal' AND owner = ?", (login,))
        db.execute("DELETE FROM users WHERE login = ?", (login,))

    def get_team(self, db, name: str) -> Optional[dict]:
        row = db.execute("SELECT * FROM teams WHERE name = ?", (name,)).fetchone()
        return dict(row) if row else None

    def list_teams(self, db) -> list:
        return [dict(r) for r in db.execute("SELECT * FROM teams ORDER BY name")]

    def insert_team(self, db, team: dict) -> None:
        db.execute("INSERT INTO teams (name, display_name, description, created) "
                   "VALUES (?, ?, ?, ?)",
                   (team["name"], team["display_name"], team["description"], team["created"]))

    def update_team(self, db, name: str, display_name: str, description: str) -> None:
        db.execute("UPDATE teams SET display_name = ?, description = ? WHERE name = ?",
                   (display_name, description, name))

    def delete_team(self, db, name: str) -> None:
        db.execute("DELETE FROM tokens WHERE kind = 'team' AND owner = ?", (name,))
        db.execute("DELETE FROM teams WHERE name = ?", (name,))

    def team_members(self, db, team: str) -> list:
        return [dict(r) for r in db.execute(
            "SELECT u.* FROM team_members m JOIN users u ON u.login = m.login "
            "WHERE m.team = ? ORDER BY u.login", (team,))]

    def user_teams(self, db, login: str) -> list:
        return [r[0] for r in db.execute(
            "SELECT team FROM team_members WHERE login = ? ORDER BY team", (login,))]

    def add_member(self, db, team: str, login: str) -> None:
        db.execute("INSERT OR IGNORE INTO team_members (team, login) VALUES (?, ?)", (team, login))

    def remove_member(self, db, team: str, login: str) -> bool:
        return db.execute("DELETE FROM team_members WHERE team = ? AND login = ?",
                          (team, login)).rowcount > 0

    def grants(self, db, teams: Iterable) -> list:
        """Return ``(team, pattern, permission)`` of every grant to one of ``teams``."""
        teams = list(teams)
        if not teams:
            return []
        marks = ",".join("?" * len(teams))
        return [tuple(r) for r in db.execute(
            f"SELECT team, pattern, permission FROM grants WHERE team IN ({marks}) "
            "ORDER BY team, pattern", teams)]

    def set_grant(self, db, team: str, pattern: str, permission: int) -> None:
        """Grant ``permission`` on ``pattern`` to ``team``; 0 removes the grant."""
        if permission:
            db.execute("INSERT OR REPLACE INTO grants (team, pattern, permission) "
                       "VALUES (?, ?, ?)", (team, pattern, permission))
        else:
            db.execute("DELETE FROM grants WHERE team = ? AND pattern = ?", (team, pattern))

    def token_by_hash(self, db, digest: str) -> Optional[dict]:
        row = db.execute("SELECT * FROM tokens WHERE hash = ?", (digest,)).fetchone()
        return dict(row) if row else None

    def get_token(self, db, token_id: str) -> Optional[dict]:
        row = db.execute("SELECT * FROM tokens WHERE id = ?", (token_id,)).fetchone()
        return dict(row) if row else None

    def list_tokens(self, db, kind: Optional[str] = None, owner: Optional[str] = None) -> list:
        sql, args = "SELECT * FROM tokens WHERE 1 = 1", []
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        if owner is not None:
            sql += " AND owner = ?"
            args.append(owner)
        return [dict(r) for r in db.execute(sql + " ORDER BY created, rowid", args)]

    def insert_token(self, db, token: dict) -> None:
        cols = ",".join(token)
        db.execute(f"INSERT INTO tokens ({cols}) VALUES ({','.join('?' * len(token))})",
                   tuple(token.values()))

    def delete_token(self, db, token_id: str) -> bool:
        return db.execute("DELETE FROM tokens WHERE id = ?", (token_id,)).rowcount > 0

    def touch_token(self, db, token_id: str, when: int) -> None:
        db.execute("UPDATE tokens SET last_used = ? WHERE id = ?", (when, token_id))

    def delete_expired_tokens(self, db, now: int, created_by_prefix: str) -> int:
        return db.execute("DELETE FROM tokens WHERE expires > 0 AND expires <= ? "
                          "AND substr(created_by, 1, ?) = ?",
                          (now, len(created_by_prefix), created_by_prefix)).rowcount

    def append_audit(self, db, event: dict) -> int:
        """Append one audit event; return its id. Nothing updates or edits these rows."""
        cols = ",".join(event)
        return db.execute(f"INSERT INTO audit ({cols}) VALUES ({','.join('?' * len(event))})",
                          tuple(event.values())).lastrowid

    def list_audit(self, db, before_id: int, since: int, until: int, event: Optional[str],
                   actor: Optional[str], limit: int, ascending: bool = False,
                   target: Optional[str] = None) -> list:
        """Return audit rows with ``since <= time <= until``, newest first below ``before_id``
        (or, ``ascending``, oldest first above it)."""
        sql = ("SELECT * FROM audit WHERE time >= ? AND time <= ? AND "
               + ("id > ?" if ascending else "id < ?"))
        args: list = [since, until, before_id]
        if event:
            sql += " AND event = ?"
            args.append(event)
        if actor:
            sql += " AND actor = ?"
            args.append(actor)
        if target:  # a prefix by substr, not LIKE: "_" in a name is no wildcard
            sql += " AND (target = ? OR substr(target, 1, ?) = ?)"
            args += [target, len(target) + 1, target + "/"]
        sql += f" ORDER BY id {'ASC' if ascending else 'DESC'} LIMIT ?"
        args.append(limit)
        return [dict(r) for r in db.execute(sql, args)]

    def prune_audit(self, db, before: int) -> int:
        """Drop audit events older than ``before`` (the retention flag: the only deletion)."""
        return db.execute("DELETE FROM audit WHERE time < ?", (before,)).rowcount

    # -- console sessions (section 11) ----------------------------------------

    def insert_session(self, db, digest: str, token_hash: str, created: int,
                       expires: int) -> None:
        db.execute("DELETE FROM console_sessions WHERE expires <= ?", (created,))
        db.execute("INSERT INTO console_sessions (hash, token_hash, created, expires) "
                   "VALUES (?, ?, ?, ?)", (digest, token_hash, created, expires))

    def get_session(self, db, digest: str) -> Optional[dict]:
        row = db.execute("SELECT * FROM console_sessions WHERE hash = ?", (digest,)).fetchone()
        return dict(row) if row else None

    def delete_session(self, db, digest: str) -> None:
        db.execute("DELETE FROM console_sessions WHERE hash = ?", (digest,))

    def console_stacks(self, db, org: str) -> list:
        """Every stack of ``org`` as ``(id, project, name, tags, resource_count)`` tuples."""
        return db.execute("SELECT id, project, name, tags, resource_count FROM stacks "
                          "WHERE org = ? ORDER BY project, name", (org,)).fetchall()

    def latest_updates(self, db, stack_ids: list) -> dict:
        """The newest non-preview update of each stack (by id) that has one."""
        marks = ",".join("?" * len(stack_ids))
        return {r["stack_id"]: dict(r) for r in db.execute(
            "SELECT stack_id, status, kind, requested_by, created, started, ended, "
            "lease_expires FROM updates WHERE id IN (SELECT (SELECT id FROM updates u "
            "WHERE u.stack_id = s.id AND u.dry_run = 0 ORDER BY u.created DESC LIMIT 1) "
            f"FROM stacks s WHERE s.id IN ({marks}))", stack_ids)}

    # -- webhooks and their deliveries (section 8) ------------------------------

    def insert_webhook(self, db, hook: dict) -> None:
        db.execute(f"INSERT INTO webhooks ({','.join(hook)}) "
                   f"VALUES ({','.join('?' * len(hook))})", tuple(hook.values()))

    def get_webhook(self, db, name: str) -> Optional[dict]:
        row = db.execute("SELECT * FROM webhooks WHERE name = ?", (name,)).fetchone()
        return dict(row) if row else None

    def list_webhooks(self, db, org: str, stack_id: Optional[str]) -> list:
        if stack_id is None:
            cur = db.execute("SELECT * FROM webhooks WHERE org = ? AND stack_id IS NULL "
                             "ORDER BY created, name", (org,))
        else:
            cur = db.execute("SELECT * FROM webhooks WHERE org = ? AND stack_id = ? "
                             "ORDER BY created, name", (org, stack_id))
        return [dict(r) for r in cur]

    def update_webhook(self, db, name: str, **fields: Any) -> None:
        _check_columns(fields, _WEBHOOK_COLUMNS)
        sets = ", ".join(f"{k} = ?" for k in fields)
        db.execute(f"UPDATE webhooks SET {sets} WHERE name = ?", (*fields.values(), name))

    def delete_webhook(self, db, name: str) -> bool:
        db.execute("DELETE FROM webhook_deliveries WHERE hook = ?", (name,))
        return db.execute("DELETE FROM webhooks WHERE name = ?", (name,)).rowcount > 0

    def webhooks_for_stack(self, db, org: str, stack_id: str) -> list:
        return [dict(r) for r in db.execute(
            "SELECT * FROM webhooks WHERE org = ? AND active = 1 AND (stack_id IS NULL OR "
            "stack_id = ?) ORDER BY created, name", (org, stack_id))]

    def webhook_secrets(self, db) -> list:
        return [tuple(r) for r in db.execute(
            "SELECT name, secret FROM webhooks WHERE secret IS NOT NULL")]

    def insert_delivery(self, db, delivery: dict) -> None:
        if delivery.get("status") == "pending" and db.execute(
                "SELECT COUNT(*) FROM webhook_deliveries WHERE hook = ? AND status = "
                "'pending'", (delivery["hook"],)).fetchone()[0] >= WEBHOOK_PENDING_MAX:
            delivery = dict(delivery, status="failed", error=(
                f"not sent: {WEBHOOK_PENDING_MAX} deliveries of this webhook were already "
                "waiting (its receiver is down or slow)"))
        db.execute(f"INSERT INTO webhook_deliveries ({','.join(delivery)}) "
                   f"VALUES ({','.join('?' * len(delivery))})", tuple(delivery.values()))
        # Only finished deliveries make room: one still to be sent is never dropped.
        db.execute("DELETE FROM webhook_deliveries WHERE hook = ? AND status <> 'pending' "
                   "AND id NOT IN (SELECT id FROM webhook_deliveries WHERE hook = ? AND "
                   "status <> 'pending' ORDER BY created DESC, id DESC LIMIT ?)",
                   (delivery["hook"], delivery["hook"], WEBHOOK_DELIVERIES_KEPT))

    def get_delivery(self, db, delivery_id: str) -> Optional[dict]:
        row = db.execute("SELECT * FROM webhook_deliveries WHERE id = ?",
                         (delivery_id,)).fetchone()
        return dict(row) if row else None

    def list_deliveries(self, db, hook: str, limit: int) -> list:
        return [dict(r) for r in db.execute(
            "SELECT * FROM webhook_deliveries WHERE hook = ? ORDER BY created DESC, id DESC "
            "LIMIT ?", (hook, limit))]

    def due_deliveries(self, db, now_ms: int, limit: int) -> list:
        return [dict(r) for r in db.execute(
            "SELECT * FROM webhook_deliveries WHERE status = 'pending' AND next_attempt <= ? "
            "ORDER BY next_attempt, id LIMIT ?", (now_ms, limit))]

    def update_delivery(self, db, delivery_id: str, **fields: Any) -> None:
        _check_columns(fields, _DELIVERY_COLUMNS)
        sets = ", ".join(f"{k} = ?" for k in fields)
        db.execute(f"UPDATE webhook_deliveries SET {sets} WHERE id = ?",
                   (*fields.values(), delivery_id))

    # -- resource search index ----------------------------------------------

    #: ``stack_id`` among the ids of a JSON array bound as one parameter.
    _STACK_ID_IN_JSON = "stack_id IN (SELECT value FROM json_each(?))"

    def replace_search_rows(self, db, stack_id: str, version: int, rows: list) -> None:
        db.execute("DELETE FROM search_resources WHERE stack_id = ?", (stack_id,))
        if rows:
            db.executemany(f"INSERT INTO search_resources ({', '.join(_SEARCH_COLUMNS)}) "
                           f"VALUES ({', '.join('?' * len(_SEARCH_COLUMNS))})", rows)
        db.execute("INSERT OR REPLACE INTO search_stacks (stack_id, version) VALUES (?, ?)",
                   (stack_id, version))

    def search_indexed_version(self, db, stack_id: str) -> Optional[int]:
        row = db.execute("SELECT version FROM search_stacks WHERE stack_id = ?",
                         (stack_id,)).fetchone()
        return row[0] if row else None

    def stacks_to_index(self, db, limit: int) -> list:
        return [r[0] for r in db.execute(
            "SELECT s.id FROM stacks s LEFT JOIN search_stacks i ON i.stack_id = s.id "
            "WHERE i.version IS NULL OR i.version <> "
            "(SELECT MAX(d.version) FROM deployments d WHERE d.stack_id = s.id) "
            "ORDER BY s.id LIMIT ?", (limit,))]

    def search_resources(self, db, where: str, params: list, stack_ids: Optional[list],
                         order: str, limit: int, offset: int) -> tuple:
        args = list(params)
        if stack_ids is not None:
            where = f"({where}) AND {self._STACK_ID_IN_JSON}"
            args.append(json.dumps(stack_ids))
        total = db.execute(f"SELECT count(*) FROM search_resources WHERE {where}",
                           args).fetchone()[0]
        rows = [dict(r) for r in db.execute(
            f"SELECT * FROM search_resources WHERE {where} ORDER BY {order} LIMIT ? OFFSET ?",
            args + [limit, offset])] if total > offset else []
        return total, rows

    # -- whole-database copy (the ``copy`` command) ---------------------------

    def count_rows(self, db, table: str) -> int:
        _check_table(table)
        return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def table_batches(self, db, table: str, size: int = 500) -> Iterator:
        """Yield ``(columns, rows)`` batches of every row of ``table``, in insertion order
        where it matters (tokens list by it, audit ids grow)."""
        _check_table(table)
        order = {"tokens": " ORDER BY rowid", "audit": " ORDER BY id"}.get(table, "")
        cur = db.execute(f"SELECT * FROM {table}{order}")
        names = [d[0] for d in cur.description]
        keep = [i for i, n in enumerate(names) if n != "rowid"]  # PostgreSQL's stand-in
        while True:
            rows = cur.fetchmany(size)
            if not rows:
                return
            yield [names[i] for i in keep], [tuple(r[i] for i in keep) for r in rows]

    def insert_rows(self, db, table: str, columns: list, rows: list) -> None:
        _check_table(table)
        unknown = set(columns) - _TABLE_COLUMNS[table]
        if unknown:  # column names reach SQL text: only the known ones
            raise ValueError(f"unknown columns in {table}: {sorted(unknown)}")
        db.executemany(f"INSERT INTO {table} ({','.join(columns)}) "
                       f"VALUES ({','.join('?' * len(columns))})", rows)

    def after_copy(self, db) -> None:
        """Bring id counters past the copied rows (SQLite's AUTOINCREMENT does it itself)."""


class SQLiteStore(_SQLRecords):
    """SQLite in WAL mode: one writer connection behind a lock, pooled readers.

    Why one writer: SQLite allows a single writer at a time anyway, and keeping
    every write on one connection under our own lock turns "database is locked"
    into ordinary queueing. Readers use their own connections (WAL lets them run
    beside the writer) and are returned to a small pool, because the threading
    server starts a thread per connection and per-thread connections would leak.
    """

    POOL_SIZE = 8

    def __init__(self, path: str, wal_autocheckpoint: int = DEFAULT_WAL_AUTOCHECKPOINT):
        self.path = path
        self.wal_autocheckpoint = wal_autocheckpoint
        self._lock = threading.RLock()
        self._on_commit: list = []
        self._pool: list = []
        self._pool_lock = threading.Lock()
        # Bytes of state committed, by table, for /metrics. The keys are fixed
        # so a scrape can read the dict while the writer updates it.
        self.bytes_written = dict.fromkeys(("deployments", "checkpoints", "journal"), 0)
        self._uncommitted_bytes: dict = {}
        _private_database(path)
        self._writer = self._connect()
        self._migrate()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=BUSY_TIMEOUT_MS / 1000)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # Free pages can go back to the file system (_give_back_space). Takes
        # effect only before the first table is made (or a VACUUM: docs/operations.md).
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("PRAGMA journal_mode = WAL")
        # Only ever PASSIVE checkpoints (never TRUNCATE/RESTART, which would race
        # Litestream); 0 leaves them all to Litestream (docs/operations.md).
        conn.execute(f"PRAGMA wal_autocheckpoint = {int(self.wal_autocheckpoint)}")
        # FULL: a commit is on disk before we answer, even across a power loss.
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.row_factory = sqlite3.Row
        return conn

    def _give_back_space(self, db) -> None:
        # Bounded: a free list left by a big deletion drains over several prunes.
        # One page per step, and Python's sqlite3 steps this pragma only once.
        if db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:  # made before schema 4
            return
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        for _ in range(min(free, VACUUM_PAGES_PER_PRUNE)):
            db.execute("PRAGMA incremental_vacuum(1)")

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

    def database_bytes(self) -> int:
        """Return the bytes the database files take on disk (main, WAL, shared memory)."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                total += os.path.getsize(self.path + suffix)
            except OSError:
                pass
        return total

    def pool_stats(self) -> dict:
        """Return {}: readers are pooled here, but /metrics shows PostgreSQL's pool only."""
        return {}

    def other_servers(self, db) -> int:
        """Return 0: a SQLite database does not know who has it open (the ``copy``
        command takes the file's lock instead)."""
        return 0


def is_postgres_url(db: str) -> bool:
    """Return whether ``--db`` names a PostgreSQL database rather than a SQLite file."""
    return db.startswith(("postgresql://", "postgres://"))


def _redact_url(url: str) -> str:
    """Return ``url`` without its password, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _import_psycopg() -> tuple:
    """Import psycopg 3 and psycopg-pool on first use of a PostgreSQL URL; RuntimeError
    (one line naming what to install) when they are missing."""
    try:
        import psycopg  # noqa: PLC0415 - only for PostgreSQL URLs: SQLite users pay nothing
        import psycopg_pool  # noqa: PLC0415
    except ImportError as e:
        raise RuntimeError(f"a postgresql:// database needs psycopg 3 and psycopg-pool "
                           f"({e.name} is missing): {PG_INSTALL_HINT}") from None
    return psycopg, psycopg_pool


# SQLite spellings in _SQLRecords' SQL and their PostgreSQL forms.
_PG_TYPES = [(re.compile(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b"), "BIGSERIAL PRIMARY KEY"),
             (re.compile(r"\bINTEGER\b"), "BIGINT"), (re.compile(r"\bBLOB\b"), "BYTEA"),
             # Byte order, like SQLite: stack lists page by (org, project, name).
             (re.compile(r"\bTEXT\b"), 'TEXT COLLATE "C"'),
             # list_tokens orders by insertion (SQLite's rowid); PostgreSQL needs a column.
             (re.compile(r"CREATE TABLE tokens \("), "CREATE TABLE tokens (rowid BIGSERIAL,")]
# After schema version 1 on PostgreSQL: states and entries are stored as they come, not
# through TOAST's compression (pglz on a 10 MB JSON state doubled the time of a write;
# deployments are gzip already).
_PG_AFTER_SCHEMA = {0: [f"ALTER TABLE {t} ALTER COLUMN data SET STORAGE EXTERNAL"
                        for t in ("deployments", "checkpoints", "journal", "events")],
                    3: [f"ALTER TABLE {t} ALTER COLUMN data SET STORAGE EXTERNAL"
                        for t in ("event_batches", "event_values")]}
_PG_CONFLICT_KEYS = {"meta": "key", "deployments": "stack_id, version",
                     "checkpoints": "update_id, seq", "grants": "team, pattern",
                     "search_stacks": "stack_id"}
_INSERT_OR_RE = re.compile(r"INSERT OR (REPLACE|IGNORE) INTO (\w+) \(([^)]*)\)(.*)", re.S)


@functools.lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    """Return SQLite-flavoured ``sql`` as PostgreSQL runs it (cached: the texts are ours)."""
    m = _INSERT_OR_RE.fullmatch(sql)
    if m:
        verb, table, cols, rest = m.groups()
        if verb == "IGNORE":
            sql = f"INSERT INTO {table} ({cols}){rest} ON CONFLICT DO NOTHING"
        else:
            keys = _PG_CONFLICT_KEYS[table]
            sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in map(str.strip, cols.split(","))
                             if c not in keys)
            sql = f"INSERT INTO {table} ({cols}){rest} ON CONFLICT ({keys}) DO UPDATE SET {sets}"
    return sql.replace("%", "%%").replace("?", "%s")


def _pg_ddl(stmt: str) -> str:
    for pattern, replacement in _PG_TYPES:
        stmt = pattern.sub(replacement, stmt)
    return stmt


class _PGRow(tuple):
    """A row readable by position and by column name, like ``sqlite3.Row``."""

    index: dict = {}

    def keys(self) -> list:
        return list(self.index)

    def __getitem__(self, key):  # type: ignore[override]
        return tuple.__getitem__(self, self.index[key] if isinstance(key, str) else key)


def _pg_row_factory(cursor) -> Callable:
    names = [c.name for c in cursor.description or ()]
    row_type = type("_PGRow", (_PGRow,), {"index": {n: i for i, n in enumerate(names)}})
    return row_type


@contextlib.contextmanager
def _pg_errors(psycopg):
    """Raise psycopg's errors as the sqlite3 classes the rest of the module maps
    (integrity: 409; connection, pool and lock troubles: 503 "busy"; others: 500)."""
    try:
        yield
    except psycopg.IntegrityError as e:
        raise sqlite3.IntegrityError(str(e).strip()) from e
    except (psycopg.OperationalError, psycopg.errors.LockNotAvailable) as e:
        raise sqlite3.OperationalError(f"database busy or unreachable: {str(e).strip()}") from e
    except psycopg.Error as e:
        raise sqlite3.DatabaseError(str(e).strip()) from e
    except Exception as e:
        if type(e).__name__ == "PoolTimeout":  # psycopg_pool's, not a psycopg.Error
            raise sqlite3.OperationalError(f"database busy: {e}") from e
        raise


class _PGHandle:
    """A pooled psycopg connection that runs _SQLRecords' SQLite-flavoured SQL."""

    def __init__(self, conn, psycopg):
        self.conn = conn
        self._psycopg = psycopg

    def execute(self, sql: str, params: Any = ()):
        with _pg_errors(self._psycopg):  # binary results: BYTEA as raw bytes, not hex text
            return self.conn.execute(_pg_sql(sql), params, binary=True)

    def executemany(self, sql: str, rows: Iterable):
        with _pg_errors(self._psycopg):
            cur = self.conn.cursor()
            cur.executemany(_pg_sql(sql), list(rows))
            return cur


class PostgresStore(_SQLRecords):
    """PostgreSQL through psycopg 3 and a psycopg-pool pool: one database, any
    number of server processes (replicas) on it.

    Locking, chosen for being as simple to reason about as SQLite's one writer:
    every write transaction runs at READ COMMITTED and first takes the
    transaction-level advisory lock ``pg_advisory_xact_lock(PG_WRITE_LOCK)``.
    Writers of all replicas queue on it as SQLite's writers queue on its lock, so
    each read-check-write of the engine (the update lease and its token, the
    stack lock and finishing an abandoned update, journal and checkpoint sequence
    checks, history and audit pruning, expired tokens) sees every earlier commit
    and nothing commits between its check and its write. PostgreSQL releases the
    lock at commit or rollback, and when a replica dies its session ends. Reads
    run at REPEATABLE READ, READ ONLY: one snapshot per block, as in SQLite.
    Inside one process a lock also queues writers, so waiting writers do not each
    hold a pooled connection.

    Caches stay correct across replicas because each is validated or per-process:
    the engine checks a cached working state against the stored checkpoint
    (``shared``), /readyz's memo is this replica's own view of the database, and
    the gauges are read from the database at every scrape.

    Periodic work needs no elected replica: history and audit pruning, expired
    tokens and abandoned updates are handled inside write transactions, so under
    the lock, by one replica at a time. Scheduled backups (``--backup-dir``) copy
    SQLite files and are refused with a PostgreSQL URL.
    """

    shared = True  # other processes write the same database: validate caches
    _STACK_ID_IN_JSON = "stack_id IN (SELECT jsonb_array_elements_text(CAST(? AS jsonb)))"

    def search_resources(self, db, where: str, params: list, stack_ids: Optional[list],
                         order: str, limit: int, offset: int) -> tuple:
        # SearchIndex's LIKE ignores ASCII case, as SQLite's does; its text has no values.
        return super().search_resources(db, where.replace(" LIKE ", " ILIKE "), params,
                                        stack_ids, order, limit, offset)

    def __init__(self, url: str, pool_size: int = PG_POOL_SIZE,
                 pool_timeout: float = PG_POOL_TIMEOUT, app_name: str = PG_APP_NAME):
        self._psycopg, pool_mod = _import_psycopg()
        self.url = url
        self.path = _redact_url(url)  # what messages name
        self._lock = threading.RLock()
        self._writing = threading.local()
        self._on_commit: list = []
        self.bytes_written = dict.fromkeys(("deployments", "checkpoints", "journal"), 0)
        self._uncommitted_bytes: dict = {}
        self.pool = pool_mod.ConnectionPool(
            url, min_size=1, max_size=pool_size, timeout=pool_timeout, open=False,
            name="pulumi_backend", kwargs={"autocommit": True, "row_factory": _pg_row_factory,
                                                   "application_name": app_name})
        with _pg_errors(self._psycopg):  # one plain connection first: its error says why
            self._psycopg.connect(url, connect_timeout=10, application_name=app_name).close()
            try:
                self.pool.open(wait=True, timeout=pool_timeout)
            except pool_mod.PoolTimeout:
                self.pool.close()
                raise RuntimeError(f"cannot connect to {self.path} within {pool_timeout:g} s "
                                   "(check host, port, user, password, database)") from None
        try:
            self._migrate()
        except BaseException:
            self.pool.close()
            raise

    def _schema_statements(self, version: int) -> list:
        return ([_pg_ddl(stmt) for stmt in super()._schema_statements(version)]
                + list(_PG_AFTER_SCHEMA.get(version, ())))

    @contextlib.contextmanager
    def write(self):
        """Yield a handle for one write transaction, serialized with every replica's."""
        # A write inside a write: SQLite refuses it; here it would wait on its own lock.
        if getattr(self._writing, "active", False):
            raise sqlite3.OperationalError("cannot start a transaction within a transaction")
        with self._lock, _pg_errors(self._psycopg), self.pool.connection() as conn:
            self._writing.active = True
            try:
                conn.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (PG_WRITE_LOCK,))
                try:
                    yield _PGHandle(conn, self._psycopg)
                except BaseException:
                    self._on_commit, self._uncommitted_bytes = [], {}
                    self._rollback(conn)
                    raise
                callbacks, self._on_commit = self._on_commit, []
                written, self._uncommitted_bytes = self._uncommitted_bytes, {}
                try:
                    conn.execute("COMMIT")
                except BaseException:
                    self._rollback(conn)
                    raise
                for table, size in written.items():
                    self.bytes_written[table] += size
                for fn in callbacks:
                    fn()
            finally:
                self._writing.active = False

    def _rollback(self, conn) -> None:
        try:
            conn.execute("ROLLBACK")
        except self._psycopg.Error:
            pass  # a broken connection: the pool discards it

    def after_commit(self, fn: Callable) -> None:
        """Run ``fn`` once the current write transaction has committed (never on rollback)."""
        self._on_commit.append(fn)

    @contextlib.contextmanager
    def read(self):
        """Yield a handle on one consistent snapshot (REPEATABLE READ, READ ONLY)."""
        with _pg_errors(self._psycopg), self.pool.connection() as conn:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                yield _PGHandle(conn, self._psycopg)
            finally:
                self._rollback(conn)

    def close(self) -> None:
        self.pool.close()

    def database_bytes(self) -> int:
        """Return the size of the database as PostgreSQL reports it."""
        with self.read() as db:
            return db.execute("SELECT pg_database_size(current_database())").fetchone()[0]

    def pool_stats(self) -> dict:
        """Return the pool's size, idle connections and waiting requests, for /metrics."""
        stats = self.pool.get_stats()
        return {"size": stats.get("pool_size", 0), "available": stats.get("pool_available", 0),
                "waiting": stats.get("requests_waiting", 0)}

    def append_audit(self, db, event: dict) -> int:
        cols = ",".join(event)
        return db.execute(f"INSERT INTO audit ({cols}) VALUES ({','.join('?' * len(event))}) "
                          "RETURNING id", tuple(event.values())).fetchone()[0]

    def after_copy(self, db) -> None:
        db.execute("SELECT setval(pg_get_serial_sequence('audit', 'id'), "
                   "(SELECT COALESCE(max(id), 0) + 1 FROM audit), false)")

    def other_servers(self, db) -> int:
        """Return how many other server sessions are connected to this database."""
        return db.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                          "current_database() AND application_name = ? AND pid <> "
                          "pg_backend_pid()", (PG_APP_NAME,)).fetchone()[0]


def open_store(db: str, wal_autocheckpoint: int = DEFAULT_WAL_AUTOCHECKPOINT,
               app_name: str = PG_APP_NAME) -> "Store":
    """Open the store ``--db`` names: a PostgreSQL URL or a SQLite file.

    Raises ValueError with a message naming the database when it cannot be opened.
    """
    if is_postgres_url(db):
        try:
            return PostgresStore(db, app_name=app_name)
        except (sqlite3.Error, RuntimeError) as e:
            raise ValueError(f"cannot open database {_redact_url(db)}: {e}") from None
    db_dir = os.path.dirname(os.path.abspath(db))
    if not os.path.isdir(db_dir):
        raise ValueError(f"cannot open database {db}: folder {db_dir} does not exist")
    try:
        return SQLiteStore(db, wal_autocheckpoint)
    except (sqlite3.Error, RuntimeError) as e:  # RuntimeError: a schema newer than ours
        raise ValueError(f"cannot open database {db}: {e}") from None
    except OSError as e:
        raise ValueError(f"cannot open database {db}: {e.strerror}") from None


def _one_data_key(conn: sqlite3.Connection) -> Optional[tuple]:
    # Shared with restore, which checks a backup through a plain connection.
    row = conn.execute("SELECT id, data_key FROM stacks ORDER BY id LIMIT 1").fetchone()
    return (row[0], row[1]) if row else None


_STACK_COLUMNS = frozenset({"org", "project", "name", "tags", "version", "active_update",
                            "resource_count", "last_update", "data_key"})
_UPDATE_COLUMNS = frozenset({"status", "started", "ended", "version", "base_version", "journal",
                             "lease_token", "lease_expires", "cli_version", "resource_changes",
                             "resource_count", "program", "requested_by", "pending"})

_WEBHOOK_COLUMNS = frozenset({"display_name", "url", "active", "format", "filters",
                              "event_groups", "secret"})
_DELIVERY_COLUMNS = frozenset({"status", "attempts", "next_attempt", "sent", "duration",
                               "request_url", "request_headers", "response_code",
                               "response_headers", "response_body", "error"})


#: Columns of a search_resources row (section 5, schema version 7), in row-tuple order.
_SEARCH_COLUMNS = ("stack_id", "seq", "urn", "type", "short_type", "name", "package", "module",
                   "project", "stack", "custom", "protected", "deleted", "pending",
                   "resource_id", "parent_urn", "provider_urn", "created", "modified")

#: Every table with its columns, parents before children (the order ``copy`` fills them).
_TABLE_COLUMNS = {
    "meta": frozenset({"key", "value"}),
    "stacks": _STACK_COLUMNS | {"id", "created"},
    "deployments": frozenset({"stack_id", "version", "data", "size", "resource_count",
                              "skeleton"}),
    "updates": _UPDATE_COLUMNS | {"id", "stack_id", "kind", "dry_run", "created"},
    "checkpoints": frozenset({"update_id", "seq", "kind", "data", "hash"}),
    "journal": frozenset({"update_id", "seq", "data", "batch"}),
    "events": frozenset({"update_id", "seq", "data"}),
    "event_batches": frozenset({"update_id", "seq", "first_seq", "data"}),
    "event_values": frozenset({"stack_id", "hash", "data"}),
    "event_refs": frozenset({"update_id", "hash"}),
    "users": frozenset({"login", "name", "email", "role", "created"}),
    "teams": frozenset({"name", "display_name", "description", "created"}),
    "team_members": frozenset({"team", "login"}),
    "grants": frozenset({"team", "pattern", "permission"}),
    "tokens": frozenset({"id", "hash", "kind", "owner", "name", "description", "admin",
                         "created_by", "created", "last_used", "expires"}),
    "audit": frozenset({"id", "time", "actor", "token_id", "token_name", "source_ip",
                        "user_agent", "event", "target", "outcome", "description"}),
    "console_sessions": frozenset({"hash", "token_hash", "created", "expires"}),
    "webhooks": _WEBHOOK_COLUMNS | {"name", "org", "stack_id", "created"},
    "webhook_deliveries": _DELIVERY_COLUMNS | {"id", "hook", "kind", "event", "payload",
                                               "created"},
    "search_resources": frozenset(_SEARCH_COLUMNS),
    "search_stacks": frozenset({"stack_id", "version"}),
}


def _check_table(table: str) -> None:
    if table not in _TABLE_COLUMNS:  # table names reach SQL text: ours only
        raise ValueError(f"unknown table {table!r}")


def _check_columns(fields: dict, allowed: frozenset) -> None:
    """Guard the only place column names reach SQL text: they come from our code only."""
    unknown = set(fields) - allowed
    if unknown:
        raise ValueError(f"unknown columns {sorted(unknown)}")


# ==== 6. Engine =============================================================
# Stacks and their history (Engine), and one update from create to its stored
# final state (UpdateLifecycle: leases, working checkpoints full, verbatim and
# delta, journal replay, events). Every method that acknowledges a write
# commits it through the Store before returning, so "200" always means "durable".

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
        _check_field_names(edit, "a delta edit")
        _check_field_names(edit["Span"], "a delta Span")
        text = edit.get("NewText", "")
        if not isinstance(text, str):
            raise BadRequest("NewText must be a string")
        start, end = edit["Span"].get("start"), edit["Span"].get("end")
        if not isinstance(start, dict) or not isinstance(end, dict):
            raise BadRequest("a delta Span needs start and end points")
        _check_field_names(start, "a delta point")
        _check_field_names(end, "a delta point")
        if _legacy_point(start) or _legacy_point(end):
            if line_starts is None:
                line_starts = _line_starts(prev)
            s, t = _line_offset(line_starts, len(prev), start), _line_offset(line_starts, len(prev), end)
        else:
            s, t = _int_field(start, "offset"), _int_field(end, "offset")
        spans.append((s, t, text.encode("utf-8")))
    # Views of ``prev`` and one join: the new state is copied once, not three times.
    view, pieces, pos = memoryview(prev), [], 0
    for s, t, text in spans:
        if not pos <= s <= t <= len(prev):
            raise BadRequest(f"delta edit [{s}, {t}) is out of order or out of range")
        pieces += (view[pos:s], text)
        pos = t
    pieces.append(view[pos:])
    return b"".join(pieces)


def _line_starts(data: bytes) -> list:
    """Return the offset of each line of ``data`` (bytes.find: ~10 times a byte loop's speed)."""
    starts, find = [0], data.find
    at = find(b"\n")
    while at >= 0:
        starts.append(at + 1)
        at = find(b"\n", at + 1)
    return starts


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
    doc = _check_field_names(_require_dict(doc, "deployment"), "deployment")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not \
            1 <= version <= MAX_DEPLOYMENT_VERSION:
        raise BadRequest(f"deployment version must be between 1 and {MAX_DEPLOYMENT_VERSION}")
    if not isinstance(doc.get("deployment"), dict):
        raise BadRequest("deployment must be a JSON object")
    _check_field_names(doc["deployment"], "deployment")
    features = doc.get("features")
    features = [] if features is None else features
    if not isinstance(features, list) or any(
            not isinstance(f, str) or f not in KNOWN_FEATURES for f in features):
        raise BadRequest(f"unknown deployment features {features!r}")
    resources = doc["deployment"].get("resources")
    resources = [] if resources is None else resources
    if not isinstance(resources, list) or any(not isinstance(r, dict) for r in resources):
        raise BadRequest("deployment resources must be a list of objects")
    for res in resources:
        _check_field_names(res, "a deployment resource")
    for op in doc["deployment"].get("pending_operations") or []:
        if isinstance(op, dict):
            _check_field_names(op, "a pending operation")
            if isinstance(op.get("resource"), dict):
                _check_field_names(op["resource"], "a pending operation's resource")
    return doc


_JSON_WS_RE = re.compile(r"[ \t\n\r]*")


class _Unusual(Exception):
    """The streaming check met something it leaves to the full parse."""


def _check_deployment_bytes(data: bytes, what: str) -> int:
    """Validate UntypedDeployment bytes as ``_check_untyped_deployment(_loads(data,
    what))`` does; return the number of its resources.

    A parsed state takes one to ten times its JSON in memory; this holds only
    the envelope (version, manifest, ...) and one resource at a time. It only
    ever accepts: anything it does not accept outright goes to the full parse,
    so refusals and their messages stay the same.
    """
    try:
        if not _SURROGATE_ESCAPE_RE.search(data):  # else the full parse looks closer
            with _gc_paused() if len(data) >= _GC_PAUSE_BYTES else contextlib.nullcontext():
                doc, members, resources = _scan_deployment(data.decode("utf-8"))
            depth, pairs = _json_shape(data, members)  # the text is gone by now
            if depth <= MAX_JSON_DEPTH and pairs == members:
                _check_untyped_deployment(doc)
                return resources
    except (UnicodeDecodeError, ValueError, RecursionError, HTTPError, _Unusual):
        pass
    return _count_resources(_check_untyped_deployment(_loads(data, what)))


def _scan_deployment(text: str) -> tuple:
    """Return ``(envelope, object members, resources)`` of an UntypedDeployment's JSON
    text, its resources checked one by one and left out; raise to hand over to
    the full parse."""
    members = 0

    def count(obj: dict) -> dict:
        nonlocal members
        members += len(obj)
        return obj

    decode = json.JSONDecoder(parse_constant=_json_constant, parse_float=_json_float,
                              parse_int=_json_int, object_hook=count).raw_decode
    resources = 0

    def resources_at(pos: int) -> tuple:
        nonlocal resources
        if text[pos:pos + 1] != "[":
            return decode(text, pos)
        pos = _JSON_WS_RE.match(text, pos + 1).end()
        while text[pos:pos + 1] != "]":
            if resources:
                if text[pos:pos + 1] != ",":
                    raise _Unusual
                pos = _JSON_WS_RE.match(text, pos + 1).end()
            res, pos = decode(text, pos)
            if not isinstance(res, dict):
                raise _Unusual
            _check_field_names(res, "a deployment resource")
            resources += 1
            pos = _JSON_WS_RE.match(text, pos).end()
        return [], pos + 1  # checked: the envelope keeps an empty list

    def top_at(key: str, pos: int) -> tuple:
        if key == "deployment" and text[pos:pos + 1] == "{":
            return _scan_object(text, pos, lambda field, at: (
                resources_at(at) if field == "resources" else decode(text, at)))
        return decode(text, pos)

    doc, end = _scan_object(text, _JSON_WS_RE.match(text).end(), top_at)
    if _JSON_WS_RE.match(text, end).end() != len(text):
        raise _Unusual  # more after the document
    members += len(doc) + (len(doc["deployment"]) if isinstance(doc.get("deployment"), dict)
                           else 0)
    return doc, members, resources


def _scan_object(text: str, pos: int, value_at: Callable) -> tuple:
    """Return ``(dict, end)`` of the JSON object at ``text[pos]``, each value parsed
    by ``value_at(key, pos)`` -> ``(value, end)``; a repeated key keeps the last
    (the caller compares member counts)."""
    if text[pos:pos + 1] != "{":
        raise _Unusual
    obj: dict = {}
    pos = _JSON_WS_RE.match(text, pos + 1).end()
    if text[pos:pos + 1] == "}":
        return obj, pos + 1
    while True:
        if text[pos:pos + 1] != '"':
            raise _Unusual
        key, pos = json.decoder.scanstring(text, pos + 1, True)
        pos = _JSON_WS_RE.match(text, pos).end()
        if text[pos:pos + 1] != ":":
            raise _Unusual
        obj[key], pos = value_at(key, _JSON_WS_RE.match(text, pos + 1).end())
        pos = _JSON_WS_RE.match(text, pos).end()
        if text[pos:pos + 1] == "}":
            return obj, pos + 1
        if text[pos:pos + 1] != ",":
            raise _Unusual
        pos = _JSON_WS_RE.match(text, pos + 1).end()


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

    def walk(value: Any) -> Any:  # one frame per level (comprehensions would add one)
        if isinstance(value, str):
            if not value.startswith(old_prefix):
                return value
            rest = value[len(old_prefix):]
            return new_prefix + (new_root if rest.startswith(root) else rest)
        if isinstance(value, list):
            return list(map(walk, value))
        if isinstance(value, dict):
            return dict(zip(value, map(walk, value.values())))
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
    req = _loads_body(body)  # unusual field order: find the value's bytes
    if "untypedDeployment" not in req:
        raise BadRequest("untypedDeployment is required")
    text = body.decode("utf-8")
    start, end = _member_span(text, "untypedDeployment")
    return _int_field(req, "sequenceNumber"), text[start:end].encode("utf-8")


_JSON_SPACE_RE = re.compile(r"[ \t\n\r]*")


def _member_span(text: str, name: str) -> tuple:
    """Return ``(start, end)`` of the value of the top-level member ``name`` of the JSON
    object ``text`` (already checked by _loads_body, so it is there once).

    Keys are decoded as JSON strings, so one spelled with escapes
    (``"untypedDeploym\\u0065nt"``) is found, and a value that reads like the key is not.
    """
    decoder, space = json.JSONDecoder(), _JSON_SPACE_RE
    i = space.match(text, space.match(text).end() + 1).end()  # past "{"
    while text[i] == '"':
        key, i = json.decoder.scanstring(text, i + 1)
        start = space.match(text, space.match(text, i).end() + 1).end()  # past ":"
        _, end = decoder.raw_decode(text, start)
        if key == name:
            return start, end
        i = space.match(text, end).end()
        if text[i] == ",":
            i = space.match(text, i + 1).end()
    raise BadRequest(f"{name} is required")


class _ByteBudget:
    """A number of bytes that several holders share (the live replays' journal)."""

    def __init__(self, limit: int):
        self.limit, self._used, self._lock = limit, 0, threading.Lock()

    def take(self, size: int) -> bool:
        """Take ``size`` bytes if that keeps within the limit; return whether it did."""
        with self._lock:
            if self._used + size > self.limit:
                return False
            self._used += size
            return True

    def give(self, size: int) -> None:
        with self._lock:
            self._used -= size


class _LiveReplay:
    """The journal replay of one running update, kept current as its batches commit.

    A thread of its own parses the base state and applies the entries of each
    committed batch in sequenceID order, so that ``complete`` finds the replay
    done instead of parsing the base and every entry while the CLI waits. The
    CLI numbers entries 1, 2, 3... but sends some a batch late (dozens of times
    in a 600-resource update), so an entry waits until those before it have
    come; ``replayer_for`` applies what still waits, in order. It only
    accelerates: when it cannot vouch for giving what replaying the stored rows
    gives (a batch it never saw, an error, too many bytes), ``complete`` replays
    the stored rows as before.
    """

    def __init__(self, load_base: Callable[[], dict], budget: _ByteBudget):
        # One lock, two conditions: the replay's thread waits for work (_work), and
        # complete's catch_up for batches applied (_cond): neither wakes the other.
        lock = threading.Lock()
        self._cond = threading.Condition(lock)
        self._work = threading.Condition(lock)
        self._inbox: list = []
        self._budget = budget
        self._bytes = 0  # of the budget, taken by this replay
        self._seen: set = set()  # sequenceIDs applied or waiting
        self._next_seq = 1  # the entry applied next; later ones wait in _waiting
        self._waiting: list = []  # heap of (sequenceID, entry); sequenceIDs are unique
        self.fed = 0  # batches handed over, one per committed journal row
        self.applied = 0
        self.replayer: Optional[_JournalReplayer] = None
        self.unusable = ""  # why the stored rows must be replayed instead
        threading.Thread(target=self._run, args=(load_base,), daemon=True,
                         name="live-replay").start()

    def feed(self, entries: list, size: int) -> None:
        """Hand over the entries of a batch that has just committed. When the replay
        is idle they are applied here and now: waking its thread for a batch of a
        few entries (a create sends hundreds) costs more than applying them."""
        with self._cond:
            self.fed += 1
            if self.unusable:
                return
            if not self._budget.take(size):
                self._give_up(f"the live replays hold {self._budget.limit} bytes of journal")
                return
            self._bytes += size
            if self.replayer is not None and self.applied == self.fed - 1:
                try:
                    self._apply(self.replayer, entries)
                except Exception as e:  # noqa: BLE001 - the stored rows will tell
                    self._give_up(f"{type(e).__name__}: {e}")
                    return
                self.applied += 1
                self._cond.notify_all()
            else:
                self._inbox.append(entries)
                self._work.notify()

    def close(self) -> None:
        with self._cond:
            self._give_up("closed")

    def _give_up(self, why: str) -> None:  # called holding _cond
        if not self.unusable:
            self.unusable = why
        self._budget.give(self._bytes)
        self._bytes = 0
        self._inbox, self.replayer = [], None  # the memory goes now
        self._cond.notify_all()
        self._work.notify_all()

    def catch_up(self, timeout: float) -> None:
        """Wait (up to ``timeout`` seconds) until every batch handed over is applied."""
        with self._cond:
            self._cond.wait_for(lambda: self.unusable or self.applied == self.fed, timeout)

    def replayer_for(self, rows: int) -> Optional[_JournalReplayer]:
        """Return the replayer if it has taken exactly the ``rows`` stored batches,
        with every entry still waiting applied."""
        with self._cond:
            if self.unusable or not self.applied == self.fed == rows:
                return None
            try:
                while self._waiting:
                    self.replayer.add(heapq.heappop(self._waiting)[1])
            except Exception as e:  # noqa: BLE001 - the stored rows will tell
                self._give_up(f"{type(e).__name__}: {e}")
            return self.replayer

    def _run(self, load_base: Callable[[], dict]) -> None:
        try:
            replayer = _JournalReplayer(load_base())
        except Exception as e:  # noqa: BLE001 - the stored rows will tell at complete
            with self._cond:
                self._give_up(f"base state: {type(e).__name__}")
            return
        with self._cond:
            self.replayer = None if self.unusable else replayer
        while True:
            with self._cond:
                self._work.wait_for(lambda: self.unusable or self._inbox)
                if self.unusable:
                    return
                entries = self._inbox.pop(0)
            try:
                self._apply(replayer, entries)
            except Exception as e:  # noqa: BLE001 - as above
                with self._cond:
                    self._give_up(f"{type(e).__name__}: {e}")
                return
            with self._cond:
                self.applied += 1
                self._cond.notify_all()

    def _apply(self, replayer: _JournalReplayer, entries: list) -> None:
        """Take a batch as the stored replay would: in sequenceID order, the first copy
        of each (sequenceIDs start at 1, so an entry waits only for ones to come)."""
        for entry in entries:
            seq = entry["sequenceID"]
            if seq in self._seen:
                continue  # a retried batch: the first copy stays
            self._seen.add(seq)
            heapq.heappush(self._waiting, (seq, entry))
        while self._waiting and self._waiting[0][0] == self._next_seq:
            replayer.add(heapq.heappop(self._waiting)[1])
            self._next_seq += 1


def _stored_journal(rows: list, max_bytes: int) -> list:
    """Return the entries of stored journal rows (``journal_rows``) sorted by
    sequenceID, the first stored copy of each."""
    entries: list = []
    for batch, data in rows:
        if not batch:  # a row of a version before 4: one entry
            entries.append(json.loads(data))
            continue
        if data[:2] == b"\x1f\x8b":
            data = _gunzip_bounded(data, max_bytes)
        entries += json.loads(data)["entries"]  # checked in full when it came
    entries.sort(key=lambda e: e["sequenceID"])  # stable: first copies stay first
    return [e for i, e in enumerate(entries)
            if i == 0 or e["sequenceID"] != entries[i - 1]["sequenceID"]]


class Engine:
    """Operations of the API on stacks, state, secrets and update history; the update
    lifecycle is ``self.updates`` (UpdateLifecycle, below)."""

    def __init__(self, cfg: Config, store: Store, keys: "KeyManager"):
        self.cfg = cfg
        self.store = store
        self.keys = keys
        self._data_keys: dict = {}
        self._data_keys_lock = threading.Lock()
        self.metrics = Metrics()
        self._ready_lock = threading.Lock()
        self._ready_checked = -math.inf  # monotonic time of the last write probe
        self._ready_error: Optional[sqlite3.Error] = None
        # Called as ``fn(db, event)`` inside the transaction that made a stack or
        # ended an update (see _emit): section 8's Webhooks queues deliveries there.
        self.on_event: list = []
        self.updates = UpdateLifecycle(self)
        self.search = SearchIndex(self)

    def _emit(self, db, event: dict) -> None:
        """Hand ``event`` to every ``on_event`` callback within the write transaction
        ``db``: they may only add rows (no network, nothing slow), so an event is
        stored exactly when what it tells of commits."""
        for fn in self.on_event:
            fn(db, event)

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

    def create_stack(self, org: str, project: str, body: dict, user: str = "") -> dict:
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
            self._emit(db, {"kind": "stack", "action": "created", "org": org,
                            "project": project, "stack": name, "stack_id": stack_id,
                            "user": user})
        log.info("created stack %s/%s/%s", org, project, name)
        return {}

    def stack_json(self, db, row: dict) -> dict:
        update = self.updates._running_update(db, row)
        out = {"id": row["id"], "orgName": row["org"], "projectName": row["project"],
               "stackName": row["name"], "activeUpdate": row["active_update"],
               "tags": json.loads(row["tags"]), "version": row["version"]}
        if update is not None:
            out["currentOperation"] = {"kind": update["kind"],
                                       "author": update["requested_by"] or self.cfg.user,
                                       "started": update["started"] or update["created"]}
        return out

    def stack_summary(self, db, row: dict) -> dict:
        out = {"id": row["id"], "orgName": row["org"], "projectName": row["project"],
               "stackName": row["name"], "resourceCount": row["resource_count"]}
        if self.updates._running_update(db, row) is not None:
            out["lastUpdate"] = 0  # the CLI shows "in progress"
        elif row["last_update"] is not None:
            out["lastUpdate"] = row["last_update"]
        return out

    def list_stacks(self, query: dict, visible: Optional[Callable] = None) -> dict:
        """One page of stack summaries; ``visible(project, stack)`` filters (permissions)."""
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
                    if visible is not None and not visible(row["project"], row["name"]):
                        continue
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

    def project_exists(self, org: str, project: str, visible: Optional[Callable] = None) -> bool:
        """Does the project have a stack (one that ``visible(project, stack)`` accepts)?"""
        self._check_names(org, project)
        with self.store.read() as db:
            if visible is None:
                return self.store.project_exists(db, org, project)
            after = (org, project, "")
            while True:
                rows = self.store.list_stacks(db, org, project, after, STACK_PAGE_SIZE)
                if any(visible(project, row["name"]) for row in rows):
                    return True
                if len(rows) < STACK_PAGE_SIZE:
                    return False
                after = (org, project, rows[-1]["name"])

    def delete_stack(self, org: str, project: str, name: str, force: bool,
                     user: str = "") -> None:
        self.updates._await_final_state(org, project, name)
        with self.store.write() as db:
            row = self.stack(db, org, project, name)
            self.updates._lock_stack(db, row)
            if row["resource_count"] > 0 and not force:
                raise BadRequest(MSG_STACK_HAS_RESOURCES)
            self.store.delete_stack(db, row["id"])
            self._emit(db, {"kind": "stack", "action": "deleted", "org": org,
                            "project": project, "stack": name, "stack_id": row["id"],
                            "user": user})
        log.info("deleted stack %s/%s/%s", org, project, name)

    def rename_stack(self, org: str, project: str, name: str, body: dict) -> None:
        new_name, new_project = body.get("newName"), body.get("newProject")
        new_name = name if new_name in (None, "") else new_name
        new_project = project if new_project in (None, "") else new_project
        if not isinstance(new_name, str) or not isinstance(new_project, str):
            raise BadRequest("newName and newProject must be strings")
        self._check_names(org, new_project, new_name)
        self.updates._await_final_state(org, project, name)
        with self.store.write() as db:
            row = self.stack(db, org, project, name)
            if (new_project, new_name) == (project, name):
                return
            self.updates._lock_stack(db, row)
            if self.store.get_stack(db, org, new_project, new_name) is not None:
                raise Conflict(f"stack '{org}/{new_project}/{new_name}' already exists")
            self.store.update_stack(db, row["id"], project=new_project, name=new_name)
            # The latest state names the stack in URNs and in its secrets provider;
            # rewrite it so the next update neither replaces everything nor asks
            # the old name to decrypt.
            dep = self.store.get_deployment(db, row["id"])
            try:
                doc = _rename_in_deployment(json.loads(gzip.decompress(dep["data"])),
                                           (project, name), (new_project, new_name))
                data = _dumps(doc)
            except (ValueError, RecursionError) as e:  # stored before input was strict
                raise Conflict(f"the stack's state cannot be rewritten for the new name ({e}); "
                               "import a repaired export first") from None
            self.store.put_deployment(db, row["id"], dep["version"], _gzip_bytes(data),
                                      len(data), dep["resource_count"])
            self.search.store(db, dict(row, project=new_project, name=new_name), dep["version"],
                              _search_entries(doc, (row["last_update"] or row["created"]) * 1000))
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
        self.updates._await_final_state(org, project, name)
        with self.store.read() as db:
            row = self.stack(db, org, project, name)
            unsettled = (self.updates._abandoned_update(db, row)
                         or self.updates._pending_update(db, row))
        if unsettled:  # its acknowledged work becomes the latest state first
            self.updates._settle(org, project, name)
        with self.store.read() as db:
            row = self.stack(db, org, project, name)
            dep = self.store.get_deployment(db, row["id"], version)
            if dep is None:
                raise NotFound(f"version {version} of stack '{org}/{project}/{name}' not found")
            if dep["data"]:
                return dep["data"]
            data = self._history_state(db, dep)
        return _gzip_bytes(data)

    def _history_state(self, db, dep: dict) -> bytes:
        """Rebuild a history version kept as a skeleton (section 5, schema version 5)."""
        text = zlib.decompress(dep["skeleton"])
        hashes = {m[2].decode() for m in _EVENT_REF_RE.finditer(text)}
        values = self.store.stack_values(db, dep["stack_id"], hashes)
        if len(values) < len(hashes):  # never expected: pruning keeps what kept versions use
            raise Conflict(f"version {dep['version']} of the stack cannot be rebuilt: "
                           f"{len(hashes) - len(values)} of its stored values are missing")
        return _EVENT_REF_RE.sub(lambda m: m[1] + values[m[2]], text)

    def import_deployment(self, org: str, project: str, name: str, body: bytes,
                          cli_version: str, requested_by: str = "") -> str:
        resources = _check_deployment_bytes(body, "request body")
        data = body.strip()
        search = _search_entries(data, _now() * 1000)  # parsed before the write lock
        self.updates._await_final_state(org, project, name)
        with self.store.write() as db:
            row = self.stack(db, org, project, name)
            self.updates._lock_stack(db, row)
            update_id, version = _new_id(), row["version"] + 1
            t = _now()
            self.store.insert_update(db, {
                "id": update_id, "stack_id": row["id"], "kind": "import", "dry_run": 0,
                "status": "succeeded", "created": t, "started": t, "ended": t,
                "version": version, "base_version": row["version"], "cli_version": cli_version,
                "resource_count": resources, "requested_by": requested_by})
            self._save_version(db, row, version, data, resources, search)
        log.info("imported state into %s/%s/%s as version %d", org, project, name, version)
        return update_id

    def _save_version(self, db, row: dict, version: int, data: bytes, resources: int,
                      search: Optional[list] = None) -> None:
        """Store ``data`` as ``version`` of the stack and make it the latest (``search``:
        its index rows, when read already)."""
        if search is None:
            search = _search_entries(data, _now() * 1000)
        self._save_compressed(db, row, version, _gzip_bytes(data), len(data), resources,
                              search=search)

    def _save_compressed(self, db, row: dict, version: int, data_gz: bytes, size: int,
                         resources: int, skeleton: Optional[bytes] = None,
                         search: Optional[list] = None) -> None:
        """Store and make latest; ``search`` is its index rows (``_search_entries``),
        read from ``data_gz`` when not given."""
        self.store.put_deployment(db, row["id"], version, data_gz, size, resources, skeleton)
        # Older versions with a skeleton keep only that: a no-op's version costs its
        # skeleton, not another copy of every resource's inputs and outputs.
        self.store.drop_full_copies(db, row["id"], version)
        self._make_latest(db, row, version, resources)
        if search is None:
            search = _search_entries(_gunzip_stored(data_gz), _now() * 1000)
        self.search.store(db, row, version, search)

    def _make_latest(self, db, row: dict, version: int, resources: int) -> None:
        """Make ``version`` the stack's latest and forget history beyond the limit (the
        newest stored state always stays: a pending version's base)."""
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

    # -- updates: reading ---------------------------------------------------

    def update_results(self, org, project, name, update_id) -> dict:
        with self.store.read() as db:
            row = self.stack(db, org, project, name)
            update = self.updates._update_of(db, row, update_id)
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
        infos = [self._update_info(u) for u in updates]
        for info in infos:
            if "requestedBy" in info:  # `pulumi stack history` shows the environment only
                info["environment"] = dict(info["environment"],
                                           requestedBy=info["requestedBy"]["githubLogin"])
        return {"updates": infos}

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
        metadata = program.get("metadata")
        metadata = metadata if isinstance(metadata, dict) else {}  # stored before it was checked
        result = {"running": "in-progress", "not started": "not-started",
                  "cancelled": "failed"}.get(update["status"], update["status"])
        info = {"kind": update["kind"], "startTime": update["started"] or update["created"],
                "message": metadata.get("message") or "",
                "environment": metadata.get("environment") or {},
                "config": _program_config(program), "result": result,
                "endTime": update["ended"] or 0, "version": update["version"],
                "updateID": update["id"]}
        if update["resource_changes"]:
            info["resourceChanges"] = json.loads(update["resource_changes"])
        if update["resource_count"]:
            info["resourceCount"] = update["resource_count"]
        if update["requested_by"]:
            info["requestedBy"] = {"name": update["requested_by"], "avatarUrl": "",
                                   "githubLogin": update["requested_by"]}
        return info

    def console_stacks(self) -> list:
        """Every stack, as ``(id, project, name, tags, resource_count)``, for the console."""
        with self.store.read() as db:
            return self.store.console_stacks(db, self.cfg.org)

    def latest_updates(self, stack_ids: list) -> dict:
        """The newest non-preview update row of each of ``stack_ids`` that has one."""
        with self.store.read() as db:
            return self.store.latest_updates(db, stack_ids)

    def usage_summary(self, org: str, granularity: str, days: int, end: int) -> dict:
        """Resources under management of ``org`` in the ``days`` before Unix time ``end``,
        per UTC hour, day or month (Pulumi Cloud's GetResourceCountSummaryResponse).

        A bucket's ``resources`` is the sum over stacks of the resource count of each
        stack's newest version at or before the bucket's end; ``resourceHours`` is that
        times the bucket's hours inside the window. BadRequest for too many buckets.
        """
        start = end - days * 86400
        buckets = list(itertools.islice(_usage_buckets(granularity, start, end),
                                        USAGE_MAX_BUCKETS + 1))
        if len(buckets) > USAGE_MAX_BUCKETS:
            raise BadRequest(f"at most {USAGE_MAX_BUCKETS} {granularity} buckets: ask for "
                             "fewer lookbackDays or a coarser granularity")
        with self.store.read() as db:
            changes = self.store.resource_counts(db, org, start, end)
        counts: dict = {}
        total, i, out = 0, 0, []
        for begin, following, fields in buckets:
            cutoff = min(following - 1, end)
            while i < len(changes) and changes[i][1] <= cutoff:
                stack_id, _, count = changes[i]
                total += count - counts.get(stack_id, 0)
                counts[stack_id] = count
                i += 1
            hours = (min(following, end) - max(begin, start)) / 3600
            out.append(dict(fields, resources=total, resourceHours=round(total * hours)))
        return {"summary": out}

    def update_with_events(self, org, project, name, update_id) -> tuple:
        """Return ``(update info, engine events)`` of one update (at most CONSOLE_MAX_EVENTS)."""
        with self.store.read() as db:
            row = self.stack(db, org, project, name)
            update = self.updates._update_of(db, row, update_id)
            page = self.store.list_events(db, update_id, -1, CONSOLE_MAX_EVENTS)
        return self._update_info(update), [event for _, event in page]

    def update_requester(self, org, project, name, update_id) -> str:
        """Return who requested the update ('' if unknown); NotFound if there is none."""
        with self.store.read() as db:
            row = self.stack(db, org, project, name)
            return self.updates._update_of(db, row, update_id)["requested_by"]

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
        gauges = {"pulumi_backend_stacks": stacks, "pulumi_backend_active_updates": running,
                  "pulumi_backend_database_bytes": self.store.database_bytes(),
                  "pulumi_backend_state_bytes_written_total": written}
        if isinstance(self.store, PostgresStore):  # this replica's connections
            for name, value in self.store.pool_stats().items():
                gauges[f"pulumi_backend_db_pool_{name}"] = value
        return gauges


def _usage_buckets(granularity: str, start: int, end: int) -> Iterator:
    """Yield ``(begin, next begin, fields)`` of the UTC hours, days or months (by
    ``granularity``) that overlap ``start..end``; fields: year, month, day, hour."""
    utc = datetime.timezone.utc
    t = datetime.datetime.fromtimestamp(start, utc)
    t = {"hourly": t.replace(minute=0, second=0, microsecond=0),
         "daily": t.replace(hour=0, minute=0, second=0, microsecond=0),
         "monthly": t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)}[granularity]
    while t.timestamp() <= end:
        if granularity == "monthly":
            following = t.replace(year=t.year + t.month // 12, month=t.month % 12 + 1)
            fields = {"year": t.year, "month": t.month}
        else:
            following = t + datetime.timedelta(hours=1 if granularity == "hourly" else 24)
            fields = {"year": t.year, "month": t.month, "day": t.day}
            if granularity == "hourly":
                fields["hour"] = t.hour
        yield int(t.timestamp()), int(following.timestamp()), fields
        t = following


def _event_urn(event: dict) -> Optional[str]:
    """The URN of the resource an engine event is about, or None."""
    for key, field in (("resourcePreEvent", "metadata"), ("resOutputsEvent", "metadata"),
                       ("resOpFailedEvent", "metadata"), ("diagnosticEvent", ""),
                       ("policyEvent", ""), ("policyRemediationEvent", "")):
        part = event.get(key)
        part = part.get(field) if field and isinstance(part, dict) else part
        if isinstance(part, dict):
            return part.get("urn") or part.get("resourceUrn")
    return None


# The update lifecycle, a class of its own: every method works on one update of
# one stack (org, project, name, update id), with state no stack operation touches.
# It owns the cache of working checkpoints, the live journal replays and the final
# states being stored in the background, with their locks. Engine owns the config,
# store, keys and metrics (read here through ``self.engine``) and the stacks; the
# lifecycle calls only engine.stack(), _history_state, _save_compressed and
# _make_latest. Stack operations (Engine, the DIY import of section 13) call it
# only to settle an update first (_await_final_state, _lock_stack, _settle,
# _running_update, _abandoned_update, _pending_update) and for _update_of.
class UpdateLifecycle:
    """An update from create to its stored final state: leases, checkpoints (full,
    verbatim, delta), journal entries and their live replay, engine events, complete
    and cancel, abandoned updates, and the final state stored after complete."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.working = _WorkingCache(engine.cfg.cache_bytes)
        self._live: dict = {}  # update id -> _LiveReplay of a running journaled update
        self._live_lock = threading.Lock()
        self._live_bytes = _ByteBudget(int(engine.cfg.cache_bytes * LIVE_REPLAY_SHARE))
        # (org, project, stack) -> Event set once the final state a `complete` left to
        # the background is stored; readers of that stack's state wait for it.
        self._storing: dict = {}
        self._storing_lock = threading.Lock()
        for form in ("full", "verbatim", "delta"):  # present from the first scrape
            self.metrics.inc("pulumi_backend_checkpoints_total", 0, form=form)
        self.metrics.inc("pulumi_backend_journal_entries_total", 0)

    # The engine's, read through it: each has one owner.

    @property
    def cfg(self) -> Config:
        return self.engine.cfg

    @property
    def store(self) -> Store:
        return self.engine.store

    @property
    def metrics(self) -> Metrics:
        return self.engine.metrics

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

    def _pending_update(self, db, row: dict) -> Optional[dict]:
        """Return the stack's completed update whose final state is not stored yet."""
        if not row["active_update"]:
            return None
        update = self.store.get_update(db, row["active_update"])
        return update if update is not None and update["pending"] else None

    def _lock_stack(self, db, row: dict) -> None:
        """Raise Conflict while another update holds the stack; finish an abandoned one,
        and store a completed one's final state if that is still pending."""
        pending = self._pending_update(db, row)
        if pending is not None:
            self._store_pending(db, row, pending)
            row.update(self.store.get_stack_by_id(db, row["id"]))
        abandoned = self._abandoned_update(db, row)
        if abandoned is not None:
            log.warning("update %s abandoned (lease expired); finishing it as failed",
                        abandoned["id"])
            self._finish(db, row, abandoned, "failed")
            row.update(self.store.get_stack_by_id(db, row["id"]))
        elif self._running_update(db, row) is not None:
            raise Conflict(MSG_UPDATE_CONFLICT)

    def _settle(self, org: str, project: str, name: str) -> None:
        """Finish the stack's abandoned update, or store its pending final state."""
        with self.store.write() as db:
            row = self.engine.stack(db, org, project, name)
            if self._abandoned_update(db, row) or self._pending_update(db, row):
                self._lock_stack(db, row)

    def create_update(self, org: str, project: str, name: str, kind: str, body: dict,
                      requested_by: str = "") -> dict:
        if kind not in _UPDATE_KINDS:
            raise NotFound(f"unknown update kind {kind!r}")
        options = body.get("options")
        options = {} if options is None else options
        if not isinstance(options, dict):
            raise BadRequest("options must be an object")
        dry_run = kind == "preview" or bool(options.get("dryRun"))
        program = _check_program(body)
        with self.store.write() as db:
            row = self.engine.stack(db, org, project, name)
            update_id = _new_id()
            self.store.insert_update(db, {
                "id": update_id, "stack_id": row["id"], "kind": kind, "dry_run": int(dry_run),
                "status": "not started", "created": _now(), "program": json.dumps(program),
                "requested_by": requested_by})
        return {"updateID": update_id}

    def start_update(self, org: str, project: str, name: str, update_id: str, body: dict,
                     cli_version: str) -> dict:
        tags = body.get("tags")
        if tags is not None:
            tags = _check_tags(tags)
        wants_journal = body.get("journalVersion") or 0
        self._await_final_state(org, project, name)
        with self.store.write() as db:
            row = self.engine.stack(db, org, project, name)
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
        if fields.get("journal"):
            self._start_live_replay(update_id, row["id"], fields["base_version"])
        log.info("started %s %s on %s/%s/%s (version %d, %s)", update["kind"], update_id, org,
                 project, name, fields["version"],
                 "dry run" if update["dry_run"] else
                 (f"journal v{fields['journal']}" if fields.get("journal") else "checkpoints"))
        return {"version": fields["version"], "token": fields["lease_token"],
                "tokenExpiration": fields["lease_expires"],
                "journalVersion": fields.get("journal", 0)}

    def _update_of(self, db, row: dict, update_id: str, by_version: bool = False) -> dict:
        """The stack's update ``update_id`` (``by_version``: or that made this version)."""
        update = self.store.get_update(db, update_id)
        if (update is None and by_version and update_id.isascii() and update_id.isdigit()
                and len(update_id) <= 18):
            update = self.store.update_by_version(db, row["id"], int(update_id))
        if update is None or update["stack_id"] != row["id"]:
            raise NotFound(f"update '{update_id}' not found")
        return update

    def _leased_update(self, db, org: str, project: str, name: str, update_id: str,
                       token: str, renew: bool = True) -> tuple:
        """Return ``(stack, update)`` if ``token`` is the live lease of that update; else 403.

        With ``renew`` (a write transaction) the lease is also extended.
        """
        row = self.engine.stack(db, org, project, name)
        update = self._update_of(db, row, update_id)
        if not update["lease_token"] or not hmac.compare_digest(
                update["lease_token"].encode(), token.encode()):
            raise Forbidden("the update token is not valid for this update")
        if update["status"] != "running":
            raise Forbidden("the update is no longer running")
        if update["lease_expires"] < _now():
            raise Forbidden("the update lease has expired")
        if not renew:
            return row, update
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
            row = self.engine.stack(db, org, project, name)
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

    def _checkpointed_update(self, db, org, project, name, update_id, token,
                             renew: bool = True) -> tuple:
        row, update = self._leased_update(db, org, project, name, update_id, token, renew)
        if update["dry_run"]:
            raise BadRequest("previews do not save state")
        return row, update

    def _working(self, db, update_id: str, keep: bool = True) -> Optional[tuple]:
        """Return ``(seq, bytes, sha256)`` of the update's latest checkpoint, or None.

        A state rebuilt from the rows is cached only with ``keep``, which only a
        writer may ask: a reader's snapshot may already be older than the cache.
        """
        item = self.working.get(update_id)
        if item is not None and (not self.store.shared or self.store.last_checkpoint(
                db, update_id) == (item[0], item[2])):  # another replica may have moved on
            return item
        rows = self.store.checkpoint_rows(db, update_id)
        if not rows:
            return None
        data = b""
        for r in rows:
            data = r["data"] if r["kind"] == "full" else apply_delta(data, _loads(r["data"]))
        item = (rows[-1]["seq"], data, rows[-1]["hash"])
        if keep:
            self.working.put(update_id, *item)
        return item

    def checkpoint_full(self, org, project, name, update_id, token, body: bytes) -> None:
        req = _loads_body(body)
        if req.get("isInvalid"):  # legacy "invalidate": keep the last good checkpoint
            with self.store.write() as db:
                self._checkpointed_update(db, org, project, name, update_id, token)
            return
        doc = {"version": req.get("version")}
        if req.get("features"):
            doc["features"] = req["features"]
        doc["deployment"] = req.get("deployment")
        self.working.discard(update_id)  # as in checkpoint_verbatim
        data = _dumps(_check_untyped_deployment(doc))
        digest = hashlib.sha256(data).hexdigest()
        with self.store.write() as db:
            self._checkpointed_update(db, org, project, name, update_id, token)
            current = self.store.last_checkpoint(db, update_id)
            seq = current[0] + 1 if current else 1
            self.store.put_checkpoint(db, update_id, seq, "full", data, digest)
            self.store.after_commit(lambda: self.working.put(update_id, seq, data, digest))
        self.metrics.inc("pulumi_backend_checkpoints_total", form="full")

    def checkpoint_verbatim(self, org, project, name, update_id, token, seq: int,
                            data: bytes) -> None:
        """Save ``data``, the untypedDeployment of a verbatim upload (see _split_verbatim)."""
        # The state it replaces need not stay in memory beside it (a delta that
        # still needs it, after a refusal, rebuilds it from the stored rows).
        self.working.discard(update_id)
        _check_deployment_bytes(data, "untypedDeployment")
        digest = hashlib.sha256(data).hexdigest()
        with self.store.write() as db:
            self._checkpointed_update(db, org, project, name, update_id, token)
            current = self.store.last_checkpoint(db, update_id)
            if current is not None and seq < current[0]:
                raise Conflict(f"sequence number {seq} is older than the last saved "
                               f"{current[0]}")
            self.store.put_checkpoint(db, update_id, seq, "full", data, digest)
            self.store.after_commit(lambda: self.working.put(update_id, seq, data, digest))
        self.metrics.inc("pulumi_backend_checkpoints_total", form="verbatim")

    def checkpoint_delta(self, org, project, name, update_id, token, body: bytes) -> None:
        """Apply a delta to the update's working state and save it.

        The write lock is shared by every stack, and applying a delta to a large
        state is slow (a legacy line/column delta on 16 MB: 0.5 to 2 s). So the
        delta is applied to a snapshot outside the lock, and the result is saved
        under the lock only if that snapshot is still the latest checkpoint;
        otherwise it is applied again to the newer one.
        """
        req = _loads_body(body)
        seq = _int_field(req, "sequenceNumber")
        expected = req.get("checkpointHash")
        if not isinstance(expected, str) or not _SHA256_HEX_RE.fullmatch(expected):
            raise BadRequest("checkpointHash must be a SHA-256 hex digest")
        edits = req.get("deploymentDelta")
        for _ in range(DELTA_ATTEMPTS):
            with self.store.read() as db:
                self._checkpointed_update(db, org, project, name, update_id, token, renew=False)
                base = self._working(db, update_id, keep=False)
            new = _next_checkpoint(base, seq, expected.lower(), edits)
            with self.store.write() as db:
                self._checkpointed_update(db, org, project, name, update_id, token)
                if self.store.last_checkpoint(db, update_id) != (base[0], base[2]):
                    continue  # another upload landed meanwhile: apply to that one
                if new is None:
                    return  # a retry of the delta we already applied
                data, digest = new
                if seq % DELTA_CHAIN_LIMIT == 0:  # bound the rebuild work after a restart
                    self.store.put_checkpoint(db, update_id, seq, "full", data, digest)
                else:
                    self.store.put_checkpoint(db, update_id, seq, "delta", _dumps(edits), digest)
                self.store.after_commit(lambda: self.working.put(update_id, seq, data, digest))
            self.metrics.inc("pulumi_backend_checkpoints_total", form="delta")
            return
        raise Conflict("the checkpoint kept changing while the delta was applied; send it again")

    def journal_append(self, org, project, name, update_id, token, body: bytes,
                       wire: bytes = b"") -> int:
        """Check a batch of entries and store it as it came (``wire``: the body as
        received, e.g. still gzip; by default ``body``)."""
        req = _loads_body(body)
        entries = req.get("entries")
        if not isinstance(entries, list):
            raise BadRequest("entries must be a list")
        entries = [_check_journal_entry(entry) for entry in entries]
        wire = wire or body
        with self.store.write() as db:
            _, update = self._checkpointed_update(db, org, project, name, update_id, token)
            if not update["journal"]:
                raise BadRequest("this update was not started with journaling")
            for entry in entries:  # entries no newer than the format agreed at start
                if entry.get("version", 1) > update["journal"]:
                    raise BadRequest(f"journal entry {entry['sequenceID']} has version "
                                     f"{entry['version']}; this update accepts up to "
                                     f"{update['journal']}")
            self.store.append_journal(db, update_id, wire)
            live = self._live.get(update_id)
            if live is not None:  # in commit order: the order of the stored rows
                self.store.after_commit(lambda: live.feed(entries, len(body)))
        self.metrics.inc("pulumi_backend_journal_entries_total", len(entries))
        return len(entries)

    # -- updates: events ----------------------------------------------------

    def events_append(self, org, project, name, update_id, token, body: bytes) -> None:
        req = _loads_body(body)
        events = req.get("events")
        if not isinstance(events, list):
            raise BadRequest("events must be a list")
        rows, changes = [], None
        for event in events:
            event = _check_field_names(_require_dict(event, "engine event"), "engine event")
            seq = _int_field(event, "sequence")
            if seq < 0:
                raise BadRequest("event sequence must not be negative")
            summary = event.get("summaryEvent")
            if isinstance(summary, dict):
                _check_field_names(summary, "summaryEvent")
                if summary.get("resourceChanges") is not None:
                    changes = _check_resource_changes(summary["resourceChanges"])
            rows.append((seq, event))
        # Everything but the write happens here, outside the write lock.
        batch = _EventBatch(rows)
        if batch.values:
            with self.store.read() as db:
                known = self.store.known_values(
                    db, self.engine.stack(db, org, project, name)["id"], batch.values)
            batch.values.pack_missing(known)
        with self.store.write() as db:
            row, _ = self._leased_update(db, org, project, name, update_id, token)
            self.store.append_events(db, row["id"], update_id, batch)
            if changes is not None:
                self.store.update_update(db, update_id, resource_changes=json.dumps(changes))

    def list_events(self, org, project, name, update_id, token: Optional[str],
                    urn: Optional[str] = None) -> dict:
        """One page of the update's engine events, of one resource if ``urn`` is given.

        ``update_id`` may also be the version number the update made (what `pulumi
        stack history` and the console show). A filtered page reads on until it has
        a page of matches or has read EVENT_FILTER_SCAN events.
        """
        after = -1
        if token:
            if not (token.isascii() and token.isdigit()) or len(token) > 18:
                raise BadRequest("invalid continuationToken")
            after = int(token)
        events: list = []
        with self.store.read() as db:
            row = self.engine.stack(db, org, project, name)
            update = self._update_of(db, row, update_id, by_version=True)
            running = update["status"] in ("not started", "running")
            last, scanned = after, 0
            while True:
                page = self.store.list_events(db, update["id"], last, EVENT_PAGE_SIZE,
                                              EVENT_PAGE_BYTES)
                last = page[-1][0] if page else last
                scanned += len(page)
                events += [e for _, e in page if urn is None or _event_urn(e) == urn]
                more = running or (bool(page) and self.store.events_after(db, update["id"],
                                                                           last))
                if (urn is None or not page or len(events) >= EVENT_PAGE_SIZE
                        or scanned >= EVENT_FILTER_SCAN or not more):
                    break
        return {"events": events, "continuationToken": str(last) if more else None}

    # -- updates: completion ------------------------------------------------

    def complete(self, org, project, name, update_id, token, body: dict) -> None:
        """End the update. Its final state is built before the answer (from the live
        replay when there is one) and stored by a background thread after it: until
        then the update is ``pending`` and its journal or checkpoints stay, so that a
        reader of the stack, or the next start after a crash, stores it first."""
        status = body.get("status")
        if status not in ("succeeded", "failed", "cancelled"):
            raise BadRequest("status must be succeeded, failed or cancelled")
        live = self._live.get(update_id)
        if live is not None:  # not under the write lock: batches still apply meanwhile
            live.catch_up(LIVE_REPLAY_WAIT)
        with self.store.write() as db:
            row = self.engine.stack(db, org, project, name)
            update = self._update_of(db, row, update_id)
            if update["status"] != "running" and update["lease_token"] and hmac.compare_digest(
                    update["lease_token"].encode(), token.encode()):
                if update["status"] == status:
                    return  # a retried complete
                raise Conflict("The Update has already completed")
            row, update = self._leased_update(db, org, project, name, update_id, token)
            self._finish(db, row, update, status, live, later=(org, project, name))

    def cancel(self, org, project, name, update_id) -> None:
        with self.store.write() as db:
            row = self.engine.stack(db, org, project, name)
            update = self._update_of(db, row, update_id)
            if update["status"] not in ("not started", "running"):
                raise Conflict("The Update has already completed")
            self._finish(db, row, update, "cancelled")
            self.store.update_update(db, update_id, lease_token="")  # revoked: later calls 403
        log.info("cancelled update %s of %s/%s/%s", update_id, org, project, name)

    def _finish(self, db, row: dict, update: dict, status: str,
                live: Optional[_LiveReplay] = None, later: Optional[tuple] = None) -> None:
        """End ``update`` with ``status``; for a real update, build its final state and
        store it now, or with ``later`` (the stack's names) once this transaction
        has committed, in the background.

        If that state cannot be built, a completing update gets Conflict (and
        stays open, its journal intact); a cancelled or abandoned one ends as
        failed without a new version, keeping its rows for inspection.
        """
        fields: dict = {"status": status, "ended": _now()}
        self.engine._emit(db, {
            "kind": "update", "org": row["org"], "project": row["project"],
            "stack": row["name"], "stack_id": row["id"], "user": update["requested_by"],
            "update_kind": update["kind"], "dry_run": bool(update["dry_run"]),
            "result": "succeeded" if status == "succeeded" else "failed",
            "update_id": update["id"], "version": update["version"],
            "resource_changes": json.loads(update["resource_changes"] or "{}")})
        self.store.after_commit(lambda: self.metrics.inc(
            "pulumi_backend_updates_total", kind=update["kind"], status=status))
        if not update["dry_run"] and update["status"] == "running":
            try:
                final, count = self._final_state(db, update, live)
            except Conflict as e:
                if status == "succeeded":
                    raise
                log.error("update %s ends without a new version: %s", update["id"], e.message)
                self._drop_live_replay(update["id"])
                self.store.update_update(db, update["id"], **fields)
                return
            self._drop_live_replay(update["id"])
            fields["resource_count"] = count
            if later:  # the stack shows the new version at once; readers store it first
                fields["pending"] = 1
                self.engine._make_latest(db, row, update["version"], count)
                self.store.after_commit(lambda: self._store_in_background(
                    later, update["id"], final, count))
            else:
                self._store_final(db, row, update, final, count)
        self.store.update_update(db, update["id"], **fields)

    def _store_final(self, db, row: dict, update: dict, final: Any, count: int,
                     search: Optional[list] = None) -> None:
        """Make ``final`` (a deployment, its bytes, or ``_compress_final`` of them) the
        update's new version and drop the rows it was built from; ``search`` is its
        index rows when ``final`` is compressed already."""
        if search is None and not isinstance(final, tuple):
            search = _search_entries(final, _now() * 1000)
        data_gz, size, skeleton, values = (
            final if isinstance(final, tuple)
            else _compress_final(final, self._base_segments(db, update)))
        if skeleton is not None:
            self.store.put_values(db, row["id"], update["id"], values)
        self.engine._save_compressed(db, row, update["version"], data_gz, size, count, skeleton,
                                     search)
        self.store.clear_checkpoints(db, update["id"])
        self.store.clear_journal(db, update["id"])
        self.store.update_update(db, update["id"], pending=0)
        self.working.discard(update["id"])

    def _base_segments(self, db, update: dict) -> dict:
        """The compressed segments of the update's base state, to reuse where the final
        state has them unchanged (``_gzip_segments``)."""
        base = self.store.get_deployment(db, update["stack_id"], update["base_version"])
        return _gzip_segment_index(base["data"]) if base and base["data"] else {}

    def _store_in_background(self, names: tuple, update_id: str, final: Any,
                             count: int) -> None:
        """Serialize, compress and store a completed update's final state in a thread;
        readers of the stack wait for it (``_await_final_state``)."""
        done = threading.Event()
        with self._storing_lock:
            self._storing[names] = done

        def run(final: Any) -> None:
            try:
                search = _search_entries(final, _now() * 1000)
                with self.store.read() as db:
                    update = self.store.get_update(db, update_id)
                    reusable = self._base_segments(db, update) if update is not None else {}
                prepared = _compress_final(final, reusable)
                del final, reusable  # the parsed state and the base go before the write
                values = prepared[3]
                with self.store.read() as db:
                    known = (self.store.known_values(db, update["stack_id"], values)
                             if update is not None else set())
                values.pack_missing(known)
                with self.store.write() as db:
                    update = self.store.get_update(db, update_id)
                    if update is not None and update["pending"]:  # else a reader stored it
                        row = self.store.get_stack_by_id(db, update["stack_id"])
                        self._store_final(db, row, update, prepared, count, search)
            except Exception:  # noqa: BLE001 - the next reader of the stack stores it
                log.exception("storing the final state of update %s failed; it is stored "
                              "when the stack is next used", update_id)
            finally:
                with self._storing_lock:
                    if self._storing.get(names) is done:
                        del self._storing[names]
                done.set()
                _release_free_memory()  # the state's buffers, freed in another order

        threading.Thread(target=run, args=(final,), daemon=True, name="store-final").start()

    def _await_final_state(self, org: str, project: str, name: str) -> None:
        """Wait until a final state this process is storing for the stack is stored."""
        done = self._storing.get((org, project, name))
        if done is not None:
            done.wait(LIVE_REPLAY_WAIT)

    def await_stored(self) -> None:
        """Wait (up to LIVE_REPLAY_WAIT) for the final states being stored at this moment
        (not for those of updates completing meanwhile)."""
        with self._storing_lock:
            pending = list(self._storing.values())
        deadline = time.monotonic() + LIVE_REPLAY_WAIT
        for done in pending:
            done.wait(max(0.0, deadline - time.monotonic()))

    def drain(self, timeout: float) -> None:
        """Wait (up to ``timeout`` seconds in all) for final states being stored."""
        deadline = time.monotonic() + timeout
        while True:
            with self._storing_lock:
                pending = list(self._storing.values())
            if not pending:
                return
            pending[0].wait(max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                return

    def _store_pending(self, db, row: dict, update: dict) -> None:
        """Store a completed update's final state that nobody stored (this process was
        stopped first, or another replica completed it)."""
        try:
            final, count = self._final_state(db, update)
        except Conflict as e:  # it was built once already: only damage gets here
            log.error("update %s: its final state cannot be stored (%s); the stack keeps "
                      "version %d", update["id"], e.message, row["version"])
            self.store.update_update(db, update["id"], pending=0, status="failed")
            return
        self._store_final(db, row, update, final, count)

    def _start_live_replay(self, update_id: str, stack_id: str, base_version: int) -> None:
        def load_base() -> dict:
            with self.store.read() as db:
                update = {"stack_id": stack_id, "base_version": base_version}
                data, _ = self._base_state(db, update)
            return json.loads(data).get("deployment") or {}

        with self._live_lock:
            if len(self._live) < LIVE_REPLAYS:
                self._live[update_id] = _LiveReplay(load_base, self._live_bytes)

    def _drop_live_replay(self, update_id: str) -> None:
        with self._live_lock:
            live = self._live.pop(update_id, None)
        if live is not None:
            live.close()

    def _final_state(self, db, update: dict, live: Optional[_LiveReplay] = None) -> tuple:
        """Return ``(deployment or its bytes, resource count)`` of the state an update
        produced (its base if it saved none), or raise Conflict.

        Nothing stored may raise anything else here (rows stored before input was
        strict, a delta chain ending in a bad document, a broken row): finishing an
        abandoned update runs inside export, new updates, imports and stack removal.
        """
        try:
            if update["journal"]:
                return self._replayed_state(db, update, live)
            return self._checkpointed_state(db, update)
        except (HTTPError, ValueError, LookupError, TypeError, AttributeError, RecursionError,
                zlib.error, EOFError, gzip.BadGzipFile) as e:
            what = ("journal cannot be replayed" if update["journal"] else
                    "last checkpoint is not a valid deployment")
            detail = e.message if isinstance(e, HTTPError) else f"{type(e).__name__}: {e}"
            raise Conflict(f"the update's {what}: {detail}"[:500]) from None

    def _base_state(self, db, update: dict) -> tuple:
        base = self.store.get_deployment(db, update["stack_id"], update["base_version"])
        if base is None:
            return _empty_deployment(), 0
        data = (_gunzip_stored(base["data"]) if base["data"]
                else self.engine._history_state(db, base))
        return data, base["resource_count"]

    def _replayed_state(self, db, update: dict, live: Optional[_LiveReplay]) -> tuple:
        rows = self.store.count_journal(db, update["id"])
        if not rows:
            return self._base_state(db, update)
        replayer = live.replayer_for(rows) if live is not None else None
        if replayer is None:  # replay the stored rows
            entries = _stored_journal(self.store.journal_rows(db, update["id"]),
                                      self.cfg.max_decompressed)
            # The parsed base is ours alone: replay over it without replay_journal's
            # copy (a 10 MB state is ~10 MB of Python objects per copy).
            base_bytes, _ = self._base_state(db, update)
            replayer = _JournalReplayer(json.loads(base_bytes).get("deployment") or {})
            for entry in entries:
                replayer.add(entry)
            del entries  # replaced base resources and begin entries: free them
        doc = replayer.generate(update["cli_version"])
        return doc, _count_resources(doc)

    def _checkpointed_state(self, db, update: dict) -> tuple:
        working = self._working(db, update["id"])
        if working is None:
            return self._base_state(db, update)
        # Deltas are applied to bytes unparsed: check what they made as strictly as an upload.
        return working[1], _check_deployment_bytes(working[1], "the last checkpoint")


def _next_checkpoint(base: Optional[tuple], seq: int, expected: str,
                     edits: Any) -> Optional[tuple]:
    """Return ``(bytes, sha256)`` of checkpoint ``seq``: ``edits`` applied to ``base``
    (``(seq, bytes, sha256)``); None if ``base`` already is that checkpoint.

    Raises Conflict when the delta does not follow ``base`` or its result does
    not hash to ``expected`` (the CLI then sends the state verbatim).
    """
    if base is None:
        raise Conflict("no checkpoint to apply a delta to; send it verbatim")
    last_seq, prev, last_hash = base
    if seq == last_seq:
        if hmac.compare_digest(expected, last_hash):
            return None
        raise Conflict(f"sequence number {seq} was already saved with another hash")
    if seq != last_seq + 1:
        raise Conflict(f"sequence number {seq} does not follow {last_seq}")
    data = apply_delta(prev, edits)
    digest = hashlib.sha256(data).hexdigest()
    if not hmac.compare_digest(digest, expected):
        raise Conflict("checkpointHash does not match the state after applying the delta")
    return data, digest


def _compress_final(final: Any, reusable: Optional[dict] = None) -> tuple:
    """Return ``(gzip bytes, size, skeleton or None, values)`` of an update's final
    state: a deployment (which gets a skeleton, section 5) or its bytes.
    ``reusable``: the base state's segments (``_gzip_segments``)."""
    if isinstance(final, bytes):
        return (*_gzip_chunks([final]), None, _Values())
    values = _Values()
    skeleton = _packed_json(_event_skeleton(final, values))
    return (*_gzip_segments(_dumps_chunks(final), reusable), skeleton, values)


def _check_resource(value: Any, what: str) -> None:
    if not isinstance(value, dict) or not isinstance(value.get("urn"), str) \
            or not isinstance(value.get("type", ""), str):
        raise BadRequest(f"{what} must be a resource object with a string urn")
    _check_field_names(value, what)


def _check_journal_entry(entry: Any) -> dict:
    """Validate one journal entry's shape; what only the whole journal can show (such
    as two resources claiming one alias) is caught when the update completes."""
    entry = _check_field_names(_require_dict(entry, "journal entry"), "journal entry")
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
        _check_field_names(op, f"journal entry {seq} operation")
        _check_resource(op.get("resource"), f"journal entry {seq} operation resource")
    if kind == 5:
        snapshot = _require_dict(entry.get("newSnapshot"), f"journal entry {seq} newSnapshot")
        _check_field_names(snapshot, f"journal entry {seq} newSnapshot")
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


def _check_program(body: dict) -> dict:
    """Return the program fields of an update request; BadRequest unless they have the
    shapes the CLI decodes from the stack's history (strings, config values, metadata)."""
    program = {k: body.get(k) for k in ("name", "runtime", "main", "description")}
    for key, value in program.items():
        if not isinstance(value, (str, type(None))):
            raise BadRequest(f"{key} must be a string")
    config, metadata = body.get("config"), body.get("metadata")
    for key, value in _require_dict(config or {}, "config").items():
        value = _require_dict(value, f"config value {key!r}")
        if not isinstance(value.get("string"), (str, type(None))) or not all(
                isinstance(value.get(flag), (bool, type(None))) for flag in ("secret", "object")):
            raise BadRequest(f"config value {key!r} needs a string 'string' and boolean "
                             "'secret' and 'object'")
    if metadata is not None:
        metadata = _check_field_names(_require_dict(metadata, "metadata"), "metadata")
        environment = metadata.get("environment")
        if not isinstance(metadata.get("message"), (str, type(None))) or not isinstance(
                environment or {}, dict) or not all(
                isinstance(v, str) for v in (environment or {}).values()):
            raise BadRequest("metadata needs a string message and an environment of strings")
    program.update(config=config, metadata=metadata)
    return program


def _go_json(value: Any) -> str:
    """Return JSON ``value`` as the CLI's Go encoder writes it: keys sorted, no spaces,
    ``<``, ``>``, ``&``, U+2028 and U+2029 escaped, numbers in Go's forms (an int
    beyond int64 and a whole float as Go's float64, ``1e-7``, ``0.000015``)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{_go_json(k)}:{_go_json(value[k])}" for k in sorted(value)) + "}"
    if isinstance(value, list):
        return "[" + ",".join(map(_go_json, value)) + "]"
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                             ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
            text = text.replace(char, escape)
        return text
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int) and -2**63 <= value < 2**63:
        return str(value)
    number = float(value)  # Go decodes config numbers to an int64, else a float64
    if number == 0:
        return "-0" if math.copysign(1, number) < 0 else "0"
    text = repr(number)
    mantissa, _, exponent = text.partition("e")
    if not 1e-6 <= abs(number) < 1e21:  # Go's 'e' format: 1e+21, 1.5e-7, 1e-10
        return f"{mantissa}e{int(exponent):+d}"
    if not exponent:
        return text[:-2] if text.endswith(".0") else text
    sign, mantissa = ("-", mantissa[1:]) if mantissa.startswith("-") else ("", mantissa)
    whole, _, fraction = mantissa.partition(".")
    digits, point = whole + fraction, len(whole) + int(exponent)
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return sign + digits + "0" * (point - len(digits))
    return f"{sign}{digits[:point]}.{digits[point:]}"


def _is_secure_value(value: Any) -> bool:
    """Return whether a config value in config.Value's JSON is ``{"secure": ciphertext}``."""
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("secure"), str)


def _has_secure_value(value: Any) -> bool:
    """Return whether a config object holds a ``{"secure": ciphertext}`` anywhere."""
    if _is_secure_value(value):
        return True
    if isinstance(value, dict):
        return any(map(_has_secure_value, value.values()))
    return isinstance(value, list) and any(map(_has_secure_value, value))


def _config_value(value: Any) -> dict:
    """Return one value of a config.Map's JSON (a DIY history's ``config``: a string,
    ``{"secure": ciphertext}``, or an object or list) as the apitype.ConfigValue
    ``{"string", "secret", "object"}`` the service serves, as the CLI converts it
    (config.Value's UnmarshalJSON, then CreateUpdate): an object becomes its JSON
    text, secret when a secure value is inside it."""
    if isinstance(value, str):
        return {"string": value, "secret": False, "object": False}
    if _is_secure_value(value):
        return {"string": value["secure"], "secret": True, "object": False}
    if isinstance(value, (dict, list)) or value is None:
        return {"string": _go_json(value), "secret": _has_secure_value(value), "object": True}
    return {"string": _go_json(value), "secret": False, "object": False}  # a number or bool


def _service_config(config: Any) -> dict:
    """Return a config.Map's JSON (``{"proj:key": value}``) as apitype.ConfigValues."""
    return {k: _config_value(v) for k, v in config.items()} if isinstance(config, dict) else {}


def _program_config(program: dict) -> dict:
    """Return the config of a stored update program as apitype.ConfigValues.

    Programs of updates the CLI made hold them as checked (``_check_program``
    writes every program key, "runtime" among them). ``import-diy`` wrote its
    programs without "runtime" and, before issue 23, with the DIY history's
    config.Map as it was, which the CLI cannot decode: those are converted here.
    """
    if "runtime" in program:
        return program.get("config") or {}
    return _service_config(program.get("config"))


def _check_resource_changes(changes: Any) -> dict:
    """Return a summary's resourceChanges if it maps operations to counts; else BadRequest."""
    if not isinstance(changes, dict) or not all(
            isinstance(n, int) and not isinstance(n, bool) and abs(n) <= 2**62
            for n in changes.values()):
        raise BadRequest("resourceChanges must map operations to counts")
    return changes


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


# -- resource search ----------------------------------------------------------
# Pulumi Cloud's query language (pulumi.com/docs/pulumi-cloud/insights/search),
# as far as a state reaches: free text, field:value, "exact", -negation, OR,
# parentheses (left to right, as documented), and ranges of created/modified.
# A query becomes one parameterized WHERE over search_resources (section 5).

#: Query fields: name -> (kind, columns). "text" matches a part of the value,
#: "keyword" the whole value (both ignore ASCII case, ``*`` is any run of
#: characters); "exact" (a quoted value) is case-sensitive equality for both.
_SEARCH_FIELDS = {
    "name": ("text", ("name",)), "project": ("text", ("project",)),
    "stack": ("text", ("stack",)), "urn": ("text", ("urn",)),
    "type": ("text", ("type", "short_type")), "id": ("text", ("resource_id",)),
    "parent.urn": ("text", ("parent_urn",)), "provider.urn": ("text", ("provider_urn",)),
    "package": ("keyword", ("package",)), "module": ("keyword", ("module",)),
    "pending": ("keyword", ("pending",)),
    "custom": ("bool", ("custom",)), "protected": ("bool", ("protected",)),
    "delete": ("bool", ("deleted",)),
    "modified": ("time", ("modified",)), "created": ("time", ("created",)),
}
#: What free text (no field) is matched against: its words against the URN alone, which
#: holds the stack, project, (qualified) type and name, so a part of any is a part of it.
_SEARCH_FREE_COLUMNS = ("name", "urn", "stack", "project", "type")
_SEARCH_FREE_PART = ("urn",)
#: Sort fields (Pulumi Cloud's list) -> column; managed and category are the same
#: for every resource of a stack here.
_SEARCH_SORTS = {
    "created": "created", "custom": "custom", "delete": "deleted", "id": "resource_id",
    "modified": "modified", "module": "module", "name": "name", "package": "package",
    "parentUrn": "parent_urn", "project": "project", "protected": "protected",
    "providerUrn": "provider_urn", "stack": "stack", "type": "type", "urn": "urn",
    "dependencies": None, "managed": None, "category": None,
}
_SEARCH_TIME_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?)?"
    r"([Zz]|[+-]\d{2}:?\d{2})?\Z")
_SEARCH_FIELD_RE = re.compile(r"([A-Za-z][A-Za-z.]*):")
_SEARCH_WORD_RE = re.compile(r'[^\s()"]+')
_SEARCH_RANGE_RE = re.compile(r"\[\s*(\S+)\s+(?:to|TO)\s+(\S+)\s*\]")


def _search_time(text: str) -> Optional[tuple]:
    """Return ``(start, end)`` Unix milliseconds of the period an RFC 3339 date or time
    names (a day, minute, second or millisecond; UTC unless it has an offset), or None."""
    m = _SEARCH_TIME_RE.match(text)
    if not m:
        return None
    year, month, day, hour, minute, second, frac, zone = m.groups()
    tz = datetime.timezone.utc
    if zone and zone not in "Zz":
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        tz = datetime.timezone(sign * datetime.timedelta(hours=int(digits[:2]),
                                                         minutes=int(digits[2:])))
    try:
        start = datetime.datetime(int(year), int(month), int(day), int(hour or 0),
                                  int(minute or 0), int(second or 0), tzinfo=tz)
    except ValueError:
        return None
    ms = int(start.timestamp()) * 1000 + (int(frac[:3].ljust(3, "0")) if frac else 0)
    span = (86400000 if hour is None else 60000 if second is None
            else 1000 if frac is None else 1)
    return ms, ms + span


def _search_ms_text(ms: int) -> str:
    """Unix milliseconds as RFC 3339 in UTC with milliseconds."""
    when = datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def _type_parts(type_: str) -> tuple:
    """Return ``(package, module, short type)`` of a type token: ``aws:s3/bucket:Bucket``
    is package ``aws``, module ``s3`` and short type ``aws:s3:Bucket``."""
    parts = type_.split(":")
    if len(parts) < 3:
        return parts[0], "", type_
    module = parts[1].split("/", 1)[0]
    return parts[0], module, f"{parts[0]}:{module}:{parts[-1]}"


def _search_entries(state: Any, fallback_ms: int) -> list:
    """Return the index rows of a state (an untyped deployment, a deployment, or JSON
    bytes of either) without their first column (the stack id), project and stack
    names; ``fallback_ms`` is the modified time of resources that record none.
    Bytes are read one resource at a time (a parsed state takes up to ten times its
    JSON). A state that cannot be read has no rows (it is logged)."""
    try:
        if isinstance(state, (bytes, str)):
            text = state.decode("utf-8") if isinstance(state, bytes) else state
            try:
                return _scanned_search_entries(text, fallback_ms)
            except _Unusual:
                state = json.loads(text)
        dep = state.get("deployment", state) if isinstance(state, dict) else {}
        dep = dep if isinstance(dep, dict) else {}
        out = [_search_entry(seq, res, fallback_ms)
               for seq, res in enumerate(dep.get("resources") or [])]
        return _with_pending([e for e in out if e], dep.get("pending_operations"))
    except (ValueError, RecursionError, AttributeError, TypeError) as e:
        log.warning("a state could not be read for the search index: %s", e)
        return []


def _scanned_search_entries(text: str, fallback_ms: int) -> list:
    """``_search_entries`` of an untyped deployment's JSON text, holding one resource
    parsed at a time; raise _Unusual for any other shape."""
    decode = json.JSONDecoder().raw_decode
    out: list = []

    def resources_at(pos: int) -> tuple:
        if text[pos:pos + 1] != "[":
            raise _Unusual
        pos, seq = _JSON_WS_RE.match(text, pos + 1).end(), 0
        while text[pos:pos + 1] != "]":
            if seq:
                if text[pos:pos + 1] != ",":
                    raise _Unusual
                pos = _JSON_WS_RE.match(text, pos + 1).end()
            res, pos = decode(text, pos)
            entry = _search_entry(seq, res, fallback_ms)
            if entry:
                out.append(entry)
            seq += 1
            pos = _JSON_WS_RE.match(text, pos).end()
        return [], pos + 1

    def top_at(key: str, pos: int) -> tuple:
        if key == "deployment" and text[pos:pos + 1] == "{":
            return _scan_object(text, pos, lambda field, at: (
                resources_at(at) if field == "resources" else decode(text, at)))
        return decode(text, pos)

    doc, _ = _scan_object(text, _JSON_WS_RE.match(text).end(), top_at)
    dep = doc.get("deployment")
    if not isinstance(dep, dict):
        raise _Unusual  # a bare deployment: the full parse reads it
    return _with_pending(out, dep.get("pending_operations"))


def _with_pending(entries: list, operations: Any) -> list:
    """``entries`` with the pending operation of each resource that has one."""
    pending = {op["resource"]["urn"]: str(op.get("type") or "")
               for op in operations or [] if isinstance(op, dict)
               and isinstance(op.get("resource"), dict)
               and isinstance(op["resource"].get("urn"), str)}
    if not pending:
        return entries
    return [(*e[:10], pending[e[1]], *e[11:]) if e[1] in pending else e for e in entries]


def _search_entry(seq: int, res: Any, fallback_ms: int) -> Optional[tuple]:
    """One resource's index row (see _search_entries), or None if it has no URN."""
    if not isinstance(res, dict) or not isinstance(res.get("urn"), str):
        return None
    urn = res["urn"]
    parts = urn.split("::", 3)
    type_ = res.get("type") if isinstance(res.get("type"), str) else (
        parts[2].rsplit("$", 1)[-1] if len(parts) == 4 else "")
    package, module, short = _type_parts(type_)
    created = _search_time(res["created"]) if isinstance(res.get("created"), str) else None
    modified = _search_time(res["modified"]) if isinstance(res.get("modified"), str) else None

    def text(key: str) -> str:
        value = res.get(key)
        return value if isinstance(value, str) else "" if value is None else str(value)

    return (seq, urn, type_, short, parts[3] if len(parts) == 4 else "", package, module,
            int(bool(res.get("custom"))), int(bool(res.get("protect"))),
            int(bool(res.get("delete"))), "", text("id"), text("parent"), text("provider"),
            created[0] if created else None, modified[0] if modified else fallback_ms)


def _like_pattern(value: str, contains: bool) -> str:
    """A LIKE pattern (escape ``\\``) of ``value``, where ``*`` matches any run."""
    escaped = re.sub(r"([\\%_])", r"\\\1", value).replace("*", "%")
    return f"%{escaped}%" if contains else escaped


class _SearchQuery:
    """A parsed search query: ``node`` is None (everything) or a tree of
    ``("and"|"or", a, b)``, ``("not", a)`` and ``("term", field, op, value)``
    (field None for free text; op "~" part, "=" exact, or a time range
    ``">=" "<" "in"`` with ``(start, end)`` milliseconds)."""

    def __init__(self, text: str):
        if len(text) > MAX_SEARCH_QUERY:
            raise BadRequest(f"the search query is longer than {MAX_SEARCH_QUERY} characters")
        self.text, self.pos, self.terms = text, 0, 0
        self.node = self._sequence(0)

    def _fail(self, why: str) -> BadRequest:
        return BadRequest(f"invalid search query at character {self.pos + 1}: {why}")

    def _skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def _sequence(self, depth: int) -> Any:
        node, joiner = None, None
        while True:
            self._skip()
            if self.pos >= len(self.text) or self.text[self.pos] == ")":
                if self.pos < len(self.text) and depth == 0:
                    raise self._fail("')' without a matching '('")
                if self.pos >= len(self.text) and depth > 0:
                    raise self._fail("'(' without a matching ')'")
                if joiner:
                    raise self._fail(f"{joiner} needs a term after it")
                return node
            word = _SEARCH_WORD_RE.match(self.text, self.pos)
            if word and word[0] in ("OR", "AND") and (
                    word.end() == len(self.text) or self.text[word.end()] in " \t\r\n()"):
                if node is None or joiner:
                    raise self._fail(f"{word[0]} needs a term before it")
                joiner, self.pos = word[0], word.end()
                continue
            term = self._negatable(depth)
            node = term if node is None else ("or" if joiner == "OR" else "and", node, term)
            joiner = None

    def _negatable(self, depth: int) -> Any:
        negate = False
        if self.text.startswith("NOT", self.pos) and self.text[self.pos + 3:self.pos + 4] in (
                " ", "\t", "("):
            self.pos += 3
            self._skip()
            negate = True
        elif self.text.startswith("-", self.pos) and self.text[self.pos + 1:self.pos + 2] \
                not in ("", " ", "\t", "\r", "\n", ")"):
            self.pos += 1
            negate = True
        term = self._primary(depth)
        return ("not", term) if negate else term

    def _primary(self, depth: int) -> Any:
        if self.pos >= len(self.text):
            raise self._fail("a term is missing at the end")
        if self.text[self.pos] == "(":
            if depth >= MAX_SEARCH_DEPTH:
                raise self._fail(f"parentheses nest deeper than {MAX_SEARCH_DEPTH}")
            self.pos += 1
            node = self._sequence(depth + 1)
            if node is None:
                raise self._fail("empty parentheses")
            self.pos += 1  # the ')' _sequence stopped at
            return node
        self.terms += 1
        if self.terms > MAX_SEARCH_TERMS:
            raise self._fail(f"more than {MAX_SEARCH_TERMS} terms")
        m = _SEARCH_FIELD_RE.match(self.text, self.pos)
        if m and m[1].lower() in _SEARCH_FIELDS:
            self.pos = m.end()
            return self._field(m[1].lower())
        if self.text[self.pos] == '"':
            return ("term", None, "=", self._quoted())
        word = _SEARCH_WORD_RE.match(self.text, self.pos)
        if not word:
            raise self._fail(f"unexpected {self.text[self.pos]!r}")
        self.pos = word.end()
        return ("term", None, "~", word[0])

    def _quoted(self) -> str:
        end = self.text.find('"', self.pos + 1)
        if end < 0:
            raise self._fail("a quote is not closed")
        value, self.pos = self.text[self.pos + 1:end], end + 1
        return value

    def _field(self, field: str) -> Any:
        kind = _SEARCH_FIELDS[field][0]
        negate = self.text.startswith("-", self.pos) and not self.text.startswith(
            ("- ", "-\t"), self.pos) and len(self.text) > self.pos + 1
        if negate:
            self.pos += 1
        rest = self.text[self.pos:]
        if not rest or rest[0].isspace() or rest[0] in "()":
            raise self._fail(f"{field}: needs a value right after the colon")
        if rest[0] == '"':
            value, op = self._quoted(), "="
        elif kind == "time" and rest[0] == "[":
            m = _SEARCH_RANGE_RE.match(rest)
            if not m:
                raise self._fail(f"{field}: a range is written [FROM to TO]")
            self.pos += m.end()
            start = (None, None) if m[1] == "*" else self._time(field, m[1])
            end = (None, None) if m[2] == "*" else self._time(field, m[2])
            value, op = (start[0], end[1]), "in"
        else:
            word = _SEARCH_WORD_RE.match(self.text, self.pos)
            value, op = word[0], "~"
            self.pos = word.end()
        if kind == "bool":
            if value.lower() not in ("true", "false"):
                raise self._fail(f"{field}: takes true or false, not {value!r}")
            value, op = value.lower() == "true", "="
        elif kind == "time" and op != "in":
            cmp = re.match(r"(>=|<=|>|<)?", value)[0]
            start, end = self._time(field, value[len(cmp):])
            # A date is its whole day (a time its minute, second or millisecond).
            op, value = {"": ("in", (start, end)), ">=": (">=", start), ">": (">=", end),
                         "<": ("<", start), "<=": ("<", end)}[cmp]
        term = ("term", field, op, value)
        return ("not", term) if negate else term

    def _time(self, field: str, text: str) -> tuple:
        period = _search_time(text)
        if period is None:
            raise self._fail(f"{field}: {text!r} is not a date (YYYY-MM-DD) or an RFC 3339 "
                             "time")
        return period

    def sql(self) -> tuple:
        """Return ``(where, params)`` for search_resources."""
        params: list = []
        return ("1 = 1" if self.node is None else self._sql(self.node, params)), params

    def _sql(self, node: tuple, params: list) -> str:
        if node[0] in ("and", "or"):
            return (f"({self._sql(node[1], params)} {node[0].upper()} "
                    f"{self._sql(node[2], params)})")
        if node[0] == "not":
            return f"NOT {self._sql(node[1], params)}"
        _, field, op, value = node
        kind, columns = _SEARCH_FIELDS[field] if field else (
            "text", _SEARCH_FREE_COLUMNS if op == "=" else _SEARCH_FREE_PART)
        if kind == "time":
            col = columns[0]
            parts = [f"{col} IS NOT NULL"]
            low, high = (value, None) if op == ">=" else (None, value) if op == "<" else value
            if low is not None:
                parts.append(f"{col} >= ?")
                params.append(low)
            if high is not None:
                parts.append(f"{col} < ?")
                params.append(high)
            return f"({' AND '.join(parts)})"
        if kind == "bool":
            params.append(int(value))
            return f"{columns[0]} = ?"
        if op == "=":
            params.extend([value] * len(columns))
            return "(" + " OR ".join(f"{c} = ?" for c in columns) + ")"
        # LIKE ignores ASCII case in SQLite; PostgresStore makes it ILIKE.
        pattern = _like_pattern(value, contains=kind == "text")
        params.extend([pattern] * len(columns))
        return "(" + " OR ".join(f"{c} LIKE ? ESCAPE '\\'" for c in columns) + ")"


class SearchIndex:
    """The resource search index: one row per resource of each stack's newest stored
    state, rewritten in the write transaction that stores a state (updates, imports,
    rename; a stack's removal takes its rows along), so searches run as SQL over it.
    Stacks stored without it (an older database, a DIY import) are indexed before
    the next search answers, one at a time."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self._catch_up_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Index the stacks stored without the index in a thread (the server's start)."""
        def run() -> None:
            try:
                done = self.catch_up()
                if done:
                    log.info("search index: %d stacks indexed", done)
            except Exception:  # noqa: BLE001 - the next search tries again
                log.exception("building the search index failed; the next search retries")

        self._stopping.clear()
        self._thread = threading.Thread(target=run, daemon=True, name="search-index")
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Stop indexing in the background after the stack at hand (up to ``timeout`` s)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def store(self, db, row: dict, version: int, entries: list) -> None:
        """Make ``entries`` (of ``_search_entries``) the index of stack ``row``."""
        rows = [(row["id"], *e[:4], e[4], e[5], e[6], row["project"], row["name"], *e[7:])
                for e in entries]
        self.engine.store.replace_search_rows(db, row["id"], version, rows)

    def catch_up(self) -> int:
        """Index every stack whose index is missing or stale; return how many."""
        store, done = self.engine.store, 0
        with self._catch_up_lock:
            while True:
                with store.read() as db:
                    ids = store.stacks_to_index(db, 100)
                if not ids:
                    return done
                for stack_id in ids:
                    if self._stopping.is_set():
                        return done
                    self._index_one(stack_id)
                    done += 1

    def _index_one(self, stack_id: str) -> None:
        store = self.engine.store
        with store.read() as db:
            row = store.get_stack_by_id(db, stack_id)
            dep = store.get_deployment(db, stack_id) if row else None
            if dep is None:
                data = b""
            else:
                try:
                    data = (_gunzip_stored(dep["data"]) if dep["data"]
                            else self.engine._history_state(db, dep))
                except (HTTPError, OSError, EOFError, zlib.error) as e:
                    log.warning("stack %s: its state cannot be read for the search index: %s",
                                stack_id, e)
                    data = b""
        if row is None:
            return
        version = dep["version"] if dep else -1
        entries = _search_entries(data, (row["last_update"] or row["created"]) * 1000) \
            if data else []
        del data
        with store.write() as db:
            now = store.get_stack_by_id(db, stack_id)
            newest = store.get_deployment(db, stack_id) if now else None
            if (now is None or (newest["version"] if newest else -1) != version
                    or store.search_indexed_version(db, stack_id) == version
                    or (now["project"], now["name"]) != (row["project"], row["name"])):
                return  # stored or renamed meanwhile (and indexed with it): the next pass sees
            self.store(db, now, version, entries)

    def search(self, query: str, stack_ids: Optional[list], sort: list, asc: bool,
               offset: int, size: int) -> tuple:
        """Return ``(total, rows)``: one page of the index rows ``query`` matches among
        the stacks ``stack_ids`` (None: all), sorted by ``sort`` (Pulumi Cloud's names;
        default modified, newest first)."""
        where, params = _SearchQuery(query).sql()
        direction = "ASC" if asc else "DESC"
        order = []
        for name in sort or ["modified"]:
            if name not in _SEARCH_SORTS:
                raise BadRequest(f"cannot sort by {name!r}; sort by one of "
                                 f"{', '.join(sorted(_SEARCH_SORTS))}")
            if _SEARCH_SORTS[name]:
                order.append(f"{_SEARCH_SORTS[name]} {direction}")
        if where != "1 = 1" and order and order[0].startswith("modified "):
            # Filtered: find the matches, then sort them. Walking the whole modified
            # index for a rare match would cost a table lookup per resource.
            order[0] = "+" + order[0]
        order += ["project ASC", "stack ASC", "seq ASC"]  # a stable order for paging
        self.engine.updates.await_stored()
        self.catch_up()
        with self.engine.store.read() as db:
            return self.engine.store.search_resources(db, where, params, stack_ids,
                                                      ", ".join(order), size, offset)


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
            _private_file(path)  # left readable by others: tightened, with a warning
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

    def seal_secret(self, purpose: bytes, plaintext: bytes) -> bytes:
        """Seal a small secret of the server's own (a webhook's) under the master key,
        bound to ``purpose``; ``rotate`` rewraps it."""
        return self.crypto.seal(self._master, plaintext, purpose)

    def open_secret(self, purpose: bytes, sealed: bytes) -> bytes:
        """Open ``seal_secret`` output; ValueError if it was altered or is not ours."""
        return self.crypto.open(self._master, sealed, purpose)

    def matches(self, canary: Optional[bytes], stack_key: Optional[tuple]) -> bool:
        """Return whether the master key is the database's: it opens ``stack_key``
        (``(stack id, wrapped data key)`` of any stack), or with no stacks the
        ``canary``; True for a new database with neither.

        A stack key decides when there is one, since those are the keys every
        secrets call needs: a backup without a canary, or a canary written
        under the wrong key by an older version, cannot pass a wrong key.
        """
        try:
            if stack_key is not None:
                self.unwrap_data_key(*stack_key)
                return True
            return canary is None or self.crypto.open(self._master, canary) == _CANARY
        except ValueError:
            return False

    def check_canary(self, store: Store) -> None:
        """Refuse a master key that does not open this database (see ``matches``);
        write the canary when it is missing or was written under another key."""
        with store.write() as db:
            canary = store.get_meta(db, "canary")
            if not self.matches(canary, store.one_data_key(db)):
                raise ValueError("the master key does not match this database "
                                 "(wrong --master-key-file or PULUMI_BACKEND_MASTER_KEY)")
            if canary is None or not self.matches(canary, None):
                if canary is not None:
                    log.warning("replacing a canary not made under the master key of the "
                                "stack keys")
                store.set_meta(db, "canary", self.crypto.seal(self._master, _CANARY))

    def rotate(self, store: Store, new_master: bytes) -> int:
        """Rewrap every data key and the canary under ``new_master`` in one transaction."""
        self.check_canary(store)
        new = KeyManager(self.crypto, new_master)
        with store.write() as db:
            rows = store.all_data_keys(db)
            for stack_id, wrapped in rows:
                store.update_stack(db, stack_id, data_key=new.wrap_data_key(
                    stack_id, self.unwrap_data_key(stack_id, wrapped)))
            for name, sealed in store.webhook_secrets(db):
                purpose = b"webhook:" + name.encode()
                store.update_webhook(db, name, secret=new.seal_secret(
                    purpose, self.open_secret(purpose, bytes(sealed))))
            store.set_meta(db, "canary", self.crypto.seal(new_master, _CANARY))
        return len(rows)


# ==== 8. Identity and access ================================================
# Who calls, and what they may do. Users (org role admin or member), teams of
# users, and API tokens: random, shown once, stored only as their SHA-256 (a
# random 160-bit token needs no slow hash). Teams hold grants of Pulumi
# Cloud's stack permissions on "project/stack" patterns. Nothing here is
# cached: every request looks its token up by hash, so a token revoked or a
# grant changed by `pulumi_backend.py token revoke` (another process, server
# running) counts from the next request. Tokens from --auth-token act as org
# admins; with neither those nor users and stored tokens, any token is the
# admin, as before users existed (allowed on loopback only, see section 2) --
# but only until the first user or stored token is created: the database then
# remembers that identities existed (_IDENTITIES_META), and a server left with
# none refuses everyone instead of going back to "any token".

#: Pulumi Cloud's stack permissions.
PERM_NONE, PERM_READ, PERM_WRITE, PERM_ADMIN = 0, 101, 102, 103
_PERM_NAMES = {PERM_NONE: "none", PERM_READ: "read", PERM_WRITE: "write", PERM_ADMIN: "admin"}
_PERM_BY_NAME = {v: k for k, v in _PERM_NAMES.items()}
_LOGIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}\Z")
_PATTERN_RE = re.compile(r"^[A-Za-z0-9_.*?\[\]!-]{1,100}(/[A-Za-z0-9_.*?\[\]!-]{1,100})?\Z")
_TOKEN_PREFIX = "pul-"
_MSG_BAD_TOKEN = "No credentials provided or are invalid."
#: Meta row set when the first user or stored token is created (and at start
#: for a database that has some): from then on "any token" never comes back.
_IDENTITIES_META = "identities_existed"
#: Meta key prefix of the provider account (issuer and ``sub``) a login is linked to
#: by single sign-on: the login a claim names is only ever that account's.
_SSO_SUBJECT_META = "sso_subject:"
_MSG_NO_IDENTITY = ("no user or token is left and this server no longer accepts any token: "
                    "add an admin with `pulumi_backend.py user add NAME --role admin` and "
                    "give them a token with `pulumi_backend.py token create --user NAME`")


class _AuthFailure(Unauthorized):
    """A refused token: the client gets the generic 401 (or ``message``), the audit
    log the reason."""

    def __init__(self, why: str, message: str = _MSG_BAD_TOKEN):
        super().__init__(message)
        self.why = why


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who a request acts as.

    ``kind`` is "user" (a personal token), "team" or "org" (their tokens; then
    ``login`` is the team or organization name), "admin" (an --auth-token) or
    "anonymous" (any token while no user or stored token has ever existed: an
    admin that may not create identities, so that no API caller can lock the
    others out). ``expires`` is the token's expiry: tokens it creates end by then.
    """

    login: str
    kind: str
    admin: bool
    name: str = ""
    email: str = ""
    teams: tuple = ()
    token_id: str = ""
    token_name: str = ""
    expires: int = 0

    @property
    def actor(self) -> str:
        """The name audit events and update history give this caller."""
        return self.login if self.kind in ("user", "admin", "anonymous") \
            else f"{self.kind}:{self.login}"


#: The actor of changes made with the server's own command line.
_LOCAL_ADMIN = Principal("local-admin", "admin", True, name="pulumi_backend.py")
#: The actor of refused credentials (nobody is known yet).
_ANONYMOUS = Principal("anonymous", "user", False)


def _address_key(address: str) -> str:
    """The key failures of a client address count under: IPv6 by its /64 (one host
    usually holds a whole /64), anything else as it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


class _FailureWindows:
    """Failures per client address, counted in fixed windows of AUTH_FAILURE_WINDOW.

    Thread-safe and bounded: past MAX_TRACKED_ADDRESSES the oldest window is
    dropped. With ``keep_ended``, windows that are over are kept (with their
    count) until ``ended()`` takes them, for the audit log's summary rows.
    """

    def __init__(self, keep_ended: bool = False, seconds: float = AUTH_FAILURE_WINDOW):
        self.seconds, self.keep_ended = seconds, keep_ended
        self._lock = threading.Lock()
        self._windows: dict = {}  # key -> [monotonic start, failures]; oldest first
        self._ended: list = []  # (key, failures) of windows over, while keep_ended
        self._swept = time.monotonic()

    def _end(self, key: str) -> None:
        count = self._windows.pop(key)[1]
        if self.keep_ended:
            self._ended.append((key, count))

    def add(self, address: str) -> int:
        """Count one failure of ``address``; return its failures in the current window."""
        key, now = _address_key(address), time.monotonic()
        with self._lock:
            w = self._windows.get(key)
            if w is not None and now - w[0] >= self.seconds:
                self._end(key)
                w = None
            if w is None:
                if len(self._windows) >= MAX_TRACKED_ADDRESSES:
                    # The fewest failures go first: rotating through many addresses
                    # must not wipe the count of one that is guessing.
                    self._end(min(self._windows, key=lambda k: self._windows[k][1]))
                w = self._windows[key] = [now, 0]
            w[1] += 1
            return w[1]

    def current(self, address: str) -> tuple:
        """Return ``(failures, seconds left)`` of ``address``'s window (0s when none)."""
        if not self._windows:  # every request asks: no parsing while nobody failed
            return 0, 0
        key, now = _address_key(address), time.monotonic()
        with self._lock:
            w = self._windows.get(key)
            if w is None or now - w[0] >= self.seconds:
                return 0, 0
            return w[1], math.ceil(w[0] + self.seconds - now)

    def ended(self) -> list:
        """Return and forget ``(address, failures)`` of the windows that are over
        (looking through all of them at most once a second)."""
        now = time.monotonic()
        with self._lock:
            if now - self._swept >= 1.0:
                self._swept = now
                for key in [k for k, w in self._windows.items() if now - w[0] >= self.seconds]:
                    self._end(key)
            out, self._ended = self._ended, []
        return out


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def _new_token() -> str:
    """Return a fresh API token: ``pul-`` and 40 hex digits (160 random bits)."""
    return _TOKEN_PREFIX + secrets.token_hex(20)


def _parse_lifetime(text: str, what: str) -> int:
    """Return the seconds of a lifetime such as ``90d``, ``12h`` or ``30m``; 0 for ``never``."""
    text = (text or "").strip().lower()
    if text in ("", "0", "never"):
        return 0
    seconds = int(_parse_duration(what.lstrip("-"), text))
    if not 0 < seconds <= MAX_TOKEN_SECONDS:
        raise ValueError(f"{what} must be between 1s and {MAX_TOKEN_SECONDS // 86400}d")
    return seconds


def _normalize_pattern(pattern: str) -> str:
    """Return a grant pattern as ``project/stack`` globs (``app`` means ``app/*``)."""
    if not isinstance(pattern, str) or not _PATTERN_RE.match(pattern):
        raise BadRequest(f"invalid stack pattern {pattern!r}: use project/stack with * and ? "
                         "wildcards, such as app/* or */prod")
    return pattern if "/" in pattern else pattern + "/*"


def _check_stack_names(project: Any, stack: Any) -> None:
    """Raise BadRequest unless both are valid names (_NAME_RE, as the engine checks)."""
    if not isinstance(project, str) or not _NAME_RE.match(project):
        raise BadRequest(f"invalid project name {str(project)[:200]!r}")
    if not isinstance(stack, str) or not _NAME_RE.match(stack):
        raise BadRequest(f"invalid stack name {str(stack)[:200]!r}")


def _perm_value(value: Any) -> int:
    """Return a permission from its name or Pulumi Cloud number; BadRequest otherwise."""
    if isinstance(value, str) and value in _PERM_BY_NAME:
        return _PERM_BY_NAME[value]
    if isinstance(value, int) and not isinstance(value, bool) and value in _PERM_NAMES:
        return value
    raise BadRequest(f"permission must be none, read, write or admin (0, 101, 102, 103), "
                     f"not {value!r}")


def _rfc3339(t: int) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


class AuditLog:
    """The append-only audit table, optionally mirrored to a JSON-lines file.

    Events say who (actor, token id and name, address, user agent) did what
    (event, target) with which outcome. Callers pass names and counts, never
    a token or a secret value.
    """

    def __init__(self, cfg: Config, store: Store):
        self.store = store
        self.path = cfg.audit_log
        self.retention = cfg.audit_retention_days * 86400
        self._file_lock = threading.Lock()
        self._pruned = -math.inf
        self._failures = _FailureWindows(keep_ended=True)

    def record(self, event: str, actor: Optional[Principal] = None, req: Any = None,
               target: str = "", outcome: str = "success", description: str = "") -> None:
        """Append one event (its own transaction, committed before this returns).

        Fields are cut to MAX_AUDIT_FIELD characters; events older than the
        retention are pruned here, at most once an hour.
        """
        actor = actor or (req.principal if req is not None else None) or _LOCAL_ADMIN
        row = {"time": _now(), "actor": actor.actor, "token_id": actor.token_id,
               "token_name": actor.token_name,
               "source_ip": getattr(req, "remote", "") if req is not None else "local",
               "user_agent": (req.headers.get("User-Agent") or "")[:MAX_AUDIT_FAILURE_FIELD]
               if req is not None else "pulumi_backend.py",
               "event": event, "target": target[:MAX_AUDIT_FIELD],
               "outcome": outcome, "description": description[:MAX_AUDIT_FIELD]}
        self._append([*self._failure_summaries(), row])

    def login_failure(self, req: Any, target: str, why: str,
                      event: str = "login_failure") -> None:
        """Record credentials refused to an unknown caller, within bounds: an attacker
        must not grow the table at will. Fields are cut to MAX_AUDIT_FAILURE_FIELD;
        past AUDIT_FAILURES_PER_MINUTE rows per address and minute the failures are
        only counted, and one "N more" row says how many once the minute is over."""
        count = self._failures.add(getattr(req, "remote", ""))
        if count <= AUDIT_FAILURES_PER_MINUTE:
            cut = MAX_AUDIT_FAILURE_FIELD  # the User-Agent is cut to it by record()
            self.record(event, _ANONYMOUS, req, target[:cut], "failure", why[:cut])
        else:
            self._append(self._failure_summaries())

    def _failure_summaries(self) -> list:
        """Rows for the windows that ended with failures not recorded one by one."""
        return [{"time": _now(), "actor": _ANONYMOUS.actor, "token_id": "", "token_name": "",
                 "source_ip": key, "user_agent": "", "event": "login_failure", "target": "",
                 "outcome": "failure",
                 "description": f"{count - AUDIT_FAILURES_PER_MINUTE} more failures from this "
                                f"address within {AUTH_FAILURE_WINDOW:g}s, not recorded one "
                                "by one"}
                for key, count in self._failures.ended() if count > AUDIT_FAILURES_PER_MINUTE]

    def _append(self, rows: list) -> None:
        if not rows:
            return
        try:
            with self.store.write() as db:
                for row in rows:
                    self.store.append_audit(db, row)
                if self.retention and time.monotonic() - self._pruned > 3600:
                    self._pruned = time.monotonic()
                    self.store.prune_audit(db, rows[-1]["time"] - self.retention)
        except sqlite3.Error as e:  # reads keep working on a read-only or full database
            log.error("cannot write the audit event %s on %s: %s", rows[-1]["event"],
                      _escape_log(rows[-1]["target"]), e)
        if self.path:
            for row in rows:
                self._append_file(row)

    def _append_file(self, row: dict) -> None:
        line = _audit_json_line(row).encode("ascii")
        try:
            with self._file_lock:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)
        except OSError as e:  # the table has it; a full disk must not fail the request
            log.error("cannot append to --audit-log %s: %s", self.path, e.strerror)

    def page(self, continuation: Optional[str], start: int, end: int, event: Optional[str],
             user: Optional[str], target: Optional[str] = None) -> dict:
        """One page of events in Pulumi Cloud's shape, newest first (of ``target`` and
        what is below it, such as a stack's "org/project/stack" and its updates)."""
        before = 2 ** 62
        if continuation:
            if not (continuation.isascii() and continuation.isdigit()) or len(continuation) > 18:
                raise BadRequest("invalid continuationToken")
            before = int(continuation)
        with self.store.read() as db:
            rows = self.store.list_audit(db, before, start, end, event, user, AUDIT_PAGE_SIZE,
                                         target=target)
        more = len(rows) == AUDIT_PAGE_SIZE
        return {"auditLogEvents": [_audit_api(r) for r in rows],
                "continuationToken": str(rows[-1]["id"]) if more else None}

    def export(self, fmt: str, start: int, end: int, event: Optional[str],
               user: Optional[str]) -> tuple:
        """Return ``(body, content type)``: the newest AUDIT_EXPORT_MAX_EVENTS matching
        events, newest first, as CSV (the columns of ``_audit_line``) or CEF lines;
        BadRequest for another format."""
        if fmt not in ("csv", "cef"):
            raise BadRequest(f"format must be csv or cef, not {fmt!r}")
        rows: list = []
        before = 2 ** 62
        with self.store.read() as db:  # pages of a thousand: one snapshot, bounded memory
            while len(rows) < AUDIT_EXPORT_MAX_EVENTS:
                page = self.store.list_audit(db, before, start, end, event, user,
                                             min(1000, AUDIT_EXPORT_MAX_EVENTS - len(rows)))
                rows += page
                if len(page) < 1000:
                    break
                before = page[-1]["id"]
        lines = [_audit_line(r) for r in rows]
        if fmt == "cef":
            body = "".join(_cef_line(line) + "\n" for line in lines)
            return body.encode(), "text/plain; charset=utf-8"
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(_audit_line(_AUDIT_COLUMNS)),
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: _csv_cell(v) for k, v in line.items()} for line in lines)
        return out.getvalue().encode(), "text/csv; charset=utf-8"


def _audit_json_line(row: dict) -> str:
    """One audit event as a pure-ASCII JSON line (the --audit-log file, the `audit`
    command): \\u-escapes for C0, DEL and all non-ASCII, C1 controls included, so a
    name a member chose cannot drive a terminal or a log viewer."""
    return json.dumps(_audit_line(row), ensure_ascii=True).replace("\x7f", "\\u007f") + "\n"


def _audit_line(row: dict) -> dict:
    """The JSON-lines form of an audit row (the `audit` command and --audit-log)."""
    return {"time": _rfc3339(row["time"]), "timestamp": row["time"], "actor": row["actor"],
            "tokenId": row["token_id"], "tokenName": row["token_name"],
            "sourceIP": row["source_ip"], "userAgent": row["user_agent"],
            "event": row["event"], "target": row["target"], "outcome": row["outcome"],
            "description": row["description"]}


#: A row with every column of the audit table, for the header of a CSV export.
_AUDIT_COLUMNS = {"time": 0, "actor": "", "token_id": "", "token_name": "", "source_ip": "",
                  "user_agent": "", "event": "", "target": "", "outcome": "",
                  "description": ""}


def _csv_cell(value: Any) -> Any:
    """A CSV value that a spreadsheet shows as text, never runs as a formula (OWASP's
    advice for CSV injection: a leading = + - @ tab or CR gets a quote)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _cef_escape(value: Any, header: bool) -> str:
    """``value`` escaped for a CEF header field (| and \\) or extension value (= and \\)."""
    text = str(value).replace("\\", "\\\\")
    text = text.replace("|", "\\|") if header else text.replace("=", "\\=")
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _cef_line(line: dict) -> str:
    """One audit event (an ``_audit_line``) as an ArcSight CEF line for a SIEM."""
    severity = 3 if line["outcome"] == "success" else 7
    head = "|".join(_cef_escape(v, True) for v in (
        "CEF:0", "Pulumi", "pulumi-backend", __version__, line["event"],
        line["description"] or f"{line['event']} {line['target']}".strip(), severity))
    ext = {"rt": line["timestamp"] * 1000, "suser": line["actor"], "src": line["sourceIP"],
           "outcome": line["outcome"], "requestClientApplication": line["userAgent"]}
    for i, label in enumerate(("target", "tokenName", "tokenId"), 1):
        if line[label]:
            ext[f"cs{i}Label"], ext[f"cs{i}"] = label, line[label]
    return head + "|" + " ".join(f"{k}={_cef_escape(v, False)}" for k, v in ext.items()
                                 if v != "")


def _audit_api(row: dict) -> dict:
    """An audit row as Pulumi Cloud's AuditLogEvent (plus userAgent, target, outcome)."""
    return {"timestamp": row["time"], "sourceIP": row["source_ip"], "event": row["event"],
            "description": row["description"] or f"{row['event']} {row['target']}".strip(),
            "user": {"name": row["actor"], "githubLogin": row["actor"], "avatarUrl": ""},
            "actorName": row["actor"], "tokenID": row["token_id"],
            "tokenName": row["token_name"], "authFailure": row["outcome"] == "failure",
            "userAgent": row["user_agent"], "target": row["target"], "outcome": row["outcome"]}


class Identity:
    """Users, teams, tokens and grants: authentication, permissions, administration.

    Used by the API handlers and by the administration commands alike; every
    change is audited with its actor.
    """

    def __init__(self, cfg: Config, store: Store, audit: AuditLog):
        self.cfg, self.store, self.audit = cfg, store, audit
        self._static = [t.encode() for t in cfg.auth_tokens]
        self._static_hashes = [_token_hash(t).encode() for t in cfg.auth_tokens]
        self.default = _PERM_BY_NAME[cfg.default_stack_permission]
        self._touched: dict = {}  # token id -> monotonic time lastUsed was last written
        self._touch_lock = threading.Lock()
        self._failures = _FailureWindows()  # refused credentials per address (throttling)
        self._no_identity_logged = -math.inf

    # -- authentication -----------------------------------------------------

    def admin_principal(self, token_name: str = "", kind: str = "admin") -> Principal:
        return Principal(self.cfg.user, kind, True, name=self.cfg.user, token_name=token_name)

    def authenticate(self, token: str, address: str = "") -> Principal:
        """Return who ``token`` acts as; raise _AuthFailure (401) if it is not valid now.

        A client ``address`` with --auth-failure-limit refused credentials in the
        current minute gets TooManyRequests (429) instead, before its token is
        looked at: short tokens cannot be guessed at network speed.
        """
        self.check_throttle(address)
        try:
            return self._authenticate(token)
        except _AuthFailure:
            self.note_failure(address)
            raise

    def check_throttle(self, address: str) -> None:
        """Raise TooManyRequests while ``address`` has failed too often this minute."""
        limit = self.cfg.auth_failure_limit
        if limit and address:
            failures, left = self._failures.current(address)
            if failures >= limit:
                raise TooManyRequests(f"{failures} failed sign-ins from your address within "
                                      f"{AUTH_FAILURE_WINDOW:g}s: retry in {left}s", left)

    def note_failure(self, address: str) -> None:
        """Count one refused credential of ``address`` (for check_throttle)."""
        if self.cfg.auth_failure_limit and address:
            self._failures.add(address)

    def _authenticate(self, token: str) -> Principal:
        raw, match = token.encode("utf-8", "surrogateescape"), False
        for known in self._static:  # compare with every token: no early exit
            match |= hmac.compare_digest(known, raw)
        if match:
            return self.admin_principal("auth-token")
        return self.authenticate_hash(_token_hash(token))

    def authenticate_hash(self, digest: str) -> Principal:
        """Like ``authenticate``, from the token's SHA-256 (what a console session keeps)."""
        static = False
        for known in self._static_hashes:  # no early exit, as in authenticate
            static |= hmac.compare_digest(known, digest.encode())
        if static:
            return self.admin_principal("auth-token")
        with self.store.read() as db:
            row = self.store.token_by_hash(db, digest)
            if row is None:
                if not self._static and not self.store.identity_in_use(db):
                    if self.store.get_meta(db, _IDENTITIES_META) is None:
                        return self.admin_principal(kind="anonymous")
                    self._log_no_identity()
                    raise _AuthFailure("no user or stored token is left", _MSG_NO_IDENTITY)
                raise _AuthFailure("unknown or revoked token")
            if row["expires"] and row["expires"] <= _now():
                raise _AuthFailure(f"token {row['id']} expired")
            principal = self._principal_of(db, row)
        self._touch(row["id"])
        return principal

    def _log_no_identity(self) -> None:
        if time.monotonic() - self._no_identity_logged > 60:  # once a minute, not per request
            self._no_identity_logged = time.monotonic()
            log.error("refusing every token: %s", _MSG_NO_IDENTITY)

    def check_at_start(self) -> None:
        """At server start: remember that identities exist (a database from before
        _IDENTITIES_META), warn about users holding a reserved login, and say how to
        get back in when every identity is gone."""
        with self.store.read() as db:
            in_use = self.store.identity_in_use(db)
            existed = self.store.get_meta(db, _IDENTITIES_META) is not None
            clashes = [u for u in self.reserved_logins() if self.store.get_user(db, u)]
        if in_use and not existed:
            with self.store.write() as db:
                self.store.set_meta(db, _IDENTITIES_META, b"1")
        for login in clashes:
            log.warning("user %s has a reserved login (--user, the name --auth-token callers "
                        "act as, or the command line's): history and the audit log cannot tell "
                        "them apart; add them again under another login and remove this one",
                        login)
        if existed and not in_use and not self._static:
            log.error("refusing every token: %s", _MSG_NO_IDENTITY)

    def reserved_logins(self) -> tuple:
        """Logins no user may have: the names other callers act under."""
        return (self.cfg.user, _LOCAL_ADMIN.login, _ANONYMOUS.login)

    def accepts_any_token(self) -> bool:
        """Return whether any token is taken as the admin now: no --auth-token, no
        users or stored tokens, and none ever existed (see authenticate_hash)."""
        if self._static:
            return False
        with self.store.read() as db:
            return not self.store.identity_in_use(db) and \
                self.store.get_meta(db, _IDENTITIES_META) is None

    def _principal_of(self, db, row: dict) -> Principal:
        ids = {"token_id": row["id"], "token_name": row["name"], "expires": row["expires"]}
        if row["kind"] == "personal":
            user = self.store.get_user(db, row["owner"])
            if user is None:
                raise _AuthFailure(f"token {row['id']}: user {row['owner']} was removed")
            return Principal(user["login"], "user", user["role"] == "admin", user["name"],
                             user["email"], tuple(self.store.user_teams(db, user["login"])),
                             **ids)
        if row["kind"] == "team":
            if self.store.get_team(db, row["owner"]) is None:
                raise _AuthFailure(f"token {row['id']}: team {row['owner']} was removed")
            return Principal(row["owner"], "team", False, row["owner"], teams=(row["owner"],),
                             **ids)
        return Principal(self.cfg.org, "org", bool(row["admin"]), self.cfg.org, **ids)

    def _touch(self, token_id: str) -> None:
        """Record the token's use, at most every TOKEN_TOUCH_SECONDS (each write is an fsync)."""
        with self._touch_lock:
            now = time.monotonic()
            if now - self._touched.get(token_id, -math.inf) < TOKEN_TOUCH_SECONDS:
                return
            self._touched[token_id] = now
        try:
            with self.store.write() as db:
                self.store.touch_token(db, token_id, _now())
        except sqlite3.Error as e:  # bookkeeping only: never fail the request for it
            log.warning("cannot record a token's last use: %s", e)

    # -- permissions --------------------------------------------------------

    def grants_of(self, p: Principal) -> list:
        with self.store.read() as db:
            return self.store.grants(db, p.teams)

    def stack_permission(self, p: Principal, project: str, stack: str,
                         grants: Optional[list] = None) -> int:
        """Return the highest permission ``p`` holds on ``project/stack``."""
        if p.admin:
            return PERM_ADMIN
        best = self.default if p.kind in ("user", "org") else PERM_NONE
        target = f"{project}/{stack}"
        for _, pattern, perm in self.grants_of(p) if grants is None else grants:
            if perm > best and fnmatch.fnmatchcase(target, pattern):
                best = perm
        return best

    def visible(self, p: Principal) -> Callable:
        """Return ``f(project, stack)``: may ``p`` read that stack (one grants query)."""
        if p.admin:
            return lambda project, stack: True
        grants = self.grants_of(p)
        return lambda project, stack: self.stack_permission(p, project, stack,
                                                            grants) >= PERM_READ

    def require(self, p: Principal, need: int, project: str, stack: str) -> None:
        """Raise Forbidden naming the missing permission unless ``p`` has ``need``;
        BadRequest for names that are not stack names (a glob must never meet a grant)."""
        _check_stack_names(project, stack)
        have = self.stack_permission(p, project, stack)
        if have < need:
            raise Forbidden(f"this needs the '{_PERM_NAMES[need]}' permission on stack "
                            f"{project}/{stack}; {p.actor} has '{_PERM_NAMES[have]}'")

    def may_write_somewhere(self, p: Principal) -> bool:
        return (p.admin or self.default >= PERM_WRITE
                or any(perm >= PERM_WRITE for _, _, perm in self.grants_of(p)))

    # -- administration (API and command line) -------------------------------

    def _check_login(self, login: Any, what: str = "login") -> str:
        if not isinstance(login, str) or not _LOGIN_RE.match(login):
            raise BadRequest(f"invalid {what} {login!r}: letters, digits, '.', '_' and '-'")
        return login

    def _user(self, db, login: str) -> dict:
        user = self.store.get_user(db, login)
        if user is None and login == self.cfg.user:
            raise BadRequest(f"'{login}' is the admin of the server's --auth-token tokens, "
                             "set by its configuration: not a stored user to change")
        if user is None:
            raise NotFound(f"user '{login}' not found")
        return user

    def _team(self, db, name: str) -> dict:
        team = self.store.get_team(db, name)
        if team is None:
            raise NotFound(f"team '{name}' not found")
        return team

    def add_user(self, actor: Principal, login: str, name: str = "", email: str = "",
                 role: str = "member", req: Any = None) -> dict:
        self._check_login(login)
        if login in self.reserved_logins():
            raise BadRequest(f"the login {login!r} is reserved: --auth-token callers or the "
                             "command line act under it; choose another")
        if role not in ("admin", "member"):
            raise BadRequest(f"role must be admin or member, not {role!r}")
        user = {"login": login, "name": name or login, "email": email or "", "role": role,
                "created": _now()}
        with self.store.write() as db:
            if self.store.get_user(db, login) is not None:
                raise Conflict(f"user '{login}' already exists")
            self.store.insert_user(db, user)
            self.store.set_meta(db, _IDENTITIES_META, b"1")
        self.audit.record("member_added", actor, req, login, description=f"role {role}")
        return user

    def set_role(self, actor: Principal, login: str, role: str, req: Any = None) -> None:
        if role not in ("admin", "member"):
            raise BadRequest(f"role must be admin or member, not {role!r}")
        with self.store.write() as db:
            self._user(db, login)
            self.store.set_user_role(db, login, role)
        self.audit.record("member_role_changed", actor, req, login, description=f"role {role}")

    def remove_user(self, actor: Principal, login: str, req: Any = None) -> None:
        with self.store.write() as db:
            self._user(db, login)
            self.store.delete_user(db, login)  # and their personal tokens
            self.store.set_meta(db, _SSO_SUBJECT_META + login, b"")  # unlinked: a new person
        self.audit.record("member_removed", actor, req, login)

    def create_team(self, actor: Principal, name: str, display_name: str = "",
                    description: str = "", req: Any = None) -> dict:
        self._check_login(name, "team name")
        team = {"name": name, "display_name": display_name or name,
                "description": description or "", "created": _now()}
        with self.store.write() as db:
            if self.store.get_team(db, name) is not None:
                raise Conflict(f"team '{name}' already exists")
            self.store.insert_team(db, team)
        self.audit.record("team_created", actor, req, name)
        return team

    def delete_team(self, actor: Principal, name: str, req: Any = None) -> None:
        with self.store.write() as db:
            self._team(db, name)
            self.store.delete_team(db, name)  # its members, grants and tokens go with it
        self.audit.record("team_deleted", actor, req, name)

    def set_team_info(self, actor: Principal, name: str, display_name: Optional[str],
                      description: Optional[str], req: Any = None) -> None:
        with self.store.write() as db:
            team = self._team(db, name)
            self.store.update_team(db, name, team["display_name"] if display_name is None
                                   else display_name,
                                   team["description"] if description is None else description)
        self.audit.record("team_modified", actor, req, name)

    def add_member(self, actor: Principal, team: str, login: str, req: Any = None) -> None:
        self._check_login(login)
        with self.store.write() as db:
            self._team(db, team)
            self._user(db, login)
            self.store.add_member(db, team, login)
        self.audit.record("team_member_added", actor, req, f"{team}/{login}")

    def remove_member(self, actor: Principal, team: str, login: str, req: Any = None) -> None:
        self._check_login(login)
        with self.store.write() as db:
            self._team(db, team)
            if not self.store.remove_member(db, team, login):
                raise NotFound(f"user '{login}' is not a member of team '{team}'")
        self.audit.record("team_member_removed", actor, req, f"{team}/{login}")

    def grant(self, actor: Principal, team: str, pattern: str, permission: int,
              req: Any = None) -> str:
        """Grant ``permission`` (0 removes) on ``pattern`` to ``team``; return the pattern."""
        pattern = _normalize_pattern(pattern)
        with self.store.write() as db:
            self._team(db, team)
            self.store.set_grant(db, team, pattern, permission)
        self.audit.record("stack_permission_changed", actor, req, f"{team} {pattern}",
                          description=f"team {team}: {_PERM_NAMES[permission]} on {pattern}")
        return pattern

    def grant_stack(self, actor: Principal, team: str, project: str, stack: str,
                    permission: int, req: Any = None) -> str:
        """Grant ``permission`` on the one stack ``project/stack``: names, never patterns
        (stack names hold no glob character, so the stored grant matches only it)."""
        _check_stack_names(project, stack)
        return self.grant(actor, team, f"{project}/{stack}", permission, req)

    def team_json(self, name: str, full: bool = True) -> dict:
        """A team in Pulumi Cloud's shape (members and stacks when ``full``)."""
        with self.store.read() as db:
            team = self._team(db, name)
            members = self.store.team_members(db, name) if full else []
            grants = self.store.grants(db, [name]) if full else []
        out = {"kind": "pulumi", "name": team["name"], "displayName": team["display_name"],
               "description": team["description"]}
        if full:
            out["members"] = [dict(_user_info(u), role="member") for u in members]
            out["stacks"] = [{"projectName": pattern.split("/", 1)[0],
                              "stackName": pattern.split("/", 1)[1], "permission": perm}
                             for _, pattern, perm in grants]
        return out

    def create_token(self, actor: Principal, kind: str, owner: str, name: str = "",
                     description: str = "", expires: int = 0, admin: bool = False,
                     req: Any = None, event: str = "token_created") -> tuple:
        """Store a new token; return ``(id, value)``. The value is never stored or shown again."""
        if not isinstance(description, str) or not isinstance(name, str):
            raise BadRequest("name and description must be strings")
        if not isinstance(expires, int) or isinstance(expires, bool) or expires < 0:
            raise BadRequest("expires must be a Unix time (0: never)")
        if expires and not _now() < expires <= _now() + MAX_TOKEN_SECONDS:
            raise BadRequest("expires must be in the future, within "
                             f"{MAX_TOKEN_SECONDS // 86400} days")
        capped = bool(actor.expires) and not 0 < expires <= actor.expires
        if capped:  # a token made with a token never outlives it (an OIDC hour stays one)
            expires = actor.expires
        value, token_id = _new_token(), _new_id()
        with self.store.write() as db:
            if kind == "personal":
                self._user(db, owner)
            elif kind == "team":
                self._team(db, owner)
            self.store.insert_token(db, {
                "id": token_id, "hash": _token_hash(value), "kind": kind, "owner": owner,
                "name": name[:200] or description[:200], "description": description[:1000],
                "admin": int(bool(admin)), "created_by": actor.actor, "created": _now(),
                "expires": expires})
            self.store.set_meta(db, _IDENTITIES_META, b"1")
        self.audit.record(event, actor, req, f"{kind}:{owner}",
                          description=f"token {token_id}" + (
                              f" expires {_rfc3339(expires)}" if expires else "") + (
                              " (the creating token's expiry)" if capped else ""))
        return token_id, value

    def revoke_token(self, actor: Principal, token_id: str, kind: Optional[str] = None,
                     owner: Optional[str] = None, req: Any = None) -> None:
        """Delete a token (of that kind and owner, when given); NotFound if there is none."""
        with self.store.write() as db:
            row = self.store.get_token(db, token_id)
            if row is None or (kind and row["kind"] != kind) or (owner and row["owner"] != owner):
                raise NotFound(f"token '{token_id}' not found")
            self.store.delete_token(db, token_id)
        self.audit.record("token_revoked", actor, req, f"{row['kind']}:{row['owner']}",
                          description=f"token {token_id}")

    def members_json(self) -> list:
        """Every member; first the admin that --auth-token tokens (or, with no identity
        yet, any token) act as, cfg.user, unless a stored user has that login."""
        with self.store.read() as db:
            users = self.store.list_users(db)
            configured = bool(self._static) or not self.store.identity_in_use(db)
        if configured and not any(u["login"] == self.cfg.user for u in users):
            users.insert(0, {"login": self.cfg.user, "name": self.cfg.user, "email": "",
                             "role": "admin", "created": None})
        return [_member_json(u) for u in users]

    def roles_json(self, purpose: Optional[str] = None) -> list:
        """The built-in roles (Pulumi Cloud's role shape), of one UX purpose if given."""
        return [_role_json(self.cfg.org, r) for r in _BUILTIN_ROLES
                if purpose in (None, "", "role")]

    def role_json(self, role_id: str) -> dict:
        """One built-in role; NotFound for any other id."""
        for role in _BUILTIN_ROLES:
            if role[0] == role_id:
                return _role_json(self.cfg.org, role)
        raise NotFound(f"role '{role_id}' not found: this server has only the built-in "
                       f"roles {', '.join(r[0] for r in _BUILTIN_ROLES)}")

    def member_role(self, body: dict) -> str:
        """The org role an UpdateOrganizationMember body asks for (``role``, or a built-in
        ``fgaRoleId``); BadRequest for custom roles and stack roles."""
        role, fga = body.get("role"), body.get("fgaRoleId")
        if fga is not None:
            if role is not None:
                raise BadRequest("give role or fgaRoleId, not both")
            if fga in ("member", "admin"):
                return fga
            if any(fga == r[0] for r in _BUILTIN_ROLES):
                raise BadRequest(f"'{fga}' is a stack role: it is granted to a team, per "
                                 "stack, not to a member of the organization")
            raise BadRequest(_MSG_NO_CUSTOM_ROLES)
        return role

    def teams_json(self) -> list:
        with self.store.read() as db:
            names = [t["name"] for t in self.store.list_teams(db)]
        return [self.team_json(n, full=False) for n in names]

    def tokens_json(self, kind: Optional[str] = None, owner: Optional[str] = None) -> dict:
        with self.store.read() as db:
            rows = self.store.list_tokens(db, kind, owner)
        return {"tokens": [_token_json(r) for r in rows]}

    def user_detail(self, login: str) -> dict:
        """A stored user's row with ``teams`` (names) and ``tokens`` (their personal
        tokens, as tokens_owned gives them); NotFound for anyone else."""
        with self.store.read() as db:
            user = dict(self._user(db, login))
            user["teams"] = self.store.user_teams(db, login)
        user["tokens"] = self.tokens_owned("personal", login)
        return user

    def tokens_owned(self, kind: Optional[str] = None, owner: Optional[str] = None) -> list:
        """Tokens (never values or hashes) as _token_json with their ``kind`` and ``owner``,
        for the console's administration pages."""
        with self.store.read() as db:
            rows = self.store.list_tokens(db, kind, owner)
        return [dict(_token_json(r), kind=r["kind"], owner=r["owner"]) for r in rows]


def _user_info(user: dict) -> dict:
    return {"name": user["name"] or user["login"], "githubLogin": user["login"],
            "avatarUrl": "", "email": user["email"]}


def _member_json(user: dict) -> dict:
    """A user as Pulumi Cloud's OrganizationMember; ``created`` None: the --auth-token
    admin (cfg.user), an admin by configuration ("virtualAdmin"), not stored."""
    created = _rfc3339(user["created"]) if user["created"] is not None else ""
    return {"role": user["role"], "user": _user_info(user), "created": created,
            "knownToPulumi": True, "virtualAdmin": user["created"] is None,
            "fgaRole": {"id": user["role"], "name": user["role"].title(),
                        "modifiedAt": created}}


#: Built-in roles as ``(id, name, resource type, description)``. Organization roles
#: are what a member is; stack roles are the stack permissions teams are granted.
_BUILTIN_ROLES = (
    ("member", "Member", "organization",
     "Uses the stacks their teams are granted (and --default-stack-permission)"),
    ("admin", "Admin", "organization",
     "Administers the organization: members, teams, tokens, audit log, every stack"),
    ("stack-read", "Stack read", "stack",
     "Granted to a team per stack: reads the stack's state, history and outputs"),
    ("stack-write", "Stack write", "stack",
     "Granted to a team per stack: read, and runs updates, refreshes and previews"),
    ("stack-admin", "Stack admin", "stack",
     "Granted to a team per stack: write, and renames, deletes and sets permissions"),
)

_MSG_NO_CUSTOM_ROLES = (
    "custom roles are not supported by this server: a member is an organization member "
    "or admin (`pulumi org member edit LOGIN --role admin`), and stack access is granted "
    "to teams, per stack or project/stack pattern (`pulumi_backend.py team grant TEAM "
    "'project/*' write`, or the team's stack permissions in the API)")


def _role_json(org: str, role: tuple) -> dict:
    """A built-in role as Pulumi Cloud's role (PermissionDescriptorRecord)."""
    role_id, name, resource_type, description = role
    return {"id": role_id, "orgId": org, "name": name, "description": description,
            "resourceType": resource_type, "uxPurpose": "role",
            "defaultIdentifier": role_id, "version": 1, "isOrgDefault": role_id == "member",
            "created": "", "modified": ""}


def _token_json(row: dict) -> dict:
    """A stored token as Pulumi Cloud's AccessToken (never its value or hash)."""
    return {"id": row["id"], "name": row["name"], "description": row["description"],
            "createdBy": row["created_by"], "created": _rfc3339(row["created"]),
            "lastUsed": row["last_used"], "expires": row["expires"],
            "admin": bool(row["admin"])}


# -- OIDC token exchange (`pulumi login --oidc-token`) -----------------------
# A CI job's ID token (a JWT signed by its issuer) is exchanged for a short-
# lived token of ours. Signatures: RS256 and ES256, through libcrypto's
# EVP_DigestVerify when it loads, else in pure Python (RSA is one pow(); P-256
# is affine point arithmetic, ~20 ms, and exchanges are rare).

_P256_P = 2 ** 256 - 2 ** 224 + 2 ** 192 + 2 ** 96 - 1
_P256_A = _P256_P - 3
_P256_B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
_P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_P256_G = (0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
           0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5)
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
_OID_RSA = bytes.fromhex("06092a864886f70d010101") + b"\x05\x00"
_OID_EC_P256 = bytes.fromhex("06072a8648ce3d020106082a8648ce3d030107")
_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
_ACCESS_TOKEN_TYPES = {"org": "urn:pulumi:token-type:access_token:organization",
                       "team": "urn:pulumi:token-type:access_token:team",
                       "personal": "urn:pulumi:token-type:access_token:personal"}


class _OIDCRefused(Exception):
    """An exchange refused; ``check`` (for the audit log) says which check failed."""

    def __init__(self, check: str):
        super().__init__(check)
        self.check = check


def _b64url(text: Any) -> bytes:
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64url_int(text: Any) -> int:
    return int.from_bytes(_b64url(text), "big")


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 128:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def _der_int(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _rs256_python(n: int, e: int, data: bytes, sig: bytes) -> bool:
    """RSASSA-PKCS1-v1_5 with SHA-256 (RFC 8017 8.2.2): recompute the encoding, compare."""
    k = (n.bit_length() + 7) // 8
    if len(sig) != k or int.from_bytes(sig, "big") >= n:
        return False
    digest = _SHA256_DIGEST_INFO + hashlib.sha256(data).digest()
    if k < len(digest) + 11:
        return False
    expected = b"\x00\x01" + b"\xff" * (k - 3 - len(digest)) + b"\x00" + digest
    return hmac.compare_digest(pow(int.from_bytes(sig, "big"), e, n).to_bytes(k, "big"),
                               expected)


def _ec_add(p1: Optional[tuple], p2: Optional[tuple]) -> Optional[tuple]:
    """Add points of P-256 in affine coordinates (None is the point at infinity)."""
    if p1 is None:
        return p2
    if p2 is None:
        return p1
    (x1, y1), (x2, y2), p = p1, p2, _P256_P
    if x1 == x2 and (y1 + y2) % p == 0:
        return None
    if p1 == p2:
        lam = (3 * x1 * x1 + _P256_A) * pow(2 * y1, -1, p) % p
    else:
        lam = (y2 - y1) * pow(x2 - x1, -1, p) % p
    x3 = (lam * lam - x1 - x2) % p
    return x3, (lam * (x1 - x3) - y1) % p


def _ec_mul(k: int, point: tuple) -> Optional[tuple]:
    out: Optional[tuple] = None
    for bit in bin(k)[2:]:
        out = _ec_add(out, out)
        if bit == "1":
            out = _ec_add(out, point)
    return out


def _es256_python(x: int, y: int, data: bytes, sig: bytes) -> bool:
    """ECDSA P-256 with SHA-256 over a JWS signature (r || s, 32 bytes each)."""
    p, n = _P256_P, _P256_N
    if len(sig) != 64 or not (0 <= x < p and 0 <= y < p) \
            or (y * y - x ** 3 - _P256_A * x - _P256_B) % p != 0:
        return False
    r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    if not (0 < r < n and 0 < s < n):
        return False
    z, w = int.from_bytes(hashlib.sha256(data).digest(), "big"), pow(s, -1, n)
    point = _ec_add(_ec_mul(z * w % n, _P256_G), _ec_mul(r * w % n, (x, y)))
    return point is not None and point[0] % n == r


class _OpenSSLVerify:
    """Signature checks through libcrypto (OpenSSL 1.1.1 and 3.x): DER key, EVP_DigestVerify."""

    name = "openssl"

    def __init__(self, lib: ctypes.CDLL):
        c_p, c_i, c_cp, c_sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t
        self.lib = lib
        for fn, args, res in (
                ("d2i_PUBKEY", [c_p, ctypes.POINTER(c_cp), ctypes.c_long], c_p),
                ("EVP_PKEY_free", [c_p], None),
                ("EVP_MD_CTX_new", [], c_p),
                ("EVP_MD_CTX_free", [c_p], None),
                ("EVP_sha256", [], c_p),
                ("EVP_DigestVerifyInit", [c_p, c_p, c_p, c_p, c_p], c_i),
                ("EVP_DigestVerify", [c_p, c_cp, c_sz, c_cp, c_sz], c_i),
                ("ERR_clear_error", [], None)):
            f = getattr(lib, fn)
            f.argtypes, f.restype = args, res

    def verify(self, spki: bytes, data: bytes, sig: bytes) -> bool:
        lib = self.lib
        buf = ctypes.c_char_p(spki)
        pkey = lib.d2i_PUBKEY(None, ctypes.byref(buf), len(spki))
        if not pkey:
            lib.ERR_clear_error()
            return False
        ctx = lib.EVP_MD_CTX_new()
        try:
            ok = (ctx and lib.EVP_DigestVerifyInit(ctx, None, lib.EVP_sha256(), None, pkey) == 1
                  and lib.EVP_DigestVerify(ctx, sig, len(sig), data, len(data)) == 1)
            if not ok:
                lib.ERR_clear_error()
            return bool(ok)
        finally:
            lib.EVP_MD_CTX_free(ctx)
            lib.EVP_PKEY_free(pkey)


@functools.lru_cache(maxsize=1)
def _openssl_verifier() -> Optional[_OpenSSLVerify]:
    lib = _load_libcrypto(os.environ.get("PULUMI_BACKEND_LIBCRYPTO", ""))
    try:
        return _OpenSSLVerify(lib) if lib is not None else None
    except AttributeError:  # a libcrypto without EVP_DigestVerify (before 1.1.1)
        return None


def _verify_jws(alg: str, jwk: dict, data: bytes, sig: bytes, use_openssl: bool = True) -> bool:
    """Check a JWS signature (RS256 or ES256) with a JWK; False for any mismatch."""
    try:
        if alg == "RS256" and jwk.get("kty") == "RSA":
            n, e = _b64url_int(jwk.get("n")), _b64url_int(jwk.get("e"))
            spki = _der(0x30, _der(0x30, _OID_RSA) + _der(
                0x03, b"\x00" + _der(0x30, _der_int(n) + _der_int(e))))
            der_sig, python = sig, lambda: _rs256_python(n, e, data, sig)
        elif alg == "ES256" and jwk.get("kty") == "EC" and jwk.get("crv") == "P-256":
            x, y = _b64url_int(jwk.get("x")), _b64url_int(jwk.get("y"))
            if len(sig) != 64 or x.bit_length() > 256 or y.bit_length() > 256:
                return False
            spki = _der(0x30, _der(0x30, _OID_EC_P256) + _der(
                0x03, b"\x00\x04" + x.to_bytes(32, "big") + y.to_bytes(32, "big")))
            der_sig = _der(0x30, _der_int(int.from_bytes(sig[:32], "big"))
                           + _der_int(int.from_bytes(sig[32:], "big")))
            python = lambda: _es256_python(x, y, data, sig)  # noqa: E731
        else:
            return False
    except (ValueError, TypeError):
        return False
    verifier = _openssl_verifier() if use_openssl else None
    return verifier.verify(spki, data, der_sig) if verifier is not None else python()


def _load_issuers(path: str) -> list:
    """Read and check the --oidc-issuers file; raise ValueError naming what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read --oidc-issuers {path}: {e.strerror}") from None
    except ValueError as e:
        raise ValueError(f"--oidc-issuers {path} is not valid JSON: {e}") from None
    items = doc.get("issuers") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise ValueError(f"--oidc-issuers {path}: expected {{\"issuers\": [...]}}")
    return [_check_issuer(item, path, i) for i, item in enumerate(items)]


def _check_issuer(item: Any, path: str, i: int) -> dict:
    where = f"--oidc-issuers {path}, issuer {i + 1}"
    if not isinstance(item, dict) or not isinstance(item.get("issuer"), str) \
            or not isinstance(item.get("audience"), str):
        raise ValueError(f"{where}: needs \"issuer\" and \"audience\" strings")
    jwks, url = item.get("jwks"), item.get("jwksUrl")
    if url is not None and (jwks is not None or "jwksFile" in item
                            or not str(url).startswith("https://")):
        raise ValueError(f"{where}: jwksUrl must be an https:// URL, and the only key source")
    allow_link_local = item.get("allowLinkLocalAddress", False)
    if not isinstance(allow_link_local, bool):
        raise ValueError(f"{where}: allowLinkLocalAddress must be true or false")
    if url is not None and not allow_link_local:
        address = _literal_ip(urllib.parse.urlsplit(str(url)).hostname or "")
        if address is not None and _is_link_local_or_metadata(address):
            raise ValueError(f"{where}: jwksUrl {url} names a link-local or cloud metadata "
                             f"address ({address}); if the issuer really serves its keys "
                             "there, add \"allowLinkLocalAddress\": true")
    if "jwksFile" in item:
        jwks_path = os.path.join(os.path.dirname(os.path.abspath(path)), str(item["jwksFile"]))
        try:
            with open(jwks_path, encoding="utf-8") as f:
                jwks = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{where}: cannot read jwksFile {jwks_path}: {e}") from None
    keys = jwks.get("keys") if isinstance(jwks, dict) else None
    if url is None and (not isinstance(keys, list) or not keys
                        or not all(isinstance(k, dict) for k in keys)):
        raise ValueError(f"{where}: needs \"jwks\", \"jwksFile\" or \"jwksUrl\" with a "
                         "non-empty \"keys\"")
    try:
        max_seconds = _parse_lifetime(str(item.get("maxExpiration", "2h")), "maxExpiration")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    rules = item.get("rules")
    if not isinstance(rules, list) or not rules:
        raise ValueError(f"{where}: needs \"rules\" mapping claims to a team, user or org")
    for rule in rules:
        targets = [k for k in ("team", "user", "org") if rule.get(k)] \
            if isinstance(rule, dict) else []
        if len(targets) != 1 or not isinstance(rule.get("claims"), dict) or not all(
                isinstance(v, str) for v in rule["claims"].values()):
            raise ValueError(f"{where}: each rule needs \"claims\" (name: glob) and one of "
                             "\"team\", \"user\" or \"org\"")
        for glob in rule["claims"].values():
            try:
                _glob_regex(glob)
            except re.error as e:
                raise ValueError(f"{where}: claim glob {glob!r} is not valid: {e}") from None
    return {"issuer": item["issuer"], "audience": item["audience"], "keys": keys,
            "jwks_url": url,  # fetched when a token needs it
            "allow_link_local": allow_link_local,
            "max_seconds": max_seconds or OIDC_DEFAULT_SECONDS, "rules": rules}


#: Cloud metadata services outside the link-local ranges (Alibaba; AWS and GCP over IPv6;
#: Oracle's older one), refused like 169.254.169.254 (see _is_link_local_or_metadata).
_METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "100.100.100.200", "fd00:ec2::254", "fd20:ce::254", "192.0.0.192"))
_NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")


def _literal_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Return the address ``host`` spells (also the old numeric IPv4 forms that
    resolvers take, e.g. ``2852039166``), or None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.ip_address(socket.inet_aton(host))
    except (OSError, ValueError, UnicodeError):
        return None


def _is_link_local_or_metadata(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for 169.254.0.0/16, fe80::/10 and the cloud metadata addresses, also
    when written as an IPv4-mapped or NAT64 IPv6 address."""
    if address.version == 6:
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        elif address in _NAT64_PREFIX:
            address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        else:
            address = ipaddress.IPv6Address(address.compressed.split("%")[0])  # no zone
    return address.is_link_local or address in _METADATA_ADDRESSES


class _JWKSConnection(http.client.HTTPSConnection):
    """HTTPS to a jwksUrl that connects only to an address it has checked.

    The name is resolved once, every address it gives is checked, and the
    socket goes to one of those same addresses (a second lookup could answer
    differently). Behind a proxy the operator configured (``https_proxy``),
    the proxy resolves the issuer and only the literal check at load applies.
    """

    def __init__(self, *args: Any, allow_link_local: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._allow_link_local = allow_link_local
        self._create_connection = self._checked_connection

    def _checked_connection(self, address: tuple, timeout: Any,
                            source_address: Any = None) -> socket.socket:
        if self._tunnel_host:
            return socket.create_connection(address, timeout, source_address)
        host, port = address
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        for *_, sockaddr in found:
            if not self._allow_link_local \
                    and _is_link_local_or_metadata(ipaddress.ip_address(sockaddr[0])):
                raise OSError(f"{host} resolves to {sockaddr[0]}, a link-local or cloud "
                              "metadata address (the issuer has no allowLinkLocalAddress)")
        error: OSError = OSError(f"{host} resolves to no address")
        for family, kind, proto, _, sockaddr in found:
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as e:
                sock.close()
                error = e
        raise error


class _JWKSHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, allow_link_local: bool):
        super().__init__()
        self._allow_link_local = allow_link_local

    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(functools.partial(
            _JWKSConnection, allow_link_local=self._allow_link_local), req, context=self._context)


def _oidc_fetch(url: str, what: str, allow_link_local: bool, data: Optional[bytes] = None,
                headers: Optional[dict] = None) -> Any:
    """Fetch the JSON document at ``url`` (POST ``data`` when given) within
    JWKS_FETCH_SECONDS; raise _OIDCRefused naming ``what`` and the URL.

    https only (system trust store, or SSL_CERT_FILE), plain http to a loopback
    address only (an issuer on the same machine, such as a development one), the
    proxy of the environment if any, no redirect followed (a redirect could go to
    plain http or elsewhere: the URL names the final one), at most MAX_JWKS_BYTES.
    """
    deadline = time.monotonic() + JWKS_FETCH_SECONDS
    opener = urllib.request.OpenerDirector()  # no redirect, file: or http: handler
    handlers: list = [urllib.request.ProxyHandler(), _JWKSHTTPSHandler(allow_link_local),
                      urllib.request.UnknownHandler(), urllib.request.HTTPDefaultErrorHandler(),
                      urllib.request.HTTPErrorProcessor()]
    if _is_loopback_url(url):
        handlers[0] = urllib.request.ProxyHandler({})  # never through a proxy
        handlers.append(urllib.request.HTTPHandler())
    for handler in handlers:
        opener.add_handler(handler)
    request = urllib.request.Request(url, data=data, headers={
        "Accept": "application/json", **(headers or {})})
    status = 200
    try:
        with opener.open(request, timeout=JWKS_FETCH_SECONDS) as resp:
            body = _read_bounded(resp, deadline, f"the {what} at {url}")
    except urllib.request.HTTPError as e:
        try:
            if 300 <= e.code < 400:
                raise _OIDCRefused(
                    f"the {what} at {url} answered {e.code} (redirect to "
                    f"{str(e.headers.get('Location'))[:200]}): redirects are not followed, "
                    "the URL must name the final one") from None
            if data is None or e.code != 400:
                raise _OIDCRefused(f"cannot fetch the {what} at {url}: {e}") from None
            status, body = e.code, _read_bounded(e, deadline, f"the {what} at {url}")
        finally:
            e.close()
    except (OSError, http.client.HTTPException) as e:
        raise _OIDCRefused(f"cannot fetch the {what} at {url}: {e}") from None
    try:
        doc = _loads(body, what)
    except BadRequest as e:
        raise _OIDCRefused(f"the {what} at {url}: {e.message}") from None
    if status != 200:  # a token endpoint's refusal (RFC 6749 5.2): its error code only
        error = doc.get("error") if isinstance(doc, dict) else None
        raise _OIDCRefused(f"the {what} at {url} refused: {str(error)[:100]}")
    return doc


def _read_bounded(resp: Any, deadline: float, what: str) -> bytes:
    """Read an HTTP answer of at most MAX_JWKS_BYTES by ``deadline``; raise _OIDCRefused."""
    data = b""  # read1: a trickle of bytes cannot outlast the deadline by much
    while len(data) <= MAX_JWKS_BYTES and time.monotonic() < deadline:
        chunk = resp.read1(MAX_JWKS_BYTES + 1 - len(data))
        if not chunk:
            return data
        data += chunk
    raise _OIDCRefused(f"{what} is over {MAX_JWKS_BYTES} bytes" if len(data) > MAX_JWKS_BYTES
                       else f"{what} took more than {JWKS_FETCH_SECONDS} s")


def _is_loopback_url(url: str) -> bool:
    """True for an http:// URL whose host is a loopback address or ``localhost``."""
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").rstrip(".")
    address = _literal_ip(host)
    return parts.scheme == "http" and (host == "localhost" or (
        address is not None and address.is_loopback))


def _download_jwks(url: str, allow_link_local: bool) -> list:
    """Fetch the key list at ``url`` (see _oidc_fetch); raise _OIDCRefused."""
    doc = _oidc_fetch(url, "JWKS", allow_link_local)
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
        raise _OIDCRefused(f"the JWKS at {url} has no key list")
    return keys


class _JWKSEntry:
    """What is known of one jwksUrl: the keys last fetched, and the fetch in flight."""

    def __init__(self) -> None:
        self.keys: Optional[list] = None
        self.fetched = -math.inf  # monotonic time of the last successful fetch
        self.started = -math.inf  # monotonic time the last fetch started
        self.error: Optional[str] = None  # why the last fetch failed
        self.done = threading.Event()  # clear while a fetch is in flight
        self.done.set()


# Fetches are driven by unauthenticated requests, so they are rationed: one
# fetch in flight per URL, in a thread of its own that every exchange needing
# it waits for (at most JWKS_FETCH_SECONDS from its start, so a slow issuer
# holds no connection for longer); keys reused JWKS_CACHE_SECONDS; a failure
# remembered JWKS_FAILURE_SECONDS; an unknown kid fetches again at most every
# JWKS_REFETCH_SECONDS. The lock guards the dict and every entry's fields.
_jwks_cache: dict = {}  # (jwksUrl, allow_link_local) -> _JWKSEntry
_jwks_lock = threading.Lock()


def _fetched_keys(url: str, kid: Any = None, allow_link_local: bool = False) -> list:
    """Return the keys at ``url`` for a token signed with key ``kid`` (None: any),
    fetched or reused as rationed above; raise _OIDCRefused when there are none."""
    now = time.monotonic()
    with _jwks_lock:
        entry = _jwks_cache.setdefault((url, allow_link_local), _JWKSEntry())
        fresh = entry.keys is not None and now - entry.fetched < JWKS_CACHE_SECONDS
        if fresh and (kid is None or any(k.get("kid") == kid for k in entry.keys)):
            return entry.keys
        if entry.done.is_set():  # none in flight: reuse what is known, or fetch
            if fresh and now - entry.started < JWKS_REFETCH_SECONDS:
                return entry.keys  # the kid is unknown, and was looked for lately
            if entry.error is not None and now - entry.started < JWKS_FAILURE_SECONDS:
                raise _OIDCRefused(f"{entry.error} (a recent failure, not retried yet)")
            entry.started, entry.done = now, threading.Event()
            threading.Thread(target=_fetch_jwks_into, args=(entry, url, allow_link_local),
                             name="jwks-fetch", daemon=True).start()
        done, started = entry.done, entry.started
    done.wait(max(0.0, started + JWKS_FETCH_SECONDS - time.monotonic()))
    with _jwks_lock:
        if not done.is_set():
            raise _OIDCRefused(f"the JWKS at {url} took more than {JWKS_FETCH_SECONDS} s")
        if entry.error is not None:
            raise _OIDCRefused(entry.error)
        return entry.keys


def _fetch_jwks_into(entry: _JWKSEntry, url: str, allow_link_local: bool) -> None:
    """The body of a fetch thread: fill ``entry``, then wake who waits."""
    keys, error = None, None
    try:
        keys = _download_jwks(url, allow_link_local)
    except _OIDCRefused as e:
        error = e.check
    except Exception:  # a bug: logged, and the exchanges waiting are refused
        log.exception("fetching the JWKS at %s failed", url)
        error = f"cannot fetch the JWKS at {url}: internal error"
    finally:
        with _jwks_lock:
            if error is None:
                entry.keys, entry.fetched = keys, time.monotonic()
            entry.error = error
            entry.done.set()


@functools.lru_cache(maxsize=256)
def _glob_regex(glob: str) -> re.Pattern:
    """Compile an OIDC rule's claim glob: ``*`` any text without ``/``, ``**`` any
    text, ``?`` one character but ``/``, ``[...]``/``[!...]`` one character of a
    class (never ``/``); all else literal. Raise re.error for a bad class."""
    out, i, n = [], 0, len(glob)
    while i < n:
        c = glob[i]
        i += 1
        if c == "*":
            if glob.startswith("*", i):
                while glob.startswith("*", i):
                    i += 1
                out.append(".*")
            else:
                out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i + 1 if glob.startswith("!", i) else i
            j += glob.startswith("]", j)  # a ] first in the class is one of its characters
            j = glob.find("]", j)
            if j < 0:  # no class: a literal [
                out.append(re.escape(c))
                continue
            body, i = glob[i:j], j + 1
            negate = body.startswith("!")
            body = re.sub(r"([\\\[\]&~|^])", r"\\\1", body[negate:])
            out.append(f"(?!/)[{'^' if negate else ''}{body}]")
        else:
            out.append(re.escape(c))
    return re.compile("".join(out), re.DOTALL)


def _claim_matches(value: Any, pattern: str) -> bool:
    """True if a claim ``value`` matches the rule's glob ``pattern`` (see _glob_regex).

    A string matches by its text, an integer by its decimal digits; a list when
    any of its strings does (an empty list never; its other elements are
    ignored); anything else (null, a boolean, a float, an object) never.
    """
    if isinstance(value, list):
        values = [v for v in value if isinstance(v, str)]
    elif isinstance(value, int) and not isinstance(value, bool):
        values = [str(value)]
    else:
        values = [value] if isinstance(value, str) else []
    return any(_glob_regex(pattern).fullmatch(v) is not None for v in values)


def _jwt_json(segment: str) -> Any:
    """Parse a JWT's header or claims segment, bounded (MAX_JWT_DEPTH) before the
    parse and strict (see _loads); raise _OIDCRefused("malformed token ...")."""
    try:
        data = _b64url(segment)
    except ValueError:
        raise _OIDCRefused("malformed token") from None
    if _json_shape(data, -1)[0] > MAX_JWT_DEPTH:  # -1: no shortcut, the depth itself
        raise _OIDCRefused(f"malformed token: nests deeper than {MAX_JWT_DEPTH} levels")
    try:
        return _loads(data, "token")
    except BadRequest as e:
        raise _OIDCRefused(f"malformed token: {e.message[:200]}") from None


def _is_jwt_time(value: Any) -> bool:
    """True for a NumericDate we take: an int or finite float in 0..MAX_JWT_TIME."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and 0 <= value <= MAX_JWT_TIME  # NaN fails every comparison


def _verified_claims(jwt: str, issuers: list, now: int) -> tuple:
    """Return ``(issuer config, claims)`` of a valid JWT; raise _OIDCRefused naming the check."""
    parts = jwt.split(".")
    if len(jwt) > MAX_JWT_BYTES or len(parts) != 3:
        raise _OIDCRefused("malformed token")
    header, claims = _jwt_json(parts[0]), _jwt_json(parts[1])
    try:
        sig = _b64url(parts[2])
    except ValueError:
        raise _OIDCRefused("malformed token") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise _OIDCRefused("malformed token")
    issuer = next((i for i in issuers if i["issuer"] == claims.get("iss")), None)
    if issuer is None:
        raise _OIDCRefused(f"unknown issuer {str(claims.get('iss'))[:200]!r}")
    alg, kid = header.get("alg"), header.get("kid")
    if alg not in ("RS256", "ES256"):
        raise _OIDCRefused(f"unsupported alg {str(alg)[:20]!r}")
    known = (_fetched_keys(issuer["jwks_url"], kid, issuer["allow_link_local"])
             if issuer["jwks_url"] else issuer["keys"])
    keys = [k for k in known if k.get("kid") == kid] if kid is not None else known
    if len(keys) != 1:
        raise _OIDCRefused(f"unknown key id {str(kid)[:100]!r}")
    if not _verify_jws(alg, keys[0], f"{parts[0]}.{parts[1]}".encode(), sig):
        raise _OIDCRefused("bad signature")
    aud = claims.get("aud")
    if issuer["audience"] not in (aud if isinstance(aud, list) else [aud]):
        raise _OIDCRefused(f"wrong audience {str(aud)[:200]!r}")
    exp, nbf, iat = claims.get("exp"), claims.get("nbf", 0), claims.get("iat", 0)
    if not all(_is_jwt_time(v) for v in (exp, nbf, iat)):
        raise _OIDCRefused("exp missing, or exp, nbf or iat not a finite number of seconds "
                           f"in 0..{MAX_JWT_TIME}")
    if now > exp + OIDC_CLOCK_SKEW:
        raise _OIDCRefused("expired (exp)")
    if nbf > now + OIDC_CLOCK_SKEW:
        raise _OIDCRefused("not valid yet (nbf)")
    if iat > now + OIDC_CLOCK_SKEW:
        raise _OIDCRefused("issued in the future (iat)")
    return issuer, claims


def _oidc_exchange(identity: Identity, issuers: list, form: dict, req: Any = None) -> dict:
    """Exchange a verified OIDC ID token (form fields of RFC 8693, as the CLI sends them)
    for a short-lived token of ours; raise _OIDCRefused naming the failed check."""
    field = lambda k: (form.get(k) or [""])[-1]  # noqa: E731
    if field("grant_type") != _TOKEN_EXCHANGE:
        raise _OIDCRefused("grant_type is not token-exchange")
    if field("audience") != f"urn:pulumi:org:{identity.cfg.org}":
        raise _OIDCRefused(f"audience {field('audience')[:100]!r} is not this organization")
    scope = field("scope")
    kind, _, name = scope.partition(":")
    if scope and (kind not in ("team", "user") or not name):
        raise _OIDCRefused(f"unsupported scope {scope[:100]!r}")
    requested = field("expiration")
    if requested and not (requested.isascii() and requested.isdigit() and len(requested) < 10):
        raise _OIDCRefused("expiration is not a number of seconds")
    now = _now()
    issuer, claims = _verified_claims(field("subject_token"), issuers, now)
    rule = next((r for r in issuer["rules"]
                 if all(_claim_matches(claims.get(c), g) for c, g in r["claims"].items())
                 and (not scope or r.get(kind) == name)), None)
    if rule is None:
        raise _OIDCRefused("no rule matches the token's claims" + (
            f" for {scope}" if scope else ""))
    kind, owner = (("team", rule["team"]) if rule.get("team") else
                   ("personal", rule["user"]) if rule.get("user") else ("org", identity.cfg.org))
    seconds = min(int(requested or OIDC_DEFAULT_SECONDS) or OIDC_DEFAULT_SECONDS,
                  issuer["max_seconds"])
    subject = str(claims.get("sub", ""))[:200]
    actor = Principal(f"oidc:{subject}", "user", False, token_name=issuer["issuer"][:200])
    with identity.store.write() as db:  # exchanged tokens that expired are of no use
        identity.store.delete_expired_tokens(db, now, "oidc:")
    try:
        _, value = identity.create_token(
            actor, kind, owner, f"oidc:{subject}", f"OIDC {issuer['issuer']}"[:1000],
            now + seconds, kind == "org" and rule.get("org") == "admin", req, "token_exchange")
    except NotFound as e:
        raise _OIDCRefused(f"the rule's {kind} does not exist: {e.message}") from None
    return {"access_token": value, "issued_token_type": _ACCESS_TOKEN_TYPES[kind],
            "token_type": "Bearer", "expires_in": seconds, "scope": scope}


# -- single sign-on (the console's OIDC authorization code flow) -----------------
#
# Design. --sso-config names one OIDC provider the console's people sign in at
# (authorization code flow with PKCE, RFC 7636 S256). The provider's discovery
# document, its JWKS and its token endpoint are all fetched by _oidc_fetch: https
# (plain http only to a loopback address), no redirect, bounded, within
# JWKS_FETCH_SECONDS. The discovery document is reused JWKS_CACHE_SECONDS and read
# again when an ID token names a key the JWKS does not have (keys rotated), and the
# ID token is checked by _verified_claims like an exchanged one, plus its nonce.
# What a sign-in in flight must remember stays on the server (see section 11:
# Console.sso_start); this class only knows the provider and what a verified
# sign-in does to users and teams: create the user (createUsers), then make their
# memberships of the mapped teams match the groups claim (teams the mapping never
# names are left alone) and their org role match adminGroups, all audited with
# the group that caused each change.

_SSO_USERNAME_CLAIMS = ("preferred_username", "email", "sub")
_SSO_KEYS = frozenset({"issuer", "clientId", "clientSecretFile", "scopes", "usernameClaim",
                       "groupsClaim", "allowedEmailDomains", "createUsers", "sessionLifetime",
                       "teams", "adminGroups", "displayName", "tokenSignIn",
                       "allowLinkLocalAddress"})


def _load_sso(path: str) -> dict:
    """Read and check the --sso-config file; raise ValueError naming the file and key."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read --sso-config {path}: {e.strerror}") from None
    except ValueError as e:
        raise ValueError(f"--sso-config {path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"--sso-config {path}: expected a JSON object")

    def bad(key: str, what: str) -> ValueError:
        return ValueError(f"--sso-config {path}: \"{key}\" {what}")

    unknown = sorted(set(doc) - _SSO_KEYS)
    if unknown:
        raise bad(unknown[0], "is not a key of this file (known: "
                  + ", ".join(sorted(_SSO_KEYS)) + ")")
    issuer = doc.get("issuer")
    if not isinstance(issuer, str) or not (issuer.startswith("https://")
                                           or _is_loopback_url(issuer)):
        raise bad("issuer", "must be an https:// URL (http:// only on a loopback address)")
    allow_link_local = doc.get("allowLinkLocalAddress", False)
    if not isinstance(allow_link_local, bool):
        raise bad("allowLinkLocalAddress", "must be true or false")
    address = _literal_ip(urllib.parse.urlsplit(issuer).hostname or "")
    if not allow_link_local and address is not None and _is_link_local_or_metadata(address):
        raise bad("issuer", "names a link-local or cloud metadata address")
    for key in ("clientId", "clientSecretFile"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise bad(key, "must be a non-empty string")
    secret_path = os.path.join(os.path.dirname(os.path.abspath(path)), doc["clientSecretFile"])
    try:
        with open(secret_path, encoding="utf-8") as f:
            secret = f.read(4096).strip()
    except OSError as e:
        raise bad("clientSecretFile", f"cannot be read ({secret_path}: {e.strerror})") \
            from None
    if not secret:
        raise bad("clientSecretFile", f"names an empty file ({secret_path})")
    scopes = doc.get("scopes", "openid profile email")
    if isinstance(scopes, list) and all(isinstance(s, str) for s in scopes):
        scopes = " ".join(scopes)
    if not isinstance(scopes, str) or "openid" not in scopes.split():
        raise bad("scopes", "must be a string (or list) of scopes that has \"openid\"")
    username = doc.get("usernameClaim", "preferred_username")
    if username not in _SSO_USERNAME_CLAIMS:
        raise bad("usernameClaim", "must be one of " + ", ".join(_SSO_USERNAME_CLAIMS))
    groups = doc.get("groupsClaim", "groups")
    if not isinstance(groups, str) or not groups:
        raise bad("groupsClaim", "must be a claim name")
    domains = doc.get("allowedEmailDomains", [])
    if not isinstance(domains, list) or not all(isinstance(d, str) and d for d in domains):
        raise bad("allowedEmailDomains", "must be a list of domain names")
    for key, default in (("createUsers", True), ("tokenSignIn", True)):
        if not isinstance(doc.get(key, default), bool):
            raise bad(key, "must be true or false")
    try:
        lifetime = _parse_lifetime(str(doc.get("sessionLifetime", "12h")), "sessionLifetime")
    except ValueError as e:
        raise bad("sessionLifetime", f"is not a lifetime such as 8h: {e}") from None
    teams = doc.get("teams", [])
    if not isinstance(teams, list) or not all(
            isinstance(t, dict) and set(t) == {"group", "team"}
            and isinstance(t["group"], str) and isinstance(t["team"], str) for t in teams):
        raise bad("teams", "must be a list of {\"group\": GLOB, \"team\": NAME}")
    admin_groups = doc.get("adminGroups", [])
    if not isinstance(admin_groups, list) or not all(isinstance(g, str) for g in admin_groups):
        raise bad("adminGroups", "must be a list of group globs")
    for key, glob in [("teams", t["group"]) for t in teams] + [("adminGroups", g)
                                                               for g in admin_groups]:
        try:
            _glob_regex(glob)
        except re.error as e:
            raise bad(key, f"has a glob {glob!r} that is not valid: {e}") from None
    for t in teams:
        if not _LOGIN_RE.match(t["team"]):
            raise bad("teams", f"names a team {t['team']!r} that is not a valid team name")
    name = doc.get("displayName", "single sign-on")
    if not isinstance(name, str) or not name or len(name) > 100:
        raise bad("displayName", "must be a name of 1 to 100 characters")
    return {"issuer": issuer, "client_id": doc["clientId"], "secret": secret,
            "scopes": scopes, "username_claim": username, "groups_claim": groups,
            "domains": [d.lower().lstrip("@") for d in domains],
            "create_users": doc.get("createUsers", True), "lifetime": lifetime or 12 * 3600,
            "teams": teams, "admin_groups": admin_groups, "display_name": name,
            "token_sign_in": doc.get("tokenSignIn", True),
            "allow_link_local": allow_link_local}


class SingleSignOn:
    """One OIDC provider of --sso-config: its endpoints, ID tokens, and what a
    verified sign-in changes (users, team memberships, org role)."""

    def __init__(self, conf: dict, identity: Identity):
        self.conf, self.identity, self.store = conf, identity, identity.store
        self._lock = threading.Lock()
        self._discovery: Optional[dict] = None
        self._discovered = -math.inf

    def discovery(self, again: bool = False) -> dict:
        """The provider's discovery document (reused JWKS_CACHE_SECONDS; ``again``:
        read it now, at most every JWKS_REFETCH_SECONDS); raise _OIDCRefused."""
        with self._lock:
            age = time.monotonic() - self._discovered
            if self._discovery is not None and (
                    age < JWKS_REFETCH_SECONDS or (not again and age < JWKS_CACHE_SECONDS)):
                return self._discovery
        issuer = self.conf["issuer"]
        doc = _oidc_fetch(issuer.rstrip("/") + "/.well-known/openid-configuration",
                          "discovery document", self.conf["allow_link_local"])
        # Exactly the configured issuer (OpenID Connect Discovery 4.3), as the ID
        # token's iss must be: a trailing "/" is part of it.
        if not isinstance(doc, dict) or doc.get("issuer") != issuer:
            raise _OIDCRefused(f"the discovery document of {issuer} names another issuer")
        for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            url = doc.get(key)
            if not isinstance(url, str) or not (url.startswith("https://")
                                                or _is_loopback_url(url)):
                raise _OIDCRefused(f"the discovery document of {issuer} has no https {key}")
        with self._lock:
            self._discovery, self._discovered = doc, time.monotonic()
        return doc

    def authorization_url(self, redirect_uri: str, state: str, nonce: str,
                          verifier: str) -> str:
        """Where to send the browser: the provider's authorization endpoint."""
        challenge = base64.urlsafe_b64encode(
            hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        query = urllib.parse.urlencode({
            "response_type": "code", "client_id": self.conf["client_id"],
            "redirect_uri": redirect_uri, "scope": self.conf["scopes"], "state": state,
            "nonce": nonce, "code_challenge": challenge, "code_challenge_method": "S256"})
        endpoint = self.discovery()["authorization_endpoint"]
        return endpoint + ("&" if "?" in endpoint else "?") + query

    def exchange(self, code: str, redirect_uri: str, verifier: str) -> str:
        """Trade the authorization code for the ID token; raise _OIDCRefused."""
        doc = self.discovery()
        form = {"grant_type": "authorization_code", "code": code,
                "redirect_uri": redirect_uri, "code_verifier": verifier}
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        methods = doc.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        if "client_secret_basic" in methods or "client_secret_post" not in methods:
            pair = f"{_q_form(self.conf['client_id'])}:{_q_form(self.conf['secret'])}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form.update(client_id=self.conf["client_id"], client_secret=self.conf["secret"])
        answer = _oidc_fetch(doc["token_endpoint"], "token endpoint",
                             self.conf["allow_link_local"],
                             urllib.parse.urlencode(form).encode(), headers)
        token = answer.get("id_token") if isinstance(answer, dict) else None
        if not isinstance(token, str):
            raise _OIDCRefused("the token endpoint answered no id_token")
        return token

    def verified_claims(self, id_token: str, nonce: str) -> dict:
        """The claims of a valid ID token for us with this ``nonce``; raise _OIDCRefused."""
        for again in (False, True):
            issuer = {"issuer": self.conf["issuer"], "audience": self.conf["client_id"],
                      "keys": [], "allow_link_local": self.conf["allow_link_local"],
                      "jwks_url": self.discovery(again)["jwks_uri"]}
            try:
                claims = _verified_claims(id_token, [issuer], _now())[1]
                break
            except _OIDCRefused as e:
                if again or not e.check.startswith("unknown key id"):
                    raise  # an unknown key: the provider may have moved its JWKS
        aud = claims.get("aud")
        if isinstance(aud, list) and len(aud) > 1 and claims.get("azp") != self.conf["client_id"]:
            raise _OIDCRefused("azp is not our client id")
        if not hmac.compare_digest(str(claims.get("nonce", "")).encode(), nonce.encode()):
            raise _OIDCRefused("wrong nonce")
        return claims

    def login_of(self, claims: dict) -> tuple:
        """``(login, email)`` the claims name, checked against allowedEmailDomains;
        raise _OIDCRefused."""
        email = claims.get("email") if isinstance(claims.get("email"), str) else ""
        domains = self.conf["domains"]
        if domains:
            domain = email.rpartition("@")[2].lower()
            if not email:
                raise _OIDCRefused("no email claim (allowedEmailDomains is set)")
            if claims.get("email_verified") is False:
                raise _OIDCRefused("the email is not verified (email_verified is false)")
            if domain not in domains:
                raise _OIDCRefused(f"email domain {domain[:100]!r} is not allowed")
        value = claims.get(self.conf["username_claim"])
        if not isinstance(value, str) or not value:
            raise _OIDCRefused(f"no {self.conf['username_claim']} claim")
        login = re.sub(r"[^A-Za-z0-9._-]", "-", value)[:100]
        if not _LOGIN_RE.match(login) or login in self.identity.reserved_logins():
            raise _OIDCRefused(f"{self.conf['username_claim']} {value[:100]!r} is no login here")
        return login, email

    def _check_link(self, db, login: str, user: Optional[dict], account: bytes, email: str,
                    claims: dict, events: list) -> None:
        """Refuse (_OIDCRefused) unless ``login`` is, or may become, the provider
        account ``account`` (issuer and sub); link it when it may.

        A username claim is no identity (preferred_username is not unique, and
        rewriting it to a login can merge two): the first sign-in links the login
        to the account, and any other account is refused from then on. A user made
        here before (``user add``) is linked only when their stored email is the
        token's verified email; otherwise an admin sets that email first.
        """
        key = _SSO_SUBJECT_META + login
        linked = self.store.get_meta(db, key) or b""
        if linked:
            if not hmac.compare_digest(linked, account):
                raise _OIDCRefused(f"user {login!r} is linked to another account of the "
                                   "provider (its sub differs)")
            return
        if user is not None:
            same = bool(email) and email.casefold() == (user["email"] or "").casefold()
            if not same or claims.get("email_verified") is False:
                raise _OIDCRefused(f"user {login!r} exists here and is not linked to single "
                                   "sign-on: an admin sets their email to the provider's "
                                   "(verified) one, then they sign in")
            events.append(("member_linked", login, "linked to single sign-on by its email"))
        self.store.set_meta(db, key, account)

    def sign_in(self, claims: dict, req: Any = None) -> str:
        """Create (when allowed) and update the user the claims name; return the login.

        Memberships of the mapped teams follow the groups claim, the org role
        follows adminGroups; each change is audited with the group behind it.
        """
        login, email = self.login_of(claims)
        groups = claims.get(self.conf["groups_claim"], [])
        groups = [groups] if isinstance(groups, str) else groups
        groups = [g for g in groups if isinstance(g, str)] if isinstance(groups, list) else []
        wanted: dict = {}  # team -> the first group that maps to it
        for rule in self.conf["teams"]:
            group = next((g for g in groups if _claim_matches(g, rule["group"])), None)
            if group is not None:
                wanted.setdefault(rule["team"], group)
        mapped = {rule["team"] for rule in self.conf["teams"]}
        admin_group = next((g for g in groups for glob in self.conf["admin_groups"]
                            if _claim_matches(g, glob)), None)
        actor = Principal(f"sso:{self.conf['issuer']}"[:200], "admin", True,
                          token_name="single sign-on")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise _OIDCRefused("no sub claim")
        account = f"{self.conf['issuer']}\n{subject}".encode("utf-8", "replace")
        events, now = [], _now()
        with self.store.write() as db:
            user = self.store.get_user(db, login)
            self._check_link(db, login, user, account, email, claims, events)
            if user is None:
                if not self.conf["create_users"]:
                    raise _OIDCRefused(f"user {login!r} does not exist (createUsers is false)")
                role = "admin" if admin_group else "member"
                name = claims.get("name") if isinstance(claims.get("name"), str) else ""
                self.store.insert_user(db, {"login": login, "name": name[:200] or login,
                                            "email": email[:200], "role": role,
                                            "created": now})
                self.store.set_meta(db, _IDENTITIES_META, b"1")
                events.append(("member_added", login, f"role {role}, created at first "
                               f"single sign-on ({self.conf['username_claim']})"))
            elif self.conf["admin_groups"] and (user["role"] == "admin") != bool(admin_group):
                role = "admin" if admin_group else "member"
                self.store.set_user_role(db, login, role)
                events.append(("member_role_changed", login, f"role {role}: " + (
                    f"group {admin_group}" if admin_group else "in no adminGroups group")))
            have = set(self.store.user_teams(db, login))
            for team, group in sorted(wanted.items()):
                if team in have:
                    continue
                if self.store.get_team(db, team) is None:
                    self.store.insert_team(db, {"name": team, "display_name": team,
                                                "description": "", "created": now})
                    events.append(("team_created", team, f"for group {group}"))
                self.store.add_member(db, team, login)
                events.append(("team_member_added", f"{team}/{login}", f"group {group}"))
            for team in sorted((have & mapped) - set(wanted)):
                self.store.remove_member(db, team, login)
                events.append(("team_member_removed", f"{team}/{login}",
                               "in no group mapped to this team"))
        for event, target, why in events:
            self.identity.audit.record(event, actor, req, target, description=why)
        return login


def _q_form(text: str) -> str:
    """``text`` form-encoded, as RFC 6749 2.3.1 wants client credentials in Basic."""
    return urllib.parse.quote_plus(text)


# -- webhooks ------------------------------------------------------------------
#
# Design. An event (a stack created or deleted, an update that ended) becomes one
# delivery row per webhook that wants it, written by Engine._emit inside the very
# transaction that made the event: it commits with it or not at all, and the
# request that caused it does no network I/O. A worker thread (started and stopped
# by serve(), section 14) claims due rows and sends each from a delivery thread (at
# most WEBHOOK_CONCURRENCY at once), then records the attempt on the row: success
# (a 2xx answer), or a retry after the next of --webhook-retry-delays, or failed
# when those are spent. Claiming moves a row's next_attempt past the time a request
# can take, so a row claimed by a server that dies (or by another replica) is sent
# again later: nothing is lost at a restart, and a receiver sees a delivery at
# least once (Pulumi-Webhook-ID names repeats). Ping and redeliver send once, while
# the caller waits: it asked for the answer. The receiver's address is checked on
# every request (_webhook_socket): loopback, link-local and cloud metadata addresses
# are refused unless --webhook-allow names them, and redirects are not followed.
# A webhook's shared secret is sealed by the master key and never answered back.

_WEBHOOK_FORMATS = ("raw", "slack", "ms_teams")
#: The CLI's event groups and their events (cmd/pulumi/org/org_webhook_new.go).
_WEBHOOK_GROUPS = {
    "stacks": ("stack_created", "stack_deleted") + tuple(
        f"{kind}_{result}" for kind in ("update", "preview", "destroy", "refresh", "import")
        for result in ("succeeded", "failed")),
    "deployments": ("deployment_queued", "deployment_started", "deployment_succeeded",
                    "deployment_failed", "drift_detected", "drift_detection_succeeded",
                    "drift_detection_failed", "drift_remediation_succeeded",
                    "drift_remediation_failed", "deployment_file_ingestion_failed"),
    "policies": ("policy_violation_mandatory", "policy_violation_advisory"),
    "environments": ("environment_created", "environment_deleted",
                     "environment_revision_created", "environment_revision_retracted",
                     "environment_revision_tag_created", "environment_revision_tag_deleted",
                     "environment_revision_tag_updated", "environment_tag_created",
                     "environment_tag_deleted", "environment_tag_updated",
                     "imported_environment_changed"),
    "change_requests": ("change_request_created", "change_request_updated",
                        "change_request_approved", "change_request_unapproved",
                        "change_request_closed", "change_request_applied",
                        "change_request_submitted"),
}
#: Groups a stack's webhook may name (the CLI's stackWebhookGroups).
_STACK_WEBHOOK_GROUPS = ("stacks", "deployments", "policies")
#: Events only an organization's webhooks get.
_ORG_ONLY_EVENTS = frozenset({"stack_created", "stack_deleted"})
#: The events this server produces: the others are refused when asked for.
_PRODUCED_EVENTS = _ORG_ONLY_EVENTS | frozenset(
    f"{kind}_{result}" for kind in _UPDATE_KINDS for result in ("succeeded", "failed"))
#: Pulumi Cloud's "clear the secret" value of a PATCH (the CLI's removeSecretSentinel).
_REMOVE_SECRET = "__remove-secret"
_MAX_WEBHOOK_SECRET = 1024
_MAX_WEBHOOK_URL = 2048


class _WebhookRefused(OSError):
    """The receiver's address is one webhooks may not reach."""


def _webhook_address_refused(address: ipaddress.IPv4Address | ipaddress.IPv6Address,
                             allowed: tuple) -> str:
    """Return why webhooks may not reach ``address`` ('' when they may).

    Loopback, link-local, cloud metadata, unspecified and multicast addresses
    (also written as IPv6 that embeds them) and this host's own addresses are refused
    unless a network of ``allowed`` (--webhook-allow) holds them; other private
    ranges are fine: a self-hosted server's receivers are often on its own network.
    """
    plain = _embedded_ipv4(address)
    if any(a in net for a in {address, plain} for net in allowed
           if a.version == net.version):
        return ""
    if plain.is_loopback:
        return "a loopback address"
    if _is_link_local_or_metadata(address):
        return "a link-local or cloud metadata address"
    if plain.is_unspecified or plain.is_multicast:
        return "not a unicast address"
    if _is_own_address(plain):
        return "an address of this server (its services listen there too)"
    return ""


def _embedded_ipv4(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Any:
    """The IPv4 address an IPv6 one stands for (IPv4-mapped, IPv4-translated, NAT64,
    6to4, and the old IPv4-compatible ``::a.b.c.d``), else ``address`` itself."""
    if address.version == 4:
        return address
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    low = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _NAT64_PREFIX or int(address) >> 32 == 0xFFFF0000 \
            or (int(address) >> 32 == 0 and int(low) > 1):
        return low
    return address


def _is_own_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether this host has ``address`` (a socket can be bound to it)."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(address), 0))
        return True
    except OSError:
        return False


def _check_webhook_url(url: Any, allowed: tuple) -> str:
    """Return ``url`` if webhooks may post to it; BadRequest otherwise.

    Only a literal address (or ``localhost``) is checked here; a name is
    checked each time it is resolved, when a delivery is sent.
    """
    if not isinstance(url, str) or not url.strip() or len(url) > _MAX_WEBHOOK_URL:
        raise BadRequest(f"payloadUrl must be a URL of at most {_MAX_WEBHOOK_URL} characters")
    url = url.strip()
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise BadRequest(f"payloadUrl {url!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest("payloadUrl must be an http:// or https:// URL with a host, "
                         "e.g. https://example.com/hook")
    if parts.username is not None or parts.password is not None:
        raise BadRequest("payloadUrl must not hold a user name or password; use the "
                         "webhook's secret to authenticate deliveries")
    host = parts.hostname.lower()
    address = (ipaddress.ip_address("127.0.0.1") if host == "localhost"
               or host.endswith(".localhost") else _literal_ip(host))
    reason = _webhook_address_refused(address, allowed) if address is not None else ""
    if reason:
        raise BadRequest(f"payloadUrl host {parts.hostname} is {reason}: webhooks may not "
                         "reach it unless the server's --webhook-allow names it")
    return url


def _webhook_events(body: dict, key: str, stack: bool) -> list:
    """Return the ``filters`` or ``groups`` of a webhook body, checked; BadRequest else.

    Names the CLI does not know are invalid; events (or groups of them) this
    server cannot produce, such as deployments, drift and policy events, are
    refused with what it can produce.
    """
    values = body.get(key)
    if values is None:
        return []
    if not isinstance(values, list) or len(values) > 100 \
            or not all(isinstance(v, str) for v in values):
        raise BadRequest(f"{key} must be a list of names")
    groups = _STACK_WEBHOOK_GROUPS if stack else tuple(_WEBHOOK_GROUPS)
    known = {e for g in groups for e in _WEBHOOK_GROUPS[g]} - (_ORG_ONLY_EVENTS if stack
                                                              else frozenset())
    out: list = []
    for value in values:
        if key == "groups":
            if value not in groups:
                raise BadRequest(f"invalid group {value!r}; valid groups: {', '.join(groups)}")
            if value != "stacks":
                raise BadRequest(f"this server cannot produce the events of group {value!r} "
                                 "(it runs no deployments, policies, environments or change "
                                 "requests); only group 'stacks' can be delivered")
        elif value not in known:
            raise BadRequest(f"invalid event {value!r}")
        elif value.startswith("import_"):
            raise BadRequest(f"this server cannot produce {value!r}: `pulumi import` reaches "
                             "it as an update, so subscribe to update_succeeded and "
                             "update_failed")
        elif value not in _PRODUCED_EVENTS:
            raise BadRequest(f"this server cannot produce {value!r} events (it runs no "
                             "deployments, drift detection or policies); it produces: "
                             + ", ".join(sorted(_PRODUCED_EVENTS - (_ORG_ONLY_EVENTS if stack
                                                                    else frozenset()))))
        if value not in out:
            out.append(value)
    return out


def _webhook_wants(hook: dict, event: str) -> bool:
    """Whether ``hook`` subscribes to ``event`` (no filters and no groups: to all)."""
    filters, groups = json.loads(hook["filters"]), json.loads(hook["event_groups"])
    if not filters and not groups:
        return True
    return event in filters or any(event in _WEBHOOK_GROUPS.get(g, ()) for g in groups)


def _webhook_signature(secret: bytes, body: bytes) -> str:
    """The Pulumi-Webhook-Signature of ``body``: hex HMAC-SHA256 keyed by the secret."""
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def _webhook_user(login: str) -> dict:
    return {"name": login, "githubLogin": login, "avatarUrl": ""}


def _changes_text(changes: dict) -> str:
    return ", ".join(f"{n} {op}" for op, n in sorted(changes.items()) if op != "same" and n)


def _webhook_message(event: dict, base_url: str) -> dict:
    """The parts of an engine event's payloads, whatever the format: the
    Pulumi-Webhook-Kind, the event's filter name, the raw payload (Pulumi Cloud's
    shape), a one-line summary, facts, a link and whether it is good news."""
    org, project, stack = event["org"], event["project"], event["stack"]
    user = event.get("user") or ""
    raw: dict = {"user": _webhook_user(user), "organization": _webhook_user(org),
                 "projectName": project, "stackName": stack}
    ref = f"{org}/{project}/{stack}"
    stack_url = (f"{base_url}/stacks/{urllib.parse.quote(project, safe='')}/"
                 f"{urllib.parse.quote(stack, safe='')}") if base_url else ""
    if event["kind"] == "stack":
        raw["action"] = event["action"]
        return {"kind": "stack", "event": f"stack_{event['action']}", "raw": raw,
                "text": f"Stack {ref} was {event['action']}" + (f" by {user}" if user else ""),
                "facts": [("Stack", ref), ("Action", event["action"])],
                "link": stack_url if event["action"] == "created" else "", "good": True}
    kind = "preview" if event["dry_run"] else event["update_kind"]
    changes = event.get("resource_changes") or {}
    link = f"{stack_url}/updates/{event['update_id']}" if stack_url else ""
    raw.update({"kind": kind, "result": event["result"], "resourceChanges": changes,
                "updateUrl": link})
    summary = _changes_text(changes)
    facts = [("Stack", ref), ("Kind", kind), ("Result", event["result"])]
    if not event["dry_run"]:
        facts.append(("Version", str(event["version"])))
    if summary:
        facts.append(("Changes", summary))
    return {"kind": "stack_preview" if kind == "preview" else "stack_update",
            "event": f"{kind}_{event['result']}", "raw": raw,
            "text": (f"{user}'s " if user else "") + f"{kind} of {ref} {event['result']}"
                    + (f" ({summary})" if summary else ""),
            "facts": facts, "link": link, "good": event["result"] == "succeeded"}


def _webhook_body(fmt: str, message: dict) -> bytes:
    """The bytes posted for ``message`` in format raw, slack or ms_teams."""
    if fmt == "slack":
        text = message["text"] + (f" <{message['link']}|details>" if message["link"] else "")
        return _dumps({"text": text, "attachments": [{
            "color": "good" if message["good"] else "danger", "fallback": message["text"],
            "fields": [{"title": k, "value": v, "short": True} for k, v in message["facts"]]}]})
    if fmt == "ms_teams":
        card: dict = {"@type": "MessageCard", "@context": "https://schema.org/extensions",
                      "summary": message["text"], "title": message["text"],
                      "themeColor": "2EB886" if message["good"] else "E01E5A",
                      "sections": [{"facts": [{"name": k, "value": v}
                                              for k, v in message["facts"]]}]}
        if message["link"]:
            card["potentialAction"] = [{"@type": "OpenUri", "name": "View in pulumi-backend",
                                        "targets": [{"os": "default", "uri": message["link"]}]}]
        return _dumps(card)
    return _dumps(message["raw"])


def _webhook_socket(address: tuple, timeout: Any, source_address: Any = None,
                    allowed: tuple = ()) -> socket.socket:
    """Connect to ``address`` (host, port) only at addresses webhooks may reach.

    The name is resolved once, every address it gives is checked, and the
    socket goes to one of those same addresses (a second lookup could answer
    differently).
    """
    host, port = address
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for *_, sockaddr in found:
        reason = _webhook_address_refused(ipaddress.ip_address(sockaddr[0].split("%")[0]),
                                          allowed)
        if reason:
            raise _WebhookRefused(f"{host} resolves to {sockaddr[0]}, {reason}, which "
                                  "webhooks may not reach unless --webhook-allow names it")
    error: OSError = OSError(f"{host} resolves to no address")
    for family, kind, proto, _, sockaddr in found:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            error = e
    raise error


def _webhook_post(url: str, body: bytes, headers: dict, allowed: tuple,
                  timeout: float) -> dict:
    """POST ``body`` to ``url`` once; return the answer's code (0: none), headers,
    the first WEBHOOK_RESPONSE_EXCERPT bytes of its body, the duration in ms and
    an error message ('' when it answered). Never raises for the receiver's sake."""
    parts = urllib.parse.urlsplit(url)
    https = parts.scheme == "https"
    start = time.monotonic()
    out = {"code": 0, "headers": "", "body": "", "error": ""}
    conn: Any = None
    # One deadline for the whole exchange: a receiver trickling its status line or
    # headers a byte at a time would otherwise hold a delivery thread for ever.
    watchdog = threading.Timer(2 * timeout, lambda: _abort_connection(conn))
    watchdog.daemon = True
    watchdog.start()
    try:
        cls = http.client.HTTPSConnection if https else http.client.HTTPConnection
        conn = cls(parts.hostname, parts.port or (443 if https else 80), timeout=timeout)
        conn._create_connection = functools.partial(_webhook_socket, allowed=allowed)
        conn.request("POST", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                     body=body, headers=headers)
        resp = conn.getresponse()
        data = b""  # read1: a trickle of bytes cannot outlast the deadline by much
        deadline = start + 2 * timeout
        while len(data) < WEBHOOK_RESPONSE_EXCERPT and time.monotonic() < deadline:
            chunk = resp.read1(WEBHOOK_RESPONSE_EXCERPT - len(data))
            if not chunk:
                break
            data += chunk
        out.update(code=resp.status, body=data.decode("utf-8", "replace"),
                   headers="\n".join(f"{k}: {v}" for k, v in resp.getheaders())
                   [:WEBHOOK_RESPONSE_EXCERPT])
        if 300 <= resp.status < 400:
            out["error"] = (f"answered {resp.status} (redirect to "
                            f"{str(resp.getheader('Location'))[:200]}): redirects are not "
                            "followed, payloadUrl must name the final URL")
    except (OSError, http.client.HTTPException, ValueError) as e:
        out["error"] = (str(e) or type(e).__name__)[:500]
        if time.monotonic() - start >= 2 * timeout:
            out["error"] = f"no complete answer within {2 * timeout:g} s"
    finally:
        watchdog.cancel()
        if conn is not None:
            conn.close()
    out["duration"] = int((time.monotonic() - start) * 1000)
    return out


def _abort_connection(conn: Any) -> None:
    """Wake whatever waits on ``conn``'s socket (the webhook deadline passed)."""
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _now_ms() -> int:
    return int(time.time() * 1000)


class Webhooks:
    """Organization and stack webhooks: their configuration (the API's), the
    deliveries engine events become, and the worker that sends them (see the
    design above). Stack webhooks are passed ``names`` (org, project, stack);
    organization ones None."""

    def __init__(self, cfg: Config, store: Store, keys: KeyManager, metrics: Metrics):
        self.cfg = cfg
        self.store = store
        self.keys = keys
        self.metrics = metrics
        for result in ("succeeded", "retried", "failed"):  # present from the first scrape
            metrics.inc("pulumi_backend_webhook_deliveries_total", 0, result=result)
        self.allowed = tuple(ipaddress.ip_network(n) for n in cfg.webhook_allow)
        self.delays = tuple(cfg.webhook_retry_delays)
        self.timeout = WEBHOOK_TIMEOUT
        self.base_url = cfg.public_url.rstrip("/")  # serve() sets the server's own URL
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._inflight: set = set()  # delivery threads
        self._inflight_lock = threading.Lock()

    # -- configuration ------------------------------------------------------

    def _scope(self, db, org: str, names: Optional[tuple]) -> Optional[dict]:
        """The stack row of a stack webhook's path (NotFound), or None for the org."""
        if names is None:
            return None
        row = self.store.get_stack(db, *names)
        if row is None:
            raise NotFound(f"stack '{'/'.join(names)}' not found")
        return row

    def _hook(self, db, org: str, names: Optional[tuple], name: str) -> tuple:
        """``(webhook row, stack row or None)``; NotFound unless it is of this scope."""
        stack = self._scope(db, org, names)
        hook = self.store.get_webhook(db, name)
        if hook is None or hook["org"] != org \
                or hook["stack_id"] != (stack["id"] if stack else None):
            raise NotFound(f"webhook '{name}' not found")
        return hook, stack

    def _purpose(self, name: str) -> bytes:
        return b"webhook:" + name.encode()

    def _json(self, hook: dict, names: Optional[tuple]) -> dict:
        """The webhook as Pulumi Cloud answers it: the secret never, only whether
        there is one and its sealed form."""
        out: dict = {"organizationName": hook["org"], "name": hook["name"],
                     "displayName": hook["display_name"], "payloadUrl": hook["url"],
                     "active": bool(hook["active"]), "format": hook["format"],
                     "filters": json.loads(hook["filters"]),
                     "groups": json.loads(hook["event_groups"]),
                     "hasSecret": hook["secret"] is not None,
                     "secretCiphertext": _b64encode(bytes(hook["secret"]))
                     if hook["secret"] is not None else ""}
        if names is not None:
            out["projectName"], out["stackName"] = names[1], names[2]
        return out

    def _fields(self, body: dict, org: str, names: Optional[tuple],
                hook: Optional[dict] = None) -> dict:
        """The columns a create (``hook`` None) or edit body sets; BadRequest if invalid."""
        if body.get("organizationName") not in (None, "", org):
            raise BadRequest(f"organizationName {body['organizationName']!r} does not match "
                             f"the organization of the path, {org!r}")
        if names is not None:
            for key, value in (("projectName", names[1]), ("stackName", names[2])):
                if body.get(key) not in (None, "", value):
                    raise BadRequest(f"{key} {body[key]!r} does not match the path's {value!r}")
        fields: dict = {}
        display = body.get("displayName")
        if display is not None or hook is None:
            if not isinstance(display, str) or not 1 <= len(display.strip()) <= 100:
                raise BadRequest("displayName must be a name of 1 to 100 characters")
            fields["display_name"] = display.strip()
        if body.get("payloadUrl") is not None or hook is None:
            fields["url"] = _check_webhook_url(body.get("payloadUrl"), self.allowed)
        active = body.get("active")
        if active is not None or hook is None:
            if not isinstance(active, bool) and active is not None:
                raise BadRequest("active must be true or false")
            fields["active"] = int(True if active is None else active)
        fmt = body.get("format")
        if fmt not in (None, "") or hook is None:
            fmt = fmt or "raw"
            if fmt == "pulumi_deployments":
                raise BadRequest("format 'pulumi_deployments' triggers Pulumi Deployments, "
                                 "which this server does not run; use raw, slack or ms_teams")
            if fmt not in _WEBHOOK_FORMATS:
                raise BadRequest(f"format must be one of {', '.join(_WEBHOOK_FORMATS)}")
            fields["format"] = fmt
        # The CLI edits by sending the whole webhook back: lists it leaves out are empty.
        fields["filters"] = json.dumps(_webhook_events(body, "filters", names is not None))
        fields["event_groups"] = json.dumps(_webhook_events(body, "groups", names is not None))
        secret = body.get("secret")
        if secret is not None and not isinstance(secret, str):
            raise BadRequest("secret must be a string")
        if secret == _REMOVE_SECRET:
            fields["secret"] = None
        elif secret:
            if len(secret) > _MAX_WEBHOOK_SECRET:
                raise BadRequest(f"secret must be at most {_MAX_WEBHOOK_SECRET} characters")
            fields["secret"] = b""  # sealed once the name is known
            fields["_plain_secret"] = secret
        elif hook is None:
            fields["secret"] = None
        return fields

    def _seal_fields(self, fields: dict, name: str) -> dict:
        plain = fields.pop("_plain_secret", None)
        if plain is not None:
            fields["secret"] = self.keys.seal_secret(self._purpose(name), plain.encode())
        return fields

    def create(self, org: str, names: Optional[tuple], body: dict) -> dict:
        """Create a webhook named by the server (8 hex digits); return it."""
        fields = self._fields(body, org, names)
        with self.store.write() as db:
            stack = self._scope(db, org, names)
            if len(self.store.list_webhooks(db, org, stack["id"] if stack else None)) \
                    >= MAX_WEBHOOKS:
                raise BadRequest(f"at most {MAX_WEBHOOKS} webhooks per organization or stack")
            name = secrets.token_hex(4)
            while self.store.get_webhook(db, name) is not None:
                name = secrets.token_hex(4)
            row = {"name": name, "org": org, "stack_id": stack["id"] if stack else None,
                   "created": _now(), **self._seal_fields(fields, name)}
            self.store.insert_webhook(db, row)
            hook = self.store.get_webhook(db, name)
        return self._json(hook, names)

    def list_hooks(self, org: str, names: Optional[tuple]) -> list:
        with self.store.read() as db:
            stack = self._scope(db, org, names)
            return [self._json(h, names) for h in
                    self.store.list_webhooks(db, org, stack["id"] if stack else None)]

    def get(self, org: str, names: Optional[tuple], name: str) -> dict:
        with self.store.read() as db:
            return self._json(self._hook(db, org, names, name)[0], names)

    def edit(self, org: str, names: Optional[tuple], name: str, body: dict) -> dict:
        """Change what the body sets (the secret only when it names one); return it."""
        with self.store.write() as db:
            hook = self._hook(db, org, names, name)[0]
            fields = self._seal_fields(self._fields(body, org, names, hook), name)
            self.store.update_webhook(db, name, **fields)
            return self._json(self.store.get_webhook(db, name), names)

    def remove(self, org: str, names: Optional[tuple], name: str) -> None:
        with self.store.write() as db:
            self._hook(db, org, names, name)
            self.store.delete_webhook(db, name)

    def deliveries(self, org: str, names: Optional[tuple], name: str) -> list:
        """The webhook's recent deliveries, newest first."""
        with self.store.read() as db:
            self._hook(db, org, names, name)
            rows = self.store.list_deliveries(db, name, WEBHOOK_DELIVERIES_KEPT)
        return [self._delivery_json(r) for r in rows]

    def overview(self, org: str, names: Optional[tuple], limit: int) -> list:
        """``(webhook JSON, its newest ``limit`` delivery rows)`` of the scope, for the
        console (section 11): the rows say status and attempts, which the API cannot."""
        with self.store.read() as db:
            stack = self._scope(db, org, names)
            return [(self._json(h, names), self.store.list_deliveries(db, h["name"], limit))
                    for h in self.store.list_webhooks(db, org, stack["id"] if stack else None)]

    def ping(self, org: str, names: Optional[tuple], name: str) -> dict:
        """Send a ping now, once; return the delivery."""
        with self.store.read() as db:
            hook = self._hook(db, org, names, name)[0]
        where = "/".join(names) if names else org
        message = {"kind": "ping", "event": "ping", "good": True, "link": "",
                   "raw": {"message": "Just a friendly ping from pulumi-backend",
                           "organization": _webhook_user(org), "webhookName": name},
                   "text": f"Ping of webhook {hook['display_name']} of {where}",
                   "facts": [("Webhook", hook["display_name"]), ("Scope", where)]}
        return self._send_now(hook, "ping", "ping", _webhook_body(hook["format"], message))

    def redeliver(self, org: str, names: Optional[tuple], name: str, event_id: str) -> dict:
        """Send a delivery's payload again now, once, as a new delivery; return it."""
        with self.store.read() as db:
            hook = self._hook(db, org, names, name)[0]
            old = self.store.get_delivery(db, event_id)
        if old is None or old["hook"] != name:
            raise NotFound(f"delivery '{event_id}' of webhook '{name}' not found")
        return self._send_now(hook, old["kind"], old["event"], old["payload"].encode())

    # -- events -------------------------------------------------------------

    def enqueue(self, db, event: dict) -> None:
        """Queue ``event`` (see Engine._emit) for every webhook that wants it, within
        the caller's transaction ``db``; wake the worker once it commits."""
        hooks = self.store.webhooks_for_stack(db, event["org"], event["stack_id"])
        message = _webhook_message(event, self.base_url) if hooks else None
        queued = False
        for hook in hooks:
            if hook["stack_id"] is not None and event["kind"] != "update":
                continue  # stack events go to the organization's webhooks only
            if not _webhook_wants(hook, message["event"]):
                continue
            now = _now_ms()
            self.store.insert_delivery(db, {
                "id": _new_id(), "hook": hook["name"], "kind": message["kind"],
                "event": message["event"],
                "payload": _webhook_body(hook["format"], message).decode(),
                "created": now, "status": "pending", "next_attempt": now,
                "request_url": hook["url"]})
            queued = True
        if queued:
            self.store.after_commit(self._wake.set)

    # -- delivery -----------------------------------------------------------

    def start(self) -> None:
        """Start the worker; it first sends what is due from before a restart."""
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Stop claiming deliveries and wait up to ``timeout`` seconds for those being
        sent; a delivery cut short is sent again after the next start."""
        self._stopping.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._inflight_lock:
            threads = list(self._inflight)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                self.run_due()
            except Exception:  # noqa: BLE001 - the worker outlives a bad moment
                log.exception("webhook delivery worker")
            self._wake.wait(WEBHOOK_POLL_SECONDS)

    def run_due(self, inline: bool = False) -> int:
        """Claim the due deliveries there are free delivery slots for and send each
        (in a thread; ``inline`` in this one, for tests); return how many."""
        with self._inflight_lock:
            free = WEBHOOK_CONCURRENCY - len(self._inflight)
        if free <= 0:
            return 0
        now = _now_ms()
        with self.store.read() as db:  # most polls find nothing: no write for them
            if not self.store.due_deliveries(db, now, 1):
                return 0
        lease = now + int((3 * self.timeout + 30) * 1000)
        with self.store.write() as db:
            rows = self.store.due_deliveries(db, now, free)
            for row in rows:
                self.store.update_delivery(db, row["id"], next_attempt=lease)
        for row in rows:
            if inline:
                self._deliver(row)
                continue
            t = threading.Thread(target=self._deliver, args=(row,), daemon=True,
                                 name="webhook-delivery")
            with self._inflight_lock:
                self._inflight.add(t)
            t.start()
        return len(rows)

    def _deliver(self, row: dict, retry: bool = True) -> None:
        """Send one claimed delivery and record the attempt."""
        try:
            with self.store.read() as db:
                hook = self.store.get_webhook(db, row["hook"])
            if hook is not None:
                self._record(row, self._attempt(hook, row), retry)
        except Exception:  # noqa: BLE001 - the row stays claimed and is retried later
            log.exception("webhook delivery %s", row["id"])
        finally:
            with self._inflight_lock:
                self._inflight.discard(threading.current_thread())
            self._wake.set()  # a slot is free

    def _attempt(self, hook: dict, row: dict) -> dict:
        body = row["payload"].encode()
        headers = {"Content-Type": "application/json",
                   "User-Agent": f"pulumi-backend/{__version__}",
                   "Pulumi-Webhook-ID": row["id"], "Pulumi-Webhook-Kind": row["kind"]}
        if hook["secret"] is not None:
            secret = self.keys.open_secret(self._purpose(hook["name"]), bytes(hook["secret"]))
            headers["Pulumi-Webhook-Signature"] = _webhook_signature(secret, body)
        if not hook["active"]:
            result = {"code": 0, "headers": "", "body": "", "duration": 0,
                      "error": "the webhook is inactive"}
        else:
            result = _webhook_post(hook["url"], body, headers, self.allowed, self.timeout)
        result["request_headers"] = "\n".join(f"{k}: {v}" for k, v in headers.items())
        result["request_url"] = hook["url"]
        return result

    def _record(self, row: dict, result: dict, retry: bool = True) -> None:
        """Store an attempt's outcome: succeeded, pending (a retry is due later) or failed."""
        attempts = row["attempts"] + 1
        ok = 200 <= result["code"] < 300
        status, due = "succeeded" if ok else "failed", 0
        if not ok and retry and result["error"] != "the webhook is inactive" \
                and attempts <= len(self.delays):
            status, due = "pending", _now_ms() + int(self.delays[attempts - 1] * 1000)
        self.metrics.inc("pulumi_backend_webhook_deliveries_total",
                         result="retried" if status == "pending" else status)
        if not ok:
            log.warning("webhook %s delivery %s (%s) attempt %d: %s", row["hook"], row["id"],
                        row["event"], attempts, _escape_log(result["error"][:200]) or
                        f"answered {result['code']}")
        with self.store.write() as db:
            self.store.update_delivery(
                db, row["id"], status=status, attempts=attempts, next_attempt=due,
                sent=_now(), duration=result["duration"], request_url=result["request_url"],
                request_headers=result["request_headers"], response_code=result["code"],
                response_headers=result["headers"], response_body=result["body"],
                error=result["error"])

    def _send_now(self, hook: dict, kind: str, event: str, body: bytes) -> dict:
        row = {"id": _new_id(), "hook": hook["name"], "kind": kind, "event": event,
               "payload": body.decode(), "created": _now_ms(), "status": "sending",
               "attempts": 0, "next_attempt": 0, "request_url": hook["url"]}
        with self.store.write() as db:
            self.store.insert_delivery(db, row)
        self._record(row, self._attempt(hook, row), retry=False)
        with self.store.read() as db:
            return self._delivery_json(self.store.get_delivery(db, row["id"]))

    def _delivery_json(self, row: dict) -> dict:
        """A delivery as Pulumi Cloud answers it; its state is told in responseBody
        when the receiver gave no 2xx answer (there is no field for it)."""
        body = row["response_body"]
        note = ""
        if row["status"] == "pending" and row["attempts"]:
            note = (f"[attempt {row['attempts']} of {len(self.delays) + 1} failed; next "
                    f"attempt at {_rfc3339(row['next_attempt'] // 1000)}]")
        elif row["status"] == "pending":
            note = "[queued]"
        elif row["status"] == "failed":
            note = f"[failed after {row['attempts']} attempt(s)]"
        if note or row["error"]:
            body = "\n".join(filter(None, (note, row["error"], body)))
        return {"id": row["id"], "kind": row["event"], "payload": row["payload"],
                "timestamp": row["sent"] or row["created"] // 1000,
                "duration": row["duration"], "requestUrl": row["request_url"],
                "requestHeaders": row["request_headers"], "responseCode": row["response_code"],
                "responseHeaders": row["response_headers"], "responseBody": body}


# -- the user, team, token and audit commands ----------------------------------

def _say(*fields: Any) -> None:
    """Print one line of the administration commands: ``fields`` escaped, tab-separated."""
    print("\t".join(_tty(f) for f in fields), flush=True)


def _want(args: list, n: int, usage: str) -> list:
    if len(args) != n:
        raise ValueError(f"usage: pulumi_backend.py {usage}")
    return args


def _admin_user(ident: Identity, action: str, args: list, opts: dict) -> None:
    if action == "add":
        login, = _want(args, 1, "user add LOGIN [--name NAME] [--email E] [--role admin|member]")
        user = ident.add_user(_LOCAL_ADMIN, login, opts["name"] or "", opts["email"] or "",
                              opts["role"] or "member")
        _say(f"added user {login} ({user['role']}); give them a token: "
             f"pulumi_backend.py token create --user {login}")
    elif action == "remove":
        login, = _want(args, 1, "user remove LOGIN")
        ident.remove_user(_LOCAL_ADMIN, login)
        _say(f"removed user {login} and their personal tokens")
    elif action == "set-role":
        login, role = _want(args, 2, "user set-role LOGIN admin|member")
        ident.set_role(_LOCAL_ADMIN, login, role)
        _say(f"{login} is now {role}")
    elif action == "list":
        _want(args, 0, "user list")
        with ident.store.read() as db:
            for u in ident.store.list_users(db):
                teams = ",".join(ident.store.user_teams(db, u["login"])) or "-"
                _say(u["login"], u["role"], f"teams={teams}", u["name"])
    else:
        raise ValueError("user actions: add, list, remove, set-role")


def _admin_team(ident: Identity, action: str, args: list, opts: dict) -> None:
    if action == "create":
        team, = _want(args, 1, "team create TEAM [--description TEXT]")
        ident.create_team(_LOCAL_ADMIN, team, description=opts["description"] or "")
        _say(f"created team {team}")
    elif action == "remove":
        team, = _want(args, 1, "team remove TEAM")
        ident.delete_team(_LOCAL_ADMIN, team)
        _say(f"removed team {team} with its grants and tokens")
    elif action in ("add-member", "remove-member"):
        team, login = _want(args, 2, f"team {action} TEAM LOGIN")
        (ident.add_member if action == "add-member" else ident.remove_member)(
            _LOCAL_ADMIN, team, login)
        _say(f"{'added' if action == 'add-member' else 'removed'} {login} "
             f"{'to' if action == 'add-member' else 'from'} team {team}")
    elif action == "grant":
        team, pattern, perm = _want(args, 3, "team grant TEAM PATTERN none|read|write|admin")
        if perm not in _PERM_BY_NAME:
            raise ValueError(f"permission must be none, read, write or admin, not {perm!r}")
        pattern = ident.grant(_LOCAL_ADMIN, team, pattern, _PERM_BY_NAME[perm])
        _say(f"team {team}: {perm} on {pattern}")
    elif action == "list":
        _want(args, 0, "team list")
        for team in ident.teams_json():
            full = ident.team_json(team["name"])
            members = ",".join(m["githubLogin"] for m in full["members"]) or "-"
            grants = ",".join(f"{s['projectName']}/{s['stackName']}="
                              f"{_PERM_NAMES[s['permission']]}" for s in full["stacks"]) or "-"
            _say(team["name"], f"members={members}", f"grants={grants}")
    else:
        raise ValueError("team actions: create, list, remove, add-member, remove-member, grant")


def _admin_token(ident: Identity, action: str, args: list, opts: dict) -> None:
    if action == "create":
        _want(args, 0, "token create (--user NAME | --team TEAM | --org-token [--admin]) "
              "[--name N] [--description D] [--expires 90d]")
        owners = [(kind, owner) for kind, owner in (
            ("personal", opts["user"]), ("team", opts["team"]),
            ("org", ident.cfg.org if opts["org_token"] else None)) if owner]
        if len(owners) != 1:
            raise ValueError("token create needs one of --user NAME, --team TEAM, --org-token")
        seconds = _parse_lifetime(opts["expires"] or "", "--expires")
        token_id, value = ident.create_token(
            _LOCAL_ADMIN, *owners[0], opts["name"] or "", opts["description"] or "",
            _now() + seconds if seconds else 0, bool(opts["admin"]))
        print(_tty(f"created token {token_id} for {owners[0][0]} {owners[0][1]}; it is "
                   "shown only now:"), file=sys.stderr)
        _say(value)
    elif action == "list":
        _want(args, 0, "token list")
        for t in ident.tokens_json()["tokens"]:
            with ident.store.read() as db:
                row = ident.store.get_token(db, t["id"])
            used = _rfc3339(t["lastUsed"]) if t["lastUsed"] else "never"
            expires = _rfc3339(t["expires"]) if t["expires"] else "never"
            _say(t["id"], f"{row['kind']}:{row['owner']}", f"name={t['name']}",
                 f"created={t['created']}", f"last-used={used}", f"expires={expires}")
    elif action == "revoke":
        token_id, = _want(args, 1, "token revoke TOKEN_ID")
        ident.revoke_token(_LOCAL_ADMIN, token_id)
        _say(f"revoked token {token_id}")
    else:
        raise ValueError("token actions: create, list, revoke")


def _parse_since(text: Optional[str]) -> int:
    """Return the Unix time of ``--since``: a date, an ISO time, or a duration ago."""
    if not text:
        return 0
    if re.fullmatch(r"\d+[dhms]", text.strip()):
        return _now() - _parse_lifetime(text, "--since")
    try:
        when = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since must be a date, an ISO time or 7d/12h/30m, not {text!r}") \
            from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return int(when.timestamp())


def _admin_audit(store: Store, args: list, opts: dict) -> None:
    _want(args, 0, "audit [--since 2026-01-31|7d]")
    after, since = 0, _parse_since(opts["since"])
    while True:
        with store.read() as db:
            rows = store.list_audit(db, after, since, 2 ** 62, None, None, 1000, ascending=True)
        for row in rows:
            sys.stdout.write(_audit_json_line(row))
        if len(rows) < 1000:
            break
        after = rows[-1]["id"]
    sys.stdout.flush()


def _run_admin(cfg: Config, command: str, words: list, opts: dict) -> int:
    """Run ``user``, ``team``, ``token`` or ``audit`` on ``cfg.db``; return an exit code.

    These take no <db>.lock, so they work while the server runs: SQLite's own
    locking orders their writes with the server's, and the server reads
    tokens and grants afresh at every request. Changes are audited as made
    by "local-admin".
    """
    store = open_store(cfg.db)
    try:
        if command == "audit":
            _admin_audit(store, words, opts)
            return 0
        ident = Identity(cfg, store, AuditLog(cfg, store))
        action, args = (words[0], words[1:]) if words else ("", [])
        {"user": _admin_user, "team": _admin_team, "token": _admin_token}[command](
            ident, action, args, opts)
        return 0
    except HTTPError as e:
        raise ValueError(_tty(e.message)) from None
    finally:
        store.close()


# ==== 9. Request, response and router =======================================
# HTTP as the handlers see it: Request and Response values, Route (everything
# about one route: pattern, handler, authentication, the permission it needs,
# body limit and schema, transport flags, OpenAPI), the Router that matches a
# request to a Route, the OpenAPI document built from the routes, and the Host
# names the server answers to. Knows nothing of stacks or storage.

@dataclasses.dataclass
class Request:
    """One parsed HTTP request, as handlers see it."""

    method: str
    path: str
    query: dict
    headers: Any
    body: bytes = b""
    wire: bytes = b""  # the body as it came, when it came compressed
    params: dict = dataclasses.field(default_factory=dict)
    route: Optional["Route"] = None  # once routed: everything about the route
    auth_kind: str = ""
    token: str = ""
    principal: Optional[Principal] = None  # who the API token acts as (section 8)
    remote: str = ""  # the client's address, for the audit log
    session: str = ""  # the web console's session id, once signed in (section 11)

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
        return _loads_body(self.body)

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


#: What a route's caller needs (App._authorize, section 10): "none" (a public
#: route), "lease" (the update's lease token, which authentication checks),
#: "signed-in" (any valid token or console session), a permission on the path's
#: stack ("read", "write", "admin"), "create" (write somewhere; the handler
#: checks the new stack's name from the body) or "org-admin".
_NEEDS = frozenset({"none", "lease", "signed-in", "read", "write", "admin", "create",
                    "org-admin"})


@dataclasses.dataclass(frozen=True, eq=False)
class Route:
    """One route, declared once: all that the rest of the server knows of it.

    The router matches to it, App._authorize checks its ``need``, the
    transport (_Handler, section 14) reads its body limit and flags, and the
    OpenAPI document describes it. Nothing is looked up by a handler's name:
    ``name`` only labels metrics and the access log. ``need`` defaults to the
    strictest, so a route that forgets it needs an org admin; a route without
    credentials (``auth="none"``) must say ``need="none"`` and the update
    routes (``auth="update"``) ``need="lease"``, or declaring it raises
    ValueError. A route takes a body of up to ``--max-body`` bytes when it has
    a ``body`` schema, of ``body_limit`` bytes when that is given, else none.
    """

    method: str
    pattern: str  # segments such as /api/stacks/{orgName}/{projectName}
    handler: Callable
    auth: str = "token"  # "token", "update", "none" or an App.authenticators name
    need: str = "org-admin"  # one of _NEEDS
    body_limit: Optional[int] = None  # the largest body: 0 for none, None for --max-body
    body: Optional[dict] = None  # JSON schema of the request body, for OpenAPI
    query: tuple = ()  # the query parameters it reads, for OpenAPI
    response: Optional[dict] = None  # JSON schema of the 200 answer (None: not JSON)
    op: str = ""  # operationId (Pulumi Cloud's, so `pulumi api <op>` works); default name
    tag: str = "Miscellaneous"  # groups the OpenAPI listing
    doc: bool = True  # False leaves it out of the OpenAPI document (web pages)
    # The host names it answers on once --console-host is given: "console" (that host),
    # "api" (every other name) or "any" (health and metrics); without it, every name.
    site: str = "api"
    # Big bodies (INGEST_GATE_BYTES) take the server's ingest turn (section 14).
    gated: bool = False
    # It holds a whole state in memory: afterwards the server gives back what it freed.
    trim: bool = False
    name: str = ""  # metrics' and the access log's route label: the handler's name

    def __post_init__(self):
        if self.need not in _NEEDS:
            raise ValueError(f"{self.method} {self.pattern}: unknown need {self.need!r}")
        if (self.auth == "none" and self.need != "none"
                or (self.auth == "update") != (self.need == "lease")
                or self.auth == "token" and self.need == "none"):
            raise ValueError(f"{self.method} {self.pattern}: need {self.need!r} does not go "
                             f"with auth {self.auth!r}")
        if self.site not in ("api", "console", "any"):
            raise ValueError(f"{self.method} {self.pattern}: unknown site {self.site!r}")
        if self.body_limit is None and self.body is None:
            object.__setattr__(self, "body_limit", 0)
        if not self.name:
            object.__setattr__(self, "name", self.handler.__name__)


class Router:
    """A small explicit route table.

    Routes are segment patterns such as ``/api/stacks/{orgName}/{projectName}``.
    A path is matched against every route of its length; routes with a literal
    segment where another has a parameter win (a literal ``updates/latest``
    beats a pattern ``updates/{version}``). A path that matches only with another
    method gives 405 with ``Allow``; HEAD falls back to GET.
    """

    def __init__(self):
        self._routes: list = []  # (specificity, segments, route), most specific first
        self.routes: list = []  # every Route, as declared
        # The routes a path can match, by its length and first two segments (each
        # kept only if some route has it as a literal there, so the keys are ours,
        # not the network's): a request tries a handful, not all two hundred.
        self._literals: tuple = (set(), set())
        self._candidates: dict = {}

    def add(self, method: str, pattern: str, handler: Callable, **fields: Any) -> Route:
        """Route ``method pattern`` to ``handler``; ``fields`` are the rest of the Route."""
        route = Route(method, pattern, handler, **fields)
        segments = tuple(pattern.strip("/").split("/"))
        specificity = tuple(0 if s.startswith("{") else 1 for s in segments)
        self._routes.append((specificity, segments, route))
        self._routes.sort(key=lambda r: r[0], reverse=True)
        for literals, segment in zip(self._literals, segments[:2]):
            if not segment.startswith("{"):
                literals.add(segment)
        self._candidates.clear()
        self.routes.append(route)
        return route

    def _routes_for(self, parts: tuple) -> list:
        """The routes that could match ``parts``, most specific first."""
        key = (len(parts), *(p if p in literals else None
                             for literals, p in zip(self._literals, parts[:2])))
        found = self._candidates.get(key)
        if found is None and not any(len(r[1]) == len(parts) for r in self._routes):
            return []  # no route this long: nothing to remember
        if found is None:
            found = self._candidates[key] = [
                r for r in self._routes if len(r[1]) == len(parts) and all(
                    seg.startswith("{") or seg == p for seg, p in zip(r[1][:2], key[1:]))]
        return found

    def openapi(self, title: str, version: str) -> dict:
        """Return an OpenAPI 3.0 document describing every route."""
        paths: dict = {}
        seen: set = set()
        for route in self.routes:
            if not route.doc:
                continue
            op_id = route.op or route.name
            while op_id in seen:
                op_id += "_"
            seen.add(op_id)
            paths.setdefault(route.pattern, {})[route.method.lower()] = _operation(route, op_id)
        auth_scheme = {"type": "apiKey", "in": "header", "name": "Authorization"}
        return {"openapi": "3.0.3", "info": {"title": title, "version": version},
                "paths": paths, "components": {"securitySchemes": {
                    "tokenAuth": dict(auth_scheme, description="token <api token>"),
                    "updateAuth": dict(auth_scheme, description="update-token <lease token>")}}}

    def match(self, method: str, path: str) -> tuple:
        """Return ``(route, params)``; raise NotFound or MethodNotAllowed."""
        parts = tuple(urllib.parse.unquote(p) for p in path.strip("/").split("/"))
        allowed: set = set()
        for _, segments, route in self._routes_for(parts):
            params = _match_segments(segments, parts)
            if params is None:
                continue
            if route.method == method or (method == "HEAD" and route.method == "GET"):
                return route, params
            allowed.add(route.method)
        if allowed:
            allow = ", ".join(sorted(allowed | ({"HEAD"} if "GET" in allowed else set())))
            raise MethodNotAllowed(f"{method} is not allowed here", {"Allow": allow})
        raise NotFound(f"no route for {path}")


def _operation(route: Route, op_id: str) -> dict:
    """One OpenAPI operation object; ``pulumi api list`` shows its tag and summary."""
    doc = (route.handler.__doc__ or "").strip()
    params = [{"name": p[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
              for p in route.pattern.split("/") if p.startswith("{")]
    params += [{"name": q, "in": "query", "required": False, "schema": {"type": "string"}}
               for q in route.query]
    ok: dict = {"description": "OK"}
    if route.response is not None:
        ok["content"] = {"application/json": {"schema": route.response}}
    op: dict = {"operationId": op_id, "summary": doc.splitlines()[0] if doc else op_id,
                "tags": [route.tag], "parameters": params, "responses": {
                    "200": ok, "default": {"description": "error", "content": {
                        "application/json": {"schema": _ERROR_SCHEMA}}}}}
    if route.auth != "none":
        op["security"] = [{route.auth + "Auth": []}]
    if route.body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": route.body}}}
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


_HOST_RE = re.compile(r"(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9_.-]+))(?::([0-9]{1,5}))?\Z")
#: Bind addresses meaning every interface.
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


def _split_host(value: str) -> tuple:
    """Return ``(name, port)`` of a Host header or URL authority, the name in lower
    case without brackets or a final dot, the port None when absent; raise BadRequest
    unless it is ``name``, ``name:port``, ``[IPv6]`` or ``[IPv6]:port``."""
    m = _HOST_RE.match(value.strip())
    name = ""
    if m and m[1]:
        try:
            name = ipaddress.IPv6Address(m[1]).compressed
        except ValueError:
            pass
    elif m:
        name = m[2].lower().rstrip(".")
    if not name or (m[3] and int(m[3]) > 65535):
        raise BadRequest("invalid host name in the Host header or request target")
    return name, int(m[3]) if m[3] else None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class _AllowedHosts:
    """The host names this server answers to: the guard against DNS rebinding.

    A web page on any domain can point its own name at 127.0.0.1 and have its
    visitors' browsers call this server; they send that domain as Host (and
    Origin), and with no token configured the server takes any caller as the
    admin. So every request's Host must be a name of this server, checked before
    routing and authentication: loopback names, IP addresses (a rebinding page
    is reached by a name, never an IP), the host of --public-url, the name bound,
    and --allowed-host names (``*.example.com`` for subdomains). A non-loopback
    binding without --allowed-host answers to any name while tokens are required
    (the names of load balancers and clusters vary, and a page without a token
    gains nothing); while any token is accepted it too checks names.

    With --console-host, that name is one of the server's too, and the Host
    header decides which routes a request reaches (Route.site): the console's
    on that name, the API on the others.
    """

    def __init__(self, cfg: Config, accepts_any_token: Callable[[], bool]):
        self.scheme = "https" if cfg.tls_cert else "http"
        self.names = {n for n in cfg.allowed_hosts if not n.startswith("*.")}
        self.suffixes = tuple(n[1:] for n in cfg.allowed_hosts if n.startswith("*."))
        self.public_origin = ""
        if cfg.public_url:
            url = urllib.parse.urlsplit(cfg.public_url)
            self.public_origin = f"{url.scheme}://{url.netloc}".lower()
            if url.hostname:
                self.names.add(url.hostname.rstrip("."))
        bound = cfg.host.strip("[]").lower().rstrip(".")
        if bound not in _WILDCARD_HOSTS:
            self.names.add(bound)
        self.console_host, self.console_schemes = cfg.console_host, {self.scheme}
        if cfg.console_host:
            self.names.add(cfg.console_host)
            # Behind a TLS proxy the console's forms come from https://CONSOLE-HOST
            # though this server speaks http: the scheme of --public-url counts too.
            self.console_schemes = {self.scheme, urllib.parse.urlsplit(cfg.public_url).scheme
                                    or self.scheme}
        self.checks_names = _is_loopback(cfg.host) or bool(cfg.allowed_hosts)
        self._accepts_any_token = accepts_any_token

    def _own(self, name: str) -> bool:
        """Whether ``name`` (see _split_host) is a loopback or configured name."""
        if name == "localhost" or name.endswith(".localhost") or name in self.names:
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return name.endswith(self.suffixes) if self.suffixes else False

    def allows(self, name: str) -> bool:
        """Whether a request whose Host (or absolute target) names ``name`` is served."""
        name = name.strip("[]").lower().rstrip(".")
        if self._own(name) or _is_ip(name):
            return True
        return not self.checks_names and not self._accepts_any_token()

    def origin_allowed(self, origin: Optional[str], host: Optional[str]) -> bool:
        """Whether a form with this Origin comes from this server's own pages.

        The Origin must be the --public-url's, or name this server (one of its own
        names, or the request's if that is an IP address or any name is served) with
        the scheme of the server and the port of the request.
        """
        if not origin or origin == "null":
            return False
        if self.public_origin and origin.lower() == self.public_origin:
            return True
        try:
            url = urllib.parse.urlsplit(origin)
            name, port = _split_host(url.netloc)
            host_name, host_port = _split_host(host or "")
        except (ValueError, BadRequest):
            return False
        default = 443 if self.scheme == "https" else 80
        if url.scheme != self.scheme and self.console_host and name == self.console_host \
                and url.scheme in self.console_schemes and not port and not host_port:
            return not (url.path or url.query or url.fragment)  # through a TLS proxy
        if url.scheme != self.scheme or url.path or url.query or url.fragment \
                or (port or default) != (host_port or default):
            return False
        if self._own(name):
            return True
        return name == host_name and (_is_ip(name) or self.allows(name))

    def site(self, host: Optional[str]) -> str:
        """The Route.site a request with this Host header reaches: "console" on the
        --console-host, "api" on any other name, "" without --console-host."""
        if not self.console_host:
            return ""
        try:
            name, _ = _split_host(host or "")
        except BadRequest:
            return "api"
        return "console" if name == self.console_host else "api"

    def console_url(self, host: Optional[str], target: str) -> str:
        """The console host's URL of ``target`` (a local path and query), on the port
        of the request's Host and the scheme of --public-url (else the server's)."""
        try:
            _, port = _split_host(host or "")
        except BadRequest:
            port = None
        scheme = self.public_origin.partition(":")[0] or self.scheme
        authority = self.console_host + (f":{port}" if port else "")
        return f"{scheme}://{authority}{target}"


class _ToConsoleHost(HTTPError):
    """A console page asked of the API's host name (--console-host): 302 to the
    console's."""

    status, reason = 302, "Found"


# ==== 10. Handlers, by API area =============================================
# App: the API's routes, each declared once in _add_routes and its helpers,
# and thin handlers that parse the request and call the engine (section 6) or
# identity (section 8). Dispatch authenticates and authorizes from the matched
# Route before any body is read, and turns every error into {"code","message"}.

# The JSON the handlers answer, for the OpenAPI document. Property names are
# those of Pulumi Cloud's schemas (a contract test compares them), and a unit
# test checks real answers against them, so they cannot drift from the code.
_CAPABILITIES = _obj(("capabilities",), capabilities=_list_of(_obj(
    ("capability",), capability=_STR, version=_INT, configuration=_ANY_OBJECT)))
_USER = _obj(id=_STR, githubLogin=_STR, name=_STR, email=_STR, avatarUrl=_STR,
             organizations=_list_of(_obj(githubLogin=_STR, name=_STR, avatarUrl=_STR,
                                         role=_STR)),
             identities=_list_of(_STR), siteAdmin=_BOOL,
             tokenInfo=_obj(("name",), name=_STR, organization=_STR, team=_STR))
_DEFAULT_ORG = _obj(GitHubLogin=_STR, Messages=_list_of(_ANY_OBJECT))
_STACK_NAMES = {"id": _STR, "orgName": _STR, "projectName": _STR, "stackName": _STR}
_STACK_LIST = _obj(("stacks", "continuationToken"), continuationToken=_NULLABLE_STR,
                   stacks=_list_of(_obj(tuple(_STACK_NAMES), **_STACK_NAMES, lastUpdate=_INT,
                                        resourceCount=_INT)))
_STACK = _obj((*_STACK_NAMES, "activeUpdate", "tags", "version"), **_STACK_NAMES,
              activeUpdate=_NULLABLE_STR, tags=_STR_MAP, version=_INT,
              currentOperation=_obj(kind=_STR, author=_STR, started=_INT))
_USER_INFO = _obj(("name", "githubLogin", "avatarUrl"), name=_STR, githubLogin=_STR,
                  avatarUrl=_STR, email=_STR)
_UPDATE_INFO = _obj(
    kind=_STR, startTime=_INT, message=_STR, environment=_STR_MAP, config=_ANY_OBJECT,
    result=_STR, endTime=_INT, version=_INT, updateID=_STR,
    resourceChanges={"type": "object", "additionalProperties": _INT}, resourceCount=_INT)
_UPDATE_PROGRAM = _obj(name=_STR, runtime=_STR, main=_STR, description=_STR,
                       options=_obj(dryRun=_BOOL), config=_ANY_OBJECT, metadata=_ANY_OBJECT)
_EVENTS = _obj(("events", "continuationToken"), events=_list_of(_ANY_OBJECT),
               continuationToken=_NULLABLE_STR)
_LEASE = {"token": _STR, "tokenExpiration": _INT}
_ACCESS_TOKEN = _obj(("id", "name", "description", "createdBy", "created", "lastUsed",
                      "expires", "admin"), id=_STR, name=_STR, description=_STR,
                     createdBy=_STR, created=_STR, lastUsed=_INT, expires=_INT, admin=_BOOL)
_TOKEN_LIST = _obj(("tokens",), tokens=_list_of(_ACCESS_TOKEN))
_NEW_TOKEN = _obj(("id", "tokenValue"), id=_STR, tokenValue=_STR)
_MEMBER = _obj(("role", "user", "created", "knownToPulumi", "virtualAdmin"), role=_STR,
               user=_USER_INFO, created=_STR, knownToPulumi=_BOOL, virtualAdmin=_BOOL,
               fgaRole=_obj(("id", "name", "modifiedAt"), id=_STR, name=_STR,
                            modifiedAt=_STR))
_ROLE = _obj(("id", "orgId", "version", "isOrgDefault", "created", "modified"), id=_STR,
             orgId=_STR, name=_STR, description=_STR, resourceType=_STR, uxPurpose=_STR,
             defaultIdentifier=_STR, version=_INT, isOrgDefault=_BOOL, created=_STR,
             modified=_STR)
_TEAM_STACK = _obj(("projectName", "stackName", "permission"), projectName=_STR,
                   stackName=_STR, permission=_INT)
_TEAM = _obj(("kind", "name", "displayName", "description"), kind=_STR, name=_STR,
             displayName=_STR, description=_STR,
             members=_list_of(_obj(("name", "githubLogin", "avatarUrl", "role"), name=_STR,
                                   githubLogin=_STR, avatarUrl=_STR, email=_STR, role=_STR)),
             stacks=_list_of(_TEAM_STACK))
_UPDATE_TEAM = _obj(memberAction=_STR, member=_STR, newDisplayName=_STR, newDescription=_STR,
                    addStackPermission=_TEAM_STACK, editStackPermission=_TEAM_STACK,
                    removeStack=_obj(("projectName", "stackName"), projectName=_STR,
                                     stackName=_STR))
_AUDIT_EVENTS = _obj(("auditLogEvents",), continuationToken=_NULLABLE_STR,
                     auditLogEvents=_list_of(_obj(
                         ("timestamp", "sourceIP", "event", "description", "user"),
                         timestamp=_INT, sourceIP=_STR, event=_STR, description=_STR,
                         user=_USER_INFO, actorName=_STR, tokenID=_STR, tokenName=_STR,
                         authFailure=_BOOL, userAgent=_STR, target=_STR, outcome=_STR)))
_SEARCH_RESOURCE = dict(created=_STR, custom=_BOOL, delete=_BOOL, id=_STR, modified=_STR,
                        module=_STR, name=_STR, package=_STR, pending=_STR, project=_STR,
                        protected=_BOOL, stack=_STR, type=_STR, urn=_STR)


def _search_answer(parent: str, provider: str) -> dict:
    """ResourceSearchResult, its resources naming their parent and provider URNs so."""
    return _obj(("total", "resources"), total=_INT, resources=_list_of(_obj(
        ("module", "package"), **_SEARCH_RESOURCE, **{parent: _STR, provider: _STR})),
        pagination=_obj(previous=_STR, next=_STR, cursor=_STR))


_WEBHOOK_PROPS = dict(organizationName=_STR, projectName=_STR, stackName=_STR, name=_STR,
                      displayName=_STR, payloadUrl=_STR, active=_BOOL, format=_STR,
                      filters=_list_of(_STR), groups=_list_of(_STR))
_WEBHOOK_BODY = _obj(("displayName", "payloadUrl"), **_WEBHOOK_PROPS, secret=_STR)
_WEBHOOK = _obj(("organizationName", "name", "displayName", "payloadUrl", "active",
                 "hasSecret", "secretCiphertext"), **_WEBHOOK_PROPS, hasSecret=_BOOL,
                secretCiphertext=_STR)
_WEBHOOK_DELIVERY = _obj(
    ("id", "kind", "payload", "timestamp", "duration", "requestUrl", "requestHeaders",
     "responseCode", "responseHeaders", "responseBody"), id=_STR, kind=_STR, payload=_STR,
    timestamp=_INT, duration=_INT, requestUrl=_STR, requestHeaders=_STR, responseCode=_INT,
    responseHeaders=_STR, responseBody=_STR)

_OPENAPI_DOC = _obj(("openapi", "info", "paths"), openapi=_STR, info=_ANY_OBJECT,
                    paths=_ANY_OBJECT, components=_ANY_OBJECT)


class App:
    """Routes API requests to the engine and turns results into responses."""

    def __init__(self, cfg: Config, engine: Engine):
        self.cfg = cfg
        self.engine = engine
        self.router = Router()
        self.audit = AuditLog(cfg, engine.store)
        self.identity = Identity(cfg, engine.store, self.audit)
        self.webhooks = Webhooks(cfg, engine.store, engine.keys, engine.metrics)
        engine.on_event.append(self.webhooks.enqueue)
        self.oidc_issuers = cfg.oidc_issuers  # re-read at each exchange: keys can rotate
        self.started = time.time()
        self.draining = False  # set when the server starts to stop: /readyz answers 503
        # Other kinds of route authentication by name (the console's "session"),
        # each ``f(req)`` setting req.principal or raising; run before any body is read.
        self.authenticators: dict = {}
        self.hosts = _AllowedHosts(cfg, self.identity.accepts_any_token)  # checked by _Handler
        self._add_routes()

    def _add_routes(self) -> None:
        # Path parameters carry Pulumi Cloud's names, and operationIds are
        # its ones, so the document lines up with the published spec.
        SP = "/api/stacks/{orgName}/{projectName}/{stackName}"
        r = functools.partial(self.router.add, tag="Operations", auth="none", need="none",
                              site="any")
        r("GET", "/healthz", self.healthz, op="Healthz", response=_obj(("status",), status=_STR))
        r("GET", "/readyz", self.readyz, op="Readyz", response=_obj(("status",), status=_STR))
        r("GET", "/metrics", self.metrics, op="Metrics")
        r = functools.partial(self.router.add, tag="Service")
        r("GET", "/api/capabilities", self.capabilities, auth="none", op="Capabilities",
          response=_CAPABILITIES, need="none")
        r("GET", "/api/openapi/pulumi-spec.json", self.openapi, auth="none",
          op="FetchRestSpecification", response=_OPENAPI_DOC, need="none")
        r("GET", "/api/openapi", self.openapi, auth="none", op="GetOpenAPIDocument",
          response=_OPENAPI_DOC, need="none")
        r = functools.partial(self.router.add, tag="Users")
        r("GET", "/api/user", self.user, op="GetCurrentUser", response=_USER, need="signed-in")
        r("GET", "/api/user/organizations/default", self.default_org,
          op="GetDefaultOrganization", response=_DEFAULT_ORG, need="signed-in")
        r("GET", "/api/user/stacks", self.list_stacks, op="ListUserStacks", query=(
            "organization", "project", "tagName", "tagValue", "continuationToken"),
          response=_STACK_LIST, need="signed-in")
        r = functools.partial(self.router.add, tag="Stacks")
        r("HEAD", "/api/stacks/{orgName}/{projectName}", self.project_exists, op="ProjectExists",
          need="signed-in")
        r("POST", "/api/stacks/{orgName}/{projectName}", self.create_stack, op="CreateStack",
          body=_obj(("stackName",), stackName=_STR, tags=_STR_MAP, teams=_list_of(_STR),
                    state=_UNTYPED_DEPLOYMENT), response=_EMPTY, need="create")
        r("GET", SP, self.get_stack, op="GetStack", response=_STACK, need="read")
        r("DELETE", SP, self.delete_stack, op="DeleteStack", query=("force",), response=_EMPTY,
          need="admin")
        r("POST", SP + "/rename", self.rename_stack, op="RenameStack",
          body=_obj(newName=_STR, newProject=_STR), response=_EMPTY, need="admin")
        r("PATCH", SP + "/tags", self.set_tags, op="UpdateStackTags", body=_STR_MAP,
          response=_EMPTY, need="write")
        r = functools.partial(self.router.add, tag="State")
        r("GET", SP + "/export", self.export, op="ExportStack", response=_UNTYPED_DEPLOYMENT,
          need="read", trim=True)
        r("GET", SP + "/export/{version}", self.export, op="ExportStackAtVersion",
          response=_UNTYPED_DEPLOYMENT, need="read", trim=True)
        r("POST", SP + "/import", self.import_state, op="ImportStack", body=_UNTYPED_DEPLOYMENT,
          response=_obj(("updateId",), updateId=_STR), need="admin", trim=True)
        r = functools.partial(self.router.add, tag="Secrets")
        r("POST", SP + "/encrypt", self.encrypt, op="EncryptValue",
          body=_obj(("plaintext",), plaintext=_STR),
          response=_obj(("ciphertext",), ciphertext=_STR), need="write")
        r("POST", SP + "/decrypt", self.decrypt, op="DecryptValue",
          body=_obj(("ciphertext",), ciphertext=_STR),
          response=_obj(("plaintext",), plaintext=_STR), need="write")
        r("POST", SP + "/batch-encrypt", self.batch_encrypt, op="BatchEncryptValue",
          body=_obj(("plaintexts",), plaintexts=_list_of(_STR)),
          response=_obj(("ciphertexts",), ciphertexts=_list_of(_STR)), need="write")
        r("POST", SP + "/batch-decrypt", self.batch_decrypt, op="BatchDecryptValue",
          body=_obj(("ciphertexts",), ciphertexts=_list_of(_STR)),
          response=_obj(("plaintexts",), plaintexts=_STR_MAP), need="write")
        r("POST", SP + "/decrypt/log-decryption", self.log_decryption, op="LogOnlyDecryptValue",
          body=_obj(secretName=_STR), response=_EMPTY, need="read")
        r("POST", SP + "/decrypt/log-batch-decryption", self.log_decryption,
          op="LogOnlyBatchDecryptValue", body=_obj(commandName=_STR), response=_EMPTY,
          need="read")
        r = functools.partial(self.router.add, tag="Updates")
        r("GET", SP + "/updates", self.history, op="GetStackUpdates", query=("pageSize", "page"),
          response=_obj(("updates",), updates=_list_of(_obj(
              **_UPDATE_INFO["properties"], requestedBy=_USER_INFO))), need="read")
        r("GET", SP + "/updates/latest", self.latest_update, op="GetLatestStackUpdate",
          response=_obj(("info",), info=_UPDATE_INFO, requestedBy=_USER_INFO), need="read")
        for kind in _UPDATE_KINDS:
            self._add_update_routes(r, SP, kind)
        r("GET", "/api/orgs/{orgName}/resources/summary", self.usage_summary,
          op="GetUsageSummaryResourceHours", tag="Organizations",
          query=("granularity", "lookbackDays", "lookbackStart"),
          response=_obj(("summary",), summary=_list_of(_obj(
              ("year", "resources", "resourceHours"), year=_INT, month=_INT, day=_INT,
              hour=_INT, resources=_INT, resourceHours=_INT))))
        self._add_access_routes()
        self._add_webhook_routes(SP)
        self._add_search_routes()

    def _add_webhook_routes(self, sp: str) -> None:
        """Organization webhooks (org admins) and stack webhooks (stack admins)."""
        for base, need, ops in (
                ("/api/orgs/{orgName}/hooks", "org-admin", (
                    "ListOrganizationWebhooks", "CreateOrganizationWebhook",
                    "GetOrganizationWebhook", "UpdateOrganizationWebhook",
                    "DeleteOrganizationWebhook", "GetOrganizationWebhookDeliveries",
                    "RedeliverOrganizationWebhookEvent", "PingOrganizationWebhook")),
                (sp + "/hooks", "admin", (
                    "ListStackWebhooks", "CreateStackWebhook", "GetStackWebhook",
                    "UpdateStackWebhook", "DeleteStackWebhook", "GetStackWebhookDeliveries",
                    "RedeliverStackWebhookEvent", "PingStackWebhook"))):
            r = functools.partial(self.router.add, tag="Webhooks", need=need,
                                  body_limit=MAX_WEBHOOK_BODY)
            hook = base + "/{hookName}"
            r("GET", base, self.list_webhooks, op=ops[0], response=_list_of(_WEBHOOK),
              body_limit=0)
            r("POST", base, self.create_webhook, op=ops[1], body=_WEBHOOK_BODY,
              response=_WEBHOOK)
            r("GET", hook, self.get_webhook, op=ops[2], response=_WEBHOOK, body_limit=0)
            r("PATCH", hook, self.update_webhook, op=ops[3], body=_WEBHOOK_BODY,
              response=_WEBHOOK)
            r = functools.partial(self.router.add, tag="Webhooks", need=need)  # no body
            r("DELETE", hook, self.delete_webhook, op=ops[4], response=_EMPTY)
            r("GET", hook + "/deliveries", self.list_webhook_deliveries, op=ops[5],
              response=_list_of(_WEBHOOK_DELIVERY))
            r("POST", hook + "/deliveries/{event}/redeliver", self.redeliver_webhook_event,
              op=ops[6], response=_WEBHOOK_DELIVERY)
            r("POST", hook + "/ping", self.ping_webhook, op=ops[7], response=_WEBHOOK_DELIVERY)

    def _add_search_routes(self) -> None:
        """Resource search across the stacks the caller may read (SearchIndex, section 6)."""
        r = functools.partial(self.router.add, tag="ResourceSearch", need="signed-in")
        search = "/api/orgs/{orgName}/search/resources"
        # The CLI's apitype.ResourceResult names parent and provider URNs "parent.urn"
        # (`pulumi org search`); the v2 answer "parent_urn" (`pulumi insights`).
        r("GET", search, self.search_resources, op="GetOrgResourceSearchQuery",
          query=("query", "sort", "page", "size", "cursor", "properties"),
          response=_search_answer("parent.urn", "provider.urn"))
        r("GET", search + "v2", self.search_resources_v2, op="GetOrgResourceSearchV2Query",
          query=("query", "sort", "asc", "page", "size", "cursor", "properties"),
          response=_search_answer("parent_urn", "provider_urn"))
        r("GET", search + "/parse", self.parse_search_query, op="GetNaturalLanguageQuery",
          query=("query",), response=_obj(("query",), query=_STR))

    def _add_access_routes(self) -> None:
        """Tokens, members, teams, stack permissions and the audit log (section 8)."""
        ORG, TEAM = "/api/orgs/{orgName}", "/api/orgs/{orgName}/teams/{teamName}"
        new_token = functools.partial(_obj, ("description", "expires"), description=_STR,
                                      expires=_INT)
        r = functools.partial(self.router.add, tag="AccessTokens")
        r("GET", "/api/user/tokens", self.list_personal_tokens, op="ListPersonalTokens",
          response=_TOKEN_LIST, need="signed-in")
        r("POST", "/api/user/tokens", self.create_personal_token, op="CreatePersonalToken",
          body=new_token(), response=_NEW_TOKEN, need="signed-in")
        r("DELETE", "/api/user/tokens/{tokenId}", self.delete_personal_token,
          op="DeletePersonalToken", response=_EMPTY, need="signed-in")
        r("GET", ORG + "/tokens", self.list_org_tokens, op="ListOrgTokens", response=_TOKEN_LIST)
        r("POST", ORG + "/tokens", self.create_org_token, op="CreateOrgToken",
          body=new_token(name=_STR, admin=_BOOL), response=_NEW_TOKEN)
        r("DELETE", ORG + "/tokens/{tokenId}", self.delete_org_token, op="DeleteOrgToken",
          response=_EMPTY)
        r("GET", TEAM + "/tokens", self.list_team_tokens, op="ListTeamTokens",
          response=_TOKEN_LIST)
        r("POST", TEAM + "/tokens", self.create_team_token, op="CreateTeamToken",
          body=new_token(name=_STR), response=_NEW_TOKEN)
        r("DELETE", TEAM + "/tokens/{tokenId}", self.delete_team_token, op="DeleteTeamToken",
          response=_EMPTY)
        r = functools.partial(self.router.add, tag="Organizations")
        r("GET", ORG + "/members", self.list_members, op="ListOrganizationMembers",
          query=("type", "continuationToken"),
          response=_obj(("members",), members=_list_of(_MEMBER),
                        continuationToken=_NULLABLE_STR), need="signed-in")
        r("POST", ORG + "/members/{userLogin}", self.add_org_member, op="AddOrganizationMember",
          body=_obj(("role",), role=_STR), response=_MEMBER)
        r("PATCH", ORG + "/members/{userLogin}", self.update_org_member,
          op="UpdateOrganizationMember", body=_obj(role=_STR, fgaRoleId=_STR),
          response=_EMPTY)
        r("DELETE", ORG + "/members/{userLogin}", self.remove_org_member,
          op="DeleteOrganizationMember", response=_EMPTY)
        r = functools.partial(self.router.add, tag="Roles")
        r("GET", ORG + "/roles", self.list_roles, op="ListRolesByOrgIDAndUXPurpose",
          query=("uxPurpose",), response=_obj(("roles",), roles=_list_of(_ROLE)),
          need="signed-in")
        r("POST", ORG + "/roles", self.refuse_custom_roles, op="CreateRole", body=_obj(
            name=_STR, description=_STR, resourceType=_STR, uxPurpose=_STR,
            details=_ANY_OBJECT), response=_ROLE)
        r("GET", ORG + "/roles/{roleID}", self.get_role, op="GetRole", response=_ROLE,
          need="signed-in")
        r("PATCH", ORG + "/roles/{roleID}", self.refuse_custom_roles, op="UpdateRole",
          body=_obj(name=_STR, description=_STR, details=_ANY_OBJECT), response=_ROLE)
        r("DELETE", ORG + "/roles/{roleID}", self.refuse_custom_roles, op="DeleteRole",
          query=("force",), response=_EMPTY)
        r("POST", TEAM + "/roles/{roleID}", self.refuse_custom_roles, op="UpdateTeamRoles",
          response=_EMPTY)
        r = functools.partial(self.router.add, tag="Teams")
        r("GET", ORG + "/teams", self.list_teams, op="ListTeams",
          response=_obj(("teams",), teams=_list_of(_TEAM)), need="signed-in")
        r("POST", ORG + "/teams/pulumi", self.create_team, op="CreatePulumiTeam",
          body=_obj(("name",), name=_STR, displayName=_STR, description=_STR),
          response=_TEAM)
        r("GET", TEAM, self.get_team, op="GetTeam", response=_TEAM, need="signed-in")
        r("PATCH", TEAM, self.update_team, op="UpdateTeam", body=_UPDATE_TEAM, response=_EMPTY)
        r("DELETE", TEAM, self.delete_team, op="DeleteTeam", response=_EMPTY)
        r("PATCH", "/api/console/stacks/{orgName}/{projectName}/{stackName}/teams/{teamName}",
          self.update_team_stack_permissions, op="UpdateTeamStackPermissions",
          body=_obj(("permissions",), permissions=_INT), response=_EMPTY, need="admin")
        self.router.add("POST", "/api/oauth/token", self.oauth_token, auth="none", op="Token",
                        tag="OAuth", body_limit=MAX_ANONYMOUS_BODY, need="none", response=_obj(
                            ("access_token", "issued_token_type", "token_type", "expires_in",
                             "scope"), access_token=_STR, issued_token_type=_STR,
                            token_type=_STR, expires_in=_INT, scope=_STR))
        r = functools.partial(self.router.add, tag="AuditLogs")
        r("GET", ORG + "/auditlogs", self.list_audit_logs, op="ListAuditLogEventsHandlerV1",
          query=("continuationToken", "startTime", "endTime", "eventFilter", "userFilter"),
          response=_AUDIT_EVENTS)
        r("GET", ORG + "/auditlogs/v2", self.list_audit_logs, op="ListAuditLogEventsHandlerV2",
          query=("continuationToken", "startTime", "endTime", "eventFilter", "userFilter"),
          response=_AUDIT_EVENTS)
        r("GET", ORG + "/auditlogs/v2/export", self.export_audit_logs,
          op="ExportAuditLogEventsHandlerV2",
          query=("format", "startTime", "endTime", "eventFilter", "userFilter"))

    def _add_update_routes(self, r: Callable, sp: str, kind: str) -> None:
        """The routes of one kind of update, under ``SP/<kind>`` as Pulumi Cloud has them.

        The CLI says ``update/{id}`` for every kind once an update exists; the
        published API names the kind. All of them reach the same update.
        """
        up = f"{sp}/{kind}/{{updateID}}"
        r("POST", f"{sp}/{kind}", self._create_update(kind), op="CreateUpdateFor" + kind.title(),
          body=_UPDATE_PROGRAM, response=_obj(("updateID",), updateID=_STR), need="write")
        r("POST", up, self.start_update, op="StartUpdateFor" + kind.title(),
          body=_obj(tags=_STR_MAP, journalVersion=_INT),
          response=_obj(("version",), version=_INT, journalVersion=_INT, **_LEASE),
          need="write")
        r("GET", up, self.update_status, op="GetUpdateStatusFor" + kind.title(),
          query=("continuationToken",), response=_obj(
              ("status", "events"), status=_STR, events=_list_of(_ANY_OBJECT),
              continuationToken=_STR), need="read")
        r("GET", up + "/events", self.list_events, op="GetEngineEvents_" + kind,
          query=("continuationToken", "urn", "type", "include_non_activated"),
          response=_EVENTS, need="read")
        r("POST", up + "/cancel", self.cancel_update, op="CancelUpdate_" + kind, response=_EMPTY,
          need="write")
        r("POST", up + "/renew_lease", self.renew_lease, auth="update",
          op="RenewUpdateLease_" + kind, body=_obj(token=_STR, duration=_INT),
          response=_obj(tuple(_LEASE), **_LEASE), need="lease")
        # Previews save no state (the engine would answer 400), and Pulumi
        # Cloud has no checkpoint routes for them either.
        if kind != "preview":
            r("PATCH", up + "/checkpoint", self.checkpoint, auth="update",
              op="PatchUpdateCheckpoint_" + kind, body=_obj(
                  ("version", "deployment"), isInvalid=_BOOL, version=_INT,
                  features=_list_of(_STR), deployment=_ANY_OBJECT), response=_EMPTY,
              need="lease", gated=True, trim=True)
            r("PATCH", up + "/checkpointverbatim", self.checkpoint_verbatim, auth="update",
              op="PatchUpdateVerbatimCheckpoint_" + kind, body=_obj(
                  ("version", "untypedDeployment", "sequenceNumber"), version=_INT,
                  untypedDeployment=_UNTYPED_DEPLOYMENT, sequenceNumber=_INT), response=_EMPTY,
              need="lease", gated=True, trim=True)
            r("PATCH", up + "/checkpointdelta", self.checkpoint_delta, auth="update",
              op="PatchUpdateCheckpointDelta_" + kind, body=_obj(
                  ("version", "checkpointHash", "sequenceNumber", "deploymentDelta"),
                  version=_INT, checkpointHash=_STR, sequenceNumber=_INT,
                  deploymentDelta=_list_of(_ANY_OBJECT)), response=_EMPTY,
              need="lease", gated=True)
        r("PATCH", up + "/journalentries", self.journal_entries, auth="update",
          op="CreateJournalEntries_" + kind,
          body=_obj(("entries",), entries=_list_of(_ANY_OBJECT)), response=_EMPTY,
          need="lease", gated=True)
        r("POST", up + "/events/batch", self.events_batch, auth="update",
          op="RecordEngineEventBatch_" + kind,
          body=_obj(("events",), events=_list_of(_ANY_OBJECT)), response=_EMPTY,
          need="lease", gated=True)
        r("POST", up + "/complete", self.complete, auth="update", op="CompleteUpdate_" + kind,
          body=_obj(("status",), status={"type": "string",
                                         "enum": ["succeeded", "failed", "cancelled"]}),
          response=_EMPTY, need="lease", trim=True)

    # -- dispatch -----------------------------------------------------------

    def resolve(self, req: Request) -> Callable:
        """Return the handler of ``req`` once its route and credentials check out.

        Needs only the request line and headers, so the server refuses unknown
        routes and callers before it reads (and decompresses) any body.
        """
        req.route, req.params = self.router.match(req.method, req.path)
        self._check_site(req)
        self._authenticate(req, req.route.auth)
        self._authorize(req)
        return req.route.handler

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
                return Response(500, _dumps(HTTPError().body()))
            log.warning("storage error on %s %s: %s", req.method, _escape_log(req.path), e)
            return Response(err.status, _dumps(err.body()))
        except Exception:  # noqa: BLE001 - the one place that catches everything
            log.exception("unexpected error on %s %s", req.method, _escape_log(req.path))
            return Response(500, _dumps(HTTPError().body()))  # no detail of the exception

    def _check_site(self, req: Request) -> None:
        """With --console-host, refuse a route of the console on another host name
        (a GET goes to the console's host) and one of the API on the console's host.

        Pages and API keep their own origins: the console's cookies and forms
        never go to the API's name, and the API's answers never come from the
        console's. Health and metrics (site "any") answer on both.
        """
        site = self.hosts.site(req.headers.get("Host"))
        if not site or req.route.site in ("any", site):
            return
        if site == "console":
            raise NotFound(f"the API is not served on the console's host name "
                           f"{self.cfg.console_host} (--console-host)")
        if req.method in ("GET", "HEAD") and req.path.startswith("/") \
                and not req.path.startswith("//"):
            target = urllib.parse.quote(req.path, safe="/%:@!$&'()*+,;=-._~") + (
                "?" + urllib.parse.urlencode(req.query, doseq=True) if req.query else "")
            url = self.hosts.console_url(req.headers.get("Host"), target)
            raise _ToConsoleHost(f"the console is at {url}", {"Location": url})
        raise NotFound(f"no route for {req.path} on this host name: the console's pages "
                       f"are on {self.cfg.console_host} (--console-host)")

    def _authenticate(self, req: Request, auth: str) -> None:
        """Check the Authorization header against what the route needs.

        API routes take ``token <t>``; the update routes take only
        ``update-token <t>`` (checked against the lease by the engine), and a
        bad lease is 403, never 401, which would send the user to log in.
        """
        if auth == "none":
            return
        if auth in self.authenticators:
            self.authenticators[auth](req)
            return
        scheme, _, token = (req.headers.get("Authorization") or "").strip().partition(" ")
        token = token.strip()
        if auth == "update":
            if scheme != "update-token" or not token:
                raise Forbidden("this call needs the update's lease token")
            # A cheap read before the body is read and parsed: a made-up lease
            # token costs us no more than one lookup.
            self.engine.updates.check_lease_token(*self._up(req), token)
        else:
            if scheme != "token" or not token:
                raise Unauthorized(_MSG_BAD_TOKEN)
            try:
                req.principal = self.identity.authenticate(token, req.remote)
            except _AuthFailure as e:
                self.audit.login_failure(req, req.path, e.why)
                raise
        req.auth_kind, req.token = scheme, token

    def _authorize(self, req: Request) -> None:
        """Refuse (403, audited) a caller without the permission the route needs.

        Runs before the body is read. Each route declares its need (Route.need,
        section 9); one that does not needs an org admin, so a new route fails closed.
        """
        p, params, need = req.principal, req.params, req.route.need
        if need in ("none", "lease"):  # public, or the lease _authenticate checked
            return
        if p is None:  # an authentication naming no caller cannot meet a need
            raise Forbidden(f"this needs a signed-in caller ({need})")
        org = params.get("orgName")
        if org is not None and org != self.cfg.org:
            raise NotFound(f"organization '{org}' not found")
        try:
            if need in ("read", "write", "admin"):
                self.identity.require(p, _PERM_BY_NAME[need], params["projectName"],
                                      params["stackName"])
            elif need == "create" and not self.identity.may_write_somewhere(p):
                raise Forbidden(f"creating a stack needs the 'write' permission; {p.actor} "
                                "has it on no stack")
            elif need == "org-admin" and not p.admin:
                raise Forbidden(f"this needs an organization admin; {p.actor} is not one")
            elif need == "org-admin" and p.kind == "anonymous" and req.method != "GET":
                raise Forbidden("no users exist yet: add the first admin with "
                                "`pulumi_backend.py user add NAME --role admin` and use a "
                                "token of theirs (`token create --user NAME`)")
        except Forbidden as e:
            self.audit.record("permission_denied", p, req, req.path, "denied", e.message)
            raise

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
        route = req.route.name if req.route else "unmatched"
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
        """The caller: its user, or the team or organization of its token."""
        p = req.principal
        out = {"id": p.login, "githubLogin": p.login, "name": p.name or p.login,
               "email": p.email, "avatarUrl": "",
               "organizations": [{"githubLogin": self.cfg.org, "name": self.cfg.org,
                                  "avatarUrl": "", "role": "admin" if p.admin else "member"}],
               "identities": [], "siteAdmin": False}
        if p.kind in ("team", "org"):  # `pulumi whoami -v` prints the token's kind and name
            out["tokenInfo"] = {"name": p.token_name, "organization": self.cfg.org,
                                "team": p.login if p.kind == "team" else ""}
        self.audit.record("user_login", p, req, p.actor)
        return out

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
            "organization", "project", "tagName", "tagValue", "continuationToken")},
            self.identity.visible(req.principal))

    def project_exists(self, req: Request) -> Response:
        """200 if the project has a stack the caller may read (any, for org admins), else 404.

        A member learns of no project through this that they cannot see a stack of.
        """
        org, project = req.params["orgName"], req.params["projectName"]
        visible = None if req.principal.admin else self.identity.visible(req.principal)
        if not self.engine.project_exists(org, project, visible):
            raise NotFound(f"project '{org}/{project}' not found")
        return Response(200, b"")

    def create_stack(self, req: Request) -> dict:
        """Create a stack, empty or with an initial state."""
        org, project, body = req.params["orgName"], req.params["projectName"], req.json()
        name = body.get("stackName")
        if isinstance(name, str):
            self._require(req, PERM_WRITE, project, name)
        out = self.engine.create_stack(org, project, body, user=req.principal.actor)
        self.audit.record("stack_created", req=req, target=f"{org}/{project}/{name}")
        return out

    def get_stack(self, req: Request) -> dict:
        """The stack: names, tags, version, operation in progress."""
        return self.engine.get_stack(*self._sp(req))

    def delete_stack(self, req: Request) -> None:
        """Delete the stack (with resources only if force=true)."""
        force = (req.q("force") or "false").lower() == "true"
        self.engine.delete_stack(*self._sp(req), force, user=req.principal.actor)
        self.audit.record("stack_deleted", req=req, target="/".join(self._sp(req)))

    def rename_stack(self, req: Request) -> None:
        """Rename the stack or move it to another project."""
        body = req.json()
        org, project, name = self._sp(req)
        new = (body.get("newProject") or project, body.get("newName") or name)
        if all(isinstance(v, str) for v in new):
            self._require(req, PERM_WRITE, *new)
        self.engine.rename_stack(org, project, name, body)
        self.audit.record("stack_renamed", req=req, target=f"{org}/{project}/{name}",
                          description=f"renamed to {org}/{new[0]}/{new[1]}")

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
        self.audit.record("stack_exported", req=req, target="/".join(self._sp(req)),
                          description=f"version {version}" if version is not None else "")
        if req.accepts_gzip:
            return Response(200, data, gzipped=True)  # stored bytes, as they are
        return Response(200, _gunzip_stored(data))

    def import_state(self, req: Request) -> dict:
        """Replace the stack's state; recorded as an "import" update."""
        update_id = self.engine.import_deployment(*self._sp(req), req.body, req.cli_version,
                                                  req.principal.actor)
        self.audit.record("stack_imported", req=req, target="/".join(self._sp(req)))
        return {"updateId": update_id}

    # -- secrets ------------------------------------------------------------

    def encrypt(self, req: Request) -> dict:
        """Encrypt a secret with the stack's key."""
        plaintext = _b64decode_strict(req.json().get("plaintext"), "plaintext")
        return {"ciphertext": _b64encode(self.engine.encrypt(*self._sp(req), [plaintext])[0])}

    def decrypt(self, req: Request) -> dict:
        """Decrypt a secret of the stack."""
        ciphertext = _b64decode_strict(req.json().get("ciphertext"), "ciphertext")
        plain = self.engine.decrypt(*self._sp(req), [ciphertext])[0]
        self._audit_decrypt(req, 1)
        return {"plaintext": _b64encode(plain)}

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
        self._audit_decrypt(req, len(blobs))
        # Keyed by the strings exactly as sent: the CLI looks each one up.
        return {"plaintexts": {c: _b64encode(p) for c, p in zip(unique, plain)}}

    def log_decryption(self, req: Request) -> None:
        """Log that the CLI showed secrets of the stack in plaintext."""
        req.json()  # only logged, yet held to the rules of every body
        self.engine.get_stack(*self._sp(req))  # 404 for an unknown stack
        log.info("secrets of %s were shown in plaintext", "/".join(self._sp(req)))
        body = req.json()
        what = body.get("secretName") or body.get("commandName") or ""
        self.audit.record("secrets_shown", req=req, target="/".join(self._sp(req)),
                          description=f"by {str(what)[:100]}" if what else "")

    def _audit_decrypt(self, req: Request, count: int) -> None:
        self.audit.record("secrets_decrypted", req=req, target="/".join(self._sp(req)),
                          description=f"{count} values")

    def _require(self, req: Request, need: int, project: str, stack: str) -> None:
        """A permission check that needs the body (after _authorize's); audited like it."""
        try:
            self.identity.require(req.principal, need, project, stack)
        except Forbidden as e:
            self.audit.record("permission_denied", req=req, target=req.path, outcome="denied",
                              description=e.message)
            raise

    # -- updates ------------------------------------------------------------

    def _up(self, req: Request) -> tuple:
        return (*self._sp(req), req.params["updateID"])

    def _create_update(self, kind: str) -> Callable:
        """The handler creating updates of ``kind`` (its route names the kind)."""
        def create_update(req: Request) -> dict:
            return self.engine.updates.create_update(*self._sp(req), kind, req.json(),
                                                     req.principal.actor)
        create_update.__doc__ = f"Create an update of kind {kind}; a second call starts it."
        return create_update

    def start_update(self, req: Request) -> dict:
        """Start the update (locking the stack) and hand out its lease."""
        out = self.engine.updates.start_update(*self._up(req), req.json(), req.cli_version)
        self.audit.record("update_started", req=req, target="/".join(self._up(req)),
                          description=f"version {out['version']}")
        return out

    def update_status(self, req: Request) -> dict:
        """The update's status."""
        return self.engine.update_results(*self._up(req))

    def list_events(self, req: Request) -> dict:
        """One page of the update's engine events (the update by id or version; urn filter)."""
        if req.q("type"):
            raise BadRequest("filtering by engine event type code is not supported here; "
                             "filter by urn, or read every event (--all --output json)")
        return self.engine.updates.list_events(*self._up(req), req.q("continuationToken"),
                                               req.q("urn"))

    def cancel_update(self, req: Request) -> None:
        """Cancel the update and unlock the stack (writers: their own; stack admins: any)."""
        p, (org, project, name, update_id) = req.principal, self._up(req)
        if self.identity.stack_permission(p, project, name) < PERM_ADMIN \
                and self.engine.update_requester(*self._up(req)) != p.actor:
            self._require(req, PERM_ADMIN, project, name)
        self.engine.updates.cancel(*self._up(req))
        self.audit.record("update_cancelled", req=req, target="/".join(self._up(req)))

    def renew_lease(self, req: Request) -> dict:
        """Extend the update's lease."""
        return self.engine.updates.renew_lease(*self._up(req), req.token, req.json())

    def checkpoint(self, req: Request) -> None:
        """Save the update's working state, as a whole deployment."""
        self.engine.updates.checkpoint_full(*self._up(req), req.token, req.body)

    def checkpoint_verbatim(self, req: Request) -> None:
        """Save the update's working state, as the CLI serialized it."""
        size = len(req.body)
        seq, data = _split_verbatim(req.body)
        req.body = b""  # the state is in ``data``: the whole body need not stay in memory
        self.engine.updates.checkpoint_verbatim(*self._up(req), req.token, seq, data)
        log.debug("verbatim checkpoint (%d bytes) for %s", size, req.params["updateID"])

    def checkpoint_delta(self, req: Request) -> None:
        """Save the update's working state, as edits of the last one."""
        self.engine.updates.checkpoint_delta(*self._up(req), req.token, req.body)
        log.debug("delta checkpoint (%d bytes) for %s", len(req.body), req.params["updateID"])

    def journal_entries(self, req: Request) -> None:
        """Append to the update's journal (replayed at the end)."""
        count = self.engine.updates.journal_append(*self._up(req), req.token, req.body, req.wire)
        log.debug("%d journal entries (%d bytes) for %s", count, len(req.body),
                  req.params["updateID"])

    def events_batch(self, req: Request) -> None:
        """Record a batch of the update's engine events."""
        self.engine.updates.events_append(*self._up(req), req.token, req.body)

    def complete(self, req: Request) -> None:
        """Finish the update: save its state and unlock the stack."""
        body = req.json()
        self.engine.updates.complete(*self._up(req), req.token, body)
        # The lease token stands for whoever started the update.
        actor = self.engine.update_requester(*self._up(req)) or self.cfg.user
        self.audit.record("update_completed", Principal(actor, "user", False), req,
                          "/".join(self._up(req)), description=str(body.get("status")))

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
        out = self.engine.latest_update(*self._sp(req))
        if "requestedBy" in out["info"]:  # Pulumi Cloud has it beside info, not in it
            out["requestedBy"] = out["info"].pop("requestedBy")
        return out

    def usage_summary(self, req: Request) -> dict:
        """Resources under management over time, per hour, day or month (org admins)."""
        granularity = req.q("granularity") or "daily"
        if granularity not in ("hourly", "daily", "monthly"):
            raise BadRequest(f"granularity must be hourly, daily or monthly, not "
                             f"{granularity!r}")
        try:
            days = int(req.q("lookbackDays") or 30)
            end = int(req.q("lookbackStart") or _now())
        except ValueError:
            raise BadRequest("lookbackDays and lookbackStart must be integers") from None
        if not (1 <= days <= 3660 and days * 86400 < end < 4102444800):  # 2100-01-01
            raise BadRequest("lookbackDays must be 1 to 3660 and lookbackStart a Unix time "
                             "before 2100")
        return self.engine.usage_summary(req.params["orgName"], granularity, days, end)

    # -- access: tokens, members, teams, audit log (section 8) ---------------

    def _personal(self, req: Request) -> str:
        if req.principal.kind != "user":
            raise Forbidden("personal tokens belong to users; this is a "
                            f"{req.principal.kind} token")
        return req.principal.login

    def _new_token(self, req: Request, kind: str, owner: str, name_field: bool) -> dict:
        body = req.json()
        name = body.get("name", "") if name_field else ""
        token_id, value = self.identity.create_token(
            req.principal, kind, owner, name, body.get("description", ""),
            body.get("expires") or 0, bool(body.get("admin")) and kind == "org", req)
        return {"id": token_id, "tokenValue": value}

    def list_personal_tokens(self, req: Request) -> dict:
        """The caller's personal tokens (never their values)."""
        return self.identity.tokens_json("personal", self._personal(req))

    def create_personal_token(self, req: Request) -> dict:
        """Create a personal token; its value is shown only in this answer."""
        return self._new_token(req, "personal", self._personal(req), False)

    def delete_personal_token(self, req: Request) -> None:
        """Revoke one of the caller's personal tokens."""
        self.identity.revoke_token(req.principal, req.params["tokenId"], "personal",
                                   self._personal(req), req)

    def list_org_tokens(self, req: Request) -> dict:
        """The organization's tokens."""
        return self.identity.tokens_json("org", self.cfg.org)

    def create_org_token(self, req: Request) -> dict:
        """Create an organization token; its value is shown only in this answer."""
        return self._new_token(req, "org", self.cfg.org, True)

    def delete_org_token(self, req: Request) -> None:
        """Revoke an organization token."""
        self.identity.revoke_token(req.principal, req.params["tokenId"], "org", self.cfg.org,
                                   req)

    def list_team_tokens(self, req: Request) -> dict:
        """The team's tokens."""
        return self.identity.tokens_json("team", req.params["teamName"])

    def create_team_token(self, req: Request) -> dict:
        """Create a team token; its value is shown only in this answer."""
        return self._new_token(req, "team", req.params["teamName"], True)

    def delete_team_token(self, req: Request) -> None:
        """Revoke a team token."""
        self.identity.revoke_token(req.principal, req.params["tokenId"], "team",
                                   req.params["teamName"], req)

    @staticmethod
    def _emails_shown(p: Principal, users: Iterable) -> None:
        """Drop the email of each of ``users`` (UserInfo dicts) but ``p``'s own, unless ``p``
        is an org admin: members see each other's logins and names, not their addresses."""
        if p.admin:
            return
        for user in users:
            if not (p.kind == "user" and user.get("githubLogin") == p.login):
                user.pop("email", None)

    def list_members(self, req: Request) -> dict:
        """The organization's members and their roles (emails: see _emails_shown)."""
        members = self.identity.members_json()
        self._emails_shown(req.principal, (m["user"] for m in members))
        return {"members": members, "continuationToken": None}

    def add_org_member(self, req: Request) -> dict:
        """Add a user to the organization with a role (admin or member)."""
        role = req.json().get("role", "member")
        user = self.identity.add_user(req.principal, req.params["userLogin"], role=role,
                                      req=req)
        return _member_json(user)

    def update_org_member(self, req: Request) -> None:
        """Change a member's role (member or admin, as role or built-in fgaRoleId)."""
        self.identity.set_role(req.principal, req.params["userLogin"],
                               self.identity.member_role(req.json()), req)

    def remove_org_member(self, req: Request) -> None:
        """Remove a member (and their personal tokens)."""
        self.identity.remove_user(req.principal, req.params["userLogin"], req)

    def list_roles(self, req: Request) -> dict:
        """The built-in roles: member and admin, and the stack permissions teams get."""
        return {"roles": self.identity.roles_json(req.q("uxPurpose"))}

    def get_role(self, req: Request) -> dict:
        """One built-in role."""
        return self.identity.role_json(req.params["roleID"])

    def refuse_custom_roles(self, req: Request) -> None:
        """Custom roles are not supported: 400, naming member roles and team grants."""
        raise BadRequest(_MSG_NO_CUSTOM_ROLES)

    def list_teams(self, req: Request) -> dict:
        """The organization's teams: all for org admins, a member's own for the others."""
        p = req.principal
        return {"teams": [t for t in self.identity.teams_json()
                          if p.admin or t["name"] in p.teams]}

    def create_team(self, req: Request) -> dict:
        """Create a team."""
        body = req.json()
        name = body.get("name")
        self.identity.create_team(req.principal, name, _opt_str(body, "displayName") or "",
                                  _opt_str(body, "description") or "", req)
        return self.identity.team_json(name)

    def get_team(self, req: Request) -> dict:
        """The team, its members and its stack permissions: for org admins and its members
        (to anyone else, a team that exists is as not found as one that does not)."""
        name, p = req.params["teamName"], req.principal
        if not p.admin and name not in p.teams:
            raise NotFound(f"team '{name}' not found")
        team = self.identity.team_json(name)
        self._emails_shown(p, team["members"])
        return team

    def update_team(self, req: Request) -> None:
        """Change a team: members, name and description, stack permissions."""
        team, body, p = req.params["teamName"], req.json(), req.principal
        action = body.get("memberAction")
        if action is not None:
            if action not in ("add", "remove"):
                raise BadRequest(f"memberAction must be add or remove, not {action!r}")
            change = self.identity.add_member if action == "add" else \
                self.identity.remove_member
            change(p, team, body.get("member"), req)
        if "newDisplayName" in body or "newDescription" in body:
            self.identity.set_team_info(p, team, _opt_str(body, "newDisplayName"),
                                        _opt_str(body, "newDescription"), req)
        for key in ("addStackPermission", "editStackPermission", "removeStack"):
            if body.get(key) is not None:
                grant = _require_dict(body[key], key)
                perm = 0 if key == "removeStack" else _perm_value(grant.get("permission"))
                self.identity.grant(p, team, _stack_of(grant), perm, req)

    def delete_team(self, req: Request) -> None:
        """Delete a team with its grants and tokens."""
        self.identity.delete_team(req.principal, req.params["teamName"], req)

    def update_team_stack_permissions(self, req: Request) -> None:
        """Set a team's permission on this stack (0 removes it)."""
        _, project, stack = self._sp(req)
        perm = _perm_value(req.json().get("permissions"))
        self.identity.grant_stack(req.principal, req.params["teamName"], project, stack, perm,
                                  req)

    def oauth_token(self, req: Request) -> dict:
        """Exchange a CI system's OIDC ID token for a short-lived access token (RFC 8693)."""
        self.identity.check_throttle(req.remote)
        try:
            if not self.oidc_issuers:
                raise _OIDCRefused("no --oidc-issuers configured")
            form = urllib.parse.parse_qs(req.body.decode("utf-8", "replace"), max_num_fields=20)
            return _oidc_exchange(self.identity, _load_issuers(self.oidc_issuers), form, req)
        except (_OIDCRefused, ValueError) as e:
            check = e.check if isinstance(e, _OIDCRefused) else str(e)
            self.identity.note_failure(req.remote)
            self.audit.login_failure(req, "", f"refused: {check}", "token_exchange")
            raise Unauthorized("the OIDC token exchange was refused") from None

    @staticmethod
    def _audit_filters(req: Request) -> tuple:
        """``(start, end, event, user)`` of an audit log query."""
        try:
            start, end = int(req.q("startTime") or 0), int(req.q("endTime") or 2 ** 62)
        except ValueError:
            raise BadRequest("startTime and endTime must be Unix times") from None
        return start, end, req.q("eventFilter"), req.q("userFilter")

    def list_audit_logs(self, req: Request) -> dict:
        """One page of audit events, newest first (org admins)."""
        return self.audit.page(req.q("continuationToken"), *self._audit_filters(req))

    def export_audit_logs(self, req: Request) -> Response:
        """Every matching audit event (the newest AUDIT_EXPORT_MAX_EVENTS) as CSV or CEF."""
        body, content_type = self.audit.export(req.q("format") or "csv",
                                               *self._audit_filters(req))
        return Response(200, body, content_type=content_type)

    # -- webhooks (section 8's Webhooks) --------------------------------------

    def _hook_scope(self, req: Request) -> tuple:
        """``(org, names)``: names (org, project, stack) for a stack webhook, else None."""
        p = req.params
        return p["orgName"], ((p["orgName"], p["projectName"], p["stackName"])
                              if "stackName" in p else None)

    def list_webhooks(self, req: Request) -> list:
        """The organization's or the stack's webhooks."""
        return self.webhooks.list_hooks(*self._hook_scope(req))

    def create_webhook(self, req: Request) -> Response:
        """Create a webhook (the server names it); its secret is never answered back."""
        org, names = self._hook_scope(req)
        out = self.webhooks.create(org, names, req.json())
        # The host only: a URL's path can be a credential (Slack's incoming webhooks).
        self.audit.record("webhook_created", req=req, target="/".join(names or (org,))
                          + f"/hooks/{out['name']}", description="to host " + str(
                              urllib.parse.urlsplit(out["payloadUrl"]).hostname)[:200])
        return _json_response(out, 201)

    def get_webhook(self, req: Request) -> dict:
        """One webhook."""
        return self.webhooks.get(*self._hook_scope(req), req.params["hookName"])

    def update_webhook(self, req: Request) -> dict:
        """Change a webhook; the secret only when the body names one."""
        org, names = self._hook_scope(req)
        out = self.webhooks.edit(org, names, req.params["hookName"], req.json())
        self.audit.record("webhook_updated", req=req, target="/".join(names or (org,))
                          + f"/hooks/{out['name']}")
        return out

    def delete_webhook(self, req: Request) -> None:
        """Delete a webhook and its deliveries."""
        org, names = self._hook_scope(req)
        self.webhooks.remove(org, names, req.params["hookName"])
        self.audit.record("webhook_deleted", req=req, target="/".join(names or (org,))
                          + f"/hooks/{req.params['hookName']}")

    def list_webhook_deliveries(self, req: Request) -> list:
        """A webhook's recent deliveries, newest first."""
        return self.webhooks.deliveries(*self._hook_scope(req), req.params["hookName"])

    def redeliver_webhook_event(self, req: Request) -> dict:
        """Send a delivery's payload again, now; answer how the receiver took it."""
        return self.webhooks.redeliver(*self._hook_scope(req), req.params["hookName"],
                                       req.params["event"])

    def ping_webhook(self, req: Request) -> dict:
        """Send a ping, now; answer how the receiver took it."""
        return self.webhooks.ping(*self._hook_scope(req), req.params["hookName"])

    # -- resource search ----------------------------------------------------

    def search_resources(self, req: Request) -> dict:
        """Search the resources of every stack the caller may read (Pulumi query syntax)."""
        return self._search(req, v2=False)

    def search_resources_v2(self, req: Request) -> dict:
        """Search resources, with ``sort`` and ``asc`` (the Insights API's form)."""
        return self._search(req, v2=True)

    def parse_search_query(self, req: Request) -> dict:
        """Check a query and give it back: no natural-language translation here."""
        query = (req.q("query") or "").strip()
        if not query:
            raise BadRequest("please provide a query")
        _SearchQuery(query)
        return {"query": query}

    def resource_search(self, p: Principal, query: str, sort: Iterable = (), asc: bool = False,
                        offset: int = 0, size: int = SEARCH_PAGE_SIZE) -> tuple:
        """Return ``(total, index rows)`` of one page of ``query`` over the stacks ``p``
        may read (the API's and the console's search)."""
        stack_ids = None
        if not p.admin:
            visible = self.identity.visible(p)
            stack_ids = [s[0] for s in self.engine.console_stacks() if visible(s[1], s[2])]
        return self.engine.search.search(query, stack_ids, list(sort), asc, offset, size)

    def _search(self, req: Request, v2: bool) -> dict:
        if (req.q("properties") or "").lower() == "true":
            raise BadRequest("this server does not index resource properties; search "
                             "without properties=true and read them with `pulumi stack export`")
        query = req.q("query") or ""
        sort = list(dict.fromkeys(f for value in req.query.get("sort", [])
                                  for f in value.split(",") if f))  # each field once
        if len(sort) > len(_SEARCH_SORTS):
            raise BadRequest(f"sort names {len(sort)} fields; there are "
                             f"{len(_SEARCH_SORTS)} to sort by")
        asc = v2 and (req.q("asc") or "").lower() == "true"
        size = _search_int(req.q("size"), "size", SEARCH_PAGE_SIZE, SEARCH_MAX_PAGE_SIZE)
        page = None
        if req.q("cursor"):
            offset = _decode_search_cursor(req.q("cursor"))
        else:
            page = _search_int(req.q("page"), "page", 1, SEARCH_MAX_WINDOW)
            offset = (page - 1) * size
            if offset + size > SEARCH_MAX_WINDOW:
                raise BadRequest(f"page and size reach past the first {SEARCH_MAX_WINDOW} "
                                 "results; follow pagination.next (a cursor) instead")
        total, rows = self.resource_search(req.principal, query, sort, asc, offset, size)
        parent, provider = ("parent_urn", "provider_urn") if v2 else ("parent.urn",
                                                                      "provider.urn")
        out: dict = {"total": total,
                     "resources": [_search_result(r, parent, provider) for r in rows]}
        link = {"query": query, "size": size, **({"sort": ",".join(sort)} if sort else {}),
                **({"asc": "true"} if asc else {})}
        pagination: dict = {}
        if offset + size < total:
            following = ({"page": page + 1} if page is not None
                         and offset + 2 * size <= SEARCH_MAX_WINDOW
                         else {"cursor": _encode_search_cursor(offset + size)})
            pagination["next"] = req.path + "?" + urllib.parse.urlencode({**link, **following})
        if offset > 0:
            before = ({"page": page - 1} if page is not None
                      else {"cursor": _encode_search_cursor(max(0, offset - size))})
            pagination["previous"] = req.path + "?" + urllib.parse.urlencode({**link, **before})
        if page is None:
            pagination["cursor"] = _encode_search_cursor(offset)
        if pagination:
            out["pagination"] = pagination
        return out


def _search_int(text: Optional[str], name: str, default: int, most: int) -> int:
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= most:
        raise BadRequest(f"{name} must be a whole number from 1 to {most}")
    return value


def _encode_search_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(_dumps(["search", offset])).decode("ascii").rstrip("=")


def _decode_search_cursor(cursor: str) -> int:
    try:
        key = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, TypeError, RecursionError):
        key = None
    if not (isinstance(key, list) and len(key) == 2 and key[0] == "search"
            and isinstance(key[1], int) and not isinstance(key[1], bool)
            and 0 <= key[1] <= 2 ** 40):
        raise BadRequest("invalid cursor")
    return key[1]


def _search_result(row: dict, parent: str, provider: str) -> dict:
    """One ResourceResult of a search_resources row."""
    out = {"custom": bool(row["custom"]), "delete": bool(row["deleted"]),
           "id": row["resource_id"], "modified": _search_ms_text(row["modified"]),
           "module": row["module"], "name": row["name"], "package": row["package"],
           "project": row["project"], "protected": bool(row["protected"]),
           "stack": row["stack"], "type": row["type"], "urn": row["urn"]}
    if row["created"] is not None:
        out["created"] = _search_ms_text(row["created"])
    if row["pending"]:
        out["pending"] = row["pending"]
    if row["parent_urn"]:
        out[parent] = row["parent_urn"]
    if row["provider_urn"]:
        out[provider] = row["provider_urn"]
    return out


def _opt_str(body: dict, key: str) -> Optional[str]:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"{key} must be a string")
    return value


def _stack_of(grant: dict) -> str:
    """``project/stack`` of a TeamStackPermission or RemoveStackIdentifier."""
    project, stack = grant.get("projectName"), grant.get("stackName")
    if not (isinstance(project, str) and _NAME_RE.match(project)
            and isinstance(stack, str) and _NAME_RE.match(stack)):
        raise BadRequest("projectName and stackName must be valid names")
    return f"{project}/{stack}"


def _batch(body: dict, key: str) -> list:
    items = body.get(key)
    if not isinstance(items, list):
        raise BadRequest(f"{key} must be a list")
    if len(items) > MAX_BATCH_ITEMS:
        raise PayloadTooLarge(f"at most {MAX_BATCH_ITEMS} {key} per request")
    if not all(isinstance(item, str) for item in items):
        raise BadRequest(f"{key} must be base64 strings")
    return items


# ==== 11. Web console =======================================================
# A read-only view of stacks, resources and updates for browsers, served at /
# beside the API (which stays under /api/). Pages are HTML strings built here:
# every value passes through _h (html.escape), links are built from quoted
# path segments, and secrets are masked before anything is rendered
# (ciphertext objects and secret config become "[secret]"; nothing is ever
# decrypted). Signing in takes an access token once and keeps a server-side
# session: the cookie holds a random id, the database its SHA-256 and the
# token's hash, so a revoked token or a lost grant counts from the next page.
# Forms are POSTs checked for the server's own Origin (before the body is
# read) and a CSRF token: an HMAC of the session id, or before sign-in a
# double-submitted cookie. The CSP allows no inline script or style: the
# stylesheet and the optional script (progressive enhancement only) have paths
# of their own.

_SECRET_SIG, _SECRET_VALUE = "4dabf18193072939515e22adb298388d", "1b47061264138c4ac30d75fd1eb44270"
_SESSION_COOKIE, _CSRF_COOKIE = "pb_session", "pb_csrf"
#: The pre-session cookie of a single sign-on in flight (SameSite=Lax: the provider's
#: redirect back is a cross-site top-level GET), and the seconds it lasts.
_SSO_COOKIE, SSO_PENDING_SECONDS = "pb_sso", 600
_CONSOLE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; script-src 'self'; "
                               "img-src 'self' data:; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY", "Cache-Control": "no-store"}
_COLOR_CODES_RE = re.compile(r"<\{%[^%]*%\}>|\x1b\[[0-9;]*[A-Za-z]")
#: Explicit bidirectional formatting characters: in a name they only ever disguise it.
_BIDI_CONTROLS_RE = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
#: The CLI's symbol and colour of each step operation (pkg/display).
_STEP_OPS = {
    "same": (" ", "same"), "create": ("+", "create"), "update": ("~", "update"),
    "delete": ("-", "delete"), "replace": ("+-", "replace"),
    "create-replacement": ("++", "replace"), "delete-replaced": ("--", "replace"),
    "read": (">", "read"), "read-replacement": (">>", "read"), "refresh": ("~", "read"),
    "discard": ("<", "delete"), "discard-replaced": ("<<", "delete"),
    "remove-pending-replace": ("-", "delete"), "import": ("=", "import"),
    "import-replacement": ("=>", "import")}
_RESULT_CLASS = {"succeeded": "ok", "failed": "bad", "in-progress": "run",
                 "not-started": "run", "cancelled": "bad"}
_CHANGE_ORDER = ("create", "update", "replace", "delete", "same")
#: Levels of a stored value that pages show (the pure-Python indenting encoder takes
#: a frame per level); deeper ones read "…", the events JSON and the export keep them.
_CONSOLE_JSON_DEPTH = 100

_CONSOLE_CSS = """
:root{--bg:#fff;--fg:#1d2127;--mut:#5d6673;--line:#dde1e6;--card:#f6f7f9;--acc:#4d5bd9;
--ok:#1a7f37;--bad:#c62828;--warn:#9a6700;--run:#0969da;--rep:#a626a4;--read:#0e7490;
--code:#f1f3f5;color-scheme:light dark}
@media (prefers-color-scheme:dark){:root{--bg:#0f1216;--fg:#e4e7eb;--mut:#9aa4b1;
--line:#2a3038;--card:#171b21;--acc:#8c96ff;--ok:#4ac26b;--bad:#ff7b72;--warn:#d29922;
--run:#58a6ff;--rep:#d2a8ff;--read:#56d4dd;--code:#1c2128}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
a{color:var(--acc);text-decoration:none}a:hover{text-decoration:underline}
header{display:flex;flex-wrap:wrap;gap:.5rem 1.25rem;align-items:center;
padding:.7rem 1.25rem;border-bottom:1px solid var(--line);background:var(--card)}
header .brand{font-weight:700;color:var(--fg)}header nav{display:flex;gap:1rem;flex:1}
header form{margin:0}.who{color:var(--mut)}
main{max-width:1200px;margin:0 auto;padding:1.25rem}
h1{font-size:1.45rem;margin:.2rem 0 .8rem;word-break:break-word}
h2{font-size:1.1rem;margin:1.4rem 0 .5rem}
.crumbs{color:var(--mut);font-size:.9rem}
.tabs{display:flex;gap:.25rem;border-bottom:1px solid var(--line);margin:.5rem 0 1rem;
overflow-x:auto}
.tabs a{padding:.45rem .9rem;border-bottom:2px solid transparent;color:var(--mut);
white-space:nowrap}.tabs a.on{border-color:var(--acc);color:var(--fg);font-weight:600}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:.92rem}
th,td{text-align:left;padding:.45rem .6rem;border-bottom:1px solid var(--line);
vertical-align:top}
th{color:var(--mut);font-weight:600;font-size:.82rem;text-transform:uppercase;
letter-spacing:.03em}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:0 .5rem;border-radius:999px;font-size:.78rem;
font-weight:600;border:1px solid currentColor;white-space:nowrap}
.ok{color:var(--ok)}.bad{color:var(--bad)}.run{color:var(--run)}.mut{color:var(--mut)}
.tag{display:inline-block;background:var(--code);border:1px solid var(--line);
border-radius:4px;padding:0 .35rem;margin:0 .25rem .2rem 0;font-size:.8rem;
word-break:break-all}
form.search{display:flex;flex-wrap:wrap;gap:.5rem;margin:0 0 1rem}
input,select,button{font:inherit;color:inherit;background:var(--bg);
border:1px solid var(--line);border-radius:6px;padding:.4rem .6rem}
input[type=text],input[type=password],input[type=search]{min-width:0;flex:1 1 12rem}
button{cursor:pointer;background:var(--card)}button.primary{background:var(--acc);
color:#fff;border-color:var(--acc)}button.danger{color:var(--bad)}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;
padding:1rem;margin:0 0 1rem}
.login{max-width:26rem;margin:8vh auto}.login form{display:grid;gap:.7rem}
a.button{display:block;text-align:center;padding:.5rem .8rem;border-radius:6px;
border:1px solid var(--acc)}a.button.primary{background:var(--acc);color:#fff}
.err{color:var(--bad);font-weight:600}
pre,code{font:13px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
pre{background:var(--code);border:1px solid var(--line);border-radius:6px;
padding:.7rem;overflow-x:auto;margin:.3rem 0;white-space:pre-wrap;word-break:break-word}
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:.3rem 1rem;margin:0}
dl.kv dt{color:var(--mut)}dl.kv dd{margin:0;word-break:break-word}
ul.tree,ul.tree ul{list-style:none;margin:0;padding-left:1.1rem}ul.tree{padding-left:0}
ul.tree li{padding:.15rem 0}ul.tree ul{border-left:1px dashed var(--line)}
.t{color:var(--mut);font-size:.85rem;word-break:break-all}
.step{border-bottom:1px solid var(--line);padding:.35rem 0}
.sym{display:inline-block;width:2.2em;font:700 14px ui-monospace,monospace}
.op-create{color:var(--ok)}.op-delete{color:var(--bad)}.op-update{color:var(--warn)}
.op-replace{color:var(--rep)}.op-read{color:var(--read)}.op-import{color:var(--run)}
.op-same{color:var(--mut)}.gone{color:var(--mut)}
.diff{margin:.2rem 0 .2rem 2.2em;font:13px/1.5 ui-monospace,monospace;
word-break:break-word}
.diag{margin:.2rem 0 .2rem 2.2em;padding:.2rem .5rem;border-left:3px solid var(--line);
color:var(--fg);white-space:pre-wrap;font:13px/1.45 ui-monospace,monospace}
.diag.error{border-color:var(--bad)}.diag.warning{border-color:var(--warn)}
.pager{display:flex;gap:1rem;margin:1rem 0;align-items:center}
form.inline{display:inline;margin:0}table.admin td{vertical-align:middle}
.token{font-size:1rem;padding:.6rem;border:2px solid var(--ok);border-radius:6px;
word-break:break-all;display:block}
@media (max-width:640px){main{padding:.8rem}th.w,td.w{display:none}
dl.kv{grid-template-columns:1fr}dl.kv dd{margin-bottom:.4rem}}
"""

_CONSOLE_JS = """'use strict';
// Progressive enhancement only: every page works without this script.
document.querySelectorAll('input[data-filter]').forEach(function (box) {
  var rows = document.querySelectorAll(box.getAttribute('data-filter'));
  box.addEventListener('input', function () {
    var q = box.value.trim().toLowerCase();
    rows.forEach(function (r) {
      r.hidden = q !== '' && r.textContent.toLowerCase().indexOf(q) < 0;
    });
  });
});
document.querySelectorAll('form[data-confirm]').forEach(function (f) {
  f.addEventListener('submit', function (e) {
    if (!window.confirm(f.getAttribute('data-confirm'))) { e.preventDefault(); }
  });
});
"""


class _SignIn(HTTPError):
    """Not signed in (or the session ended): 303 to the sign-in page."""

    status, reason = 303, "See Other"


def _h(value: Any) -> str:
    """``value`` as HTML text or attribute value (quotes escaped too)."""
    return html.escape(str(value), quote=True)


def _name(value: Any) -> str:
    """A name someone chose (stack, project, resource, URN, type, user, team, token
    description, tag) as HTML: escaped, in a <bdi> so that right-to-left text in it
    cannot reorder what is around it, and with its explicit bidi controls shown as
    U+XXXX rather than obeyed ("\\u202egnp.exe" would read "exe.png")."""
    text = _h(value)
    if _BIDI_CONTROLS_RE.search(text):
        text = _BIDI_CONTROLS_RE.sub(lambda m: f'<span class="bad">U+{ord(m[0]):04X}</span>',
                                     text)
    return f"<bdi>{text}</bdi>"


def _q(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _q_urn(urn: str) -> str:
    # ":", "/" and "$" may stay as they are in a query, and a URN without
    # other specials takes quote()'s fast path (this runs once per resource).
    return urllib.parse.quote(urn, safe=":/$")


def _masked(value: Any, depth: int = 0) -> Any:
    """``value`` with every secret (a ciphertext object) replaced by "[secret]" and,
    when ``depth`` is given, every object or array nested deeper than that by "…".

    Without recursion: stored values nest up to MAX_JSON_DEPTH levels, and a frame
    per level (two with comprehensions) ran out of Python's recursion limit.
    """
    root: list = [None]
    todo = [(root, 0, value, 1)]
    while todo:
        target, key, item, level = todo.pop()
        if isinstance(item, dict):
            if item.get(_SECRET_SIG) == _SECRET_VALUE:
                item = "[secret]"
            elif depth and level > depth:
                item = "…"
            else:
                copy = dict.fromkeys(item)  # keeps the keys' order
                for k, v in item.items():
                    if isinstance(v, (dict, list)):
                        todo.append((copy, k, v, level + 1))
                    else:
                        copy[k] = v
                item = copy
        elif isinstance(item, list):
            if depth and level > depth:
                item = "…"
            else:
                copy = list(item)
                for i, v in enumerate(item):
                    if isinstance(v, (dict, list)):
                        todo.append((copy, i, v, level + 1))
                item = copy
        target[key] = item
    return root[0]


def _masked_config(config: Any) -> dict:
    """An update's config (``{key: {string, secret, object}}``) with secret values masked."""
    out = {}
    for key, value in (config.items() if isinstance(config, dict) else ()):
        if isinstance(value, dict) and value.get("secret"):
            out[key] = "[secret]"
        elif isinstance(value, dict) and "string" in value:
            out[key] = _masked(value["string"])
        else:
            out[key] = _masked(value)
    return out


def _json_text(value: Any, indent: Optional[int] = None) -> str:
    """Masked ``value`` as JSON ("…" below _CONSOLE_JSON_DEPTH levels), with bidi controls
    as \\u escapes: in a string of it they would reorder the rest of its line."""
    text = json.dumps(_masked(value, _CONSOLE_JSON_DEPTH), indent=indent, sort_keys=True,
                      ensure_ascii=False, default=str)
    return _BIDI_CONTROLS_RE.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


def _pretty(value: Any) -> str:
    """Masked ``value`` as escaped, indented JSON (see _json_text)."""
    return _h(_json_text(value, 2))


def _short(value: Any, limit: int = 300) -> str:
    """Masked ``value`` as escaped one-line JSON (see _json_text), cut at ``limit`` characters."""
    text = _json_text(value)
    return _h(text if len(text) <= limit else text[:limit] + "…")


def _when(t: Any) -> str:
    """A Unix time as a <time> element; the number itself when no date has it."""
    if not isinstance(t, (int, float)) or isinstance(t, bool) or t <= 0:
        return '<span class="mut">never</span>'
    try:  # import takes a DIY history's startTime as it is, 10**18 too
        day, clock = datetime.datetime.fromtimestamp(int(t), datetime.timezone.utc) \
            .isoformat()[:19].split("T")
    except (ValueError, OverflowError, OSError):
        return _h(t)
    return f'<time datetime="{day}T{clock}Z">{day} {clock} UTC</time>'


def _duration(start: Any, end: Any) -> str:
    if not (isinstance(start, int) and isinstance(end, int)) or end < start or not start:
        return ""
    seconds = end - start
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _result_badge(result: str) -> str:
    label = {"in-progress": "running", "not-started": "starting"}.get(result, result)
    return f'<span class="badge {_RESULT_CLASS.get(result, "mut")}">{_h(label)}</span>'


def _changes(changes: Any) -> str:
    """Resource change counts, e.g. "+2 ~1 -0", coloured like the CLI."""
    if not isinstance(changes, dict):
        return ""
    parts = []
    for op in _CHANGE_ORDER + tuple(sorted(set(changes) - set(_CHANGE_ORDER))):
        count = changes.get(op)
        if isinstance(count, int) and count and op in _STEP_OPS:
            sym, cls = _STEP_OPS[op]
            parts.append(f'<span class="op-{cls}" title="{_h(op)}">{_h(sym.strip() or "=")}'
                         f'{count}</span>')
    return " ".join(parts)


def _urn_name(urn: str) -> str:
    return urn.rsplit("::", 1)[-1]


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _tags_html(tags: dict) -> str:
    return "".join(f'<span class="tag">{_name(k)}: {_name(v)}</span>'
                   for k, v in sorted(tags.items()))


def _kv(rows: Iterable) -> str:
    return '<dl class="kv">' + "".join(f"<dt>{_name(k)}</dt><dd>{v}</dd>" for k, v in rows) \
        + "</dl>"


def _plain(text: Any) -> str:
    """A diagnostic or log message as escaped text, without the CLI's colour codes."""
    return _h(_COLOR_CODES_RE.sub("", str(text)))


def _property_diff(op: str, meta: dict) -> list:
    """``(sign, key, old, new)`` per changed input of a step, from its metadata."""
    old = _dict(_dict(meta.get("old")).get("inputs"))
    new = _dict(_dict(meta.get("new")).get("inputs"))
    if op in ("create", "import", "create-replacement"):
        return [("+", k, None, new[k]) for k in sorted(new) if not k.startswith("__")]
    if op in ("delete", "delete-replaced", "discard"):
        return [("-", k, old[k], None) for k in sorted(old) if not k.startswith("__")]
    keys = [k for k in meta.get("diffs") or () if isinstance(k, str)]
    for path in _dict(meta.get("detailedDiff")):
        keys.append(re.split(r"[.\[]", path, 1)[0])
    if not keys:
        keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    rows = []
    for key in dict.fromkeys(keys):
        if key.startswith("__"):
            continue
        if key in old and key in new:
            rows.append(("~", key, old[key], new[key]))
        elif key in new:
            rows.append(("+", key, None, new[key]))
        elif key in old:
            rows.append(("-", key, old[key], None))
    return rows


def _step_log(events: list) -> tuple:
    """Rebuild ``(steps, diagnostics without a resource, stdout lines, summary)`` from events.

    A step is one resource's operation: its pre-event, outputs event or
    failure, and its diagnostics, in the order the engine began them.
    """
    steps: dict = {}
    general, stdout, summary = [], [], None
    for event in sorted(events, key=lambda e: e.get("sequence") if isinstance(
            e.get("sequence"), int) else 0):
        for kind, state in (("resourcePreEvent", "running"), ("resOutputsEvent", "done"),
                            ("resOpFailedEvent", "failed")):
            body = event.get(kind)
            if not isinstance(body, dict):
                continue
            meta = _dict(body.get("metadata"))
            urn = meta.get("urn")
            if not isinstance(urn, str):
                continue
            step = steps.setdefault(urn, {"urn": urn, "meta": {}, "diags": []})
            if body.get("planning"):
                continue
            merged = dict(step["meta"])
            merged.update({k: v for k, v in meta.items() if v not in (None, [], {})})
            step["meta"], step["state"] = merged, state
        diag = event.get("diagnosticEvent")
        if isinstance(diag, dict) and diag.get("severity") != "debug":
            urn = diag.get("urn")
            target = steps[urn]["diags"] if isinstance(urn, str) and urn in steps else general
            target.append(diag)
        out = event.get("stdoutEvent")
        if isinstance(out, dict):
            stdout.append(str(out.get("message", "")))
        if isinstance(event.get("summaryEvent"), dict):
            summary = event["summaryEvent"]
    return list(steps.values()), general, stdout, summary


class Console:
    """The web console's pages (section 11), on the App's router and identity."""

    def __init__(self, app: App):
        self.app, self.cfg, self.engine = app, app.cfg, app.engine
        self.identity, self.audit, self.store = app.identity, app.audit, app.engine.store
        self.secure = bool(self.cfg.tls_cert) or self.cfg.public_url.startswith("https:")
        self.css = _CONSOLE_CSS.encode()
        self.js = _CONSOLE_JS.encode()
        self.sso = SingleSignOn(_load_sso(self.cfg.sso_config), app.identity) \
            if self.cfg.sso_config else None
        self._sso_starts = _FailureWindows()  # per address: each start stores a row

    def install(self) -> None:
        """Add the console's routes and its "session" and "origin" authentication."""
        self.app.authenticators.update(session=self._session, origin=self._check_origin)
        add = functools.partial(self.app.router.add, doc=False, auth="session", need="signed-in",
                                site="console")
        form = functools.partial(add, body_limit=MAX_CONSOLE_FORM)
        stack = "/stacks/{projectName}/{stackName}"
        add("GET", "/console.css", self.stylesheet, auth="none", need="none")
        add("GET", "/console.js", self.script, auth="none", need="none")
        add("GET", "/login", self._page(self.login_page), auth="none", need="none")
        form("POST", "/login", self._page(self.sign_in), auth="origin", need="none")
        add("GET", "/sso/start", self._page(self.sso_start), auth="none", need="none")
        add("GET", "/sso/callback", self._page(self.sso_callback), auth="none", need="none")
        form("POST", "/logout", self._page(self.sign_out))
        add("GET", "/", self._page(self.stacks_page))
        add("GET", stack, self._page(self.overview_page))
        add("GET", stack + "/resources", self._page(self.resources_page))
        add("GET", stack + "/resource", self._page(self.resource_page))
        add("GET", stack + "/activity", self._page(self.activity_page))
        add("GET", stack + "/updates/{updateID}", self._page(self.update_page))
        add("GET", stack + "/updates/{updateID}/events", self._page(self.update_events))
        add("GET", stack + "/export", self._page(self.export_download))
        add("GET", "/tokens", self._page(self.tokens_page))
        add("GET", "/webhooks", self._page(self.webhooks_page))
        add("GET", "/search", self._page(self.search_page))
        form("POST", "/tokens", self._page(self.create_token))
        form("POST", "/tokens/{tokenId}/revoke", self._page(self.revoke_token))
        # `pulumi login` in a browser: a confirmed form makes a personal token and hands
        # it to the CLI's loopback port, which then shows /welcome/cli.
        add("GET", "/cli-login", self._page(self.cli_login_page))
        form("POST", "/cli-login", self._page(self.cli_login))
        add("GET", "/welcome/cli", self._page(self.cli_welcome), auth="none", need="none")
        # `pulumi login` offers the console's token page at /user/settings/tokens
        # of the console host (PULUMI_CONSOLE_DOMAIN); older CLIs said /account/tokens.
        for path in ("/user/settings/tokens", "/account/tokens"):
            add("GET", path, self._page(self.to_tokens))
        # Administration: org admins only (a member gets 403), as in the API.
        admin = functools.partial(add, need="org-admin")
        admin_form = functools.partial(form, need="org-admin")
        admin("GET", "/admin/users", self._page(self.admin_users_page))
        admin_form("POST", "/admin/users", self._page(self.admin_add_user))
        admin("GET", "/admin/users/{login}", self._page(self.admin_user_page))
        admin_form("POST", "/admin/users/{login}/role", self._page(self.admin_set_role))
        admin_form("POST", "/admin/users/{login}/remove", self._page(self.admin_remove_user))
        admin("GET", "/admin/teams", self._page(self.admin_teams_page))
        admin_form("POST", "/admin/teams", self._page(self.admin_create_team))
        admin("GET", "/admin/teams/{team}", self._page(self.admin_team_page))
        admin_form("POST", "/admin/teams/{team}/members", self._page(self.admin_add_member))
        admin_form("POST", "/admin/teams/{team}/members/{login}/remove",
                   self._page(self.admin_remove_member))
        admin_form("POST", "/admin/teams/{team}/grants", self._page(self.admin_grant))
        admin_form("POST", "/admin/teams/{team}/delete", self._page(self.admin_delete_team))
        admin("GET", "/admin/tokens", self._page(self.admin_tokens_page))
        admin_form("POST", "/admin/tokens/{tokenId}/revoke", self._page(self.admin_revoke_token))
        admin("GET", "/admin/audit", self._page(self.admin_audit_page))

    # -- plumbing -----------------------------------------------------------

    def _page(self, view: Callable) -> Callable:
        """``view`` with the console's headers, and its errors as HTML pages."""
        @functools.wraps(view)
        def page(req: Request) -> Response:
            try:
                resp = view(req)
            except HTTPError as e:
                if isinstance(e, _SignIn):
                    resp = Response(e.status, b"", "text/plain", headers=dict(e.headers))
                else:
                    body = (f'<h1>{_h(e.status)} {_h(e.reason)}</h1><p class="err">'
                            f'{_h(e.message)}</p><p><a href="/">Back to the stacks</a></p>')
                    resp = self._html(req, e.reason, body, e.status)
                    resp.headers.update(e.headers)
            resp.headers = {**_CONSOLE_HEADERS, **resp.headers}
            return resp
        return page

    def _html(self, req: Request, title: str, body: str, status: int = 200,
              refresh: int = 0) -> Response:
        p = req.principal if req.session else None
        nav = ""
        if p is not None:
            nav = ('<nav><a href="/">Stacks</a><a href="/search">Resources</a>'
                   '<a href="/tokens">Tokens</a>'
                   + ('<a href="/admin/users">Admin</a>' if p.admin else "") + '</nav>'
                   f'<span class="who">{_name(p.actor)}</span>'
                   '<form method="post" action="/logout">'
                   f'<input type="hidden" name="csrf" value="{_h(self._csrf(req))}">'
                   '<button type="submit">Sign out</button></form>')
        meta = f'<meta http-equiv="refresh" content="{int(refresh)}">' if refresh else ""
        # Plain text: no <bdi> in a title, so a resource name's bidi controls show as U+XXXX.
        title = _BIDI_CONTROLS_RE.sub(lambda m: f"U+{ord(m[0]):04X}", title)
        doc = ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
               '<meta name="viewport" content="width=device-width, initial-scale=1">'
               f'{meta}<title>{_h(title)} · pulumi-backend</title>'
               '<link rel="icon" href="data:,"><link rel="stylesheet" href="/console.css">'
               '<script src="/console.js" defer></script></head><body>'
               f'<header><a class="brand" href="/">pulumi-backend</a>{nav}</header>'
               f'<main>{body}</main></body></html>')
        return Response(status, doc.encode(), "text/html; charset=utf-8")

    def _cookie(self, req: Request, name: str) -> str:
        for part in (req.headers.get("Cookie") or "").split(";"):
            key, _, value = part.strip().partition("=")
            if key == name:
                return value.strip()
        return ""

    def _set_cookie(self, name: str, value: str, max_age: int, path: str = "/",
                    same_site: str = "Strict") -> str:
        secure = "; Secure" if self.secure else ""
        return (f"{name}={value}; Path={path}; Max-Age={max_age}; HttpOnly; "
                f"SameSite={same_site}{secure}")

    def _check_origin(self, req: Request) -> None:
        """Refuse a form sent from anywhere but this server's own pages (CSRF, part one)."""
        # By the server's names, not the request's Host: a DNS rebinding page
        # sends its own domain as both (see _AllowedHosts).
        origin, host = req.headers.get("Origin"), req.headers.get("Host")
        if not self.app.hosts.origin_allowed(origin, host):
            raise Forbidden("this form must be sent from this server's own pages "
                            "(the Origin header does not match)")

    def _session(self, req: Request) -> None:
        """Authenticate by the session cookie; raise _SignIn without a live session."""
        sid = self._cookie(req, _SESSION_COOKIE)
        session = None
        if sid:
            with self.store.read() as db:
                session = self.store.get_session(db, _token_hash(sid))
        if session is None or session["expires"] <= _now():
            raise self._to_sign_in(req)
        try:
            req.principal = self.identity.authenticate_hash(session["token_hash"])
        except _AuthFailure:
            raise self._to_sign_in(req) from None
        req.session = sid
        if req.method == "POST":
            self._check_origin(req)

    def _to_sign_in(self, req: Request) -> _SignIn:
        target = req.path + ("?" + urllib.parse.urlencode(req.query, doseq=True)
                             if req.query else "")
        location = "/login" if req.method != "GET" or target == "/" \
            else "/login?next=" + _q(target)
        return _SignIn("sign in first", {**_CONSOLE_HEADERS, "Location": location})

    def _csrf(self, req: Request) -> str:
        return hmac.new(req.session.encode(), b"console-csrf", hashlib.sha256).hexdigest()

    def _form(self, req: Request) -> dict:
        try:
            fields = urllib.parse.parse_qs(req.body.decode("utf-8", "replace"),
                                           max_num_fields=20)
        except ValueError:  # more fields than that: no form of ours
            raise BadRequest("the form has more than 20 fields") from None
        return {k: v[-1] for k, v in fields.items()}

    def _checked_form(self, req: Request) -> dict:
        form = self._form(req)
        if not hmac.compare_digest(self._csrf(req).encode(), form.get("csrf", "").encode()):
            raise Forbidden("the form is stale or came from another page; reload and retry")
        return form

    def _read(self, req: Request) -> tuple:
        """``(org, project, stack)`` of the path, once the principal may read that stack."""
        project, name = req.params["projectName"], req.params["stackName"]
        self.identity.require(req.principal, PERM_READ, project, name)
        return self.cfg.org, project, name

    def _state(self, org: str, project: str, name: str) -> dict:
        doc = json.loads(gzip.decompress(self.engine.export(org, project, name, None)))
        return _dict(doc.get("deployment"))

    def _stack_url(self, project: str, name: str, tail: str = "") -> str:
        return f"/stacks/{_q(project)}/{_q(name)}{tail}"

    def _stack_head(self, req: Request, tab: str) -> str:
        org, project, name = self.cfg.org, req.params["projectName"], req.params["stackName"]
        base = self._stack_url(project, name)
        tabs = "".join(f'<a href="{_h(base + suffix)}"{" class=on" if key == tab else ""}>'
                       f'{label}</a>' for key, label, suffix in (
                           ("overview", "Overview", ""), ("resources", "Resources", "/resources"),
                           ("activity", "Activity", "/activity")))
        return (f'<div class="crumbs">{_name(org)} / <a href="/?q={_h(_q(project))}">'
                f'{_name(project)}</a></div><h1>{_name(name)}</h1><div class="tabs">{tabs}</div>')

    # -- static files, sign in and out --------------------------------------

    def stylesheet(self, req: Request) -> Response:
        """The console's stylesheet."""
        return Response(200, self.css, "text/css; charset=utf-8", headers={
            "Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"})

    def script(self, req: Request) -> Response:
        """The console's optional script."""
        return Response(200, self.js, "text/javascript; charset=utf-8", headers={
            "Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"})

    def login_page(self, req: Request, error: str = "", status: int = 200) -> Response:
        """The sign-in form (with a double-submit CSRF cookie)."""
        token = self._cookie(req, _CSRF_COOKIE)
        if not re.fullmatch(r"[A-Za-z0-9_-]{32,64}", token):
            token = secrets.token_urlsafe(32)
        target = self._next(req.q("next") or "/")
        err = f'<p class="err" role="alert">{_h(error)}</p>' if error else ""
        sso = ""
        if self.sso is not None:
            start = "/sso/start" + ("?next=" + _q(target) if target != "/" else "")
            sso = (f'<p><a class="button primary" id="sso" href="{_h(start)}">Sign in with '
                   f'{_name(self.sso.conf["display_name"])}</a></p>')
        form = ""
        if self.sso is None or self.sso.conf["token_sign_in"]:
            form = ('<p class="mut">' + ("Or paste" if sso else "Paste") + ' an access token '
                    '(<code>pulumi_backend.py token create --user NAME</code>, or one from the '
                    'Tokens page).</p><form method="post" action="/login">'
                    f'<input type="hidden" name="csrf" value="{_h(token)}">'
                    f'<input type="hidden" name="next" value="{_h(target)}">'
                    '<label for="token">Access token</label>'
                    '<input type="password" id="token" name="token" autocomplete="off" '
                    'required autofocus><button class="primary" type="submit">Sign in</button>'
                    '</form>')
        body = f'<div class="login card"><h1>Sign in</h1>{err}{sso}{form}</div>'
        resp = self._html(req, "Sign in", body, status)
        resp.headers["Set-Cookie"] = self._set_cookie(_CSRF_COOKIE, token, 3600, "/login")
        return resp

    @staticmethod
    def _next(target: str) -> str:
        """A local path to return to after sign-in ("/" for anything else)."""
        # ASCII only: a Location header is Latin-1 on the wire.
        ok = target.startswith("/") and not target.startswith(("//", "/\\")) \
            and target.isascii() and target.isprintable() and len(target) < 2000
        return target if ok else "/"

    def sign_in(self, req: Request) -> Response:
        """Check the token and start a session."""
        form = self._form(req)
        cookie = self._cookie(req, _CSRF_COOKIE)
        if not cookie or not hmac.compare_digest(cookie.encode(),
                                                 form.get("csrf", "").encode()):
            raise Forbidden("the sign-in form is stale or came from another page; reload it")
        if self.sso is not None and not self.sso.conf["token_sign_in"]:
            raise Forbidden("sign-in with a token is turned off here: use single sign-on")
        token = form.get("token", "").strip()
        try:
            if not token:
                raise _AuthFailure("empty token")
            principal = self.identity.authenticate(token, req.remote)
        except _AuthFailure as e:
            self.audit.login_failure(req, "console", e.why)
            return self.login_page(req, "That token is not valid." if e.message == _MSG_BAD_TOKEN
                                   else e.message, 401)
        sid, now = secrets.token_urlsafe(32), _now()
        with self.store.write() as db:
            self.store.insert_session(db, _token_hash(sid), _token_hash(token), now,
                                      now + CONSOLE_SESSION_SECONDS)
        self.audit.record("console_login", principal, req, "console")
        return Response(303, b"", "text/plain", headers={
            "Location": self._next(form.get("next", "/")),
            "Set-Cookie": self._set_cookie(_SESSION_COOKIE, sid, CONSOLE_SESSION_SECONDS)})

    # Single sign-on (SingleSignOn, section 8). /sso/start keeps what the callback
    # must check on the server, keyed by the SHA-256 of a random pre-session id that
    # only the browser's pb_sso cookie holds: a console_sessions row that can never
    # authenticate (its "token hash" is "sso:..." and no token hashes to that),
    # with the SHA-256 of the state and the local path to return to, for
    # SSO_PENDING_SECONDS, deleted when the callback reads it (one use). The PKCE
    # verifier and the nonce are HMACs of the pre-session id: never stored, and
    # bound to that browser. A verified sign-in gets a personal token that lasts the
    # session lifetime, so the session is an ordinary one (one path for permissions).

    def _sso_secrets(self, pre: str) -> tuple:
        """``(verifier, nonce)`` of the pre-session id ``pre``."""
        derive = lambda label: base64.urlsafe_b64encode(hmac.new(  # noqa: E731
            pre.encode(), label, hashlib.sha256).digest()).rstrip(b"=").decode()
        return derive(b"sso-pkce-verifier"), derive(b"sso-nonce")

    def _sso_redirect_uri(self, req: Request) -> str:
        base = self.cfg.public_url.rstrip("/") or (
            f"{'https' if self.cfg.tls_cert else 'http'}://{req.headers.get('Host', '')}")
        return base + "/sso/callback"

    def _sso_refused(self, req: Request, check: str, status: int = 403) -> Response:
        self.audit.login_failure(req, "console-sso", check)
        # The pb_sso cookie stays (one Set-Cookie per answer, the sign-in form's):
        # its sign-in is gone from the server, and it ends in SSO_PENDING_SECONDS.
        return self.login_page(req, f"Single sign-on failed: {check}.", status)

    def sso_start(self, req: Request) -> Response:
        """Start a single sign-on: remember it, and send the browser to the provider."""
        if self.sso is None:
            raise NotFound("single sign-on is not configured here (--sso-config)")
        self.identity.check_throttle(req.remote)
        limit = self.cfg.auth_failure_limit  # a start stores a row for an unknown caller
        if limit and req.remote and self._sso_starts.add(req.remote) > limit:
            left = self._sso_starts.current(req.remote)[1]
            raise TooManyRequests(f"more than {limit} sign-ins started from your address "
                                  f"within {AUTH_FAILURE_WINDOW:g}s: retry in {left}s", left)
        pre, state, now = secrets.token_urlsafe(32), secrets.token_urlsafe(32), _now()
        verifier, nonce = self._sso_secrets(pre)
        try:
            location = self.sso.authorization_url(self._sso_redirect_uri(req), state, nonce,
                                                  verifier)
        except _OIDCRefused as e:
            log.warning("single sign-on cannot start: %s", _escape_log(e.check))
            return self._sso_refused(req, e.check, 503)
        pending = f"sso:{_token_hash(state)}:{self._next(req.q('next') or '/')}"
        with self.store.write() as db:
            self.store.insert_session(db, _token_hash("sso:" + pre), pending, now,
                                      now + SSO_PENDING_SECONDS)
        return Response(303, b"", "text/plain", headers={
            "Location": location, "Set-Cookie": self._set_cookie(
                _SSO_COOKIE, pre, SSO_PENDING_SECONDS, "/sso", "Lax")})

    def sso_callback(self, req: Request) -> Response:
        """The provider's redirect back: check everything, then start a session."""
        if self.sso is None:
            raise NotFound("single sign-on is not configured here (--sso-config)")
        self.identity.check_throttle(req.remote)
        pre, state = self._cookie(req, _SSO_COOKIE), req.q("state") or ""
        row = None
        if pre:
            with self.store.write() as db:  # read and delete at once: one use
                row = self.store.get_session(db, _token_hash("sso:" + pre))
                if row is not None:
                    self.store.delete_session(db, _token_hash("sso:" + pre))
        if row is None or row["expires"] <= _now() or not row["token_hash"].startswith("sso:"):
            self.identity.note_failure(req.remote)
            return self._sso_refused(req, "no sign-in in flight in this browser (state "
                                     "unknown, used or expired)")
        _, state_hash, target = row["token_hash"].split(":", 2)
        if not hmac.compare_digest(state_hash.encode(), _token_hash(state).encode()):
            self.identity.note_failure(req.remote)
            return self._sso_refused(req, "state does not match")
        if req.q("error"):
            return self._sso_refused(req, "the provider answered "
                                     f"{re.sub(r'[^A-Za-z0-9_.-]', '?', req.q('error'))[:100]}")
        code = req.q("code") or ""
        verifier, nonce = self._sso_secrets(pre)
        try:
            if not code or len(code) > 4096:
                raise _OIDCRefused("no code")
            id_token = self.sso.exchange(code, self._sso_redirect_uri(req), verifier)
            claims = self.sso.verified_claims(id_token, nonce)
            login = self.sso.sign_in(claims, req)
        except _OIDCRefused as e:
            self.identity.note_failure(req.remote)
            return self._sso_refused(req, e.check)
        lifetime, now = self.sso.conf["lifetime"], _now()
        actor = Principal(f"sso:{self.sso.conf['issuer']}"[:200], "admin", True,
                          token_name="single sign-on")
        with self.store.write() as db:  # tokens of sessions that ended are of no use
            self.store.delete_expired_tokens(db, now, "sso:")
        _, token = self.identity.create_token(
            actor, "personal", login, "console session",
            f"console session (single sign-on at {self.sso.conf['issuer']})"[:1000],
            now + lifetime, req=req)
        sid = secrets.token_urlsafe(32)
        with self.store.write() as db:
            self.store.insert_session(db, _token_hash(sid), _token_hash(token), now,
                                      now + lifetime)
        self.audit.record("console_login", Principal(login, "user", False), req, "console",
                          description=f"single sign-on at {self.sso.conf['issuer']}")
        # A page, not a 303: the browser came here from the provider (a cross-site
        # navigation), and a redirect would not send the SameSite=Strict session cookie.
        body = (f'<h1>Signed in</h1><p><a id="continue" href="{_h(target)}">Continue</a></p>')
        resp = self._html(req, "Signed in", body)
        resp.headers["Refresh"] = f"0; url={target}"
        resp.headers["Set-Cookie"] = self._set_cookie(_SESSION_COOKIE, sid, lifetime)
        return resp

    def sign_out(self, req: Request) -> Response:
        """End the session."""
        self._checked_form(req)
        with self.store.write() as db:
            session = self.store.get_session(db, _token_hash(req.session))
            self.store.delete_session(db, _token_hash(req.session))
            # A single sign-on's session token (sso_callback) ends with its session.
            row = self.store.token_by_hash(db, session["token_hash"]) if session else None
            if row is not None and row["created_by"].startswith("sso:") \
                    and row["name"] == "console session":
                self.store.delete_token(db, row["id"])
        self.audit.record("console_logout", req.principal, req, "console")
        return Response(303, b"", "text/plain", headers={
            "Location": "/login", "Set-Cookie": self._set_cookie(_SESSION_COOKIE, "", 0)})

    # -- stacks -------------------------------------------------------------

    def stacks_page(self, req: Request) -> Response:
        """Stacks grouped by project; search by name, filter by tag, paged."""
        text = (req.q("q") or "").strip()[:200]
        tag = (req.q("tag") or "").strip()[:200]
        tag_name, has_value, tag_value = tag.partition("=")
        try:
            page = max(1, min(int(req.q("page") or 1), 10**6))
        except ValueError:
            raise BadRequest("page must be a number") from None
        visible, now = self.identity.visible(req.principal), _now()
        rows = []
        for row in self.engine.console_stacks():
            _, project, name, tags, _ = row
            if text and text.lower() not in f"{project}/{name}".lower():
                continue
            if not visible(project, name):
                continue
            if tag:
                tags = json.loads(tags)
                if tag_name not in tags or (has_value and tags[tag_name] != tag_value):
                    continue
            rows.append(row)
        first = (page - 1) * CONSOLE_STACK_PAGE
        shown = rows[first:first + CONSOLE_STACK_PAGE]
        # Updates only for the page shown: the newest of 1,000 stacks is a query each.
        updates = self.engine.latest_updates([row[0] for row in shown]) if shown else {}
        out = [f'<h1>Stacks <span class="mut">({len(rows)})</span></h1>'
               '<form class="search" method="get" action="/">'
               f'<input type="search" name="q" value="{_h(text)}" placeholder="Name" '
               'aria-label="Search by name">'
               f'<input type="text" name="tag" value="{_h(tag)}" placeholder="tag or tag=value" '
               'aria-label="Filter by tag"><button type="submit">Search</button></form>']
        if not shown:
            out.append('<p class="mut">No stacks here yet: <code>pulumi stack init</code> '
                       'makes one.</p>' if not text and not tag else
                       '<p class="mut">No stack matches.</p>')
        for project, group in itertools.groupby(shown, key=lambda r: r[1]):
            out.append(f'<h2>{_name(project)}</h2><div class="scroll"><table><thead><tr>'
                       '<th>Stack</th><th>Last update</th><th class="w">By</th>'
                       '<th class="n">Resources</th><th class="w">Tags</th></tr></thead><tbody>')
            out.extend(self._stack_row(row, updates.get(row[0]) or {}, now) for row in group)
            out.append("</tbody></table></div>")
        out.append(self._pager(req, page, first + CONSOLE_STACK_PAGE < len(rows)))
        if req.principal.admin:
            out.append('<p class="mut"><a href="/webhooks">Organization webhooks</a></p>')
        return self._html(req, "Stacks", "".join(out))

    def _stack_row(self, row: tuple, update: dict, now: int) -> str:
        _, project, name, tags, resource_count = row
        url = self._stack_url(project, name)
        status = update.get("status")
        if status == "running" and (update["lease_expires"] or 0) >= now:
            state = '<span class="badge run">running</span>'
        elif status == "running":  # its CLI went silent; the next write finishes it
            state = '<span class="badge bad">abandoned</span>'
        elif status in (None, "not started"):
            state = '<span class="mut">never</span>'
        else:
            result = {"cancelled": "failed"}.get(status, status)
            state = f"{_result_badge(result)} {_when(update['ended'] or update['started'])}"
        return (f'<tr><td><a href="{_h(url)}">{_name(name)}</a></td><td>{state}</td>'
                f'<td class="w">{_name(update.get("requested_by") or "")}</td>'
                f'<td class="n">{resource_count}</td>'
                f'<td class="w">{_tags_html(json.loads(tags))}</td></tr>')

    def _pager(self, req: Request, page: int, more: bool) -> str:
        def link(n: int, label: str) -> str:
            query = {k: v[-1] for k, v in req.query.items() if k != "page"}
            query["page"] = str(n)
            return f'<a href="{_h(req.path + "?" + urllib.parse.urlencode(query))}">{label}</a>'
        prev = link(page - 1, "← Newer" if "activity" in req.path else "← Previous") \
            if page > 1 else ""
        nxt = link(page + 1, "Older →" if "activity" in req.path else "Next →") if more else ""
        return f'<div class="pager">{prev}<span class="mut">Page {page}</span>{nxt}</div>' \
            if prev or nxt else ""

    def overview_page(self, req: Request) -> Response:
        """A stack's outputs, tags, last update and its config."""
        org, project, name = self._read(req)
        stack = self.engine.get_stack(org, project, name)
        state = self._state(org, project, name)
        root = next((r for r in state.get("resources") or () if isinstance(r, dict)
                     and r.get("type") == _STACK_TYPE and not r.get("parent")), {})
        updates = self.engine.history(org, project, name, 1, 1)["updates"]
        out = [self._stack_head(req, "overview")]
        if "currentOperation" in stack:
            op = stack["currentOperation"]
            out.append(f'<p><span class="badge run">{_h(op["kind"])} running</span> '
                       f'by {_name(op["author"])} since {_when(op["started"])}</p>')
        out.append('<div class="card">' + _kv([
            ("Tags", _tags_html(stack["tags"]) or '<span class="mut">none</span>'),
            ("Resources", _h(len(state.get("resources") or ()))),
            ("Version", _h(stack["version"])),
            ("Export", f'<a href="{_h(self._stack_url(project, name, "/export"))}" '
                       'download>Download the state (JSON)</a>')]) + "</div>")
        outputs = _dict(root.get("outputs"))
        out.append("<h2>Outputs</h2>")
        out.append(_kv((k, f"<code>{_short(outputs[k], 2000)}</code>") for k in sorted(outputs))
                   if outputs else '<p class="mut">No outputs.</p>')
        out.append("<h2>Last update</h2>")
        if updates:
            info = updates[0]
            url = self._stack_url(project, name, "/updates/" + _q(info["updateID"]))
            out.append('<div class="card">' + _kv([
                ("Update", f'<a href="{_h(url)}">#{_h(info["version"])} {_h(info["kind"])}</a>'),
                ("Result", _result_badge(info["result"])),
                ("By", _name(_dict(info.get("requestedBy")).get("name", ""))),
                ("When", _when(info["startTime"])),
                ("Duration", _h(_duration(info["startTime"], info["endTime"]))),
                ("Changes", _changes(info.get("resourceChanges")) or "none"),
                ("Message", _h(info["message"]))]) + "</div><h2>Config</h2>")
            config = _masked_config(info.get("config"))
            out.append(_kv((k, f"<code>{_short(config[k], 2000)}</code>")
                           for k in sorted(config)) if config else
                       '<p class="mut">No config.</p>')
        else:
            out.append('<p class="mut">No updates yet.</p>')
        if self.identity.stack_permission(req.principal, project, name) >= PERM_ADMIN:
            out.append("<h2>Webhooks</h2>" + self._webhooks_html(org, (org, project, name)))
        return self._html(req, f"{project}/{name}", "".join(out))

    # -- resources ----------------------------------------------------------

    def resources_page(self, req: Request) -> Response:
        """A stack's resources as a tree by parent; a filter makes it a flat list."""
        org, project, name = self._read(req)
        resources = [r for r in self._state(org, project, name).get("resources") or ()
                     if isinstance(r, dict) and isinstance(r.get("urn"), str)]
        text = (req.q("q") or "").strip()[:200]
        out = [self._stack_head(req, "resources"),
               '<form class="search" method="get">'
               f'<input type="search" name="q" value="{_h(text)}" placeholder="Type or name" '
               'aria-label="Filter by type or name" data-filter="ul.tree li, tbody tr">'
               '<button type="submit">Filter</button></form>']
        link = self._linker(project, name)
        if text:
            low = text.lower()
            hits = [r for r in resources if low in _urn_name(r["urn"]).lower()
                    or low in str(r.get("type", "")).lower()]
            out.append(f'<p class="mut">{len(hits)} of {len(resources)} resources</p>'
                       '<div class="scroll"><table><thead><tr><th>Name</th><th>Type</th>'
                       '<th class="w">Provider</th><th class="w">Kind</th></tr></thead><tbody>')
            out.extend(f'<tr><td>{link(r)}</td><td class="t">{_name(r.get("type", ""))}</td>'
                       f'<td class="w t">{_name(self._provider_name(r))}</td>'
                       f'<td class="w">{"custom" if r.get("custom") else "component"}</td></tr>'
                       for r in hits)
            out.append("</tbody></table></div>")
        else:
            out.append(f'<p class="mut">{len(resources)} resources</p>')
            out.append(self._tree(resources, link))
        return self._html(req, f"{project}/{name} resources", "".join(out))

    def search_page(self, req: Request) -> Response:
        """Resources of every stack the caller may read that match a Pulumi query, paged."""
        text = (req.q("q") or "").strip()[:MAX_SEARCH_QUERY]
        try:
            page = max(1, min(int(req.q("page") or 1), 10**6))
        except ValueError:
            raise BadRequest("page must be a number") from None
        out = ['<h1>Resources</h1><form class="search" method="get" action="/search">'
               f'<input type="search" name="q" value="{_h(text)}" '
               'placeholder="type:bucket protected:true -stack:dev" '
               'aria-label="Search resources (Pulumi query syntax)">'
               '<button type="submit">Search</button></form>'
               '<p class="mut">Words match names, types, URNs, stacks and projects; '
               '<code>field:value</code> (name, type, stack, project, package, module, urn, '
               'id, protected, custom, delete, modified, created), <code>"exact"</code>, '
               '<code>-negation</code>, <code>OR</code> and parentheses narrow it.</p>']
        try:
            total, rows = self.app.resource_search(req.principal, text,
                                                   offset=(page - 1) * CONSOLE_SEARCH_PAGE,
                                                   size=CONSOLE_SEARCH_PAGE)
        except BadRequest as e:
            out.append(f'<p class="err">{_h(e.message)}</p>')
            return self._html(req, "Resources", "".join(out), 400)
        out.append(f'<p class="mut">{total} resources</p>')
        if rows:
            out.append('<div class="scroll"><table><thead><tr><th>Name</th><th>Type</th>'
                       '<th>Stack</th><th class="w">Modified</th><th class="w">Flags</th>'
                       '</tr></thead><tbody>')
            for r in rows:
                link = self._linker(r["project"], r["stack"])({"urn": r["urn"]})
                stack = (f'<a href="{_h(self._stack_url(r["project"], r["stack"]))}">'
                         f'{_name(r["project"])}/{_name(r["stack"])}</a>')
                flags = " ".join(label for label, on in (
                    ("protected", r["protected"]), ("component", not r["custom"]),
                    ("delete", r["deleted"]), (r["pending"], r["pending"])) if on)
                out.append(f'<tr><td>{link}</td><td class="t">{_name(r["type"])}</td>'
                           f'<td>{stack}</td><td class="w">{_when(r["modified"] // 1000)}</td>'
                           f'<td class="w">{_h(flags)}</td></tr>')
            out.append("</tbody></table></div>")
        out.append(self._pager(req, page, page * CONSOLE_SEARCH_PAGE < total))
        return self._html(req, "Resources", "".join(out))

    def _linker(self, project: str, name: str, present: Optional[set] = None) -> Callable:
        """Return ``f(resource)``: a link to its page (the stack's part computed once), or
        its name as plain text when it is not among the URNs ``present`` (when given) of
        the latest state, which has no page of it."""
        base = _h(self._stack_url(project, name, "/resource?urn="))

        def link(res: dict) -> str:
            if present is not None and res["urn"] not in present:
                return (f'<span class="gone" title="not in the latest state">'
                        f'{_name(_urn_name(res["urn"]))}</span>')
            return f'<a href="{base}{_h(_q_urn(res["urn"]))}">{_name(_urn_name(res["urn"]))}</a>'
        return link

    @staticmethod
    def _provider_name(res: dict) -> str:
        ref = res.get("provider")
        return _urn_name(ref.rsplit("::", 1)[0]) if isinstance(ref, str) and ref else ""

    def _tree(self, resources: list, link: Callable) -> str:
        """Nested lists by parent, built without recursion (trees can be deep)."""
        urns = {r["urn"] for r in resources}
        children: dict = collections.defaultdict(list)
        roots = []
        for r in resources:
            parent = r.get("parent")
            (children[parent] if isinstance(parent, str) and parent in urns
             and parent != r["urn"] else roots).append(r)
        out, todo, seen, abouts = ['<ul class="tree">'], list(reversed(roots)), set(), {}
        while todo:
            r = todo.pop()
            if r is None:
                out.append("</ul></li>")
                continue
            if r["urn"] in seen:
                continue
            seen.add(r["urn"])
            key = (r.get("type"), r.get("provider"), bool(r.get("custom")))
            about = abouts.get(key)
            if about is None:  # resources of a tree share few types and providers
                provider = self._provider_name(r)
                about = abouts[key] = (
                    f' <span class="t">{_name(r.get("type", ""))}'
                    f'{" · " + _name(provider) if provider else ""} · '
                    f'{"custom" if r.get("custom") else "component"}</span>')
            out.append(f"<li>{link(r)}{about}")
            kids = children.get(r["urn"])
            if kids:
                out.append("<ul>")
                todo.append(None)
                todo.extend(reversed(kids))
            else:
                out.append("</li>")
        out.append("</ul>")
        return "".join(out)

    def resource_page(self, req: Request) -> Response:
        """One resource: flags, parent, children, dependencies, inputs and outputs."""
        org, project, name = self._read(req)
        urn = req.q("urn") or ""
        resources = [r for r in self._state(org, project, name).get("resources") or ()
                     if isinstance(r, dict) and isinstance(r.get("urn"), str)]
        res = next((r for r in resources if r["urn"] == urn and not r.get("delete")),
                   None) or next((r for r in resources if r["urn"] == urn), None)
        if res is None:
            raise NotFound("no resource with that URN in the stack's latest state")
        link = self._linker(project, name)
        by_urn = {r["urn"]: r for r in resources}

        def links(urns: Iterable) -> str:
            items = [link(by_urn[u]) if u in by_urn else _name(u) for u in urns
                     if isinstance(u, str)]
            return ", ".join(items) or '<span class="mut">none</span>'

        parent = res.get("parent")
        flags = [f for f in ("protect", "retainOnDelete", "external", "delete",
                             "pendingReplacement", "taint") if res.get(f)]
        provider = res.get("provider") if isinstance(res.get("provider"), str) else ""
        out = [self._stack_head(req, "resources"), f"<h2>{_name(_urn_name(urn))}</h2>",
               '<div class="card">' + _kv([
                   ("Type", _name(res.get("type", ""))), ("URN", f"<code>{_name(urn)}</code>"),
                   ("ID", _name(res.get("id")) if res.get("id") else
                    '<span class="mut">none</span>'),
                   ("Kind", "custom" if res.get("custom") else "component"),
                   ("Provider", links([provider.rsplit("::", 1)[0]]) if provider else
                    '<span class="mut">default</span>'),
                   ("Parent", links([parent]) if isinstance(parent, str) and parent else
                    '<span class="mut">none</span>'),
                   ("Children", links(r["urn"] for r in resources if r.get("parent") == urn)),
                   ("Dependencies", links(res.get("dependencies") or ())),
                   ("Flags", _h(", ".join(flags)) or '<span class="mut">none</span>')]) + "</div>"]
        for title, key in (("Inputs", "inputs"), ("Outputs", "outputs")):
            out.append(f"<h2>{title}</h2><pre>{_pretty(_dict(res.get(key)))}</pre>")
        return self._html(req, f"{_urn_name(urn)} · {project}/{name}", "".join(out))

    # -- activity and updates -------------------------------------------------

    def activity_page(self, req: Request) -> Response:
        """A stack's updates, newest first, paged."""
        org, project, name = self._read(req)
        try:
            page = max(1, min(int(req.q("page") or 1), 10**6))
        except ValueError:
            raise BadRequest("page must be a number") from None
        updates = self.engine.history(org, project, name, CONSOLE_HISTORY_PAGE, page)["updates"]
        out = [self._stack_head(req, "activity")]
        if not updates:
            out.append('<p class="mut">No updates.</p>')
        else:
            out.append('<div class="scroll"><table><thead><tr><th>#</th><th>Kind</th>'
                       '<th>Result</th><th class="w">By</th><th>When</th>'
                       '<th class="w">Duration</th><th>Changes</th><th class="w">Message</th>'
                       '</tr></thead><tbody>')
            for info in updates:
                url = self._stack_url(project, name, "/updates/" + _q(info["updateID"]))
                out.append(
                    f'<tr><td><a href="{_h(url)}">{_h(info["version"])}</a></td>'
                    f'<td><a href="{_h(url)}">{_h(info["kind"])}</a></td>'
                    f'<td>{_result_badge(info["result"])}</td>'
                    f'<td class="w">{_name(_dict(info.get("requestedBy")).get("name", ""))}</td>'
                    f'<td>{_when(info["startTime"])}</td>'
                    f'<td class="w">{_h(_duration(info["startTime"], info["endTime"]))}</td>'
                    f'<td>{_changes(info.get("resourceChanges"))}</td>'
                    f'<td class="w">{_h(info["message"][:200])}</td></tr>')
            out.append("</tbody></table></div>")
        out.append(self._pager(req, page, len(updates) == CONSOLE_HISTORY_PAGE))
        return self._html(req, f"{project}/{name} activity", "".join(out))

    def update_page(self, req: Request) -> Response:
        """An update's step log from its engine events; reloads itself while it runs."""
        org, project, name = self._read(req)
        info, events = self.engine.update_with_events(org, project, name,
                                                      req.params["updateID"])
        steps, general, stdout, summary = _step_log(events)
        running = info["result"] in ("in-progress", "not-started")
        raw = self._stack_url(project, name, f"/updates/{_q(info['updateID'])}/events")
        out = [self._stack_head(req, "activity"),
               f'<h2>Update #{_h(info["version"])}: {_h(info["kind"])} '
               f'{_result_badge(info["result"])}</h2>', '<div class="card">' + _kv([
                   ("By", _name(_dict(info.get("requestedBy")).get("name", ""))),
                   ("Update ID", f'<code>{_h(info["updateID"])}</code>'),
                   ("Started", _when(info["startTime"])),
                   ("Duration", _h(_duration(info["startTime"], info["endTime"]))
                    or ('<span class="run">running…</span>' if running else "")),
                   ("Changes", _changes(info.get("resourceChanges")) or "none"),
                   ("Message", _h(info["message"])),
                   ("Events", f'<a href="{_h(raw)}">{len(events)} engine events (JSON)</a>')])
               + "</div>"]
        if running:
            out.append(f'<p class="run">This update is running; the page reloads every '
                       f'{CONSOLE_REFRESH_SECONDS} seconds.</p>')
        out.append("<h2>Steps</h2>")
        # A resource the update deleted has no page: its name is plain text.
        present = {r["urn"] for r in self._state(org, project, name).get("resources") or ()
                   if isinstance(r, dict) and isinstance(r.get("urn"), str)}
        link = self._linker(project, name, present)
        out.append("".join(self._step_html(link, s, running) for s in steps)
                   or '<p class="mut">No resource steps recorded.</p>')
        if general:
            out.append("<h2>Diagnostics</h2>" + "".join(self._diag_html(d) for d in general))
        if stdout:
            out.append("<h2>Output</h2><pre>" + _plain("".join(stdout)[-200000:]) + "</pre>")
        if isinstance(summary, dict):
            out.append("<h2>Summary</h2><div class=\"card\">" + _kv([
                ("Changes", _changes(summary.get("resourceChanges")) or "none"),
                ("Duration", _h(f"{summary.get('durationSeconds', '?')}s"))]) + "</div>")
        return self._html(req, f"Update {info['version']} · {project}/{name}", "".join(out),
                          refresh=CONSOLE_REFRESH_SECONDS if running else 0)

    def _step_html(self, link: Callable, step: dict, running: bool) -> str:
        meta = step["meta"]
        op = meta.get("op") if isinstance(meta.get("op"), str) else "same"
        sym, cls = _STEP_OPS.get(op, ("?", "same"))
        state = {"failed": ' <span class="badge bad">failed</span>',
                 "running": ' <span class="badge run">in progress</span>' if running
                 else ' <span class="badge mut">unfinished</span>'}.get(step.get("state"), "")
        out = [f'<div class="step op-{cls}"><span class="sym">{_h(sym)}</span>'
               f'<span class="t">{_name(meta.get("type", ""))}</span> {link(step)} '
               f'<span class="mut">{_h(op)}</span>{state}']
        if op != "same":
            for sign, key, old, new in _property_diff(op, meta):
                if sign == "~":
                    value, scls = f"{_short(old)} → {_short(new)}", "update"
                elif sign == "+":
                    value, scls = _short(new), "create"
                else:
                    value, scls = _short(old), "delete"
                out.append(f'<div class="diff op-{scls}">{sign} {_name(key)}: {value}</div>')
        out.extend(self._diag_html(d) for d in step["diags"])
        out.append("</div>")
        return "".join(out)

    @staticmethod
    def _diag_html(diag: dict) -> str:
        severity = str(diag.get("severity") or "info")
        cls = severity if severity in ("error", "warning") else "info"
        # The CLI's prefix ("warning: ") would say the severity a second time.
        return (f'<div class="diag {cls}"><strong>{_h(severity)}</strong>: '
                f'{_plain(diag.get("message", ""))}</div>')

    def update_events(self, req: Request) -> Response:
        """An update's engine events as JSON (secrets masked)."""
        org, project, name = self._read(req)
        _, events = self.engine.update_with_events(org, project, name, req.params["updateID"])
        # <, > and & only occur inside JSON strings: as \u escapes the JSON is
        # the same, and inert even if something renders it as HTML.
        data = _dumps({"events": _masked(events)})
        for char in b"<>&":
            data = data.replace(bytes([char]), b"\\u%04x" % char)
        return Response(200, data)

    def export_download(self, req: Request) -> Response:
        """The stack's state, as `pulumi stack export` writes it, as a download."""
        org, project, name = self._read(req)
        data = _gunzip_stored(self.engine.export(org, project, name, None))
        self.audit.record("stack_exported", req=req, target=f"{org}/{project}/{name}",
                          description="console download")
        # Names match _NAME_RE ([A-Za-z0-9_.-]): safe in a quoted filename.
        return Response(200, data, headers={
            "Content-Disposition": f'attachment; filename="{project}-{name}.json"'})

    # -- tokens -------------------------------------------------------------

    def to_tokens(self, req: Request) -> Response:
        """The CLI's address of the token page: ours is /tokens."""
        return Response(303, b"", "text/plain", headers={"Location": "/tokens"})

    # -- `pulumi login` in a browser ------------------------------------------
    #
    # The CLI (pkg/backend/httpstate: loginWithBrowser) listens on 127.0.0.1 at a
    # random port and opens CONSOLE/cli-login?cliSessionPort=P&cliSessionNonce=N&
    # cliSessionDescription=D. A signed-in person confirms; the POST makes a personal
    # token described by D and answers 303 to http://localhost:P/?accessToken=T&nonce=N,
    # where the CLI checks N, keeps T and sends the browser on to /welcome/cli. The
    # host is always localhost and P only a port number, so the token goes nowhere
    # else; the confirmation (a CSRF-checked POST) keeps a link from handing a token
    # out unasked. The access log has paths only: neither T nor N is logged.

    @staticmethod
    def _cli_session(fields: Callable[[str], Optional[str]]) -> tuple:
        """``(port, nonce, description)`` of a CLI login request; BadRequest unless
        the port is a port number and the nonce and description are bounded text."""
        port, nonce = fields("cliSessionPort") or "", fields("cliSessionNonce") or ""
        description = fields("cliSessionDescription") or "Generated by pulumi login"
        if not re.fullmatch(r"[1-9][0-9]{0,4}", port) or int(port) > 65535:
            raise BadRequest("cliSessionPort must be the port number the CLI listens on")
        if not 0 < len(nonce) <= MAX_CLI_LOGIN_NONCE or not nonce.isprintable():
            raise BadRequest(f"cliSessionNonce must be 1 to {MAX_CLI_LOGIN_NONCE} printable "
                             "characters")
        if len(description) > MAX_CLI_LOGIN_DESCRIPTION or not description.isprintable():
            raise BadRequest(f"cliSessionDescription must be at most "
                             f"{MAX_CLI_LOGIN_DESCRIPTION} printable characters")
        return int(port), nonce, description

    @staticmethod
    def _personal_only(p: Principal) -> None:
        if p.kind != "user":
            raise Forbidden("`pulumi login` gets a personal token, and those belong to "
                            f"users; you signed in with {'an' if p.kind[0] in 'aeiou' else 'a'}"
                            f" {p.kind} token. Sign in with a token of your own user.")

    def cli_login_page(self, req: Request) -> Response:
        """Ask the signed-in person to confirm a `pulumi login` from this computer."""
        port, nonce, description = self._cli_session(req.q)
        self._personal_only(req.principal)
        hidden = "".join(f'<input type="hidden" name="{k}" value="{_h(v)}">' for k, v in (
            ("csrf", self._csrf(req)), ("cliSessionPort", port), ("cliSessionNonce", nonce),
            ("cliSessionDescription", description)))
        body = ('<div class="login card"><h1>Log in the pulumi CLI</h1>'
                f'<p>Log in the <code>pulumi</code> CLI on this computer as '
                f'<strong>{_name(req.principal.login)}</strong>?</p>'
                f'<p class="mut">A new personal access token, described as '
                f'“{_name(description)}”, goes to the CLI waiting at '
                f'<code>http://localhost:{port}</code>. Revoke it on the Tokens page.</p>'
                f'<form method="post" action="/cli-login">{hidden}'
                '<button class="primary" type="submit" id="cli-login">Log in the CLI</button>'
                '</form><p><a href="/">Cancel</a></p></div>')
        resp = self._html(req, "Log in the pulumi CLI", body)
        # The form's answer redirects to the CLI's port: CSP's form-action covers that.
        resp.headers["Content-Security-Policy"] = _CONSOLE_HEADERS[
            "Content-Security-Policy"].replace("form-action 'self'",
                                               "form-action 'self' http://localhost:*")
        return resp

    def cli_login(self, req: Request) -> Response:
        """Make a personal token for the CLI and send it to the CLI's loopback port."""
        form = self._checked_form(req)
        port, nonce, description = self._cli_session(form.get)
        self._personal_only(req.principal)
        # No expiry asked: a session of a token that expires makes one expiring with it.
        _, value = self.identity.create_token(
            req.principal, "personal", req.principal.login, "", description, 0, req=req,
            event="cli_login")
        query = urllib.parse.urlencode({"accessToken": value, "nonce": nonce},
                                       quote_via=urllib.parse.quote)
        return Response(303, b"", "text/plain", headers={
            "Location": f"http://localhost:{port}/?{query}"})

    def cli_welcome(self, req: Request) -> Response:
        """Where the CLI sends the browser once it has its token."""
        return self._html(req, "pulumi CLI logged in", (
            '<div class="login card"><h1>The pulumi CLI is logged in</h1>'
            '<p>You can close this tab and go back to your terminal.</p>'
            '<p class="mut">Its token is on the <a href="/tokens">Tokens</a> page.</p></div>'))

    # -- webhooks -------------------------------------------------------------

    def webhooks_page(self, req: Request) -> Response:
        """The organization's webhooks and their recent deliveries (org admins)."""
        if not req.principal.admin:
            raise Forbidden(f"this needs an organization admin; {req.principal.actor} is not "
                            "one")
        return self._html(req, "Webhooks", "<h1>Organization webhooks</h1>"
                          + self._webhooks_html(self.cfg.org, None))

    def _webhooks_html(self, org: str, names: Optional[tuple]) -> str:
        """Read-only tables of a scope's webhooks and their newest deliveries. A URL
        shows its host only: its path can be a credential (Slack's)."""
        hooks = self.app.webhooks.overview(org, names, CONSOLE_WEBHOOK_DELIVERIES)
        if not hooks:
            return ('<p class="mut">No webhooks: <code>pulumi '
                    f'{"stack" if names else "org"} webhook new</code> adds one.</p>')
        out = []
        for hook, rows in hooks:
            parts = urllib.parse.urlsplit(hook["payloadUrl"])
            events = ", ".join(hook["groups"] + hook["filters"]) or "all"
            out.append('<div class="card">' + _kv([
                ("Webhook", f'{_name(hook["displayName"])} <span class="t">'
                            f'{_h(hook["name"])}</span>'),
                ("Receiver", f'<code>{_h(parts.scheme)}://{_h(parts.netloc)}/…</code>'),
                ("Format", _h(hook["format"])), ("Events", _h(events)),
                ("Active", "yes" if hook["active"] else '<span class="mut">no</span>'),
                ("Secret", "yes" if hook["hasSecret"] else '<span class="mut">none</span>')])
                + "</div>")
            if not rows:
                out.append('<p class="mut">No deliveries yet.</p>')
                continue
            out.append('<div class="scroll"><table><thead><tr><th>When</th><th>Event</th>'
                       '<th>Status</th><th class="n">Code</th><th class="n">Attempts</th>'
                       '<th class="n">Duration</th><th class="w">Error</th></tr></thead><tbody>')
            for d in rows:
                status = {"succeeded": "succeeded", "failed": "failed"}.get(d["status"])
                badge = _result_badge(status) if status else \
                    f'<span class="badge run">{_h(d["status"])}</span>'
                out.append(
                    f'<tr><td>{_when(d["sent"] or d["created"] // 1000)}</td>'
                    f'<td>{_h(d["event"])}</td><td>{badge}</td>'
                    f'<td class="n">{_h(d["response_code"] or "")}</td>'
                    f'<td class="n">{_h(d["attempts"])}</td>'
                    f'<td class="n">{_h(d["duration"])} ms</td>'
                    f'<td class="w">{_h(d["error"][:200])}</td></tr>')
            out.append("</tbody></table></div>")
        return "".join(out)

    def tokens_page(self, req: Request, new: Optional[tuple] = None) -> Response:
        """The signed-in user's personal tokens: create and revoke."""
        p = req.principal
        out = ["<h1>Personal access tokens</h1>"]
        if p.kind != "user":
            out.append(f'<p class="mut">Personal tokens belong to users; you signed in with '
                       f'{_h("an " + p.kind if p.kind[0] in "aeiou" else "a " + p.kind)} '
                       'token. Ask an admin for a user and a token of your own '
                       '(<code>pulumi_backend.py user add</code>).</p>')
            return self._html(req, "Tokens", "".join(out))
        csrf = f'<input type="hidden" name="csrf" value="{_h(self._csrf(req))}">'
        if new is not None:
            out.append(f'<div class="card"><p><strong>New token {_h(new[0])}</strong>: copy it '
                       'now, it is not shown again. Use it with <code>pulumi login</code> or '
                       f'<code>PULUMI_ACCESS_TOKEN</code>.</p><code class="token" id="new-token">'
                       f'{_h(new[1])}</code></div>')
        out.append('<div class="card"><form class="search" method="post" action="/tokens">'
                   f'{csrf}<input type="text" name="description" placeholder="Description" '
                   'aria-label="Description" maxlength="200" required>'
                   '<select name="expires" aria-label="Expires">'
                   '<option value="0">never expires</option><option value="30">30 days</option>'
                   '<option value="90">90 days</option><option value="365">1 year</option>'
                   '</select><button class="primary" type="submit">Create token</button>'
                   '</form></div>')
        rows = self.identity.tokens_json("personal", p.login)["tokens"]
        if not rows:
            out.append('<p class="mut">No personal tokens.</p>')
        else:
            out.append('<div class="scroll"><table><thead><tr><th>Description</th>'
                       '<th class="w">Created</th><th>Last used</th><th class="w">Expires</th>'
                       '<th></th></tr></thead><tbody>')
            for t in rows:
                action = f"/tokens/{_q(t['id'])}/revoke"
                out.append(
                    f'<tr><td>{_name(t["description"] or t["name"])} <span class="t">'
                    f'{_h(t["id"])}</span></td><td class="w">{_h(t["created"])}</td>'
                    f'<td>{_when(t["lastUsed"])}</td><td class="w">{_when(t["expires"])}</td>'
                    f'<td><form method="post" action="{_h(action)}" data-confirm="Revoke this '
                    f'token?">{csrf}<button class="danger" type="submit">Revoke</button>'
                    '</form></td></tr>')
            out.append("</tbody></table></div>")
        return self._html(req, "Tokens", "".join(out))

    def create_token(self, req: Request) -> Response:
        """Create a personal token; the page shows its value once."""
        form = self._checked_form(req)
        if req.principal.kind != "user":
            raise Forbidden("personal tokens belong to users")
        try:
            days = int(form.get("expires") or 0)
        except ValueError:
            raise BadRequest("expires must be a number of days") from None
        if days not in (0, 30, 90, 365):
            raise BadRequest("expires must be 0, 30, 90 or 365 days")
        token_id, value = self.identity.create_token(
            req.principal, "personal", req.principal.login, "",
            form.get("description", "")[:200], _now() + days * 86400 if days else 0, req=req)
        return self.tokens_page(req, (token_id, value))

    def revoke_token(self, req: Request) -> Response:
        """Revoke one of the user's personal tokens."""
        self._checked_form(req)
        self.identity.revoke_token(req.principal, req.params["tokenId"], "personal",
                                   req.principal.login, req)
        return Response(303, b"", "text/plain", headers={"Location": "/tokens"})

    # -- administration (org admins) -----------------------------------------
    # The pages call the same Identity and AuditLog functions as the API
    # handlers and the user/team/token commands (section 8), which check their
    # input and audit every change with the signed-in admin as the actor; the
    # routes need "org-admin" (App._authorize), as the API's do.

    _ADMIN_TABS = (("users", "Users", "/admin/users"), ("teams", "Teams", "/admin/teams"),
                   ("tokens", "Tokens", "/admin/tokens"), ("audit", "Audit log", "/admin/audit"))

    def _admin_head(self, tab: str, title: str) -> str:
        tabs = "".join(f'<a href="{path}"{" class=on" if key == tab else ""}>{label}</a>'
                       for key, label, path in self._ADMIN_TABS)
        return (f'<div class="crumbs">{_name(self.cfg.org)} / administration</div>'
                f'<h1>{title}</h1><div class="tabs">{tabs}</div>')

    def _csrf_field(self, req: Request) -> str:
        return f'<input type="hidden" name="csrf" value="{_h(self._csrf(req))}">'

    def _button_form(self, req: Request, action: str, label: str, fields: Iterable = (),
                     confirm: str = "", cls: str = "danger") -> str:
        """A one-button POST form (hidden ``fields`` as ``(name, value)``)."""
        hidden = "".join(f'<input type="hidden" name="{_h(k)}" value="{_h(v)}">'
                         for k, v in fields)
        ask = f' data-confirm="{_h(confirm)}"' if confirm else ""
        return (f'<form class="inline" method="post" action="{_h(action)}"{ask}>'
                f'{self._csrf_field(req)}{hidden}<button class="{cls}" type="submit">'
                f'{_h(label)}</button></form>')

    @staticmethod
    def _see(location: str) -> Response:
        return Response(303, b"", "text/plain", headers={"Location": location})

    @staticmethod
    def _perm_select(selected: int = PERM_WRITE, with_none: bool = False) -> str:
        perms = (PERM_NONE,) * with_none + (PERM_READ, PERM_WRITE, PERM_ADMIN)
        return ('<select name="permission" aria-label="Permission">' + "".join(
            f'<option value="{_PERM_NAMES[p]}"{" selected" if p == selected else ""}>'
            f'{_PERM_NAMES[p]}</option>' for p in perms) + "</select>")

    def _token_rows(self, req: Request, tokens: list, back: str, owner: bool = True) -> str:
        if not tokens:
            return '<p class="mut">No tokens.</p>'
        out = ['<div class="scroll"><table class="admin"><thead><tr>'
               + ("<th>Owner</th>" if owner else "") + '<th>Description</th>'
               '<th class="w">Created by</th><th class="w">Created</th><th>Last used</th>'
               '<th class="w">Expires</th><th></th></tr></thead><tbody>']
        for t in tokens:
            who = (f'<td><span class="badge mut">{_h(t["kind"])}</span> '
                   f'{self._owner_link(t["kind"], t["owner"])}'
                   + (' <span class="badge bad">admin</span>' if t["admin"] else "")
                   + "</td>") if owner else ""
            out.append(
                f'<tr class="token-row">{who}<td>{_name(t["description"] or t["name"])} '
                f'<span class="t">{_h(t["id"])}</span></td>'
                f'<td class="w">{_name(t["createdBy"])}</td><td class="w">{_h(t["created"])}</td>'
                f'<td>{_when(t["lastUsed"])}</td><td class="w">{_when(t["expires"])}</td>'
                '<td>' + self._button_form(req, f"/admin/tokens/{_q(t['id'])}/revoke", "Revoke",
                                           (("back", back),), "Revoke this token?")
                + "</td></tr>")
        out.append("</tbody></table></div>")
        return "".join(out)

    @staticmethod
    def _owner_link(kind: str, owner: str) -> str:
        if kind == "personal":
            return f'<a href="/admin/users/{_h(_q(owner))}">{_name(owner)}</a>'
        if kind == "team":
            return f'<a href="/admin/teams/{_h(_q(owner))}">{_name(owner)}</a>'
        return _name(owner)

    def admin_users_page(self, req: Request) -> Response:
        """Every user with their role and teams; adds users (org admins)."""
        members = self.identity.members_json()
        out = [self._admin_head("users", f'Users <span class="mut">({len(members)})</span>'),
               '<div class="card"><form class="search" method="post" action="/admin/users">'
               f'{self._csrf_field(req)}<input type="text" name="login" placeholder="Login" '
               'aria-label="Login" maxlength="100" required pattern="[A-Za-z0-9][A-Za-z0-9_.\\-]*">'
               '<input type="text" name="name" placeholder="Name" aria-label="Name" '
               'maxlength="200"><input type="text" name="email" placeholder="Email" '
               'aria-label="Email" maxlength="200"><select name="role" aria-label="Role">'
               '<option value="member">member</option><option value="admin">admin</option>'
               '</select><button class="primary" type="submit">Add user</button></form>'
               '<p class="mut">Give a new user a token with <code>pulumi_backend.py token '
               'create --user LOGIN</code>; removing a user revokes their tokens and ends '
               'their sessions at once.</p></div>',
               '<div class="scroll"><table class="admin"><thead><tr><th>Login</th>'
               '<th class="w">Name</th>'
               '<th class="w">Email</th><th>Role</th><th>Teams</th><th class="n">Tokens</th>'
               '<th class="w">Created</th></tr></thead><tbody>']
        for m in members:
            login = m["user"]["githubLogin"]
            if m["virtualAdmin"]:
                out.append(f'<tr><td>{_name(login)}</td><td class="w" colspan="2">'
                           '<span class="mut">the admin of --auth-token tokens (configuration, '
                           'not a stored user)</span></td><td>admin</td><td></td><td></td>'
                           '<td class="w"></td></tr>')
                continue
            user = self.identity.user_detail(login)
            teams = " ".join(f'<a class="tag" href="/admin/teams/{_h(_q(t))}">{_name(t)}</a>'
                             for t in user["teams"])
            role = ('<span class="badge bad">admin</span>' if user["role"] == "admin"
                    else '<span class="mut">member</span>')
            out.append(f'<tr class="user-row"><td><a href="/admin/users/{_h(_q(login))}">'
                       f'{_name(login)}</a></td><td class="w">{_name(user["name"])}</td>'
                       f'<td class="w">{_name(user["email"])}</td><td>{role}</td>'
                       f'<td>{teams}</td><td class="n">{len(user["tokens"])}</td>'
                       f'<td class="w">{_when(user["created"])}</td></tr>')
        out.append("</tbody></table></div>")
        return self._html(req, "Users", "".join(out))

    def admin_add_user(self, req: Request) -> Response:
        """Add a user (Identity.add_user, as `user add` and the API do)."""
        form = self._checked_form(req)
        login = form.get("login", "").strip()
        self.identity.add_user(req.principal, login, form.get("name", "").strip()[:200],
                               form.get("email", "").strip()[:200],
                               form.get("role", "member"), req)
        return self._see(f"/admin/users/{_q(login)}")

    def admin_user_page(self, req: Request) -> Response:
        """One user: role, teams and personal tokens, with the forms that change them."""
        login = req.params["login"]
        user = self.identity.user_detail(login)
        here = f"/admin/users/{_q(login)}"
        role_form = (f'<form class="inline" method="post" action="{_h(here)}/role">'
                     f'{self._csrf_field(req)}<select name="role" aria-label="Role">' + "".join(
                         f'<option value="{r}"{" selected" if r == user["role"] else ""}>{r}'
                         '</option>' for r in ("member", "admin"))
                     + '</select><button type="submit">Set role</button></form>')
        out = [self._admin_head("users", f"User {_name(login)}"), '<div class="card">' + _kv([
            ("Login", _name(login)), ("Name", _name(user["name"])),
            ("Email", _name(user["email"])), ("Role", role_form),
            ("Created", _when(user["created"]))]) + "</div>", "<h2>Teams</h2>"]
        if user["teams"]:
            out.append('<table class="admin"><tbody>')
            for team in user["teams"]:
                out.append(f'<tr><td><a href="/admin/teams/{_h(_q(team))}">{_name(team)}</a>'
                           '</td><td>' + self._button_form(
                               req, f"/admin/teams/{_q(team)}/members/{_q(login)}/remove",
                               "Remove from team", (("back", here),)) + "</td></tr>")
            out.append("</tbody></table>")
        else:
            out.append('<p class="mut">In no team.</p>')
        out.append("<h2>Personal tokens</h2>")
        out.append(self._token_rows(req, user["tokens"], here, owner=False))
        out.append('<h2>Remove</h2><p class="mut">Removing the user deletes their personal '
                   'tokens and memberships; their sessions end at once. (There is no '
                   '"disabled" state: add them again to let them back in.)</p>'
                   + self._button_form(req, here + "/remove", f"Remove user {login}",
                                       confirm=f"Remove user {login} and their tokens?"))
        return self._html(req, f"User {login}", "".join(out))

    def admin_set_role(self, req: Request) -> Response:
        """Set a user's org role (Identity.set_role)."""
        form = self._checked_form(req)
        login = req.params["login"]
        self.identity.set_role(req.principal, login, form.get("role", ""), req)
        return self._see(f"/admin/users/{_q(login)}")

    def admin_remove_user(self, req: Request) -> Response:
        """Remove a user and their personal tokens (Identity.remove_user)."""
        self._checked_form(req)
        self.identity.remove_user(req.principal, req.params["login"], req)
        return self._see("/admin/users")

    def admin_teams_page(self, req: Request) -> Response:
        """Every team with its members and grants; creates teams."""
        names = [t["name"] for t in self.identity.teams_json()]
        out = [self._admin_head("teams", f'Teams <span class="mut">({len(names)})</span>'),
               '<div class="card"><form class="search" method="post" action="/admin/teams">'
               f'{self._csrf_field(req)}<input type="text" name="name" placeholder="Team name" '
               'aria-label="Team name" maxlength="100" required>'
               '<input type="text" name="display_name" placeholder="Display name" '
               'aria-label="Display name" maxlength="200"><input type="text" '
               'name="description" placeholder="Description" aria-label="Description" '
               'maxlength="1000"><button class="primary" type="submit">Create team</button>'
               '</form></div>']
        if not names:
            out.append('<p class="mut">No teams.</p>')
            return self._html(req, "Teams", "".join(out))
        out.append('<div class="scroll"><table class="admin"><thead><tr><th>Team</th><th class="w">'
                   'Description</th><th>Members</th><th>Grants</th></tr></thead><tbody>')
        for name in names:
            team = self.identity.team_json(name)
            grants = " ".join(
                f'<span class="tag">{_name(s["projectName"] + "/" + s["stackName"])}: '
                f'{_h(_PERM_NAMES.get(s["permission"], s["permission"]))}</span>'
                for s in team["stacks"])
            out.append(f'<tr class="team-row"><td><a href="/admin/teams/{_h(_q(name))}">'
                       f'{_name(team["displayName"])}</a> <span class="t">{_name(name)}</span>'
                       f'</td><td class="w">{_name(team["description"])}</td>'
                       f'<td class="n">{len(team["members"])}</td><td>{grants}</td></tr>')
        out.append("</tbody></table></div>")
        return self._html(req, "Teams", "".join(out))

    def admin_create_team(self, req: Request) -> Response:
        """Create a team (Identity.create_team)."""
        form = self._checked_form(req)
        name = form.get("name", "").strip()
        self.identity.create_team(req.principal, name, form.get("display_name", "").strip()[:200],
                                  form.get("description", "").strip()[:1000], req)
        return self._see(f"/admin/teams/{_q(name)}")

    def admin_team_page(self, req: Request) -> Response:
        """One team: members and stack grants, with the forms that change them."""
        name = req.params["team"]
        team = self.identity.team_json(name)
        here = f"/admin/teams/{_q(name)}"
        members = [m["githubLogin"] for m in team["members"]]
        others = [m["user"]["githubLogin"] for m in self.identity.members_json()
                  if not m["virtualAdmin"] and m["user"]["githubLogin"] not in members]
        out = [self._admin_head("teams", f"Team {_name(team['displayName'])}"),
               '<div class="card">' + _kv([
                   ("Name", _name(name)), ("Display name", _name(team["displayName"])),
                   ("Description", _name(team["description"]))]) + "</div>",
               f'<h2>Members <span class="mut">({len(members)})</span></h2>']
        if others:
            out.append(f'<form class="search" method="post" action="{_h(here)}/members">'
                       f'{self._csrf_field(req)}<select name="login" aria-label="User">'
                       + "".join(f'<option value="{_h(u)}">{_h(u)}</option>' for u in others)
                       + '</select><button class="primary" type="submit">Add member</button>'
                       '</form>')
        if members:
            out.append('<div class="scroll"><table class="admin"><tbody>')
            for m in team["members"]:
                login = m["githubLogin"]
                out.append(
                    f'<tr class="member-row"><td><a href="/admin/users/{_h(_q(login))}">'
                    f'{_name(login)}</a></td><td class="w">{_name(m["name"])}</td><td>'
                    + self._button_form(req, f"{here}/members/{_q(login)}/remove", "Remove",
                                        (("back", here),)) + "</td></tr>")
            out.append("</tbody></table></div>")
        else:
            out.append('<p class="mut">No members.</p>')
        out.append('<h2>Stack permissions</h2><p class="mut">A pattern is '
                   '<code>project/stack</code> with <code>*</code> and <code>?</code> wildcards '
                   '(<code>app/*</code>, <code>*/prod</code>; <code>app</code> means '
                   '<code>app/*</code>). Members get the highest permission of any matching '
                   'grant.</p>'
                   f'<form class="search" method="post" action="{_h(here)}/grants">'
                   f'{self._csrf_field(req)}<input type="text" name="pattern" '
                   'placeholder="project/stack pattern" aria-label="Stack pattern" '
                   f'maxlength="201" required>{self._perm_select()}'
                   '<button class="primary" type="submit">Grant</button></form>')
        if team["stacks"]:
            out.append('<div class="scroll"><table class="admin"><thead><tr><th>Pattern</th>'
                       '<th>Permission'
                       '</th><th></th></tr></thead><tbody>')
            for s in team["stacks"]:
                pattern = s["projectName"] + "/" + s["stackName"]
                out.append(
                    f'<tr class="grant-row"><td><code>{_name(pattern)}</code></td><td>'
                    f'{_h(_PERM_NAMES.get(s["permission"], s["permission"]))}</td><td>'
                    + self._button_form(req, f"{here}/grants", "Remove",
                                        (("pattern", pattern), ("permission", "none")))
                    + "</td></tr>")
            out.append("</tbody></table></div>")
        else:
            out.append('<p class="mut">No grants: members see only what '
                       '--default-stack-permission allows.</p>')
        out.append("<h2>Team tokens</h2>")
        out.append(self._token_rows(req, self.identity.tokens_owned("team", name), here,
                                    owner=False))
        out.append("<h2>Delete</h2>" + self._button_form(
            req, here + "/delete", f"Delete team {name}",
            confirm=f"Delete team {name} with its grants and tokens?"))
        return self._html(req, f"Team {name}", "".join(out))

    def admin_add_member(self, req: Request) -> Response:
        """Add a user to the team (Identity.add_member)."""
        form = self._checked_form(req)
        team = req.params["team"]
        self.identity.add_member(req.principal, team, form.get("login", "").strip(), req)
        return self._see(f"/admin/teams/{_q(team)}")

    def admin_remove_member(self, req: Request) -> Response:
        """Remove a user from the team (Identity.remove_member)."""
        form = self._checked_form(req)
        team = req.params["team"]
        self.identity.remove_member(req.principal, team, req.params["login"], req)
        return self._see(self._next(form.get("back") or f"/admin/teams/{_q(team)}"))

    def admin_grant(self, req: Request) -> Response:
        """Grant the team a permission on a stack pattern, or remove it with "none"
        (Identity.grant: what `team grant` does; globs allowed)."""
        form = self._checked_form(req)
        team, perm = req.params["team"], form.get("permission", "")
        if perm not in _PERM_BY_NAME:
            raise BadRequest("permission must be none, read, write or admin")
        self.identity.grant(req.principal, team, form.get("pattern", "").strip(),
                            _PERM_BY_NAME[perm], req)
        return self._see(f"/admin/teams/{_q(team)}")

    def admin_delete_team(self, req: Request) -> Response:
        """Delete the team with its grants and tokens (Identity.delete_team)."""
        self._checked_form(req)
        self.identity.delete_team(req.principal, req.params["team"], req)
        return self._see("/admin/teams")

    def admin_tokens_page(self, req: Request) -> Response:
        """Every token of the organization (personal, team, org), to revoke."""
        kind = req.q("kind") or ""
        if kind not in ("", "personal", "team", "org"):
            raise BadRequest("kind must be personal, team or org")
        tokens = self.identity.tokens_owned(kind or None)
        kinds = "".join(f'<a href="/admin/tokens{"?kind=" + k if k else ""}"'
                        f'{" class=on" if k == kind else ""}>{label}</a>'
                        for k, label in (("", "All"), ("personal", "Personal"),
                                         ("team", "Team"), ("org", "Organization")))
        out = [self._admin_head("tokens", f'Tokens <span class="mut">({len(tokens)})</span>'),
               f'<div class="tabs">{kinds}</div>',
               self._token_rows(req, tokens, "/admin/tokens" + (f"?kind={kind}" if kind else ""))]
        return self._html(req, "Tokens", "".join(out))

    def admin_revoke_token(self, req: Request) -> Response:
        """Revoke any token (Identity.revoke_token)."""
        form = self._checked_form(req)
        self.identity.revoke_token(req.principal, req.params["tokenId"], req=req)
        return self._see(self._next(form.get("back") or "/admin/tokens"))

    @staticmethod
    def _audit_time(text: str, end: bool) -> Optional[int]:
        """A date (YYYY-MM-DD, whole day) or date and time (UTC) as a Unix time."""
        if not text:
            return None
        try:
            when = datetime.datetime.fromisoformat(text[:40])
        except ValueError:
            raise BadRequest(f"invalid time {text[:40]!r}: use YYYY-MM-DD or "
                             "YYYY-MM-DDTHH:MM (UTC)") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        extra = 86399 if end and len(text) <= 10 else 59 if end and len(text) <= 16 else 0
        return int(when.timestamp()) + extra

    def admin_audit_page(self, req: Request) -> Response:
        """The audit log, newest first: filter by user, event, stack and time; paged."""
        user = (req.q("user") or "").strip()[:200]
        event = (req.q("event") or "").strip()[:200]
        stack = (req.q("stack") or "").strip()[:201]
        since, until = (req.q("from") or "").strip(), (req.q("to") or "").strip()
        start = self._audit_time(since, False) or 0
        end = self._audit_time(until, True) or 2 ** 62
        target = None
        if stack:
            project, _, name = stack.partition("/")
            if name:
                _check_stack_names(project, name)
            elif not _NAME_RE.match(project):
                raise BadRequest(f"invalid project name {project!r}")
            target = f"{self.cfg.org}/{stack}"
        page = self.audit.page(req.q("after"), start, end, event or None, user or None, target)
        filters = {"user": user, "event": event, "stack": stack, "from": since, "to": until}
        out = [self._admin_head("audit", "Audit log"),
               '<form class="search" method="get" action="/admin/audit">' + "".join(
                   f'<input type="text" name="{k}" value="{_h(filters[k])}" '
                   f'placeholder="{label}" aria-label="{label}">' for k, label in (
                       ("user", "User"), ("event", "Event, e.g. team_created"),
                       ("stack", "project or project/stack"),
                       ("from", "From (YYYY-MM-DD, UTC)"), ("to", "To (YYYY-MM-DD, UTC)")))
               + '<button type="submit">Filter</button></form>']
        rows = page["auditLogEvents"]
        if not rows:
            out.append('<p class="mut">No events match.</p>')
        else:
            out.append('<div class="scroll"><table class="admin"><thead><tr><th>When</th>'
                       '<th>User</th>'
                       '<th>Event</th><th>Target</th><th class="w">Details</th>'
                       '<th class="w">Address</th></tr></thead><tbody>')
            for e in rows:
                outcome = "" if e["outcome"] == "success" else \
                    f' <span class="badge bad">{_h(e["outcome"])}</span>'
                token = f' <span class="t">via {_name(e["tokenName"])}</span>' \
                    if e["tokenName"] else ""
                out.append(f'<tr class="audit-row"><td>{_when(e["timestamp"])}</td>'
                           f'<td>{_name(e["actorName"])}{token}</td>'
                           f'<td><code>{_h(e["event"])}</code>{outcome}</td>'
                           f'<td>{_name(e["target"])}</td>'
                           f'<td class="w">{_name(e["description"])}</td>'
                           f'<td class="w">{_h(e["sourceIP"])}</td></tr>')
            out.append("</tbody></table></div>")
        query = {k: v for k, v in filters.items() if v}
        links = []
        if req.q("after"):
            links.append(f'<a href="/admin/audit?{_h(urllib.parse.urlencode(query))}">'
                         '← Newest</a>')
        if page["continuationToken"]:
            more = urllib.parse.urlencode(dict(query, after=page["continuationToken"]))
            links.append(f'<a href="/admin/audit?{_h(more)}">Older →</a>')
        if links:
            out.append(f'<div class="pager">{"".join(links)}</div>')
        return self._html(req, "Audit log", "".join(out))


def build_app(cfg: Config, environ: Optional[dict] = None) -> tuple:
    """Open the store and keys and return ``(store, app)``; raise ValueError on bad setup."""
    environ = os.environ if environ is None else environ
    if cfg.oidc_issuers:
        _load_issuers(cfg.oidc_issuers)  # a broken file stops the start, not the first login
    if cfg.sso_config:
        if not cfg.console:
            raise ValueError("--sso-config signs people in to the console: it needs "
                             "--console on")
        _load_sso(cfg.sso_config)  # a broken file stops the start, not the first sign-in
    if cfg.audit_log:
        try:
            os.close(os.open(cfg.audit_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
        except OSError as e:
            raise ValueError(f"cannot append to --audit-log {cfg.audit_log}: {e.strerror}") \
                from None
        _private_file(cfg.audit_log)  # left readable by others: tightened, with a warning
    store = open_store(cfg.db, cfg.wal_autocheckpoint)
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
    app = App(cfg, Engine(cfg, store, keys))
    app.identity.check_at_start()
    if cfg.console:
        Console(app).install()
    return store, app


# ==== 12. Backups and replication ===========================================
# Copies of the database and their keys: online backups (SQLite's backup API,
# then checked with the master key), restore with the server stopped, copy
# between SQLite and PostgreSQL, master key rotation, and the scheduled
# BackupScheduler. Commands that must run alone hold <db>.lock. Replication is
# Litestream's, outside the process (docs/operations.md); section 5 only keeps
# the WAL the way it needs.

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


def _snapshot(db: str, out: str) -> int:
    """Copy ``db`` to the new file ``out`` (0600, checked); return its stack count.

    Raises ValueError naming the files. Why one backup step (``pages=-1``):
    in WAL mode the step is a single read transaction, and readers never block
    writers (they append to the WAL beside it); only checkpoints cannot pass
    the snapshot until it ends. Copying in several steps would let every commit
    in between restart the copy from the first page, so under steady writes it
    might never finish. The copy is written beside ``out`` and linked into
    place, so ``out`` is never half written; an existing ``out`` is never
    replaced (with the two paths mixed up, that would be the live database).
    """
    if os.path.lexists(out):
        raise ValueError(f"{out} exists; backups never overwrite a file, give a new name")
    src = _open_read_only(db)
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        dst = sqlite3.connect(tmp, isolation_level=None)
        try:
            src.backup(dst, pages=-1)
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
        raise ValueError(f"backup of {db} to {out} failed: {e}") from None
    finally:
        src.close()
        if os.path.exists(tmp):
            os.remove(tmp)
    return stacks


def _private_dir(path: str) -> None:
    """Take group and other access off the folder ``path``, with a warning (backups are
    copies of the database: as private as it; see _private_file)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return
    if not mode & 0o077:
        return
    try:
        os.chmod(path, mode & 0o700)
    except OSError as e:
        log.warning("%s is readable by other users (mode %04o) and cannot be changed: %s",
                    path, mode, e.strerror)
        return
    log.warning("%s was readable by other users (mode %04o); it is now %04o", path, mode,
                mode & 0o700)


class BackupScheduler:
    """Takes a ``_snapshot`` into ``cfg.backup_dir`` every ``cfg.backup_interval`` seconds.

    Files are named by UTC time (``pulumi-backend-20260101T120000Z.db``), so
    sorting names sorts them by age; beyond ``cfg.backup_keep`` the oldest are
    removed. A failure is logged and counted in ``metrics`` and the next backup
    is tried on schedule: requests never see it. The first backup is due one
    interval after the newest one already in the folder (at once if none).
    """

    PREFIX = "pulumi-backend-"
    _NAME_RE = re.compile(r"pulumi-backend-([0-9]{8}T[0-9]{6}Z)\.db\Z")

    def __init__(self, cfg: Config, metrics: Metrics):
        self.cfg, self.metrics = cfg, metrics
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Create the folder (0700) if needed and start the background thread."""
        try:
            os.makedirs(self.cfg.backup_dir, mode=0o700, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create --backup-dir {self.cfg.backup_dir}: "
                             f"{e.strerror}") from None
        _private_dir(self.cfg.backup_dir)
        self.metrics.inc("pulumi_backend_backup_failures_total", 0)
        newest = self._newest_time()
        if newest is not None:
            self.metrics.set("pulumi_backend_last_backup_success_timestamp_seconds", newest)
        self._thread = threading.Thread(target=self._run, name="backups", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread; a backup under way is finished first (it is one step)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        newest = self._newest_time()
        delay = 0.0 if newest is None else newest + self.cfg.backup_interval - time.time()
        while not self._stop.wait(max(0.0, delay)):
            self.backup_now()
            delay = self.cfg.backup_interval

    def backup_now(self) -> Optional[str]:
        """Take one backup and prune old ones; return its path, or None if it failed."""
        t = time.time()
        name = self.PREFIX + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t)) + ".db"
        out = os.path.join(self.cfg.backup_dir, name)
        try:
            stacks = _snapshot(self.cfg.db, out)
        except ValueError as e:
            log.error("scheduled backup failed: %s", e)
            self.metrics.inc("pulumi_backend_backup_failures_total")
            return None
        self.metrics.set("pulumi_backend_last_backup_success_timestamp_seconds", int(t))
        log.info("backed up %d stacks to %s in %.1f s", stacks, out, time.time() - t)
        self._prune()
        return out

    def backups(self) -> list:
        """Return the names of the scheduled backups in the folder, oldest first."""
        try:
            names = os.listdir(self.cfg.backup_dir)
        except OSError:
            return []
        return sorted(n for n in names if self._NAME_RE.match(n))

    def _newest_time(self) -> Optional[int]:
        names = self.backups()
        if not names:
            return None
        stamp = self._NAME_RE.match(names[-1])[1]
        return int(datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(
            tzinfo=datetime.timezone.utc).timestamp())

    def _prune(self) -> None:
        names = self.backups()
        for name in names[:max(0, len(names) - self.cfg.backup_keep)]:
            try:
                os.remove(os.path.join(self.cfg.backup_dir, name))
            except OSError as e:
                log.warning("cannot remove old backup %s: %s", name, e.strerror)


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
        fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT, 0o600)
    except OSError as e:
        raise ValueError(f"cannot open {lock_path}: {e.strerror}") from None
    _private_file(lock_path)
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


def backup_database(cfg: Config, out: Optional[str]) -> int:
    """Copy ``cfg.db`` to the new file ``out``: one consistent, self-contained file.

    Works while the server runs; see ``_snapshot``. Returns an exit code.
    """
    if not out:
        raise ValueError("backup needs the file to write: backup --db DB OUT")
    stacks = _snapshot(cfg.db, out)
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
    keys = KeyManager(crypto, master_key)
    if not keys.matches(canary[0] if canary else None, _one_data_key(conn)):
        raise ValueError("it was made under another master key: give that key "
                         "(--master-key-file or PULUMI_BACKEND_MASTER_KEY)")
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
            _private_database(cfg.db)  # a restored database is as private as a new one
        except OSError as e:
            raise ValueError(f"cannot restore into {cfg.db}: {e.strerror}") from None
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
    except (sqlite3.Error, RuntimeError, OSError) as e:
        raise ValueError(f"restored {source} into {cfg.db}, but it does not open: {e}") from None
    print(f"restored {stacks} stacks from {source} into {cfg.db}")
    return 0


def _copy_lock(db: str):
    """The lock a copy holds on one side: ``<db>.lock`` for SQLite (no server may run);
    for PostgreSQL nothing to take, ``copy_database`` checks for connected servers."""
    return contextlib.nullcontext() if is_postgres_url(db) else _database_lock(db)


def _export_hashes(store: "Store", db) -> dict:
    """Return stack id -> SHA-256 of its latest state as export serves it (uncompressed)."""
    hashes = {}
    for stack_id, _ in store.all_data_keys(db):
        row = store.get_deployment(db, stack_id)
        data = gzip.decompress(row["data"]) if row else _empty_deployment()
        hashes[stack_id] = hashlib.sha256(data).hexdigest()
    return hashes


def copy_database(source: Optional[str], target: Optional[str]) -> int:
    """Copy every row of one database (SQLite file or PostgreSQL URL) into another, empty
    one, in one transaction, then check row counts and every stack's export hash.

    Servers on either side must be stopped. The master key is not needed: stack keys
    are copied still wrapped, so the same key opens the copy. Returns an exit code.
    """
    if not source or not target:
        raise ValueError("copy needs both databases: copy --from state.db --to postgresql://...")
    if source == target:
        raise ValueError("copy: --from and --to are the same database")
    if not is_postgres_url(source) and not os.path.exists(source):
        raise ValueError(f"copy: {source} does not exist")
    names = (_redact_url(source), _redact_url(target))
    tty = sys.stderr.isatty()
    with _copy_lock(source), _copy_lock(target):
        src = open_store(source, app_name="pulumi-backend-copy")
        try:
            dst = open_store(target, app_name="pulumi-backend-copy")
        except ValueError:
            src.close()
            raise
        try:
            for store, name in ((src, names[0]), (dst, names[1])):
                if isinstance(store, PostgresStore):
                    with store.read() as db:
                        if store.other_servers(db):
                            raise ValueError(f"copy: a server is connected to {name}; stop "
                                             "every server on both databases first")
            with dst.read() as db:
                busy = [t for t in _TABLE_COLUMNS if t != "meta" and dst.count_rows(db, t)]
            if busy:
                raise ValueError(f"copy: {names[1]} is not empty ({', '.join(busy)} have rows); "
                                 "copy into a new database")
            counts: dict = {}
            with src.read() as rdb, dst.write() as wdb:
                meta = dict(r for _, rows in src.table_batches(rdb, "meta") for r in rows)
                for key, value in meta.items():  # replaces a canary of a server started on it
                    dst.set_meta(wdb, key, value)
                for table in list(_TABLE_COLUMNS)[1:]:
                    counts[table] = 0
                    for columns, rows in src.table_batches(rdb, table):
                        dst.insert_rows(wdb, table, columns, rows)
                        counts[table] += len(rows)
                    if tty:
                        print(f"  {table}: {counts[table]} rows", file=sys.stderr, flush=True)
                dst.after_copy(wdb)
                hashes = _export_hashes(src, rdb)
            _check_copy(dst, meta, counts, hashes, names)
        finally:
            src.close()
            dst.close()
    print(f"copied {counts['stacks']} stacks, {sum(counts.values()) + len(meta)} rows from "
          f"{names[0]} to {names[1]}; checked: row counts of {len(counts) + 1} tables, "
          f"{len(hashes)} export hashes")
    return 0


def _check_copy(dst: "Store", meta: dict, counts: dict, hashes: dict, names: tuple) -> None:
    """Raise ValueError unless the copy has the source's rows and states."""
    with dst.read() as db:
        for table, n in counts.items():
            got = dst.count_rows(db, table)
            if got != n:
                raise ValueError(f"copy check failed: {table} has {got} rows in {names[1]}, "
                                 f"{n} in {names[0]}")
        if any(dst.get_meta(db, key) != value for key, value in meta.items()):
            raise ValueError(f"copy check failed: the meta rows of {names[1]} differ")
        copied = _export_hashes(dst, db)
    bad = sorted(k for k in hashes if copied.get(k) != hashes[k])
    if bad or len(copied) != len(hashes):
        raise ValueError(f"copy check failed: the state of {len(bad)} stacks differs "
                         f"(first: {bad[:1]})")


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


# ==== 13. Import from DIY backends ==========================================
#
# A DIY backend (``pulumi login file://...``) keeps, under ``.pulumi/``:
#   meta.yaml                       ``version: 1`` once stacks are project-scoped
#   stacks/<project>/<stack>.json   the latest checkpoint (legacy: stacks/<stack>.json)
#   history/<project>/<stack>/<stack>-<unix nanos>.checkpoint.json   state after an update
#   history/<project>/<stack>/<stack>-<unix nanos>.history.json      its UpdateInfo record
#   locks/organization/<project>/<stack>/<id>.json   a running update (legacy: locks/<stack>/)
#   stacks/<project>/<stack>.pulumi-tags             {"version": 1, "tags": {...}}
# Any of these files may be gzipped (``.json.gz``, PULUMI_DIY_BACKEND_GZIP) or
# zstd-compressed (``.json.zst``). A checkpoint file is a VersionedCheckpoint:
# ``{"version": N, "features": [...], "checkpoint": {"stack", "config", "latest"}}``
# where ``latest`` is the deployment of schema N.
#
# Import runs beside a live server without the server's lock: the server
# reads stack rows afresh on every request, and its caches (working
# checkpoints, unwrapped data keys) are keyed by update and stack ids. Import
# only adds stacks, or (--overwrite) replaces one that has no update running
# by a new stack with a new id, each in one transaction.

_DIY_FILE_RE = re.compile(r"(.+)\.json(\.gz|\.zst)?\Z")
_DIY_HISTORY_RE = re.compile(r".+-([0-9]+)\.(checkpoint|history)\.json(\.gz|\.zst)?\Z")
_DIY_RESULTS = {"succeeded": "succeeded", "failed": "failed"}  # others never finished


@dataclasses.dataclass
class _DIYStack:
    """One stack found in a DIY backend, and what importing it means."""

    project: str  # '' until known for a legacy (unscoped) stack
    name: str
    path: str  # the stack's latest checkpoint file
    history: list  # [(unix nanos, checkpoint path, history path or None)], oldest first
    locks: list  # lock files present
    tags_path: str
    skip: str = ""  # why it is not imported ('' to import)
    versions: int = 0
    bytes: int = 0


def _diy_root(source: str) -> str:
    """Return the ``.pulumi`` folder of a DIY backend folder or ``file://`` URL."""
    path = source
    if source.startswith("file://"):  # file:///abs, file://~/x or file://rel, maybe ?options
        path = urllib.parse.unquote(source[len("file://"):].split("?", 1)[0])
    path = os.path.expanduser(path)
    for root in (os.path.join(path, ".pulumi"), path):
        if os.path.basename(os.path.normpath(root)) == ".pulumi" and os.path.isdir(root):
            break
    else:
        raise ValueError(f"{source}: no .pulumi folder there; give the folder (or file:// URL) "
                         "you logged in to with `pulumi login`. For a bucket, sync it to a "
                         "folder first (e.g. `aws s3 sync s3://BUCKET ./diy`)")
    try:
        with open(os.path.join(root, "meta.yaml"), encoding="utf-8") as f:
            m = re.search(r"^version:\s*([0-9]+)", f.read(), re.M)
    except OSError:
        m = None
    if m and int(m[1]) > 1:
        raise ValueError(f"{root}/meta.yaml has layout version {m[1]}; this importer knows "
                         "versions 0 and 1")
    return root


def _diy_read(path: str) -> bytes:
    """Return a DIY file's bytes, decompressed; ValueError naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":
            return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if data[:4] == b"\x28\xb5\x2f\xfd":
        raise ValueError(f"{path} is zstd-compressed, which Python's standard library cannot "
                         "read: decompress it first (`zstd -d`) and import again")
    return data


def _diy_stacks(root: str) -> list:
    """Return every stack of the DIY backend at ``root`` (project-scoped and legacy)."""
    stacks_dir = os.path.join(root, "stacks")
    found: dict = {}
    for dirpath, _, files in os.walk(stacks_dir):
        rel = os.path.relpath(dirpath, stacks_dir)
        project = "" if rel == "." else rel
        if os.sep in project:
            continue  # too deep: not a stack file
        for fname in sorted(files):
            m = _DIY_FILE_RE.match(fname)
            if not m:
                continue  # .bak copies, .pulumi-tags and strangers
            key = (project, m[1])
            path = os.path.join(dirpath, fname)
            if key in found and os.path.getmtime(found[key]) >= os.path.getmtime(path):
                continue  # a stale copy left by a change of compression
            found[key] = path
    out = []
    for (project, name), path in sorted(found.items()):
        scoped = (project, name) if project else (name,)
        out.append(_DIYStack(
            project=project, name=name, path=path,
            history=_diy_history(os.path.join(root, "history", *scoped)),
            locks=_diy_locks(os.path.join(root, "locks", *(
                ("organization", project, name) if project else (name,)))),
            tags_path=os.path.join(os.path.dirname(path), name + ".pulumi-tags")))
    return out


def _diy_history(folder: str) -> list:
    """Return ``[(nanos, checkpoint path, history path or None)]`` oldest first."""
    pairs: dict = {}
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    for fname in names:
        m = _DIY_HISTORY_RE.match(fname)
        if m:
            pairs.setdefault(int(m[1]), {})[m[2]] = os.path.join(folder, fname)
    return [(nanos, files["checkpoint"], files.get("history"))
            for nanos, files in sorted(pairs.items()) if "checkpoint" in files]


def _diy_locks(folder: str) -> list:
    try:
        return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".json"))
    except OSError:
        return []


def _diy_deployment(path: str, raw: Optional[bytes] = None) -> tuple:
    """Return ``(untyped deployment dict, its JSON bytes)`` of a DIY checkpoint file
    (whose decompressed bytes are ``raw`` if already read)."""
    try:
        doc = _require_dict(_loads(_diy_read(path) if raw is None else raw, path), path)
        version = doc.get("version")
        latest = _require_dict(doc.get("checkpoint"), path).get("latest")
        if latest is None:  # a stack that was never updated
            untyped = _loads(_empty_deployment())
        else:
            untyped = {"version": version, "deployment": latest}
            if doc.get("features"):
                untyped["features"] = doc["features"]
        untyped = _check_untyped_deployment(untyped)
    except HTTPError as e:
        raise ValueError(f"{path}: {e.message}") from None
    return untyped, _dumps(untyped)


def _diy_update(history_path: Optional[str], nanos: int, kind_default: str) -> dict:
    """Return the UpdateInfo record of a history entry (times and kind guessed if absent)."""
    info: Any = {}
    if history_path is not None:
        try:
            info = _loads(_diy_read(history_path), history_path)
        except HTTPError as e:
            raise ValueError(e.message) from None
    if not isinstance(info, dict):
        raise ValueError(f"{history_path} is not an update record")
    t = nanos // 10**9
    kind = info.get("kind") if isinstance(info.get("kind"), str) else kind_default
    start = info.get("startTime") if isinstance(info.get("startTime"), int) else t
    end = info.get("endTime") if isinstance(info.get("endTime"), int) else start
    metadata = {"message": info.get("message") if isinstance(info.get("message"), str) else "",
                "environment": info.get("environment") or {}}
    changes = info.get("resourceChanges")
    return {"kind": kind[:40], "status": _DIY_RESULTS.get(info.get("result"), "failed"),
            "created": start, "started": start, "ended": end,
            # Every key an update request's program has (_check_program): its config is
            # then read as the apitype.ConfigValues it holds (_program_config).
            "program": json.dumps({"name": None, "runtime": None, "main": None,
                                   "description": None, "config": _service_config(
                                       info.get("config")), "metadata": metadata}),
            "resource_changes": json.dumps(changes) if isinstance(changes, dict) else None}


def _legacy_project(doc: dict) -> str:
    """Return the project a legacy stack's resources name (its URNs), or ''."""
    for res in doc["deployment"].get("resources") or []:
        parts = str(res.get("urn", "")).split("::")
        if len(parts) >= 2 and parts[0].startswith("urn:pulumi:"):
            return parts[1]
    return ""


def _diy_versions(stack: _DIYStack, limit: int) -> list:
    """Return the stack's versions, oldest first: ``[(number, update row, deployment bytes,
    resource count)]``; only the newest ``limit`` are read (as the server keeps them).

    Each history checkpoint is one version; the stack file is one more if its
    state differs from the last checkpoint's (e.g. after ``pulumi stack import``).
    """
    entries = stack.history
    raw = _diy_read(stack.path)
    last_raw = _diy_read(entries[-1][1]) if entries else None
    last = _diy_deployment(entries[-1][1], last_raw) if entries else None
    if raw == last_raw:  # the usual case: the last update's copy of the stack file
        latest, extra = last, False
    else:
        latest = _diy_deployment(stack.path, raw)
        extra = latest[0] != last[0] if last else _count_resources(latest[0]) > 0
    total = len(entries) + int(extra)
    out = []
    for number, (nanos, cp, hist) in enumerate(entries, 1):
        if number <= total - limit:
            continue
        doc, data = last if number == len(entries) else _diy_deployment(cp)
        out.append((number, _diy_update(hist, nanos, "update"), data, _count_resources(doc)))
    if extra:
        nanos = int(os.path.getmtime(stack.path) * 10**9)
        update = _diy_update(None, nanos, "import")
        update["status"] = "succeeded"
        out.append((total, update, latest[1], _count_resources(latest[0])))
    if not stack.project:
        stack.project = _legacy_project(latest[0])
    return out


def _diy_tags(stack: _DIYStack) -> dict:
    """Return the stack's tags that are valid here (a tags file is optional)."""
    if not os.path.exists(stack.tags_path):
        return {}
    try:
        tags = _loads(_diy_read(stack.tags_path), stack.tags_path).get("tags") or {}
        return {k: v for k, v in tags.items() if _TAG_NAME_RE.match(k) and isinstance(v, str)
                and len(v) <= 256}
    except (HTTPError, ValueError, AttributeError):
        return {}


def _import_stack(engine: Engine, org: str, stack: _DIYStack, versions: list, tags: dict,
                  overwrite: bool) -> str:
    """Store one DIY stack and its versions in one transaction; return '' or why it was skipped."""
    store = engine.store
    stack_id = _new_id()
    data_key = engine.keys.wrap_data_key(stack_id, secrets.token_bytes(32))
    with store.write() as db:
        row = store.get_stack(db, org, stack.project, stack.name)
        if row is not None:
            if not overwrite:
                return "exists here (give --overwrite to replace it)"
            if engine.updates._running_update(db, row) is not None:
                return "exists here with an update running"
            store.delete_stack(db, row["id"])
        first = versions[0][1]["created"] if versions else _now()
        store.insert_stack(db, {
            "id": stack_id, "org": org, "project": stack.project, "name": stack.name,
            "created": first, "tags": json.dumps(tags), "data_key": data_key})
        if not versions:
            empty = _empty_deployment()
            store.put_deployment(db, stack_id, 0, _gzip_bytes(empty), len(empty), 0)
        for number, update, data, count in versions:
            store.put_deployment(db, stack_id, number, _gzip_bytes(data), len(data), count)
            store.insert_update(db, {
                **update, "id": _new_id(), "stack_id": stack_id, "dry_run": 0,
                "version": number, "base_version": number - 1, "resource_count": count})
        if versions:
            number, update, _, count = versions[-1]
            store.update_stack(db, stack_id, version=number, resource_count=count,
                               last_update=update["ended"])
    return ""


def _plan_stack(stack: _DIYStack, limit: int, ignore_locks: bool) -> list:
    """Read a stack's versions and decide whether to import it (sets ``stack.skip``)."""
    if stack.locks and not ignore_locks:
        stack.skip = (f"locked ({os.path.relpath(stack.locks[0], os.path.dirname(stack.path))}"
                      "): an update may be running; give --ignore-locks if it is stale")
        return []
    versions = _diy_versions(stack, limit)
    if not _NAME_RE.match(stack.project or "") or not _NAME_RE.match(stack.name):
        stack.skip = ("legacy stack without resources: its project is unknown"
                      if not stack.project else "not a valid project/stack name here")
        return []
    stack.versions = len(versions)
    stack.bytes = sum(len(v[2]) for v in versions)
    return versions


def import_diy(cfg: Config, source: Optional[str], options: dict, environ: dict) -> int:
    """Import every stack of a DIY backend, with its history; return an exit code.

    ``options``: ``dry_run``, ``overwrite``, ``ignore_locks`` (booleans). Stacks
    are skipped (and reported) when locked, existing without ``overwrite``, or
    unreadable; the exit code is 1 only if some stack could not be read or stored.
    """
    if not source:
        raise ValueError("import-diy needs the DIY backend: import-diy --db DB FOLDER|file://URL")
    t0 = time.monotonic()
    stacks = _diy_stacks(_diy_root(source))
    store, engine = None, None
    if not options.get("dry_run"):
        store, app = build_app(cfg, environ)
        engine = app.engine
    elif is_postgres_url(cfg.db) or os.path.exists(cfg.db):
        store = open_store(cfg.db, cfg.wal_autocheckpoint)
    tty = sys.stderr.isatty()
    done = versions_total = bytes_total = failed = 0
    try:
        for i, stack in enumerate(stacks, 1):
            if tty:
                print(f"\r[{i}/{len(stacks)}] {stack.project}/{stack.name}\033[K",
                      end="", file=sys.stderr, flush=True)
            try:
                versions = _plan_stack(stack, cfg.history_limit, options.get("ignore_locks"))
                if stack.skip:
                    pass
                elif engine is not None:
                    stack.skip = _import_stack(engine, cfg.org, stack, versions,
                                               _diy_tags(stack), options.get("overwrite"))
                elif store is not None and not options.get("overwrite"):
                    with store.read() as db:
                        if store.get_stack(db, cfg.org, stack.project, stack.name):
                            stack.skip = "exists here (give --overwrite to replace it)"
            except (ValueError, sqlite3.Error) as e:
                stack.skip, failed = f"failed: {e}", failed + 1
            what = f"{cfg.org}/{stack.project or '?'}/{stack.name}"
            if tty:
                print("\r\033[K", end="", file=sys.stderr)
            if stack.skip:
                print(f"skipped {what}: {stack.skip}", file=sys.stderr)
                continue
            done += 1
            versions_total += stack.versions
            bytes_total += stack.bytes
            if options.get("dry_run"):
                print(f"would import {what}: {stack.versions} versions, {stack.bytes} bytes")
    finally:
        if store is not None:
            store.close()
    skipped = [s for s in stacks if s.skip]
    reasons = collections.Counter(s.skip.split(" (")[0].split(":")[0] for s in skipped)
    print(f"{'would import' if options.get('dry_run') else 'imported'} {done} stacks, "
          f"{versions_total} versions, {bytes_total} bytes of state from {source} in "
          f"{time.monotonic() - t0:.1f} s; skipped {len(skipped)}"
          + (" (" + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())) + ")"
             if skipped else ""))
    if done and not options.get("dry_run"):
        print("Stacks with a passphrase or cloud KMS secrets provider keep it: run `pulumi stack "
              "change-secrets-provider default` on each to move it to this server's keys.")
    return 1 if failed else 0


# ==== 14. Server lifecycle and main() =======================================
# The HTTP server: _Handler (HTTP/1.1, keep-alive, header and body deadlines,
# bounded reads, the ingest turn) and Server (connection slots, per-address
# caps, watchdog, graceful drain), serve() that starts and stops it, and
# main(), which parses arguments and hands each subcommand to its section.

class _Handler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive; every request goes through ``App.dispatch``."""

    protocol_version = "HTTP/1.1"
    server_version = "pulumi-backend/" + __version__
    sys_version = ""
    server: "Server"

    def setup(self) -> None:
        cfg = self.server.cfg
        # A new connection owes its first request line and headers (and its TLS
        # handshake) within this deadline; a kept-alive one gets its own per request.
        self._header_seconds = min(cfg.header_timeout, cfg.socket_timeout)
        self._header_deadline = time.monotonic() + self._header_seconds
        self.request.settimeout(cfg.socket_timeout)
        # Headers and body go out in two writes; without this, Nagle's algorithm
        # and the client's delayed ACK add ~40 ms to every keep-alive response.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hasattr(self.request, "do_handshake"):  # TLS: in this thread, not in accept()
            self.server.watch(self.request, self._header_deadline)
            try:
                self.request.do_handshake()
            finally:
                self.server.unwatch(self.request)
        super().setup()

    def handle(self) -> None:
        cfg = self.server.cfg
        idle = min(cfg.keepalive_timeout, cfg.socket_timeout)
        try:
            self.close_connection = True
            ready = self._wait_for_request(self._header_deadline)
            while ready:
                self._handle_one()
                if self.close_connection:
                    break
                ready = self._wait_for_request(time.monotonic() + idle)
                self._header_deadline = time.monotonic() + self._header_seconds
        except (ConnectionError, socket.timeout, OSError) as e:
            log.debug("connection ended: %s", e)

    def _handle_one(self) -> None:
        # The socket timeout bounds each read; the reaper's deadline bounds the
        # request line and headers (then the body, see _serve), so a client
        # trickling a byte at a time cannot hold a thread.
        self.server.watch(self.request, self._header_deadline)
        self._continue_pending = False
        try:
            self.handle_one_request()
        finally:
            self.server.unwatch(self.request)

    def handle_expect_100(self) -> bool:
        """Defer ``100 Continue`` until the route and credentials check out (_read_body)."""
        self._continue_pending = True
        return True

    def parse_request(self) -> bool:
        """Parse the request line and headers, then refuse a target or Host name this
        server does not serve, before routing, authentication or any byte of the body."""
        if not super().parse_request():
            return False
        try:
            self._check_host()
        except HTTPError as e:
            self._send_early_error(e)
            return False
        return True

    def _check_host(self) -> None:
        """Raise BadRequest for an unparsable target or Host, MisdirectedRequest for a
        host name not among the server's (a DNS rebinding page; see _AllowedHosts)."""
        try:
            target = urllib.parse.urlsplit(self.path)  # _serve splits it again
        except ValueError:  # e.g. http://[::1/api: an absolute form with a broken IPv6 host
            raise BadRequest("invalid request target") from None
        hosts = self.headers.get_all("Host") or []
        if len(hosts) > 1:
            raise BadRequest("more than one Host header")
        # An absolute-form target's host wins over Host: both must be ours. A request
        # without a name (HTTP/1.0, no Host) cannot come from a browser page.
        for value in ([target.netloc] if target.scheme else []) + hosts:
            if not value.strip():
                continue
            name, _ = _split_host(value)
            if not self.server.app.hosts.allows(name):
                log.warning("refused a request for host %s (not one of this server's names: "
                            "see --allowed-host)", name)
                raise MisdirectedRequest(
                    f"this server does not answer to the host name {name!r}; if clients "
                    f"reach it by that name, start it with --allowed-host {name} "
                    "(PULUMI_BACKEND_ALLOWED_HOST)")

    def _send_early_error(self, err: HTTPError) -> None:
        """Answer ``err`` to a request refused while parsing, and close the connection."""
        self.close_connection = True
        if self.headers.get("Content-Length") or self.headers.get("Transfer-Encoding"):
            self._body_left_unread = True  # finish() drains it, so the client reads this
        body = _dumps(err.body())
        try:
            self.send_response(err.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:
            pass

    def _unknown_caller_deadline(self, req: Request) -> None:
        """Give a body sent before its caller is known (the OIDC exchange, the console's
        sign-in) --header-timeout to arrive, not --socket-timeout: nobody known holds
        the slot, and a trickled body must not keep it."""
        if req.principal is None and not req.auth_kind:
            self.server.watch(self.request, time.monotonic() + self._header_seconds)

    def _wait_for_request(self, deadline: float) -> bool:
        """Wait until the client sends a request; False when the server stops or at ``deadline``."""
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
    _continue_pending = False  # the client sent Expect: 100-continue

    def finish(self) -> None:
        super().finish()
        if self._body_left_unread:
            self._drain_input()

    def _drain_input(self) -> None:
        """Drop what the client still sends, for up to a second, before the socket closes.

        Closing with unread input makes the kernel reset the connection, and a
        client still sending its body would then lose our error response. What
        arrives is thrown away as it comes: nothing is kept or decompressed.
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

    def _content_length(self) -> int:
        """The body's length from the headers; raise the 4xx/501 of bad framing."""
        codings = ",".join(self.headers.get_all("Transfer-Encoding") or ()).strip().lower()
        if "chunked" in codings:
            raise LengthRequired("chunked request bodies are not supported; send Content-Length")
        if codings:
            raise Unimplemented(f"unsupported Transfer-Encoding {codings[:40]!r}")
        lengths = {v.strip() for v in self.headers.get_all("Content-Length") or ()}
        if len(lengths) > 1:
            raise BadRequest("conflicting Content-Length headers")
        text = lengths.pop() if lengths else "0"
        if not (text.isascii() and text.isdigit()):  # int() would take "+9", "0_9", "-0"
            raise BadRequest("invalid Content-Length")
        digits = text.lstrip("0") or "0"
        return int(digits) if len(digits) < 19 else sys.maxsize  # int() refuses 4300 digits

    def _read_body(self, body_limit: Optional[int]) -> tuple:
        """Read (and gunzip) the body of a routed, authenticated request; return it and,
        if it came compressed, the bytes as they came (else b"").

        A route that takes no body reads at most MAX_IGNORED_BODY bytes and
        ignores them. An error leaves the rest unread; _serve closes the connection.
        """
        cfg = self.server.cfg
        try:
            length = self._content_length()
        except HTTPError:
            self._body_left_unread = True  # _serve closes the connection
            raise
        limit = cfg.max_body if body_limit is None else body_limit
        if length > (limit or MAX_IGNORED_BODY):
            raise PayloadTooLarge(f"request body exceeds {limit} bytes" if limit
                                  else "this route takes no request body")
        if not length:
            return b"", b""
        if self._continue_pending:
            self.send_response_only(100)
            self.end_headers()
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise RequestTimeout("the request body did not arrive in time") from None
        if len(body) != length:
            raise BadRequest("request body shorter than Content-Length")
        if not limit:
            return b"", b""  # e.g. "{}": never parsed, never decompressed
        encoding = (self.headers.get("Content-Encoding") or "").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            return _gunzip_bounded(body, cfg.max_decompressed if body_limit is None
                                   else limit), body
        if encoding not in ("", "identity"):
            raise BadRequest(f"unsupported Content-Encoding {encoding!r}")
        return body, b""

    def _serve(self) -> None:
        started = time.monotonic()
        # The headers are in: the body gets the socket timeout as its deadline.
        self.server.watch(self.request, started + self.server.cfg.socket_timeout)
        url = urllib.parse.urlsplit(self.path)
        req = Request(self.command, url.path, urllib.parse.parse_qs(url.query), self.headers)
        req.remote = self.client_address[0] if self.client_address else ""
        try:
            handler = self.server.app.resolve(req)  # nothing is read before this passes
            self._unknown_caller_deadline(req)
            req.body, req.wire = self._read_body(req.route.body_limit)
            self.server.unwatch(self.request)  # the request is in: handling may take long
            with self._ingest_turn(req):
                resp = self.server.app.dispatch(req, handler)
        except HTTPError as e:
            if (self._body_left_unread
                    or self.headers.get("Content-Length", "0").strip() not in ("", "0")
                    or self.headers.get("Transfer-Encoding") is not None):
                self.close_connection = True  # a body may be left unread
                self._body_left_unread = True
            resp = Response(e.status, _dumps(e.body()), headers=e.headers)
        try:
            self._send(req, resp)
        finally:  # also when the client went away before the answer
            if req.route is not None and req.route.trim:
                _release_free_memory()
            seconds = time.monotonic() - started
            self.server.app.record(req, resp.status, seconds)
            self._log_access(req, resp, seconds)
        if self.server.stopping.is_set():
            self.close_connection = True

    def _ingest_turn(self, req: Request):
        """The server's ingest lock for a big upload of an update, else nothing.

        The uploads of an update (Route.gated) are handled one at a time once
        their (decompressed) body has INGEST_GATE_BYTES: the CLI posts engine
        events beside journal batches on several connections, and their parsed
        trees (several times their JSON) added up to the server's peak RSS. The
        GIL parses one at a time anyway: they take as long.
        """
        if req.route is not None and req.route.gated and len(req.body) >= INGEST_GATE_BYTES:
            return self.server.ingest_lock
        return contextlib.nullcontext()

    def _log_access(self, req: Request, resp: Response, seconds: float) -> None:
        # The path only: no query string, headers or body, so no token or secret.
        path = _escape_log(req.path)
        log.info("%s %s %s %d %d %.1fms", self.client_address[0], req.method, path,
                 resp.status, len(resp.body), seconds * 1000, extra={"fields": {
                     "remote": self.client_address[0], "method": req.method, "path": path,
                     "route": req.route.name if req.route else "", "status": resp.status,
                     "bytes": len(resp.body),
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
    # selectors, not select.select(), which cannot watch descriptors >= 1024.
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        return bool(sel.select(timeout))


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
        self.ingest_lock = threading.Lock()  # see _Handler._ingest_turn
        self._active_lock = threading.Lock()
        self._idle = threading.Condition(self._active_lock)  # notified as connections end
        self._connections: set = set()  # sockets being served, under _active_lock
        self._per_address: collections.Counter = collections.Counter()  # _client_key -> open
        self._address_cap = _per_address_cap(cfg)
        self._deadlines: dict = {}
        self._tls_refusals = threading.BoundedSemaphore(16)  # 503s being sent over TLS
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

    def watch(self, sock: socket.socket, deadline: float) -> None:
        """Disconnect ``sock`` at ``deadline`` (time.monotonic()) unless unwatched before."""
        with self._active_lock:
            self._deadlines[sock] = deadline

    def unwatch(self, sock: socket.socket) -> None:
        with self._active_lock:
            self._deadlines.pop(sock, None)

    def _reap_slow_requests(self) -> None:
        """Disconnect clients whose request has not fully arrived by its deadline."""
        while not self._closed.wait(0.25):
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
        key = _client_key(client_address)
        with self._active_lock:
            full = len(self._connections) >= self.cfg.max_connections
            crowded = self._per_address[key] >= self._address_cap
            if not (full or crowded):
                self._connections.add(request)
                self._per_address[key] += 1
        if full or crowded:
            self._refuse(request, key if crowded and not full else "")
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            key = _client_key(client_address)
            with self._active_lock:
                self._connections.discard(request)
                self._per_address[key] -= 1
                if self._per_address[key] <= 0:
                    del self._per_address[key]
                self._idle.notify_all()

    def _refuse(self, request, address: str = "") -> None:
        """Answer 503 and close, without a slot; ``address``: refused for its share."""
        if address:
            log.warning("refused a connection from %s: %d already open from that address "
                        "(--max-connections-per-address)", address, self._address_cap)
        else:
            log.warning("refused a connection: %d already open", self.cfg.max_connections)
        if not hasattr(request, "do_handshake"):
            self._send_503(request)
        elif self._tls_refusals.acquire(blocking=False):
            # A TLS handshake waits for the client: never in the accept loop.
            threading.Thread(target=self._send_503, args=(request, self._tls_refusals),
                             name="refuse", daemon=True).start()
        else:
            self.shutdown_request(request)  # too many refusals under way already

    def _send_503(self, request, slot: Optional[threading.Semaphore] = None) -> None:
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
        finally:
            self.shutdown_request(request)
            if slot is not None:
                slot.release()

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


def _per_address_cap(cfg: Config) -> int:
    """Return how many connections one client address may hold: the flag, or by default
    half of --max-connections, so that one address never holds every slot (a CLI opens
    up to ~6 at once: 128 by default leaves room for many)."""
    cap = cfg.max_connections_per_address or max(1, cfg.max_connections // 2)
    return min(cap, cfg.max_connections)


def _client_key(client_address: Any) -> str:
    """The address a connection counts against: its IP, or the /64 of an IPv6 one (a
    single host commonly has the whole /64)."""
    text = str(client_address[0]) if isinstance(client_address, tuple) and client_address \
        else ""
    try:
        ip = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return text
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


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
    short = _short_token_count(cfg)
    if short:  # the count only: a token never reaches the log
        log.warning("%d of %d accepted tokens are shorter than %d characters: use long "
                    "random ones (e.g. `openssl rand -hex 32`)", short, len(cfg.auth_tokens),
                    MIN_TOKEN_LENGTH)
    log.info("secrets: AES-256-GCM via %s", app.engine.keys.crypto.name)
    backups = BackupScheduler(cfg, app.engine.metrics) if cfg.backup_dir else None
    app.webhooks.base_url = app.webhooks.base_url or server.url.rstrip("/")
    try:
        app.webhooks.start()
        if backups is not None:
            backups.start()
        app.engine.search.start()  # stacks stored before the search index (section 6)
        gc.freeze()  # start-up objects live as long as the server: no collection walks them
        print(f"pulumi-backend listening on {server.url}", flush=True)
        server.serve_forever(poll_interval=0.25)
    finally:
        if backups is not None:
            backups.stop()
        app.webhooks.stop(cfg.shutdown_timeout)  # what is cut short is sent after a restart
        server.server_close()  # waits (bounded) for in-flight requests
        app.engine.search.stop(cfg.shutdown_timeout)
        app.engine.updates.drain(cfg.shutdown_timeout)  # final states stored after `complete`
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
    if command in _ADMIN_COMMANDS:
        _setup_logging(cfg.log_level, cfg.log_format)
        try:
            return _run_admin(cfg, command, extras["words"], extras["admin"])
        except ValueError as e:
            print(f"pulumi_backend.py: error: {e}", file=sys.stderr)
            return 1
    if extras["file"] and command not in ("backup", "restore", "import-diy"):
        print(f"pulumi_backend.py: error: unexpected argument {extras['file']!r}", file=sys.stderr)
        return 2
    _setup_logging(cfg.log_level, cfg.log_format)
    try:
        if command in ("backup", "restore") and is_postgres_url(cfg.db):
            raise ValueError(f"{command} works on SQLite files; for PostgreSQL use its own "
                             "tools, or `copy --from postgresql://... --to FILE.db`")
        if command == "backup":
            return backup_database(cfg, extras["file"])
        if command == "copy":
            return copy_database(*extras["copy"])
        if command == "import-diy":  # beside a running server too: see section 12
            return import_diy(cfg, extras["file"], extras["import"], environ)
        # <db>.lock is SQLite's: PostgreSQL replicas share one database by design.
        with (contextlib.nullcontext() if is_postgres_url(cfg.db) else _database_lock(cfg.db)):
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
