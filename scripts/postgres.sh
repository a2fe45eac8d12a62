#!/usr/bin/env bash
# Find or start the PostgreSQL server that `make run`, `make test` and
# `make bench` use, by the rule of SPEC §9:
#
#   1. DATABASE_URL, if set (printed unchanged: the callers decide which
#      database to use in it);
#   2. else the local server, if it accepts a passwordless login;
#   3. else a throwaway cluster in the project folder `.pg/`, started from the
#      installed PostgreSQL binaries (installed with apt-get when absent).
#
# Usage:
#   scripts/postgres.sh url     one line on stdout: a libpq URL of a role that
#                               may CREATE DATABASE, on a server that is up
#   scripts/postgres.sh stop    stop the throwaway cluster (no-op if none runs)
#   scripts/postgres.sh status  one human line: which server would be used
#
# Environment:
#   DATABASE_URL        use this server (step 1)
#   PG_LOCAL_URL        the local server to try in step 2
#                       (default postgresql://postgres@127.0.0.1:5432/postgres)
#   PG_THROWAWAY_DIR    folder of the throwaway cluster (default <project>/.pg)
#   PG_THROWAWAY_PORT   its port; default: the first free one from 55432 on
#   PG_BINDIR           folder holding initdb/pg_ctl/postgres (default: the
#                       newest /usr/lib/postgresql/*/bin, else pg_config's)
#
# Everything but the URL / status line goes to stderr, so that callers can
# write DATABASE_URL=$(scripts/postgres.sh url).
set -euo pipefail

readonly DEFAULT_LOCAL_URL='postgresql://postgres@127.0.0.1:5432/postgres'
readonly DEFAULT_THROWAWAY_PORT=55432
# How long to wait for a server that does not answer at all; a refused
# connection or a password demand fails at once anyway.
readonly PROBE_TIMEOUT=3

PROJECT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
readonly PROJECT_DIR
readonly LOCAL_URL=${PG_LOCAL_URL:-$DEFAULT_LOCAL_URL}
# Absolute, so that the data directory the server reports can be compared
# with it, and so that a `cd` elsewhere changes nothing.
THROWAWAY_DIR=$(realpath -m -- "${PG_THROWAWAY_DIR:-$PROJECT_DIR/.pg}")
readonly THROWAWAY_DIR

# Set as we go: the folder that really holds the cluster (THROWAWAY_DIR, or a
# folder under /tmp when the postgres user cannot reach THROWAWAY_DIR), the
# binaries, and psql's complaint from the last probe.
BASE=''
BINDIR=''
PROBE_ERR=''

