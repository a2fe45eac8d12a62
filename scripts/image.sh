#!/usr/bin/env bash
# Build deploy/Dockerfile for real on a machine with no Docker engine and no
# container registry: Debian's podman (with runc) builds it from a Debian
# bookworm base made here with debootstrap, from apt's configured mirror.
# `make image-smoke` and tests/test_image.py use it.
#
# The base (minbase bookworm with Debian's python3, python3-venv,
# python-is-python3 and, as in the official python:3.11-slim-bookworm,
# ca-certificates, netbase and tzdata) is made once and cached: as the podman
# image localhost/portal-gateway-base:bookworm, and as a tarball in
# $IMAGE_CACHE, outside the clone, so that a new clone on the same machine
# (CI) imports it in seconds instead of running debootstrap again. The
# Dockerfile's FROM takes it through its build argument BASE; the default
# BASE stays the official image for real builds.
#
# pip inside the build reaches PyPI through this machine's TLS setup: the
# host's /etc/ssl/certs is mounted read-only for the build's RUN steps only
# (a mount, never a layer: tests/test_image.py checks the image holds no copy).
#
# Usage:
#   scripts/image.sh install       install podman, runc and debootstrap (apt-get) if absent
#   scripts/image.sh base          make the base if needed; its name on stdout
#   scripts/image.sh build         base, then the image; its ID on stdout (tagged $IMAGE_TAG)
#   scripts/image.sh podman ARGS   podman with the project's containers.conf
#   scripts/image.sh clean         remove the image, the base and the cached tarball
#
# Environment:
#   IMAGE_TAG     tag of the built image (default localhost/portal-gateway:test)
#   IMAGE_BASE    build FROM this image instead (e.g. python:3.11-slim-bookworm
#                 where a registry answers): no debootstrap, pulled if missing
#   IMAGE_CACHE   folder of the cached base tarball (default /var/cache/portal-gateway-image)
#   IMAGE_MIRROR  Debian mirror for debootstrap (default: apt's, for bookworm)
#
# Everything but the name/ID goes to stderr. Needs root (apt-get, debootstrap,
# rootful podman).
set -euo pipefail

