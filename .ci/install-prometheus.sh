#!/usr/bin/env bash
# Install Prometheus and promtool (Debian's `prometheus` package) for the alert-rule tests
# (tests/cluster/test_alerts.py, tests/cluster/test_alerts_live.py).
#
# Idempotent and never fatal: without apt-get, or without root, it prints why and exits 0,
# and those tests skip themselves saying the binary is missing. (On a machine running
# systemd, Debian's package also starts a prometheus service on :9090; the tests use
# Prometheus instances of their own on other ports.)
set -uo pipefail

note() { echo "install-prometheus: $*" >&2; }

if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    note "apt-get not available; install Prometheus (prometheus, promtool) yourself, or the alert tests skip"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    note "not root; run 'apt-get install prometheus' as root, or the alert tests skip"
    exit 0
fi
note "installing Debian's prometheus package"
if ! { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
       || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }; }; then
    note "WARNING: apt-get failed; the alert tests will be skipped"
fi
exit 0
