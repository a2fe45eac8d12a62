#!/usr/bin/env bash
# Make sure Debian's Chromium is installed, for the browser test of portal links
# (tests/test_portal_links_browser.py, part of `make test`).
#
# When /usr/bin/chromium is missing, Debian's `chromium` package is installed
# with apt-get (non-interactive; as root, or through sudo when not root). When
# it is present this costs nothing: no apt, no network. Playwright drives this
# browser (its executable_path): a test tool's download of its own browser is
# not what the project relies on.
#
# Usage:
#   scripts/chromium.sh       one line on stdout: the browser's path
#
# Environment:
#   CHROMIUM_BIN   use this binary instead (nothing installed)
#
# Everything else goes to stderr. Exit 1 with one clear line (the last one on
# stderr) when Chromium is missing and cannot be installed: the browser test
# then skips with that line as its reason.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

log() { printf 'chromium.sh: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }
# shellcheck source=scripts/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

install_chromium() {
    have apt-get || die "Chromium is not installed and there is no apt-get: install Debian's chromium package, or set CHROMIUM_BIN"
    log "$CHROMIUM not found: installing Debian's chromium package with apt-get"
    apt_install chromium || die "could not install chromium (above)"
}

main() {
    if [[ -n ${CHROMIUM_BIN:-} ]]; then
        [[ -x $CHROMIUM_BIN ]] || die "CHROMIUM_BIN: $CHROMIUM_BIN is not an executable"
        printf '%s\n' "$CHROMIUM_BIN"
        return
    fi
    if [[ ! -x $CHROMIUM ]] && have flock; then
        # `make test` installs it first, but the test runs the script too (a lone
        # `pytest` run): one process installs while the others wait, then find it.
        exec 9>/tmp/portal-gateway-chromium-install.lock
        flock -w 600 9 || die "timed out waiting for another install of Chromium"
    fi
    if [[ ! -x $CHROMIUM ]]; then
        install_chromium
        [[ -x $CHROMIUM ]] || die "the chromium package is installed but $CHROMIUM is not there"
    fi
    printf '%s\n' "$CHROMIUM"
}

main "$@"
