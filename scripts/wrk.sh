#!/usr/bin/env bash
# Make sure the tools of `make bench` are installed: wrk (closed-loop HTTP load
# with a Lua script), strace (counts Postgres round trips) and, with
# --valgrind, valgrind's callgrind (for `make bench-instr`).
#
# A missing tool is installed from Debian's packages with apt-get
# (non-interactive; as root, or through sudo when not root). When everything
# is present this costs nothing: no apt, no network.
#
# Usage:
#   scripts/wrk.sh              on stdout:  WRK=/usr/bin/wrk and STRACE=/usr/bin/strace
#   scripts/wrk.sh --valgrind   also VALGRIND=... and CALLGRIND_CONTROL=...
#
# Environment:
#   WRK_BIN, STRACE_BIN, VALGRIND_BIN, CALLGRIND_CONTROL_BIN
#                        use these (nothing installed)
#
# Everything else goes to stderr. Exit 1 with one clear line when a tool is
# missing and cannot be installed.
set -euo pipefail

log() { printf 'wrk.sh: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }
# shellcheck source=scripts/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

find_bin() {
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

install_package() {
    have apt-get || die "$1 is not installed and there is no apt-get: install Debian's $1 package"
    log "$1 not found: installing Debian's $1 package with apt-get"
    apt_install "$1" || die "could not install $1 (above)"
}

# ensure VAR OVERRIDE BINARY PACKAGE: print VAR=path, installing PACKAGE if needed.
ensure() {
    local var=$1 override=$2 name=$3 package=$4 path
    path=$(find_bin "$override" "$name")
    if [[ -z $path ]]; then
        install_package "$package"
        path=$(find_bin "" "$name")
        [[ -n $path ]] || die "the $package package is installed but $name is not on PATH"
    fi
    printf '%s=%s\n' "$var" "$path"
}

main() {
    local with_valgrind=0
    case ${1:-} in
    '') ;;
    --valgrind) with_valgrind=1 ;;
    *)
        printf 'usage: %s [--valgrind]\n' "${0##*/}" >&2
        exit 2
        ;;
    esac
    ensure WRK "${WRK_BIN:-}" wrk wrk
    ensure STRACE "${STRACE_BIN:-}" strace strace
    if ((with_valgrind)); then
        ensure VALGRIND "${VALGRIND_BIN:-}" valgrind valgrind
        ensure CALLGRIND_CONTROL "${CALLGRIND_CONTROL_BIN:-}" callgrind_control valgrind
    fi
}

main "$@"
