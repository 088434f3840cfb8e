#!/usr/bin/env bash
# Regenerates the Python client's protobuf and gRPC modules from proto/ (and
# google/rpc/{status,error_details}.proto from the google-proto-files npm
# package) with buf and clients/python/buf.gen.yaml:
#
#   leasehold/v1/*_pb2.py, *_pb2.pyi, *_pb2_grpc.py
#   google/rpc/*_pb2.py,   *_pb2.pyi, *_pb2_grpc.py
#
# Needs, on PATH: protoc (3.20 or newer; the committed code comes from
# Debian's 3.21.12, package protobuf-compiler) and grpc_python_plugin (Debian
# package protobuf-compiler-grpc), plus the repository's npm packages
# (`npm ci`: buf and google-proto-files). Runs from any directory.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"

missing=()
command -v protoc >/dev/null || missing+=("protoc (Debian: apt-get install protobuf-compiler)")
command -v grpc_python_plugin >/dev/null ||
  missing+=("grpc_python_plugin (Debian: apt-get install protobuf-compiler-grpc)")
[ -x node_modules/.bin/buf ] || missing+=("node_modules/.bin/buf (run 'npm ci' in $root)")
[ -d node_modules/google-proto-files/google/rpc ] || missing+=("node_modules/google-proto-files (run 'npm ci' in $root)")
# proto3 `optional` (used by the protos) and the pyi generator need protoc 3.20 or newer.
if command -v protoc >/dev/null; then
  version="$(protoc --version | awk '{print $2}')"
  major="${version%%.*}"
  minor="${version#*.}"
  minor="${minor%%.*}"
  if [ "$major" -lt 3 ] 2>/dev/null || { [ "$major" -eq 3 ] && [ "$minor" -lt 20 ]; }; then
    missing+=("protoc 3.20 or newer (found $version; Debian 12: apt-get install protobuf-compiler)")
  fi
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "clients/python/generate.sh: cannot generate, missing:" >&2
  printf '  - %s\n' "${missing[@]}" >&2
  exit 1
fi

# The generated directories hold nothing else, so a proto that was removed
# leaves no stale module behind.
rm -rf clients/python/leasehold/v1 clients/python/google
node_modules/.bin/buf generate --template clients/python/buf.gen.yaml
echo "clients/python: generated with $(protoc --version)"
