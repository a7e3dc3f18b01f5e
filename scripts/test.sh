#!/usr/bin/env bash
# Installs what the tests need (Debian packages, the static guest agent, the guest kernel,
# initramfs and test rootfs) and runs every
# test: the store's property, SIGKILL crash (FURCATE_CRASH_ROUNDS, default 50) and full-disk
# tests, real FUSE mounts, and a QEMU boot with guest RAM on a store file. Tests that need root,
# /dev/fuse or QEMU say so and skip when those are absent.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/packages.sh
install_packages
# The project's own rules (.swift-format: line length, no force unwraps, ordered imports):
# seconds, so first. `swift format format --in-place --recursive Sources Tests Package.swift`
# fixes all but the force unwraps.
echo "test: swift format lint"
swift format lint --strict --recursive Sources Tests Package.swift
# Guest kernel and initramfs for the QEMU tests, kept outside the checkout.
export FURCATE_GUEST_DIR="${FURCATE_GUEST_DIR:-${FURCATE_DATA:-${XDG_DATA_HOME:-$HOME/.local/share}/furcate}/guest}"
scripts/build-agent.sh "$FURCATE_GUEST_DIR"
scripts/guest-artifacts.sh "$FURCATE_GUEST_DIR"
echo "test: swift build --build-tests"
swift build --build-tests
echo "test: swift test"
# A hang fails the run in minutes with the stacks of what hung (about 5 min here when all is well).
source scripts/deadline.sh
run_with_deadline "${FURCATE_TEST_DEADLINE:-1500}" swift test --skip-build
# The API against real clients: the official instavm Python SDK, and schemathesis on
# /openapi.json (both from PyPI, in virtualenvs outside the checkout).
run_with_deadline 900 scripts/test-sdk.sh .build/debug/furcate
# kill -9 of the server at random moments of each kind of operation (FURCATE_FAULT_POINTS per
# kind, default 20), and the checks of what the next server kept.
run_with_deadline "${FURCATE_FAULT_DEADLINE:-900}" scripts/test-sdk.sh .build/debug/furcate Tests/sdk/fault_matrix.py
run_with_deadline 1200 scripts/test-openapi.sh .build/debug/furcate
