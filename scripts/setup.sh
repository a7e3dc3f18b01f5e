#!/usr/bin/env bash
# Sets up a fresh machine: system packages, the release build of `furcate` installed as
# PREFIX/bin/furcate (PREFIX: /usr/local, or $PREFIX), and the guest artifacts (agent, kernel,
# initramfs, the default image) in PREFIX/share/furcate/guest, where every `furcate` command
# finds them whatever --data says ($FURCATE_GUEST_DIR, when set, is used instead).
set -euo pipefail
cd "$(dirname "$0")/.."
prefix="${PREFIX:-/usr/local}"
source scripts/packages.sh
install_packages
echo "build: swift build -c release --product furcate"
swift build -c release --product furcate
mkdir -p "$prefix/bin"
install -m 0755 "$(swift build -c release --show-bin-path)/furcate" "$prefix/bin/furcate.new"
mv "$prefix/bin/furcate.new" "$prefix/bin/furcate"
guest="${FURCATE_GUEST_DIR:-$prefix/share/furcate/guest}"
scripts/build-agent.sh "$guest"
scripts/guest-artifacts.sh "$guest"
echo "setup: done; furcate is $prefix/bin/furcate, its guest artifacts are in $guest"
