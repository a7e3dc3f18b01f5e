#!/usr/bin/env bash
# The official instavm Python SDK (from PyPI, unmodified) against a live `furcate serve`:
# installs it into a virtualenv outside the checkout and runs Tests/sdk/instavm_sdk_test.py.
# Usage: scripts/test-sdk.sh PATH/TO/furcate
set -euo pipefail
cd "$(dirname "$0")/.."
furcate="${1:-.build/debug/furcate}"
venv="${FURCATE_SDK_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/furcate/instavm-venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import instavm' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'instavm==0.26.1'
fi
echo "test: instavm SDK $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("instavm"))') against furcate serve"
"$venv/bin/python" Tests/sdk/instavm_sdk_test.py "$furcate"