log() { printf 'image.sh: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }
# shellcheck source=scripts/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

PROJECT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
readonly PROJECT_DIR
export CONTAINERS_CONF=$PROJECT_DIR/scripts/containers.conf
export PATH=$PATH:/usr/sbin:/sbin # debootstrap lives in /usr/sbin

readonly TAG=${IMAGE_TAG:-localhost/portal-gateway:test}
readonly CACHE=${IMAGE_CACHE:-/var/cache/portal-gateway-image}
readonly LOCAL_BASE=localhost/portal-gateway-base:bookworm
readonly SUITE=bookworm
readonly BASE_PACKAGES=python3,python3-venv,python-is-python3,ca-certificates,netbase,tzdata
# Bump when the way the base is made changes (trim, image config): a new
# recipe makes a new base, the old tarball is removed.
readonly BASE_REVISION=1
readonly RECIPE_LABEL=org.portal-gateway.base-recipe

cmd_install() {
    local -a missing=()
    have podman || missing+=(podman)
    have runc || missing+=(runc)
    have debootstrap || missing+=(debootstrap)
    ((${#missing[@]} == 0)) && return 0
    [[ $(id -u) -eq 0 ]] || die "${missing[*]} missing, and installing them needs root"
    have apt-get || die "${missing[*]} missing and there is no apt-get"
    log "installing Debian's ${missing[*]} with apt-get"
    apt_install "${missing[@]}" || die "could not install ${missing[*]} (above)"
    if ! have podman || ! have runc || ! have debootstrap; then
        die "installed, but not on PATH: ${missing[*]}"
    fi
}

# The Debian mirror apt uses for $SUITE (the sources.list or deb822 entry).
apt_mirror() {
    local uri release
    # shellcheck disable=SC2016 # apt's own $(FIELD) placeholders, not the shell's
    local format='$(REPO_URI) $(RELEASE)'
    while read -r uri release; do
        if [[ $release == "$SUITE" ]]; then
            printf '%s\n' "${uri%/}"
            return 0
        fi
    done < <(apt-get indextargets --format "$format" 'Created-By: Packages' | sort -u)
    die "apt has no source for $SUITE: set IMAGE_MIRROR"
}

recipe_hash() {
    printf '%s %s %s\n' "$SUITE" "$BASE_PACKAGES" "$BASE_REVISION" | sha256sum | cut -c1-12
}

# What the official slim images leave out too: package caches and lists,
# documentation, manuals, translations; and this host's name and resolver.
trim_rootfs() {
    local root=$1
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin \
        "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
        "$root"/usr/share/info/* "$root"/usr/share/locale/* "$root"/var/log/* \
        "$root"/tmp/* "$root"/root/.cache "$root"/etc/hostname "$root"/etc/resolv.conf
}

# Make the base tarball with debootstrap (about a minute).
debootstrap_base() {
    local tarball=$1 mirror=${IMAGE_MIRROR:-} root
    [[ -n $mirror ]] || mirror=$(apt_mirror)
    root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    log "debootstrap: $SUITE minbase + $BASE_PACKAGES from $mirror (about a minute, once)"
    if ! debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$root" "$mirror" \
        >"$CACHE/debootstrap.log" 2>&1; then
        tail -n 20 "$CACHE/debootstrap.log" >&2
        rm -rf "$root"
        die "debootstrap failed (whole log: $CACHE/debootstrap.log)"
    fi
    trim_rootfs "$root"
    tar -C "$root" --numeric-owner -cf "$tarball.tmp" .
    rm -rf "$root"
    mv "$tarball.tmp" "$tarball"
}

cmd_base() {
    if [[ -n ${IMAGE_BASE:-} ]]; then
        printf '%s\n' "$IMAGE_BASE"
        return 0
    fi
    local hash tarball current
    hash=$(recipe_hash)
    tarball=$CACHE/base-$SUITE-$hash.tar
    current=$(podman image inspect --format "{{index .Labels \"$RECIPE_LABEL\"}}" "$LOCAL_BASE" \
        2>/dev/null || true)
    if [[ $current != "$hash" ]]; then
        if [[ ! -s $tarball ]]; then
            find "$CACHE" -maxdepth 1 -name "base-$SUITE-*.tar*" -delete
            debootstrap_base "$tarball"
        fi
        log "importing $tarball as $LOCAL_BASE"
        # The image configuration of the official python image, as far as we use it.
        podman import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV LANG=C.UTF-8' \
            --change "LABEL $RECIPE_LABEL=$hash" \
            --change 'CMD ["python3"]' \
            "$tarball" "$LOCAL_BASE" >/dev/null
    fi
    printf '%s\n' "$LOCAL_BASE"
}

cmd_build() {
    local base iid
    base=$(cmd_base)
    iid=$(mktemp)
    local -a args=(build --format docker --network host --file deploy/Dockerfile
        --build-arg "BASE=$base" --tag "$TAG" --iidfile "$iid")
    # The local base is never pulled; another one may be.
    if [[ -z ${IMAGE_BASE:-} ]]; then
        args+=(--pull=never)
    fi
    if [[ -d /etc/ssl/certs ]]; then
        args+=(--volume /etc/ssl/certs:/etc/ssl/certs:ro)
    fi
    log "podman build -f deploy/Dockerfile --build-arg BASE=$base -t $TAG"
    if ! (cd "$PROJECT_DIR" && podman "${args[@]}" .) >&2; then
        rm -f "$iid"
        die "podman build failed"
    fi
    local id
    id=$(<"$iid")
    id=${id#sha256:} # as podman image inspect spells it
    rm -f "$iid"
    # Earlier builds' images, untagged now, would pile up: those over an hour old
    # go (the layers of this build stay, as do images a container still uses;
    # tests/test_image.py keeps one on its image while it runs).
    podman image prune --force --filter until=1h --filter "label=$RECIPE_LABEL" >/dev/null ||
        log "warning: podman image prune failed"
    log "$TAG: $(podman image inspect --format '{{.Size}}' "$id" | awk '{printf "%.0f MB", $1 / 1e6}')"
    printf '%s\n' "$id"
}

# Every image made from the base (tags, layers, the base itself), and the tarball.
cmd_clean() {
    if have podman; then
        podman images --all --quiet --filter "label=$RECIPE_LABEL" | sort -u |
            xargs --no-run-if-empty podman rmi --force >/dev/null
    fi
    rm -f "$CACHE"/base-*.tar "$CACHE"/base-*.tar.tmp
}

# One base maker and one build at a time (two test runs, a CI run beside a
# session): the cache, the tag and the pruning are shared.
locked() {
    local lock
    cmd_install
    mkdir -p "$CACHE"
    exec {lock}>"$CACHE/lock"
    flock "$lock"
    "$@"
}

main() {
    local command=${1:-}
    shift || true
    case $command in
        install) cmd_install ;;
        base) locked cmd_base ;;
        build) locked cmd_build ;;
        podman) exec podman "$@" ;;
        clean) cmd_clean ;;
        *)
            log "usage: scripts/image.sh install|base|build|podman ARGS|clean"
            exit 2
            ;;
    esac
}

main "$@"
