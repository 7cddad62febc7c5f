#!/usr/bin/env bash
# Install the Debian packages named as arguments, but only those missing.
#
# Quick when everything is there (one dpkg-query call, no apt-get).
# Skips with a clear message, and exit 0, where it cannot install: not
# Debian/Ubuntu (no apt-get/dpkg-query, e.g. macOS) or not root. Set
# BRANCHAGENT_SKIP_APT=1 to skip it on purpose.
set -euo pipefail

if [[ $# -eq 0 ]]; then
    exit 0
fi
if [[ "${BRANCHAGENT_SKIP_APT:-0}" == 1 ]]; then
    echo "apt-ensure: BRANCHAGENT_SKIP_APT=1: not checking system packages: $*" >&2
    exit 0
fi
if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    echo "apt-ensure: no apt-get/dpkg-query here: install these yourself if a step needs them: $*" >&2
    exit 0
fi

missing=()
for pkg in "$@"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    if [[ "$status" != installed ]]; then
        missing+=("$pkg")
    fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "apt-ensure: missing system packages: ${missing[*]}" >&2
    echo "apt-ensure: not root, so not installing them; run:" >&2
    echo "    sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
    echo "apt-ensure: continuing; steps that need them will fail until they are installed" >&2
    exit 0
fi

echo "apt-ensure: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "apt-ensure: installed ${missing[*]}" >&2
