#!/usr/bin/env bash
# Make sure a real Prometheus and promtool are installed, for the dashboard and
# alert check (`make check-dashboards`, also part of `make test`).
#
# When either binary is missing, Debian's `prometheus` package is installed
# with apt-get (non-interactive; as root, or through sudo when not root). When
# both are present this costs nothing: no apt, no network.
#
# Usage:
#   scripts/prometheus.sh       two lines on stdout:
#                                 PROMETHEUS=/usr/bin/prometheus
#                                 PROMTOOL=/usr/bin/promtool
#
# Environment:
#   PROMETHEUS_BIN, PROMTOOL_BIN   use these binaries instead (nothing installed)
#
# Everything else goes to stderr. Exit 1 with one clear line when the binaries
# are missing and cannot be installed.
set -euo pipefail

log() { printf 'prometheus.sh: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }
# shellcheck source=scripts/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

find_bin() {
    # An explicit override, else PATH, else Debian's location (root's PATH may
    # lack /usr/bin in odd shells; sbin never holds these).
    local override=$1 name=$2
    if [[ -n $override ]]; then
        [[ -x $override ]] || die "$name: $override is not an executable"
        printf '%s\n' "$override"
    elif have "$name"; then
        command -v "$name"
    elif [[ -x /usr/bin/$name ]]; then
        printf '/usr/bin/%s\n' "$name"
    fi
}

install_prometheus() {
    have apt-get || die "Prometheus is not installed and there is no apt-get: install Debian's prometheus package, or set PROMETHEUS_BIN and PROMTOOL_BIN"
    log "prometheus/promtool not found: installing Debian's prometheus package with apt-get"
    # No node exporter (no recommends); the checks start their own Prometheus.
    apt_install prometheus || die "could not install prometheus (above)"
}

main() {
    local prometheus promtool
    prometheus=$(find_bin "${PROMETHEUS_BIN:-}" prometheus)
    promtool=$(find_bin "${PROMTOOL_BIN:-}" promtool)
    if [[ -z $prometheus || -z $promtool ]]; then
        # Several test workers may find it missing at once (tests/test_dashboards.py,
        # tests/test_deploy.py): one installs while the others wait, then find it.
        if have flock; then
            exec 9>/tmp/portal-gateway-prometheus-install.lock
            flock -w 600 9 || die "timed out waiting for another install of Prometheus"
        fi
        prometheus=$(find_bin "${PROMETHEUS_BIN:-}" prometheus)
        promtool=$(find_bin "${PROMTOOL_BIN:-}" promtool)
    fi
    if [[ -z $prometheus || -z $promtool ]]; then
        install_prometheus
        prometheus=$(find_bin "" prometheus)
        promtool=$(find_bin "" promtool)
        [[ -n $prometheus && -n $promtool ]] ||
            die "the prometheus package is installed but prometheus/promtool are not on PATH"
    fi
    printf 'PROMETHEUS=%s\nPROMTOOL=%s\n' "$prometheus" "$promtool"
}

main "$@"
