#!/usr/bin/env bash
# The API against a live `furcate serve` from Python: the official instavm SDK (from PyPI,
# unmodified) by default, or another script of Tests/sdk (the fault matrix) with the same
# virtualenv, kept outside the checkout.
# Usage: scripts/test-sdk.sh PATH/TO/furcate [Tests/sdk/SCRIPT.py]
set -euo pipefail
cd "$(dirname "$0")/.."
furcate="${1:-.build/debug/furcate}"
script="${2:-Tests/sdk/instavm_sdk_test.py}"
venv="${FURCATE_SDK_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/furcate/instavm-venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import instavm' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'instavm==0.26.1'
fi
echo "test: $(basename "$script") with instavm $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("instavm"))') against furcate serve"
"$venv/bin/python" "$script" "$furcate"
