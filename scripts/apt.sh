# shellcheck shell=bash
# Sourced by the scripts that install a tool the project needs when it is
# missing (chromium.sh, prometheus.sh, wrk.sh, image.sh): Debian packages with
# apt-get, as root or through `sudo -n`, package lists refreshed when missing
# and once more when an install fails on stale ones. A failure prints one line
# on stderr and returns 1; the calling script says what it means.

apt_as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        printf 'installing with apt-get needs root (no sudo here)\n' >&2
        return 1
    fi
}

# apt_install PACKAGE...: --no-install-recommends (what a test or a build needs,
# no fonts, translations or desktop integration; Debian packages do not start
# their daemons in containers).
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        printf 'there is no apt-get to install %s with\n' "$*" >&2
        return 1
    fi
    local -a apt=(env DEBIAN_FRONTEND=noninteractive apt-get -q -y
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold
        -o DPkg::Lock::Timeout=120)
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        apt_as_root "${apt[@]}" update >&2 || { printf 'apt-get update failed\n' >&2; return 1; }
    fi
    if ! apt_as_root "${apt[@]}" install --no-install-recommends "$@" >&2; then
        # Stale package lists (a newer point release) are the usual cause.
        apt_as_root "${apt[@]}" update >&2 || { printf 'apt-get update failed\n' >&2; return 1; }
        apt_as_root "${apt[@]}" install --no-install-recommends "$@" >&2 ||
            { printf 'apt-get install %s failed\n' "$*" >&2; return 1; }
    fi
    hash -r
}
