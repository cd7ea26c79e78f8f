#!/usr/bin/env bash
# The Debian package end to end, as a DBA would use it, on this machine:
#
#   1. builds the package and the tarball (scripts/package.sh) and checks them: a second build
#      gives the same bytes, metadata, no maintainer scripts, the tarball holds the .deb's
#      PostgreSQL files byte for byte, lintian where installed;
#   2. removes whatever pg_webhooks files `cargo pgrx install/test` left in PostgreSQL's
#      directories (pg_config --pkglibdir, --sharedir/extension), so the package is their only
#      source;
#   3. in a clean room (env -i, PATH=/usr/sbin:/usr/bin:/sbin:/bin, no cargo on it, the
#      working directory a temporary one outside the checkout holding only the .deb,
#      tests/receiver.py and a copy of this script, as root): `dpkg -i`, `dpkg -L`, a fresh cluster
#      with the library preloaded, CREATE EXTENSION, a tracked `orders` table and a
#      subscription to the verifying receiver on 127.0.0.1; an inserted order must be
#      delivered with a verified signature within 60 s; every earlier version whose install
#      script the package carries is created and updated (ALTER EXTENSION UPDATE) with the
#      package's update scripts; then the cluster stops, `dpkg -r` removes the package and
#      no pg_webhooks file may be left in PostgreSQL's directories.
#
# Prints `package: N passed, M failed` last and exits non-zero on any failure. Everything it
# starts or creates (cluster, receiver, temporary directories, the installed package) is
# removed on every exit. scripts/test.sh runs it after `cargo pgrx test`; it also runs alone,
# as root or as a user with sudo (the build then runs as that user, the clean room as root).
# It installs into and removes from PostgreSQL's system directories: where other test runs
# share the machine, run it under `flock /tmp/pg-system.lock tests/package.sh`.
set -euo pipefail

PASSED=0 FAILED=0
ok() { PASSED=$((PASSED + 1)); echo "package: ok - $*"; }
# A failed check ends the run: each step needs the ones before it.
bad() { FAILED=$((FAILED + 1)); echo "package: FAILED - $*" >&2; exit 1; }
# check DESCRIPTION COMMAND...: runs the command (a function, mostly) in a subshell with
# errexit in force (bash ignores it in a function called as a condition), its output shown
# indented. State that later steps need is kept in files.
check() {
    local what=$1 log rc
    shift
    log=$(mktemp "$LOGDIR/check.XXXXXX")
    set +e
    (set -e; "$@") >"$log" 2>&1
    rc=$?
    set -e
    if [ "$rc" -eq 0 ]; then
        sed 's/^/    /' "$log"
        rm -f "$log"
        ok "$what"
    else
        sed 's/^/    /' "$log" >&2
        rm -f "$log"
        bad "$what"
    fi
}

# ---------------------------------------------------------------------------------------------
# The clean room: runs from the temporary directory with nothing but the .deb, receiver.py and
# this script, in an environment of PATH alone. Arguments are plain values from the outer run.
clean_room() {
    DEB=$1 PACKAGE=$2 VERSION=$3 BINDIR=$4 PKGLIBDIR=$5 EXTDIR=$6 PY=$7 PYPATH=$8
    WORK=$PWD
    CL=$WORK/cluster
    AS=(runuser -u postgres --)   # initdb refuses root: the cluster runs as postgres
    LOGDIR=$(mktemp -d)           # the checks' output, outside the room
    trap 'clean_room_exit' EXIT
    trap 'echo "package: interrupted" >&2; exit 130' INT TERM

    check "clean environment: no cargo, rustc or cargo-pgrx on PATH=$PATH, no HOME, cwd $WORK" \
        no_toolchain
    check "dpkg -i $DEB" dpkg -i "./$DEB"
    check "dpkg -L $PACKAGE lists the library, control file and SQL scripts; they are the only pg_webhooks files in PostgreSQL's directories" \
        package_files
    check "fresh cluster started by $BINDIR/pg_ctl with shared_preload_libraries = 'pg_webhooks'" \
        start_cluster
    check "CREATE EXTENSION pg_webhooks makes version $VERSION" create_extension
    check "receiver on 127.0.0.1 ($PY)" start_receiver
    check "track orders, subscribe the receiver, insert an order: delivered within 60 s, signature verified by standardwebhooks" \
        deliver_signed_event
    upgrades
    check "cluster stopped" "${AS[@]}" "$BINDIR/pg_ctl" -D "$CL/data" stop -m fast -w
    check "dpkg -r $PACKAGE" dpkg -r "$PACKAGE"
    check "nothing of pg_webhooks left in $PKGLIBDIR and $EXTDIR, dpkg -s: not installed" \
        nothing_left
}

