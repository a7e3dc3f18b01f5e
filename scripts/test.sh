#!/usr/bin/env bash
# Installs what the tests need and runs every test (a real SIGKILL crash test, a tmpfs full-disk
# test when root, the property test). FURCATE_CRASH_ROUNDS sets the crash rounds (default 50).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/packages.sh
install_packages
echo "test: swift build --build-tests"
swift build --build-tests
echo "test: swift test"
swift test --skip-build
