#!/usr/bin/env bash
# Runs the system benchmarks (`furcate bench store`) on a release build; extra args pass through
# (e.g. --quick, --json).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >&2
bin="$(swift build -c release --show-bin-path)/furcate"
echo "bench: furcate bench store $*" >&2
exec "$bin" bench store "$@"
