#!/usr/bin/env bash
# Sets up (setup.sh) and runs furcate with the given arguments; without arguments it runs
# `furcate serve` once that exists, and until then prints what furcate can do.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >&2
bin="${PREFIX:-/usr/local}/bin/furcate"
if [ $# -eq 0 ]; then
  if "$bin" help serve >/dev/null 2>&1; then set -- serve; else set -- --help; fi
fi
echo "run: furcate $*" >&2
exec "$bin" "$@"
