#!/usr/bin/env bash
# Sets up a fresh machine: system packages, then the release build of `furcate`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/packages.sh
install_packages
echo "build: swift build -c release --product furcate"
swift build -c release --product furcate
echo "setup: done; the binary is $(swift build -c release --show-bin-path)/furcate"
