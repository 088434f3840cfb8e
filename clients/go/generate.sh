#!/usr/bin/env bash
# Regenerates the Go code of the contract (proto/) into
# clients/go/src/leasehold.dev/client/gen with buf (from npm) and the local
# protoc-gen-go and protoc-gen-go-grpc. The output is committed; CI checks
# that running this changes nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."

missing=()
for plugin in protoc-gen-go protoc-gen-go-grpc; do
  command -v "$plugin" >/dev/null 2>&1 || missing+=("$plugin")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "clients/go/generate.sh: ${missing[*]} not found on PATH." >&2
  echo "  Debian/Ubuntu: apt-get install --no-install-recommends protoc-gen-go protoc-gen-go-grpc" >&2
  echo "  (the committed code comes from Debian 12's protoc-gen-go 1.28.1 and protoc-gen-go-grpc 1.0;" >&2
  echo "  other versions generate working code with small differences)" >&2
  exit 1
fi
if [ ! -x node_modules/.bin/buf ]; then
  echo "clients/go/generate.sh: node_modules/.bin/buf not found: run 'npm ci' in the repository root first." >&2
  exit 1
fi

node_modules/.bin/buf generate --template clients/go/buf.gen.yaml
echo "clients/go/generate.sh: generated clients/go/src/leasehold.dev/client/gen"