log() { printf 'postgres.sh: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }
is_root() { [[ $(id -u) -eq 0 ]]; }

# Never echo a password from a URL into a log.
redact() { sed -E 's#(://[^:/@?]*):[^@/?]*@#\1:***@#' <<<"$1"; }

# First line of psql's complaint, for one-line diagnostics.
first_line() { head -n 1 <<<"$1"; }

# psql, bounded in time and blind to ~/.psqlrc; -w: never prompt for a
# password (there is no one to type it in CI).
psql_probe() {
    PGCONNECT_TIMEOUT=$PROBE_TIMEOUT psql -X -w -q -A -t "$@"
}

# Step 2 asks for a *passwordless* login (SPEC §9), and the URL we print has
# no password, so a password from PGPASSWORD or ~/.pgpass must not make the
# probe succeed. A path that does not exist silences the password file.
probe_passwordless() {
    PROBE_ERR=$(env -u PGPASSWORD PGPASSFILE=/nonexistent/.pgpass \
        PGCONNECT_TIMEOUT="$PROBE_TIMEOUT" \
        psql -X -w -q -A -t -c 'select 1' "$1" 2>&1 >/dev/null)
}

# ----------------------------------------------------------------------------
# Running things as the postgres user

# initdb, pg_ctl and postgres refuse to run as root (CI runs as root), so as
# root they run as the `postgres` system user. From `/`, because the current
# folder may be one that user cannot enter (/root), which makes initdb warn.
# Without fd 9, the lock of throwaway_url: a server that inherited it would
# hold the lock for as long as it runs.
as_pg() {
    if ! is_root; then
        "$@" 9>&-
    elif have runuser; then
        (cd / && runuser -u postgres -- "$@") 9>&-
    else
        (cd / && su -s /bin/bash postgres -c "$(printf '%q ' "$@")") 9>&-
    fi
}

as_root() {
    if is_root; then
        "$@"
    elif have sudo; then
        sudo "$@"
    else
        die "need root to run '$*': run it as root, or install the 'postgresql' package, or set DATABASE_URL"
    fi
}

ensure_postgres_user() {
    id -u postgres >/dev/null 2>&1 && return 0
    # The Debian package creates this user; binaries from elsewhere may not.
    log "creating the 'postgres' system user to run the throwaway cluster"
    useradd --system --user-group --no-create-home \
        --home-dir /nonexistent --shell /bin/bash postgres >&2
}

# ----------------------------------------------------------------------------
# Binaries

install_postgresql() {
    have apt-get || die "PostgreSQL is not installed and there is no apt-get: install it, or set DATABASE_URL"
    log "PostgreSQL is not installed: installing it with apt-get"
    local -a apt=(env DEBIAN_FRONTEND=noninteractive apt-get -q -y
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    # A fresh image has no package lists at all: fetch them first. Stale lists
    # show up as a failed install, retried once after an update.
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        as_root "${apt[@]}" update >&2 || die "apt-get update failed"
    fi
    if ! as_root "${apt[@]}" install --no-install-recommends postgresql >&2; then
        as_root "${apt[@]}" update >&2 || die "apt-get update failed"
        as_root "${apt[@]}" install --no-install-recommends postgresql >&2 ||
            die "apt-get install postgresql failed"
    fi
    hash -r
}

# Prints the folder of initdb/pg_ctl/postgres, or fails if there is none.
find_bindir() {
    if [[ -n ${PG_BINDIR:-} ]]; then
        [[ -x $PG_BINDIR/initdb && -x $PG_BINDIR/pg_ctl ]] || return 1
        printf '%s\n' "$PG_BINDIR"
        return 0
    fi
    # Debian installs each major version side by side: take the newest.
    local newest
    newest=$(compgen -G '/usr/lib/postgresql/*/bin/initdb' | sort -V | tail -n 1 || true)
    if [[ -n $newest && -x $newest ]]; then
        dirname -- "$newest"
        return 0
    fi
    local dir
    if have pg_config; then
        dir=$(pg_config --bindir 2>/dev/null || true)
        if [[ -n $dir && -x $dir/initdb && -x $dir/pg_ctl ]]; then
            printf '%s\n' "$dir"
            return 0
        fi
    fi
    if have initdb; then
        # Resolve symlinks such as /usr/local/bin/initdb to the real folder,
        # where pg_ctl and postgres live too.
        dir=$(dirname -- "$(realpath -- "$(command -v initdb)")")
        if [[ -x $dir/pg_ctl ]]; then
            printf '%s\n' "$dir"
            return 0
        fi
    fi
    return 1
}

# Major version of the binaries in $1: "15" from "pg_ctl (PostgreSQL) 15.20".
bin_major() {
    local version
    version=$(as_pg "$1/pg_ctl" --version | sed -E 's/.*\(PostgreSQL\) ([0-9]+(\.[0-9]+)?).*/\1/')
    # Before 10 the major version had two parts (9.6).
    if [[ $version == 9.* ]]; then
        printf '%s\n' "$version"
    else
        printf '%s\n' "${version%%.*}"
    fi
}

# Sets BINDIR: binaries able to run the existing cluster in $BASE/data, else
# the newest installed (installing PostgreSQL if there is none).
choose_bindir() {
    local data=$BASE/data
    if [[ -f $data/PG_VERSION ]]; then
        local want cand
        want=$(<"$data/PG_VERSION")
        for cand in "$(cat -- "$BASE/bindir" 2>/dev/null || true)" "/usr/lib/postgresql/$want/bin"; do
            if [[ -n $cand && -x $cand/pg_ctl ]] && [[ $(bin_major "$cand") == "$want" ]]; then
                BINDIR=$cand
                return 0
            fi
        done
    fi
    if [[ -n ${PG_BINDIR:-} && ! -x $PG_BINDIR/pg_ctl ]]; then
        die "PG_BINDIR=$PG_BINDIR holds no initdb/pg_ctl"
    fi
    BINDIR=$(find_bindir) || {
        install_postgresql
        BINDIR=$(find_bindir) || die "PostgreSQL was installed but initdb is nowhere to be found"
    }
    if [[ -f $data/PG_VERSION ]]; then
        # The cluster is throwaway by definition: rather than fail after an
        # upgrade of the binaries, make a new one.
        log "throwaway cluster in $data is version $(<"$data/PG_VERSION") but $BINDIR is $(bin_major "$BINDIR"): recreating it"
        rm -rf -- "$data"
    fi
}

# ----------------------------------------------------------------------------
# Where the throwaway cluster lives

# The folder of an existing cluster: THROWAWAY_DIR, unless a previous run had
# to put it elsewhere and left a note saying where.
current_base() {
    if [[ -f $THROWAWAY_DIR/location ]]; then
        cat -- "$THROWAWAY_DIR/location"
    else
        printf '%s\n' "$THROWAWAY_DIR"
    fi
}

# Make $1 a private folder of the postgres user, and tell whether that user
# can really use it (every folder above it must let it through).
claim_for_postgres() {
    local dir=$1
    if [[ -L $dir ]]; then
        die "$dir is a symlink; refusing to use it"
    fi
    mkdir -p -- "$dir"
    if is_root; then
        # A folder in a shared /tmp that someone else made first is not ours.
        local owner
        owner=$(stat -c %U -- "$dir")
        [[ $owner == root || $owner == postgres ]] || die "$dir belongs to $owner; refusing to use it"
        chown postgres:postgres -- "$dir"
    fi
    chmod 0700 -- "$dir"
    as_pg test -x "$dir" 2>/dev/null && as_pg test -w "$dir" 2>/dev/null
}

# Sets BASE, making the folder ready for the cluster.
prepare_base() {
    if is_root; then
        ensure_postgres_user
    fi
    if [[ -f $THROWAWAY_DIR/location ]]; then
        BASE=$(<"$THROWAWAY_DIR/location")
        claim_for_postgres "$BASE" || die "the postgres user cannot use $BASE (named in $THROWAWAY_DIR/location)"
        return 0
    fi
    if claim_for_postgres "$THROWAWAY_DIR"; then
        BASE=$THROWAWAY_DIR
        return 0
    fi
    # As root the project may sit where the postgres user cannot go (/root is
    # 0700). Use a folder it can reach, named after the project folder so that
    # two checkouts do not share a cluster, and remember where it is.
    local hash tmp cand
    hash=$(printf '%s' "$THROWAWAY_DIR" | sha256sum | cut -c 1-12)
    for tmp in "${TMPDIR:-/tmp}" /tmp; do
        cand=$(realpath -m -- "$tmp/portal-gateway-pg-$hash")
        if claim_for_postgres "$cand"; then
            BASE=$cand
            printf '%s\n' "$BASE" >"$THROWAWAY_DIR/location"
            log "the postgres user cannot reach $THROWAWAY_DIR: the throwaway cluster lives in $BASE"
            return 0
        fi
    done
    die "the postgres user can reach neither $THROWAWAY_DIR nor a folder under ${TMPDIR:-/tmp}"
}

# ----------------------------------------------------------------------------
# The throwaway cluster

throwaway_url_for() { printf 'postgresql://postgres@127.0.0.1:%s/postgres\n' "$1"; }

# If the cluster in $1 runs and answers, print its URL. The data directory
# check makes sure the port is still ours and not some other server's.
print_if_running() {
    local base=$1 port url dir
    [[ -f $base/port && -f $base/data/postmaster.pid ]] || return 1
    port=$(<"$base/port")
    url=$(throwaway_url_for "$port")
    have psql || return 1
    dir=$(psql_probe -c 'show data_directory' "$url" 2>/dev/null) || return 1
    [[ $(realpath -m -- "$dir") == $(realpath -m -- "$base/data") ]] || return 1
    if [[ -n ${PG_THROWAWAY_PORT:-} && $PG_THROWAWAY_PORT != "$port" ]]; then
        log "the throwaway cluster already runs on port $port; PG_THROWAWAY_PORT=$PG_THROWAWAY_PORT applies once it is stopped"
    fi
    printf '%s\n' "$url"
}

# Exit status 0 when something accepts TCP connections on 127.0.0.1:$1.
# bash's /dev/tcp fails with status 1 on a refused connection; anything else
# (a connection, or a hang cut by timeout) means the port is not for us.
port_in_use() {
    local rc=0
    # shellcheck disable=SC2016  # $1 is for the inner bash, on purpose
    timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null || rc=$?
    [[ $rc -ne 1 ]]
}

choose_port() {
    local port
    if [[ -n ${PG_THROWAWAY_PORT:-} ]]; then
        port=$PG_THROWAWAY_PORT
        if ! [[ $port =~ ^[0-9]{1,5}$ ]] || ((10#$port < 1 || 10#$port > 65535)); then
            die "PG_THROWAWAY_PORT=$port is not a port number"
        fi
        if port_in_use "$port"; then
            die "PG_THROWAWAY_PORT=$port is already in use on 127.0.0.1"
        fi
        printf '%s\n' "$port"
        return 0
    fi
    for ((port = DEFAULT_THROWAWAY_PORT; port < DEFAULT_THROWAWAY_PORT + 100; port++)); do
        if ! port_in_use "$port"; then
            printf '%s\n' "$port"
            return 0
        fi
    done
    die "no free port in $DEFAULT_THROWAWAY_PORT-$((DEFAULT_THROWAWAY_PORT + 99)); set PG_THROWAWAY_PORT"
}

init_cluster() {
    local data=$BASE/data
    if [[ -e $data && ! -f $data/PG_VERSION ]]; then
        # An initdb that was interrupted leaves a folder initdb will refuse.
        log "removing the incomplete cluster in $data"
        rm -rf -- "$data"
    fi
    [[ -f $data/PG_VERSION ]] && return 0

    log "creating a throwaway cluster in $data ($BINDIR)"
    # trust: only this machine can connect (127.0.0.1 and a private socket
    # folder), and nobody must type a password. C locale: the same result on
    # every machine, whatever locales are installed.
    if ! as_pg "$BINDIR/initdb" -D "$data" -U postgres --auth=trust \
        --encoding=UTF8 --locale=C >"$BASE/initdb.log" 2>&1; then
        tail -n 30 -- "$BASE/initdb.log" >&2 || true
        die "initdb failed (log: $BASE/initdb.log)"
    fi

    # The socket goes into our folder, not /var/run/postgresql (which may not
    # exist or may belong to the machine's own server). A socket path is
    # limited to ~107 bytes; past that, do without a socket (clients use TCP).
    local sockdir=$BASE/run quoted
    if ((${#sockdir} + 20 > 107)); then
        sockdir=''
    else
        as_pg mkdir -p -m 0700 -- "$sockdir"
    fi
    quoted=${sockdir//"'"/"''"}
    cat >>"$data/postgresql.conf" <<EOF

# Added by scripts/postgres.sh: a throwaway cluster for tests and the demo,
# reachable from this machine only. The port is given at start.
listen_addresses = '127.0.0.1'
unix_socket_directories = '$quoted'
EOF
    printf '%s\n' "$BINDIR" >"$BASE/bindir"
}

start_cluster() {
    local data=$BASE/data port log=$BASE/postgres.log
    port=$(choose_port)
    log "starting the throwaway cluster on 127.0.0.1:$port (log: $log)"
    # -l: the server's output goes to the log, so it never holds our stdout
    # open (callers read it with $(...) and would wait for the server to end).
    if ! as_pg "$BINDIR/pg_ctl" -D "$data" -l "$log" -w -t 30 -o "-p $port" start >/dev/null; then
        log "the throwaway cluster did not come up; the end of $log:"
        tail -n 30 -- "$log" >&2 || true
        die "could not start the throwaway cluster in $data"
    fi
    printf '%s\n' "$port" >"$BASE/port"
}

throwaway_url() {
    # Fast path: it already runs.
    print_if_running "$(current_base)" && return 0

    # Several make targets may race to create the cluster: one at a time.
    mkdir -p -- "$THROWAWAY_DIR"
    if have flock; then
        exec 9>>"$THROWAWAY_DIR/.lock"
        flock -w 120 9 || die "timed out waiting for another scripts/postgres.sh (lock $THROWAWAY_DIR/.lock)"
        print_if_running "$(current_base)" && return 0
    fi

    prepare_base
    choose_bindir
    init_cluster
    if [[ -f $BASE/data/postmaster.pid ]] &&
        as_pg "$BINDIR/pg_ctl" -D "$BASE/data" status >/dev/null 2>&1; then
        # Up, but not answering at the recorded port (e.g. the port file is
        # gone): restart it so that we know where it listens.
        log "the throwaway cluster runs but does not answer as expected: restarting it"
        as_pg "$BINDIR/pg_ctl" -D "$BASE/data" -m fast -w -t 30 stop >/dev/null
    fi
    start_cluster
    print_if_running "$BASE" ||
        die "the throwaway cluster started but does not answer; see $BASE/postgres.log"
}

# ----------------------------------------------------------------------------
# Commands

cmd_url() {
    if [[ -n ${DATABASE_URL:-} ]]; then
        if ! have psql; then
            log "psql is not installed: using DATABASE_URL without checking it"
        elif ! PROBE_ERR=$(psql_probe -c 'select 1' "$DATABASE_URL" 2>&1 >/dev/null); then
            # The server answers; the database is for the caller to create.
            if grep -q 'database ".*" does not exist' <<<"$PROBE_ERR"; then
                log "DATABASE_URL's database does not exist yet (the server answers)"
            else
                die "DATABASE_URL ($(redact "$DATABASE_URL")) does not answer: $(first_line "$PROBE_ERR")"
            fi
        fi
        printf '%s\n' "$DATABASE_URL"
        return 0
    fi

    # psql comes with the server package; without it we cannot even ask.
    have psql || install_postgresql
    if probe_passwordless "$LOCAL_URL"; then
        printf '%s\n' "$LOCAL_URL"
        return 0
    fi
    log "no passwordless login at $(redact "$LOCAL_URL") ($(first_line "$PROBE_ERR")): using a throwaway cluster"
    throwaway_url
}

cmd_stop() {
    local base data bindir
    base=$(current_base)
    data=$base/data
    if [[ ! -f $data/postmaster.pid ]]; then
        log "no throwaway cluster runs in $base"
        return 0
    fi
    bindir=$(cat -- "$base/bindir" 2>/dev/null || true)
    if [[ -z $bindir || ! -x $bindir/pg_ctl ]]; then
        bindir=$(find_bindir) || die "cannot find pg_ctl to stop the cluster in $data"
    fi
    if as_pg "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        as_pg "$bindir/pg_ctl" -D "$data" -m fast -w -t 30 stop >/dev/null
        log "stopped the throwaway cluster in $data"
    else
        log "the throwaway cluster in $data is not running"
    fi
    rm -f -- "$base/port"
}

cmd_status() {
    if [[ -n ${DATABASE_URL:-} ]]; then
        local state='not checked: psql is not installed'
        if have psql; then
            if PROBE_ERR=$(psql_probe -c 'select 1' "$DATABASE_URL" 2>&1 >/dev/null); then
                state='it answers'
            else
                state="it does not answer: $(first_line "$PROBE_ERR")"
            fi
        fi
        printf 'DATABASE_URL %s (%s)\n' "$(redact "$DATABASE_URL")" "$state"
        return 0
    fi
    if ! have psql; then
        printf 'psql is not installed: "url" would install PostgreSQL, then use %s or a throwaway cluster in %s\n' \
            "$(redact "$LOCAL_URL")" "$(current_base)"
        return 0
    fi
    if probe_passwordless "$LOCAL_URL"; then
        printf 'local server %s (answers without a password)\n' "$(redact "$LOCAL_URL")"
        return 0
    fi
    local why base url
    why=$(first_line "$PROBE_ERR")
    base=$(current_base)
    if url=$(print_if_running "$base"); then
        printf 'throwaway cluster %s, running, data in %s (local server: %s)\n' "$url" "$base/data" "$why"
    else
        printf 'throwaway cluster in %s, not running: "url" would start it (local server: %s)\n' "$base" "$why"
    fi
}

usage() {
    printf 'usage: %s url|stop|status\n' "${0##*/}" >&2
    exit 2
}

main() {
    [[ $# -eq 1 ]] || usage
    case $1 in
    url) cmd_url ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) usage ;;
    esac
}

main "$@"
