#!/usr/bin/env bash
# Usage: pytest-python.sh X.Y MAIN_PYTHON [PYTEST_ARG...]
# Run pytest (with PYTEST_ARGs: the core subset) under Python X.Y in its own venv,
# .venv-pyXY, set up like the main one: made once, `pip install -e '.[dev]'` again
# only when pyproject.toml is newer than its stamp file.
#
# The interpreter is pythonX.Y on PATH; a pyenv shim for a version that is installed
# but not selected (pyenv global) does not run, so pyenv's own copy is used then.
# Where there is none, this says SKIPPED and exits 0: a missing interpreter is not
# a failure. Nor is X.Y being MAIN_PYTHON's version (the main pytest covered it).
# pytest collecting no tests (exit status 5) is a failure.
set -euo pipefail

version=${1:?usage: pytest-python.sh X.Y MAIN_PYTHON [PYTEST_ARG...]}
main_python=${2:?usage: pytest-python.sh X.Y MAIN_PYTHON [PYTEST_ARG...]}
shift 2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv=.venv-py${version//./}
is_version="import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$version'.split('.'))))"

# The real path of a pythonX.Y that runs, or nothing.
find_python() {
    local candidate root
    if command -v "python$version" >/dev/null 2>&1 \
            && "python$version" -c "$is_version" >/dev/null 2>&1; then
        "python$version" -c 'import sys; print(sys.executable)'
        return
    fi
    root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-${HOME:-}/.pyenv}")
    if [[ -d "$root/versions" ]]; then
        # The newest installed X.Y.Z (not X.Y-dev, X.Yt, ...).
        for candidate in $(ls -d "$root/versions/$version".* 2>/dev/null | sort -rV); do
            if [[ "${candidate##*/}" =~ ^${version//./\\.}\.[0-9]+$ ]] \
                    && "$candidate/bin/python$version" -c "$is_version" >/dev/null 2>&1; then
                echo "$candidate/bin/python$version"
                return
            fi
        done
    fi
}

if "$main_python" -c "$is_version" 2>/dev/null; then
    echo "pytest-pythons: $main_python is Python $version already: the main pytest ran there"
    exit 0
fi
py=$(find_python)
if [[ -z "$py" ]]; then
    echo "SKIPPED: python$version not found (install it, e.g. pyenv install $version)" \
         "— the core subset did not run on $version"
    exit 0
fi

t0=$SECONDS
# A venv of another version, or a broken one (its interpreter went away), is made again.
if [[ -e "$venv" ]] && ! "$venv/bin/python" -c "$is_version" 2>/dev/null; then
    rm -rf "$venv"
fi
if [[ ! -f "$venv/.stamp-venv" ]]; then
    PYTHON=$py "$here/make-venv.sh" "$venv"
    touch "$venv/.stamp-venv"
fi
deps_stamp=$venv/.stamp-deps
stale=false
for dep in pyproject.toml strategies/pyproject.toml "$venv/.stamp-venv"; do
    if [[ -e "$dep" && ( ! -f "$deps_stamp" || "$dep" -nt "$deps_stamp" ) ]]; then
        stale=true
    fi
done
if $stale; then
    echo "$venv/bin/python -m pip install -e '.[dev]'"
    "$venv/bin/python" -m pip install -e '.[dev]'
    touch "$deps_stamp"
fi
echo "pytest-pythons: $venv ready in $((SECONDS - t0)) s"

rc=0
"$here/timed.sh" "pytest (Python $version: $("$venv/bin/python" --version 2>&1))" \
    "$venv/bin/pytest" "$@" || rc=$?
if [[ $rc -eq 5 ]]; then
    echo "pytest collected no tests on Python $version: counted as a failure" >&2
fi
exit "$rc"
