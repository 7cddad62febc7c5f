#!/usr/bin/env bash
# Usage: timed.sh LABEL COMMAND [ARG...]
# Run COMMAND, then say how long it took and whether it failed; exit with its status.
set -uo pipefail

label=${1:?usage: timed.sh LABEL COMMAND [ARG...]}
shift

now() {
    if [[ -n "${EPOCHREALTIME:-}" ]]; then
        echo "${EPOCHREALTIME/,/.}"
    else
        echo "$SECONDS"
    fi
}

start=$(now)
echo "==> $label"
"$@"
rc=$?
elapsed=$(awk -v a="$start" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
if [[ $rc -eq 0 ]]; then
    echo "<== $label: ok (${elapsed} s)"
else
    echo "<== $label: FAILED with exit status $rc (${elapsed} s)" >&2
fi
exit "$rc"
