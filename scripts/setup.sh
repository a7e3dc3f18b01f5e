#!/usr/bin/env bash
# Sets up a fresh machine: system packages, the release build of `furcate`, and the guest
# artifacts (agent, kernel, initramfs).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/packages.sh
install_packages
echo "build: swift build -c release --product furcate"
swift build -c release --product furcate
# What guests boot: the static agent, Debian's cloud kernel, the initramfs (outside the checkout).
export FURCATE_GUEST_DIR="${FURCATE_GUEST_DIR:-${FURCATE_DATA:-${XDG_DATA_HOME:-$HOME/.local/share}/furcate}/guest}"
scripts/build-agent.sh "$FURCATE_GUEST_DIR"
scripts/guest-artifacts.sh "$FURCATE_GUEST_DIR"
echo "setup: done; the binary is $(swift build -c release --show-bin-path)/furcate"
