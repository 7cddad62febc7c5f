#!/usr/bin/env bash
# Create (or adopt) a Python >= 3.11 virtual environment at $1.
#
# Uses $PYTHON when set, else python3.11, else python3 (checked >= 3.11).
# A directory that already holds a working venv of the right version with
# pip is adopted as is; a half-made one is removed and made again.
set -euo pipefail

venv=${1:?usage: make-venv.sh VENV_DIR}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
version_ok='import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'

if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c "$version_ok" 2>/dev/null \
        && "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    echo "make-venv: using the existing $venv ($("$venv/bin/python" --version))" >&2
    exit 0
fi

if [[ -n "${PYTHON:-}" ]]; then
    py=$PYTHON
elif command -v python3.11 >/dev/null 2>&1; then
    py=python3.11
elif command -v python3 >/dev/null 2>&1; then
    py=python3
else
    "$here/apt-ensure.sh" python3 python3-venv
    py=python3
fi
if ! command -v "$py" >/dev/null 2>&1; then
    echo "make-venv: error: no Python found ($py); branchagent needs Python >= 3.11" >&2
    exit 1
fi
if ! "$py" -c "$version_ok"; then
    echo "make-venv: error: $py is $("$py" --version 2>&1); branchagent needs Python >= 3.11" >&2
    echo "make-venv: install python3.11, or point PYTHON=/path/to/python3.11 at one" >&2
    exit 1
fi
# Debian splits ensurepip (needed by venv) into pythonX.Y-venv.
if ! "$py" -c 'import ensurepip' >/dev/null 2>&1; then
    minor=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    "$here/apt-ensure.sh" "python$minor-venv"
fi

# C extensions built from sdists (pyfuse3) need the interpreter's headers.
has_headers='import os, sys, sysconfig
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)'
if ! "$py" -c "$has_headers" >/dev/null 2>&1; then
    minor=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    "$here/apt-ensure.sh" "python$minor-dev"
fi

rm -rf "$venv"
echo "make-venv: creating $venv with $py ($("$py" --version 2>&1))" >&2
if ! "$py" -m venv "$venv"; then
    rm -rf "$venv"
    echo "make-venv: error: '$py -m venv $venv' failed (on Debian: apt-get install python3-venv)" >&2
    exit 1
fi