clean_room_exit() {
    local rc=$?
    if [ -f "$CL/data/postmaster.pid" ]; then
        "${AS[@]}" "$BINDIR/pg_ctl" -D "$CL/data" stop -m immediate -w >/dev/null 2>&1 || true
    fi
    if [ -s "$WORK/receiver.pid" ]; then
        kill "$(cat "$WORK/receiver.pid")" 2>/dev/null || true
    fi
    rm -rf "$LOGDIR"
    echo "$PASSED $FAILED" >"$WORK/counts"
    exit "$rc"
}

no_toolchain() {
    local t found=0
    for t in cargo rustc cargo-pgrx rustup; do
        if command -v "$t"; then found=1; fi
    done
    [ "$found" -eq 0 ] || { echo "found on PATH (above)"; return 1; }
    [ -z "${HOME:-}" ] || { echo "HOME is set: $HOME"; return 1; }
    [ ! -e Cargo.toml ] && [ ! -d src ] || { echo "the working directory looks like a checkout"; return 1; }
    echo "environment: $(env | cut -d= -f1 | sort | tr '\n' ' ')"
    echo "directory: $(ls | tr '\n' ' ')"
}

package_files() {
    local listed found
    dpkg -L "$PACKAGE"
    listed=$(dpkg -L "$PACKAGE" | grep -E "^($PKGLIBDIR|$EXTDIR)/" | LC_ALL=C sort)
    for f in "$PKGLIBDIR/pg_webhooks.so" "$EXTDIR/pg_webhooks.control" "$EXTDIR/pg_webhooks--$VERSION.sql"; do
        grep -qxF "$f" <<<"$listed" || { echo "not in the package: $f"; return 1; }
        [ -f "$f" ] || { echo "not installed: $f"; return 1; }
    done
    found=$(find "$PKGLIBDIR" "$EXTDIR" -maxdepth 1 -name 'pg_webhooks*' | LC_ALL=C sort)
    [ "$found" = "$listed" ] || { echo "pg_webhooks files that are not the package's:"; diff <(echo "$listed") <(echo "$found"); return 1; }
    [ "$(dpkg -S "$PKGLIBDIR/pg_webhooks.so" | cut -d: -f1)" = "$PACKAGE" ]
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start_cluster() {
    mkdir "$CL"
    chown postgres:postgres "$CL"
    "${AS[@]}" "$BINDIR/initdb" -A trust -U postgres --no-sync -E UTF8 -D "$CL/data" >/dev/null
    free_port >"$WORK/port"
    # initdb created postgresql.auto.conf, so it keeps its owner.
    cat >"$CL/data/postgresql.auto.conf" <<EOF
port = $(cat "$WORK/port")
listen_addresses = '127.0.0.1'
unix_socket_directories = '$CL'
shared_preload_libraries = 'pg_webhooks'
webhooks.allow_http = on
webhooks.allow_private_network = on
fsync = off
EOF
    if ! "${AS[@]}" "$BINDIR/pg_ctl" -D "$CL/data" -l "$CL/server.log" -w -t 60 start; then
        tail -n 30 "$CL/server.log"
        return 1
    fi
    echo "port $(cat "$WORK/port"), data directory $CL/data"
}

sql() { "$BINDIR/psql" -X -q -At -h 127.0.0.1 -p "$(cat "$WORK/port")" -U postgres -v ON_ERROR_STOP=1 "$@"; }

create_extension() {
    local v
    sql -d postgres -c "CREATE EXTENSION pg_webhooks"
    v=$(sql -d postgres -c "SELECT extversion FROM pg_extension WHERE extname = 'pg_webhooks'")
    echo "extversion $v"
    [ "$v" = "$VERSION" ]
}

start_receiver() {
    # Only the receiver is told where its library is (the user's site directory, maybe).
    env PYTHONPATH="$PYPATH" "$PY" "$WORK/receiver.py" --port-file "$WORK/receiver.port" --quiet >"$WORK/receiver.log" 2>&1 &
    echo $! >"$WORK/receiver.pid"
    local deadline=$((SECONDS + 20))
    while [ ! -s "$WORK/receiver.port" ]; do
        kill -0 "$(cat "$WORK/receiver.pid")" 2>/dev/null || { cat "$WORK/receiver.log"; return 1; }
        [ "$SECONDS" -lt "$deadline" ] || { echo "no port file after 20 s"; return 1; }
        sleep 0.1
    done
    curl -fsS "$(recv)/_health"
    echo " from $(recv)"
}

recv() { echo "http://127.0.0.1:$(cat "$WORK/receiver.port")"; }

deliver_signed_event() {
    local sub secret status="" deadline event_id
    sql -d postgres <<'SQL'
CREATE TABLE orders (id bigint PRIMARY KEY, customer text, status text NOT NULL DEFAULT 'pending', total numeric);
SELECT webhooks.track('orders', status_column => 'status');
SQL
    read -r sub secret < <(sql -d postgres -F ' ' -c \
        "SELECT id, secret FROM webhooks.subscribe('$(recv)/hooks/package', '{order.*}', description => 'package test')")
    [ -n "${secret:-}" ] || { echo "subscribe returned no secret"; return 1; }
    # The receiver verifies with the same secret (given on stdin, not on a command line).
    curl -fsS -H 'content-type: application/json' --data-binary @- "$(recv)/_control/endpoint" \
        <<<"{\"path\": \"/hooks/package\", \"secret\": \"$secret\"}"
    echo
    sql -d postgres -c "INSERT INTO orders (id, customer, total) VALUES (1, 'Ada Lovelace', 59.90)"
    deadline=$((SECONDS + 60))
    while [ "$SECONDS" -lt "$deadline" ]; do
        status=$(sql -d postgres -c "SELECT string_agg(status, ',') FROM webhooks.deliveries WHERE subscription_id = $sub")
        [ "$status" = succeeded ] && break
        sleep 0.2
    done
    sql -d postgres -F ' | ' -c \
        "SELECT id, event_type, status, attempts, last_status_code, coalesce(last_error, '') FROM webhooks.deliveries WHERE subscription_id = $sub"
    [ "$status" = succeeded ] || { echo "delivery status after 60 s: '${status}'"; return 1; }
    curl -fsS "$(recv)/_log?path=/hooks/package" >"$WORK/received.json"
    event_id=$(sql -d postgres -c "SELECT id FROM webhooks.events WHERE type = 'order.created'")
    # What the receiver got: one request, signature verified, the event of the insert, sent by
    # the packaged library (user-agent pg_webhooks/<version>).
    python3 - "$VERSION" "$event_id" "$WORK/received.json" <<'PY'
import json, sys
version, event_id, path = sys.argv[1:]
log = json.load(open(path))
assert len(log) == 1, f"{len(log)} requests"
r = log[0]
print(f"received {r['json']['type']} {r['headers']['webhook-id']}, verified={r['verified']}, "
      f"user-agent {r['headers'].get('user-agent')}")
assert r["verified"] is True, r["verify_error"]
assert r["json"]["type"] == "order.created" and r["json"]["data"]["id"] == 1, r["json"]
assert r["headers"]["webhook-id"] == event_id, (r["headers"]["webhook-id"], event_id)
assert r["headers"].get("user-agent") == f"pg_webhooks/{version}", r["headers"].get("user-agent")
PY
}

# Every install script of an earlier version that the package carries: create that version,
# update it with the package's update scripts, and the result must be this version.
upgrades() {
    local olds=() f v
    for f in $(dpkg -L "$PACKAGE" | grep -E "^$EXTDIR/pg_webhooks--.*\.sql$" | grep -v -- 'pg_webhooks--.*--'); do
        v=${f##*/pg_webhooks--}
        v=${v%.sql}
        [ "$v" = "$VERSION" ] || olds+=("$v")
    done
    if [ ${#olds[@]} -eq 0 ]; then
        echo "package: skipped - CREATE EXTENSION VERSION '<old>' + ALTER EXTENSION UPDATE: the package carries no install script of an earlier version (no sql/archive/pg_webhooks--*.sql yet), so there is nothing to update from"
        return 0
    fi
    for v in "${olds[@]}"; do
        check "CREATE EXTENSION pg_webhooks VERSION '$v', then ALTER EXTENSION pg_webhooks UPDATE to $VERSION with the package's scripts" \
            update_from "$v"
    done
}

update_from() {
    local old=$1 db v
    db=update_from_${old//[^0-9a-zA-Z]/_}
    sql -d postgres -c "CREATE DATABASE $db"
    sql -d "$db" -c "CREATE EXTENSION pg_webhooks VERSION '$old'"
    v=$(sql -d "$db" -c "SELECT extversion FROM pg_extension WHERE extname = 'pg_webhooks'")
    [ "$v" = "$old" ] || { echo "created version $v, asked for $old"; return 1; }
    sql -d "$db" -c "ALTER EXTENSION pg_webhooks UPDATE"
    v=$(sql -d "$db" -c "SELECT extversion FROM pg_extension WHERE extname = 'pg_webhooks'")
    echo "$old -> $v"
    [ "$v" = "$VERSION" ] || return 1
    # The updated schema works: a tracked table's insert becomes an event.
    sql -d "$db" <<'SQL'
CREATE TABLE orders (id bigint PRIMARY KEY, status text NOT NULL DEFAULT 'pending');
SELECT webhooks.track('orders', status_column => 'status');
INSERT INTO orders (id) VALUES (1);
SQL
    [ "$(sql -d "$db" -c "SELECT string_agg(type, ',') FROM webhooks.events")" = order.created ]
    sql -d postgres -c "DROP DATABASE $db"
}

nothing_left() {
    local left
    left=$(find "$PKGLIBDIR" "$EXTDIR" -name 'pg_webhooks*')
    [ -z "$left" ] || { echo "left behind:"; echo "$left"; return 1; }
    [ ! -e "/usr/share/doc/$PACKAGE" ] || { echo "left behind: /usr/share/doc/$PACKAGE"; return 1; }
    if dpkg -s "$PACKAGE" 2>&1; then
        echo "dpkg -s still knows $PACKAGE as installed"
        return 1
    fi
    return 0
}

# ---------------------------------------------------------------------------------------------
# The outer run, from the checkout.
outer() {
    cd "$(dirname "$0")/.."
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo   # dpkg -i, the cluster as postgres: root's work
    trap 'outer_exit' EXIT
    trap 'echo "package: interrupted" >&2; exit 130' INT TERM
    WORK="" LOGDIR=/tmp
    INSTALLED_BY_US=0

    ./scripts/package.sh
    cfg() { python3 scripts/config.py "$1"; }
    VERSION=$(python3 scripts/package.py cargo version)
    PG_VERSION=$(cfg postgres.version)
    PG_CONFIG=$(cfg postgres.pg_config)
    BINDIR=$("$PG_CONFIG" --bindir)
    PKGLIBDIR=$("$PG_CONFIG" --pkglibdir)
    EXTDIR=$("$PG_CONFIG" --sharedir)/extension
    PACKAGE=postgresql-$PG_VERSION-pg-webhooks
    ARCH=$(dpkg --print-architecture)
    DEB=target/dist/${PACKAGE}_${VERSION}_$ARCH.deb
    TARBALL=target/dist/pg_webhooks-$VERSION-pg$PG_VERSION-$(dpkg-architecture -qDEB_HOST_MULTIARCH).tar.gz
    # The receiver verifies with the standardwebhooks library that setup.sh installed for the
    # python3 on this PATH; the clean room calls that interpreter by its path, with the
    # library's directory (site-packages, or the user's site directory) as PYTHONPATH.
    PY=$(python3 -c 'import standardwebhooks, sys; print(sys.executable)')
    PYPATH=$(python3 -c 'import os, standardwebhooks; print(os.path.dirname(os.path.dirname(standardwebhooks.__file__)))')
    WORK=$(mktemp -d /tmp/pg_webhooks_package.XXXXXX)
    LOGDIR=$WORK
    ROOM=$WORK/room        # the clean room's working directory
    mkdir "$ROOM"
    chmod 0755 "$WORK" "$ROOM"   # the cluster inside runs as postgres

    check "built $DEB and $TARBALL" test -s "$DEB" -a -s "$TARBALL"
    check "a second scripts/package.sh writes the same bytes" same_again
    check "control: $PACKAGE $VERSION $ARCH, Depends on postgresql-$PG_VERSION, section database" \
        deb_metadata
    check "no maintainer scripts in the .deb (control and md5sums only)" no_maintainer_scripts
    check "the tarball holds exactly the .deb's PostgreSQL files, byte for byte" tarball_matches
    # lintian is not among setup.sh's packages (it pulls ~150 others); checked where installed.
    if command -v lintian >/dev/null; then
        check "lintian: no errors, no warnings" lintian --fail-on error,warning --info "$DEB"
    else
        echo "package: skipped - lintian: not installed (apt-get install lintian to check the .deb with it)"
    fi

    check "no earlier pg_webhooks files in $PKGLIBDIR and $EXTDIR (cargo pgrx install/test leftovers removed)" \
        remove_leftovers

    cp "$DEB" tests/receiver.py "$ROOM/"
    cp tests/package.sh "$ROOM/package.sh"
    INSTALLED_BY_US=1
    local rc=0
    (cd "$ROOM" && exec $SUDO env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        bash ./package.sh --clean-room "$(basename "$DEB")" "$PACKAGE" "$VERSION" "$BINDIR" \
        "$PKGLIBDIR" "$EXTDIR" "$PY" "$PYPATH") || rc=$?
    read -r p f <"$ROOM/counts" || { p=0 f=1; }
    PASSED=$((PASSED + p)) FAILED=$((FAILED + f))
    [ "$rc" -eq 0 ] || { [ "$f" -gt 0 ] || FAILED=$((FAILED + 1)); exit 1; }
}

outer_exit() {
    local rc=$?
    trap - EXIT
    if [ -n "$WORK" ] && [ -f "$ROOM/cluster/data/postmaster.pid" ]; then
        $SUDO runuser -u postgres -- "$BINDIR/pg_ctl" -D "$ROOM/cluster/data" stop -m immediate -w >/dev/null 2>&1 || true
    fi
    if [ "$INSTALLED_BY_US" -eq 1 ] && dpkg -s "$PACKAGE" >/dev/null 2>&1; then
        echo "package: removing $PACKAGE after the failed run"
        $SUDO dpkg -r "$PACKAGE" >/dev/null 2>&1 || echo "package: dpkg -r $PACKAGE failed" >&2
    fi
    [ -z "$WORK" ] || $SUDO rm -rf "$WORK"
    [ "$rc" -eq 0 ] || [ "$FAILED" -gt 0 ] || FAILED=1
    echo "package: $PASSED passed, $FAILED failed"
    exit "$rc"
}

same_again() {
    cp target/dist/SHA256SUMS "$WORK/SHA256SUMS.first"
    ./scripts/package.sh >"$WORK/package-again.log" 2>&1 || { tail -n 30 "$WORK/package-again.log"; return 1; }
    cat target/dist/SHA256SUMS
    diff "$WORK/SHA256SUMS.first" target/dist/SHA256SUMS
}

deb_metadata() {
    dpkg-deb -I "$DEB"
    [ "$(dpkg-deb -f "$DEB" Package)" = "$PACKAGE" ]
    [ "$(dpkg-deb -f "$DEB" Version)" = "$VERSION" ]
    [ "$(dpkg-deb -f "$DEB" Architecture)" = "$ARCH" ]
    [ "$(dpkg-deb -f "$DEB" Section)" = database ]
    [[ $(dpkg-deb -f "$DEB" Depends) == "postgresql-$PG_VERSION, "*libc6* ]]
    [ -n "$(dpkg-deb -f "$DEB" Description | sed -n 2p)" ]   # a long description
}

no_maintainer_scripts() {
    local members
    members=$(dpkg-deb --ctrl-tarfile "$DEB" | tar -t | grep -v '/$' | LC_ALL=C sort | tr '\n' ' ')
    echo "control members: $members"
    [ "$members" = "./control ./md5sums " ]
}

tarball_matches() {
    local d=$WORK/compare
    mkdir -p "$d/deb" "$d/tar"
    dpkg-deb -x "$DEB" "$d/deb"
    tar -C "$d/tar" -xzf "$TARBALL"
    rm -rf "$d/deb/usr/share/doc"   # the package's own documentation is not PostgreSQL's
    diff -r "$d/deb" "$d/tar"
    tar -tzvf "$TARBALL"
    [ -z "$(tar -tzf "$TARBALL" | grep '/$')" ] || { echo "the tarball has directory entries"; return 1; }
    rm -rf "$d"
}

remove_leftovers() {
    local f owner
    if dpkg -s "$PACKAGE" >/dev/null 2>&1; then
        echo "removing the installed $PACKAGE $(dpkg-query -W -f '${Version}' "$PACKAGE") first"
        $SUDO dpkg -r "$PACKAGE"
    fi
    for f in $(find "$PKGLIBDIR" "$EXTDIR" -maxdepth 1 -name 'pg_webhooks*'); do
        if owner=$(dpkg -S "$f" 2>/dev/null); then
            echo "$f belongs to ${owner%%:*}: not removed"
            return 1
        fi
        echo "removing $f"
        $SUDO rm -f "$f"
    done
    [ -z "$(find "$PKGLIBDIR" "$EXTDIR" -maxdepth 1 -name 'pg_webhooks*')" ]
}

if [ "${1:-}" = --clean-room ]; then
    shift
    clean_room "$@"
else
    outer "$@"
fi
