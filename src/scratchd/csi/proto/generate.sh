#!/bin/sh
# Regenerate csi_pb2.py, its type stub csi_pb2.pyi (for mypy) and csi_pb2_grpc.py from csi.proto
# (needs grpcio-tools of the version pyproject's `csi` extra names as grpcio's minimum:
# pip install grpcio-tools==1.85.4).
# Run from anywhere; commit what it writes.
set -eu
src="$(cd "$(dirname "$0")/../../.." && pwd)"
python="${PYTHON:-$src/../.venv/bin/python}"
[ -x "$python" ] || python=python3
cd "$src"
"$python" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. scratchd/csi/proto/csi.proto
