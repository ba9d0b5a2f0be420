#!/usr/bin/env bash
# Build the real `pulumi` CLI from its Go module at a pinned version into a
# cache folder outside the repository, and print the path of the binary.
#
#   e2e/build_cli.sh [VERSION]        (default: the newest pinned version)
#
# The module's go.mod replaces sdk/v3 with a sibling folder of the upstream
# repository, so `go install pkg@version` refuses it. We copy the module from
# the Go module cache into a scratch folder, drop that replace, require sdk/v3
# at the same version and build cmd/pulumi with the version stamped in.
# The result is reused when present: delete the cache folder to rebuild.
set -euo pipefail

version="${1:-v3.276.0}"
cache="${PULUMI_BACKEND_CLI_CACHE:-$HOME/.cache/pulumi-backend-cli}"
out="$cache/$version/pulumi"

if [ -x "$out" ]; then
  echo "$out"
  exit 0
fi

command -v go >/dev/null || { echo "build_cli.sh: the go command is needed" >&2; exit 1; }
export GOFLAGS="${GOFLAGS:-} -mod=mod"

scratch="$(mktemp -d)"
trap 'chmod -R u+w "$scratch" 2>/dev/null; rm -rf "$scratch"' EXIT

dir="$(cd "$scratch" && go mod download -json "github.com/pulumi/pulumi/pkg/v3@$version" \
       | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
cp -r "$dir" "$scratch/pkg"
chmod -R u+w "$scratch/pkg"
cd "$scratch/pkg"
go mod edit -dropreplace github.com/pulumi/pulumi/sdk/v3 \
            -require "github.com/pulumi/pulumi/sdk/v3@$version"
go mod download github.com/pulumi/pulumi/sdk/v3 >&2
mkdir -p "$cache/$version"
go build -o "$out.tmp" \
  -ldflags "-s -w -X github.com/pulumi/pulumi/sdk/v3/go/common/version.Version=$version" \
  ./cmd/pulumi >&2
mv "$out.tmp" "$out"
echo "$out"
