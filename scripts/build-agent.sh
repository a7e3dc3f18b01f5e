#!/usr/bin/env bash
# Builds furcate-agent as one static, stripped executable (it runs in any rootfs: glibc, musl
# or none) and copies it to DEST (default: the guest artifacts directory), where
# guest-artifacts.sh injects it into the test rootfs and image import (later) into every image.
# Its own scratch path: -static-executable must not touch the main build's cache.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-${FURCATE_GUEST_DIR:-${FURCATE_DATA:-${XDG_DATA_HOME:-$HOME/.local/share}/furcate}/guest}}"
mkdir -p "$dest"
echo "agent: swift build -c release --product furcate-agent -static-executable"
swift build -c release --product furcate-agent --scratch-path .build-agent -Xswiftc -static-executable -Xlinker -s 2>&1 \
  | grep -v "requires at runtime the shared libraries" || true
bin=.build-agent/release/furcate-agent
[ -x "$bin" ] || { echo "agent: build failed" >&2; exit 1; }
if ! cmp -s "$bin" "$dest/furcate-agent"; then
  cp "$bin" "$dest/furcate-agent.tmp" && mv "$dest/furcate-agent.tmp" "$dest/furcate-agent"
fi
echo "agent: $dest/furcate-agent ($(stat -c %s "$dest/furcate-agent") bytes)"
