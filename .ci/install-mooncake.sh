#!/usr/bin/env bash
# Install the optional Mooncake transfer engine (CPU build) into .venv.
#
# Idempotent and never fatal: if the Debian libraries or the wheel cannot be
# installed, it prints why and exits 0, and the Mooncake tests skip themselves.
set -uo pipefail
cd "$(dirname "$0")/.."

PIP="${PIP:-.venv/bin/pip}"
PY="${PY:-.venv/bin/python}"
DEBS=(libibverbs1 ibverbs-providers libnl-3-200 libnl-route-3-200)
PKG=mooncake-transfer-engine-non-cuda

note() { echo "install-mooncake: $*" >&2; }

if "$PY" -c "from mooncake.engine import TransferEngine" 2>/dev/null; then
    note "mooncake already importable; nothing to do"
    exit 0
fi

missing=()
for deb in "${DEBS[@]}"; do
    dpkg-query -W -f='${Status}' "$deb" 2>/dev/null | grep -q "install ok installed" || missing+=("$deb")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        note "installing Debian libraries: ${missing[*]}"
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; }; then
            note "WARNING: apt-get failed; Mooncake tests will be skipped"
            exit 0
        fi
    else
        note "WARNING: missing ${missing[*]} and not root (or no apt-get); Mooncake tests will be skipped"
        exit 0
    fi
fi

if ! "$PIP" install -q "$PKG"; then
    note "WARNING: pip could not install $PKG; Mooncake tests will be skipped"
    exit 0
fi

if "$PY" -c "from mooncake.engine import TransferEngine" 2>/dev/null; then
    note "mooncake installed and importable"
else
    note "WARNING: $PKG installed but does not import; Mooncake tests will be skipped:"
    "$PY" -c "from mooncake.engine import TransferEngine" 2>&1 | tail -n 3 >&2
fi
exit 0
