#!/usr/bin/env bash
# Capture-overhead benchmark: how much slower do order writes get when pg_webhooks tracks
# the table? One command, prints a table; see BENCHMARKS.md for what it measures.
#
#   bench/run.sh
#
# 1. ./scripts/setup.sh, then a release build installed with `cargo pgrx install --release`.
# 2. A private copy of that build (the .so plus the extension SQL generated from the same
#    build) in a private PostgreSQL "install tree" under a temp dir, so a debug build that
#    another test run installs into the shared PostgreSQL directory meanwhile cannot change
#    what is measured. The tree links every other file to the system installation; only the
#    `postgres` binary is copied (PostgreSQL finds $libdir and its share dir relative to it).
# 3. A throwaway cluster (port 28830, 127.0.0.1 only, pg_webhooks preloaded, webhooks.database
#    = bench) with two identical schemas in one database: plain.* (untracked) and tracked.*
#    (webhooks.track on tracked.orders with tracked.order_items as the "items" child).
#    No subscriptions in the main runs: the delivery worker has nothing to fan out to, and its
#    CPU is reported.
# 4. pgbench, 8 clients / 2 threads, fixed duration, two workloads (order insert = order +
#    3 items in one transaction; status update = one UPDATE of a random existing order to a
#    random status), plain and tracked alternated (plain, tracked, tracked, plain, ...), and
#    the median TPS of each plus the ratio tracked/plain.
# Everything it starts is stopped and removed on exit (also on Ctrl-C or failure).
#
# Knobs (environment): BENCH_PORT (28830), BENCH_DURATION seconds per run (20), BENCH_ROUNDS (3),
# BENCH_WARMUP seconds per variant, not counted (5), BENCH_ORDERS preloaded orders per schema
# (100000), BENCH_FSYNC "off on" (the settings measured, in this order, on the same cluster and
# data: off = fsync and synchronous_commit off, CPU-bound, the capture's CPU cost undiluted by
# WAL flush waits; on = both on, what production runs), BENCH_SHARED_BUFFERS (512MB),
# BENCH_MAX_SECONDS budget for everything after the build (1500; 2700 with BENCH_FLOOR=1), BENCH_KEEP=1 keeps the temp
# dir (server log, pgbench output), BENCH_SKIP_BUILD=1 reuses target/release as it is,
# BENCH_FLOOR=1 adds a fourth schema to the rounds, right after plain in each: floor.*, no
# trigger, the application's own statement also writes one event-shaped row (constant data of
# the size of pg_webhooks' and a constant id) into a table with _events' columns and two
# indexes. It is a lower bound for any design that writes one such row per transaction, not
# something a user would run. The result also gives floor/plain round by round.
# PGOPTIONS is passed on by libpq to every session (e.g. '-c plan_cache_mode=force_generic_plan'
# for a diagnostic run; it then applies to the plain and the tracked side alike).
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${BENCH_PORT:-28830}
DURATION=${BENCH_DURATION:-20}
ROUNDS=${BENCH_ROUNDS:-3}
WARMUP=${BENCH_WARMUP:-5}
ORDERS=${BENCH_ORDERS:-100000}
FSYNC_LIST=${BENCH_FSYNC:-off on}
SINK_PORT=${BENCH_SINK_PORT:-28831}
SHARED_BUFFERS=${BENCH_SHARED_BUFFERS:-512MB}
SCHEMAS="plain tracked outbox"
[ "${BENCH_FLOOR:-0}" != 1 ] || SCHEMAS="plain tracked outbox floor"
MAX_SECONDS=${BENCH_MAX_SECONDS:-1500}
[ "${BENCH_FLOOR:-0}" != 1 ] || MAX_SECONDS=${BENCH_MAX_SECONDS:-2700}   # a quarter more runs
CLIENTS=8
THREADS=2
DB=bench
# Targets per setting: durable (fsync on) and CPU-bound (fsync off).
declare -A TARGET_INSERT=([on]=0.85 [off]=0.70)
declare -A TARGET_UPDATE=([on]=0.75 [off]=0.50)

say() { printf '\n=== %s\n' "$*"; }
die() { echo "bench: $*" >&2; exit 1; }
cfg() { python3 scripts/config.py "$1"; }
for f in $FSYNC_LIST; do case "$f" in on|off) ;; *) die "BENCH_FSYNC must list on and/or off" ;; esac; done
FSYNC=${FSYNC_LIST%% *}

machine_load() {   # what else is running: load average and the busiest processes right now
    echo "    $(uptime)"
    top -b -n 2 -d 1 -w 200 2>/dev/null | awk '/^top -/{n++} n==2 && /^ *[0-9]+ /{ if ($9+0 >= 2.0) print "    " $0 }' | head -n 12
}

say "Machine: $(nproc) cores, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo); load before the build"
machine_load

if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
    say "Setup (packages, cargo-pgrx)"
    ./scripts/setup.sh
fi
PG_CONFIG=$(cfg postgres.pg_config)
BINDIR=$("$PG_CONFIG" --bindir)
PKGLIBDIR=$("$PG_CONFIG" --pkglibdir)

if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
    say "Build (release, lto) and install into $PKGLIBDIR (waits on cargo's lock if another build runs)"
    if [ "$(id -u)" -eq 0 ]; then
        timeout 1800 cargo pgrx install --release --pg-config "$PG_CONFIG"
    else
        timeout 1800 cargo pgrx install --release --pg-config "$PG_CONFIG" --sudo
    fi
fi
timeout 900 cargo build --release --example sink >/dev/null 2>&1 || die "could not build the sink (examples/sink.rs)"
START=$SECONDS   # the time budget covers everything after the build

# Private install tree: same PostgreSQL, our own $libdir/pg_webhooks.so and extension SQL.
DIR=$(mktemp -d "${TMPDIR:-/tmp}/pg_webhooks_bench.XXXXXX")
chmod 755 "$DIR"
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -f "$DIR/data/postmaster.pid" ]; then
        "${AS[@]}" "$BINDIR/pg_ctl" -D "$DIR/data" stop -m fast -w -t 30 >/dev/null 2>&1 ||
            "${AS[@]}" "$BINDIR/pg_ctl" -D "$DIR/data" stop -m immediate -w >/dev/null 2>&1 || true
    fi
    [ -z "${SINK_PID:-}" ] || kill "$SINK_PID" 2>/dev/null || true
    if [ "${BENCH_KEEP:-0}" = 1 ]; then
        echo "bench: kept $DIR"
    else
        rm -rf "$DIR"
    fi
    exit "$rc"
}
AS=()
[ "$(id -u)" -ne 0 ] || AS=(runuser -u postgres --)   # initdb refuses root
trap cleanup EXIT
trap 'exit 130' INT TERM

say "Private copy of the release build in $DIR/inst"
# shellcheck source=bench/lib.sh
. bench/lib.sh
private_tree "$DIR" || die "could not make the private install tree"
INSTALLED_MD5=$(md5sum "$PKGLIBDIR/pg_webhooks.so" | cut -c1-12)
echo "    measured build: release (lto=fat, opt-level 3), pg_webhooks.so md5 $SO_MD5, $(stat -c %s "$PRIV_LIB/pg_webhooks.so") bytes"
echo "    source: $SRC_STATE"
[ "$SO_MD5" = "$INSTALLED_MD5" ] ||
    echo "    note: $PKGLIBDIR/pg_webhooks.so is now another build (md5 $INSTALLED_MD5); the private copy is used"

for p in "$PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
        die "port $p is already in use (another benchmark running?); set BENCH_PORT"
    fi
done

say "Throwaway cluster (port $PORT, 127.0.0.1 only, database $DB)"
[ ${#AS[@]} -eq 0 ] || chown postgres "$DIR"   # initdb creates $DIR/data as postgres
"${AS[@]}" "$BINDIR/initdb" -A trust -U postgres --no-sync -E UTF8 -D "$DIR/data" >/dev/null
{
    echo "port = $PORT"
    echo "listen_addresses = '127.0.0.1'"
    echo "unix_socket_directories = '$DIR'"
    echo "max_connections = 40"
    echo "shared_preload_libraries = 'pg_webhooks'"
    echo "webhooks.database = '$DB'"
    echo "shared_buffers = '$SHARED_BUFFERS'"
    echo "fsync = $FSYNC"
    echo "synchronous_commit = $FSYNC"
    echo "max_wal_size = '8GB'"
    echo "checkpoint_timeout = '30min'"
    echo "jit = off"
    echo "log_min_messages = warning"
} >"$DIR/data/postgresql.auto.conf"
sed 's/^/    /' "$DIR/data/postgresql.auto.conf"
if ! "${AS[@]}" "$BINDIR/pg_ctl" -D "$DIR/data" -p "$PRIV_BIN/postgres" -l "$DIR/server.log" -w -t 60 start >/dev/null; then
    tail -n 20 "$DIR/server.log" >&2 || true
    die "PostgreSQL did not start (server log above)"
fi
PM_PID=$(head -n 1 "$DIR/data/postmaster.pid")
PSQL=("$BINDIR/psql" -X -q -h 127.0.0.1 -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -P pager=off)
"${PSQL[@]}" -d postgres -c "CREATE DATABASE $DB"
SQL=("${PSQL[@]}" -d "$DB")
"${SQL[@]}" -c "CREATE EXTENSION pg_webhooks"
# Prove the private build is the one loaded (postmaster maps it; $libdir points to the tree).
grep -q " $PRIV_LIB/pg_webhooks.so\$" "/proc/$PM_PID/maps" || die "the postmaster did not load $PRIV_LIB/pg_webhooks.so"
[ "$("${SQL[@]}" -At -c "SELECT setting FROM pg_config WHERE name = 'PKGLIBDIR'")" = "$PRIV_LIB" ] ||
    die "\$libdir is not the private tree"
echo "    loaded: $PRIV_LIB/pg_webhooks.so (checked in /proc/$PM_PID/maps and pg_config's PKGLIBDIR)"

say "Schemas ${SCHEMAS// /, }, $ORDERS orders with 3 items each in all of them"
for s in $SCHEMAS; do   # the same DDL for every schema
    "${SQL[@]}" <<SQL
CREATE SCHEMA $s;
CREATE TABLE $s.orders (
    id bigint PRIMARY KEY, customer text, status text NOT NULL DEFAULT 'pending', total numeric,
    created_at timestamptz DEFAULT now());
CREATE TABLE $s.order_items (
    id bigserial PRIMARY KEY, order_id bigint REFERENCES $s.orders, sku text, qty int, price numeric);
CREATE INDEX ON $s.order_items (order_id);
CREATE SEQUENCE $s.order_id_seq START $((ORDERS + 1));
SQL
done
"${SQL[@]}" <<SQL
INSERT INTO plain.orders (id, customer, status, total, created_at)
SELECT g, 'customer-' || (g % 5000), (ARRAY['pending', 'paid', 'shipped', 'delivered'])[1 + g % 4],
       round((random() * 500)::numeric, 2), now() - g * interval '1 minute'
  FROM generate_series(1, $ORDERS) g;
INSERT INTO plain.order_items (order_id, sku, qty, price)
SELECT g, 'SKU-' || ((g * 7 + i) % 1000), 1 + (g + i) % 5, round((random() * 100)::numeric, 2)
  FROM generate_series(1, $ORDERS) g, generate_series(1, 3) i ORDER BY g, i;
-- Identical rows in the tracked schema, loaded before tracking (the preload is not captured).
INSERT INTO tracked.orders SELECT * FROM plain.orders ORDER BY id;
INSERT INTO tracked.order_items SELECT * FROM plain.order_items ORDER BY id;
SELECT setval('tracked.order_items_id_seq', (SELECT max(id) FROM tracked.order_items)) \\g /dev/null
INSERT INTO outbox.orders SELECT * FROM plain.orders ORDER BY id;
INSERT INTO outbox.order_items SELECT * FROM plain.order_items ORDER BY id;
SELECT setval('outbox.order_items_id_seq', (SELECT max(id) FROM outbox.order_items)) \\g /dev/null

-- What a user would write by hand instead: a deferred constraint trigger that, at commit,
-- writes the order's JSON with its items into an outbox table, one row per event (and a
-- separate row for the mapped status event).
CREATE TABLE outbox.events (
    id bigserial PRIMARY KEY, type text NOT NULL, key text NOT NULL, data jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now());
CREATE FUNCTION outbox.capture() RETURNS trigger LANGUAGE plpgsql AS \$\$
DECLARE
    v_data jsonb;
BEGIN
    SELECT to_jsonb(o) || jsonb_build_object('items',
               COALESCE((SELECT jsonb_agg(to_jsonb(i) ORDER BY i.id) FROM outbox.order_items i WHERE i.order_id = o.id), '[]'))
      INTO v_data FROM outbox.orders o WHERE o.id = NEW.id;
    IF TG_OP = 'INSERT' THEN
        INSERT INTO outbox.events (type, key, data) VALUES ('order.created', NEW.id, v_data);
    ELSIF NEW.status IS DISTINCT FROM OLD.status THEN
        INSERT INTO outbox.events (type, key, data)
        VALUES ('order.status_updated', NEW.id, v_data || jsonb_build_object('previous_status', OLD.status));
        IF NEW.status IN ('paid', 'shipped', 'delivered') THEN
            INSERT INTO outbox.events (type, key, data) VALUES ('order.' || NEW.status, NEW.id, v_data);
        END IF;
    ELSIF NEW IS DISTINCT FROM OLD THEN
        INSERT INTO outbox.events (type, key, data) VALUES ('order.updated', NEW.id, v_data);
    END IF;
    RETURN NULL;
END \$\$;
CREATE CONSTRAINT TRIGGER outbox_capture AFTER INSERT OR UPDATE ON outbox.orders
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION outbox.capture();

SELECT webhooks.track('tracked.orders', entity => 'order', status_column => 'status',
                      children => '{"items": {"table": "tracked.order_items", "foreign_key": "order_id"}}') \\g /dev/null
SQL
if [[ " $SCHEMAS " == *" floor "* ]]; then
    "${SQL[@]}" <<SQL
INSERT INTO floor.orders SELECT * FROM plain.orders ORDER BY id;
INSERT INTO floor.order_items SELECT * FROM plain.order_items ORDER BY id;
SELECT setval('floor.order_items_id_seq', (SELECT max(id) FROM floor.order_items)) \\g /dev/null
-- The floor: _events' columns and its two indexes, no trigger. The pgbench scripts write the
-- rows (below). The id is a constant of a uuid's 16 bytes: gen_random_uuid() takes 3 to 7 us
-- here, pg_webhooks' own ids a fraction of one (direct.rs), and _events has no index on it.
CREATE TABLE floor.events (
    seq bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    id uuid NOT NULL DEFAULT '6f1c2a44-0d9e-4b7a-9c3e-5a8b7d2e1f00', type text NOT NULL, entity text,
    key text, data jsonb NOT NULL, xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    created_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE INDEX ON floor.events (xid, seq);
SQL
fi
"${SQL[@]}" -c "VACUUM ANALYZE" -c "CHECKPOINT"
SUBS=$("${SQL[@]}" -At -c "SELECT count(*) FROM webhooks._subscriptions")
echo "    subscriptions: $SUBS (the worker fans out to nobody)"
"${SQL[@]}" -At -F ' ' -c "SELECT '    triggers:', string_agg(tgrelid::regclass || '.' || tgname, ', ') FROM pg_trigger WHERE NOT tgisinternal"

# pgbench scripts, one per workload and schema (@S@ = schema).
cat >"$DIR/insert.tmpl" <<'EOF'
\set cust random(1, 5000)
\set total random(100, 50000)
\set sku random(1, 997)
\set q1 random(1, 5)
\set q2 random(1, 5)
\set q3 random(1, 5)
BEGIN;
INSERT INTO @S@.orders (id, customer, total) VALUES (nextval('@S@.order_id_seq'), 'customer-' || :cust::text, :total / 100.0) RETURNING id AS oid \gset
INSERT INTO @S@.order_items (order_id, sku, qty, price) VALUES (:oid, 'SKU-' || :sku::text, :q1, 19.99);
INSERT INTO @S@.order_items (order_id, sku, qty, price) VALUES (:oid, 'SKU-' || (:sku + 1)::text, :q2, 5.49);
INSERT INTO @S@.order_items (order_id, sku, qty, price) VALUES (:oid, 'SKU-' || (:sku + 2)::text, :q3, 102.00);
END;
EOF
cat >"$DIR/update.tmpl" <<EOF
\\set oid random(1, $ORDERS)
\\set st random(1, 4)
UPDATE @S@.orders SET status = (ARRAY['pending', 'paid', 'shipped', 'delivered']::text[])[:st] WHERE id = :oid;
EOF
for w in insert update; do
    for s in plain tracked outbox; do
        sed "s/@S@/$s/g" "$DIR/$w.tmpl" >"$DIR/$w-$s.sql"
    done
done
if [[ " $SCHEMAS " == *" floor "* ]]; then
    # The plain statements, the order's INSERT and the UPDATE each also writing the event row
    # (no extra round trip). The data is a constant: what pg_webhooks writes for order 1's
    # creation and for a status change of it.
    FLOOR_CREATED=$("${SQL[@]}" -At -c \
        "SELECT (to_jsonb(o) || jsonb_build_object('items', (SELECT jsonb_agg(to_jsonb(i) ORDER BY i.id)
                   FROM plain.order_items i WHERE i.order_id = o.id)))::text FROM plain.orders o WHERE o.id = 1")
    FLOOR_CREATED=$FLOOR_CREATED DIR=$DIR python3 - <<'PY'
import json, os
d, created = os.environ["DIR"], os.environ["FLOOR_CREATED"]
status = json.dumps({**json.loads(created), "previous_status": "pending", "status": "paid"})
lit = lambda v: "'" + v.replace("'", "''") + "'::jsonb"
ins = open(f"{d}/insert-plain.sql").read().replace("plain.", "floor.")
old = next(l for l in ins.splitlines() if l.startswith("INSERT INTO floor.orders "))
values = old[len("INSERT INTO floor.orders "):old.index(" RETURNING id AS oid")]
new = ("WITH o AS (INSERT INTO floor.orders " + values + " RETURNING id), "
       "e AS (INSERT INTO floor.events (type, entity, key, data) SELECT 'order.created', 'order', o.id::text, "
       + lit(created) + " FROM o) SELECT id AS oid FROM o \\gset")
open(f"{d}/insert-floor.sql", "w").write(ins.replace(old, new))
upd = open(f"{d}/update-plain.sql").read().replace("plain.", "floor.")
old = next(l for l in upd.splitlines() if l.startswith("UPDATE "))
new = ("WITH u AS (" + old.rstrip(";") + " RETURNING id) INSERT INTO floor.events (type, entity, key, data) "
       "SELECT 'order.status_updated', 'order', u.id::text, " + lit(status) + " FROM u;")
open(f"{d}/update-floor.sql", "w").write(upd.replace(old, new))
PY
fi

cpu_busy() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; }   # user nice system irq softirq
pg_cpu() {   # clock ticks used by our postmaster and all its children, living and reaped
    local t c
    t=$(awk '{print $14 + $15 + $16 + $17}' "/proc/$PM_PID/stat")
    for c in $(pgrep -P "$PM_PID" || true); do
        t=$((t + $(awk '{print $14 + $15}' "/proc/$c/stat" 2>/dev/null || echo 0)))
    done
    echo "$t"
}
worker_pid() { pgrep -P "$PM_PID" -f 'pg_webhooks worker' | head -n 1; }
proc_cpu() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
reaped_cpu() { awk '{print $16 + $17}' "/proc/$PM_PID/stat"; }
children() { pgrep -P "$PM_PID" | wc -l; }
settle() {   # wait until the run's backends have exited and been reaped (their CPU is then in cutime)
    local last=-1 same=0 cur
    for _ in $(seq 50); do
        cur=$(reaped_cpu)
        if [ "$cur" = "$last" ] && [ "$(children)" -le "$1" ]; then
            same=$((same + 1))
            [ "$same" -lt 3 ] || break
        else
            same=0
        fi
        last=$cur
        sleep 0.1
    done
}
HZ=$(getconf CLK_TCK)
quiet() {   # wait (at most 120 s) until the cluster uses under 0.05 cores for 2 s in a row: work
    # left from the run before (the worker catching up, autovacuum) must not run in the next one
    local last cur calm=0 waited=0
    last=$(pg_cpu)
    while [ "$waited" -lt 120 ]; do
        sleep 1
        waited=$((waited + 1))
        cur=$(pg_cpu)
        if [ $((cur - last)) -lt $((HZ / 20 + 1)) ]; then
            calm=$((calm + 1))
            [ "$calm" -lt 2 ] || break
        else
            calm=0
        fi
        last=$cur
    done
    [ "$waited" -le 2 ] || echo "    (waited ${waited} s for the cluster to be idle before the next run)"
}

RESULTS="$DIR/results.tsv"
: >"$RESULTS"
run_pgbench() {   # workload schema seconds label -> one line in results.tsv (unless warm-up)
    local w=$1 s=$2 secs=$3 label=$4 out="$DIR/pgbench-$1-$2-$4.out"
    if [ $((SECONDS - START + secs + 15)) -gt "$MAX_SECONDS" ]; then
        echo "    $w/$s $label: skipped, BENCH_MAX_SECONDS=$MAX_SECONDS would be exceeded" | tee -a "$DIR/skipped"
        return 0
    fi
    "${SQL[@]}" -c "CHECKPOINT"
    quiet
    local busy0 pg0 busy1 pg1 t0 t1
    local n0 wpid wk0 wk1
    n0=$(children) wpid=$(worker_pid)
    wk0=$(proc_cpu "$wpid")
    t0=$(date +%s%N) busy0=$(cpu_busy) pg0=$(pg_cpu)
    if ! timeout $((secs + 60)) /usr/bin/time -f '%U %S' -o "$out.time" \
        "$BINDIR/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -n -M prepared \
        -c "$CLIENTS" -j "$THREADS" -T "$secs" -f "$DIR/$w-$s.sql" "$DB" >"$out" 2>&1; then
        cat "$out" >&2
        die "pgbench $w/$s failed"
    fi
    settle "$n0"
    t1=$(date +%s%N) busy1=$(cpu_busy) pg1=$(pg_cpu)
    if [ -n "$wpid" ] && [ "$(worker_pid)" = "$wpid" ]; then
        wk1=$(proc_cpu "$wpid")
        wk1=$(awk -v d="$((wk1 - wk0))" -v hz="$HZ" -v s="$(((t1 - t0) / 1000000))" 'BEGIN {printf "%.2f", d / hz / (s / 1000)}')
    else
        wk1="?"
    fi
    local tps n lat failed other
    tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p' "$out")
    n=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out")
    lat=$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' "$out")
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$out")
    [ -n "$tps" ] || { cat "$out" >&2; die "no tps in the pgbench output"; }
    # CPU used during the run by anything other than our cluster and pgbench, in cores.
    other=$(awk -v b="$((busy1 - busy0))" -v p="$((pg1 - pg0))" -v hz="$HZ" -v s="$(((t1 - t0) / 1000000))" \
        '{o = (b - p) / hz - $1 - $2; if (o < 0) o = 0; printf "%.2f", o / (s / 1000)}' "$out.time")
    printf '    %-7s %-8s %-7s %10.1f tps  %8s tx  lat %6s ms  failed %s  worker %s cores  other load %s cores\n' \
        "$w" "$s" "$label" "$tps" "$n" "$lat" "${failed:-0}" "$wk1" "$other"
    if [ "$label" != warmup ]; then
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$w" "$s" "$label" "$tps" "$n" "$lat" "$other" "$wk1" "$FSYNC" >>"$RESULTS"
    else
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$w" "$s" "$label" "$tps" "$n" "$lat" "$other" "$wk1" >>"$DIR/warmup.tsv"
    fi
}

psql_at() { "${SQL[@]}" -At -c "$1"; }
set_fsync() {   # fsync is reloadable, synchronous_commit a session default: no restart
    "${SQL[@]}" -c "ALTER SYSTEM SET fsync = $1" -c "ALTER SYSTEM SET synchronous_commit = $1" \
        -c "SELECT pg_reload_conf()" >/dev/null
    sleep 1
    [ "$(psql_at 'SHOW fsync')" = "$1" ] || die "fsync did not become $1"
    FSYNC=$1
}
run_rounds() {   # all workloads and schemas for the current fsync setting
    local w r s order
    for w in insert update; do
        run_pgbench "$w" plain "$WARMUP" warmup
        run_pgbench "$w" tracked "$WARMUP" warmup
        run_pgbench "$w" outbox "$WARMUP" warmup
        [[ " $SCHEMAS " != *" floor "* ]] || run_pgbench "$w" floor "$WARMUP" warmup
        for r in $(seq 1 "$ROUNDS"); do
            case $((r % 3)) in
                1) order="plain tracked outbox" ;;
                2) order="tracked outbox plain" ;;
                *) order="outbox plain tracked" ;;
            esac
            # The floor right after plain: its per-round ratio to plain pairs two neighbours.
            [[ " $SCHEMAS " != *" floor "* ]] || order=${order/plain/plain floor}
            for s in $order; do
                run_pgbench "$w" "$s" "$DURATION" "round$r"
            done
        done
    done
}
queued() { psql_at "SELECT count(*) FROM webhooks._queue"; }
run_delivering() {   # tracked, with one subscription delivered to the sink during the run
    local w=$1 backlog t0 drained
    run_pgbench "$w" tracked "$DURATION" delivering
    backlog=$(queued)
    # Events the worker has not fanned out yet count as backlog too.
    backlog=$((backlog + $(psql_at "SELECT count(*) FROM webhooks._events e WHERE e.type LIKE 'order.%' AND NOT pg_visible_in_snapshot(e.xid, (SELECT done FROM webhooks._fanout))")))
    t0=$(date +%s%N)
    drained=""
    while [ $(( ($(date +%s%N) - t0) / 1000000000 )) -lt 300 ]; do
        if [ "$(queued)" = 0 ] && [ "$(psql_at "SELECT count(*) FROM webhooks._events e WHERE NOT pg_visible_in_snapshot(e.xid, (SELECT done FROM webhooks._fanout))")" = 0 ]; then
            drained=$(( ($(date +%s%N) - t0) / 1000000 ))
            break
        fi
        sleep 0.1
    done
    [ -n "$drained" ] || { echo "    not drained within 300 s"; drained=-1; }
    printf '%s\t%s\t%s\t%s\n' "$FSYNC" "$w" "$backlog" "$drained" >>"$DIR/delivering.tsv"
    echo "    backlog when the writers stopped: $backlog; drained in $drained ms"
}

say "Load on the machine before the runs"
machine_load
"${SQL[@]}" -c "ALTER SYSTEM SET webhooks.allow_http = on" -c "ALTER SYSTEM SET webhooks.allow_private_network = on" \
    -c "ALTER SYSTEM SET webhooks.concurrency = 32" -c "ALTER SYSTEM SET webhooks.max_in_flight_per_endpoint = 32" \
    -c "SELECT pg_reload_conf()" >/dev/null
: >"$DIR/delivering.tsv"
for f in $FSYNC_LIST; do
    set_fsync "$f"
    say "fsync=$f: pgbench, $CLIENTS clients, $THREADS threads, -M prepared, ${DURATION}s per run, $ROUNDS rounds, plain/tracked/outbox rotated (floor, if measured, right after plain), no subscription"
    run_rounds
    say "fsync=$f: tracked, with one subscription (order.*) delivered to a sink on 127.0.0.1 during the run"
    target/release/examples/sink "$SINK_PORT" >/dev/null 2>&1 &
    SINK_PID=$!
    sleep 0.5
    SUB=$(psql_at "SELECT id FROM webhooks.subscribe('http://127.0.0.1:$SINK_PORT/in', '{order.*}')")
    for w in insert update; do
        run_delivering "$w"
    done
    psql_at "SELECT webhooks.unsubscribe($SUB)" >/dev/null
    kill "$SINK_PID" 2>/dev/null || true
    wait "$SINK_PID" 2>/dev/null || true
    SINK_PID=""
done
say "Load on the machine after the runs"
machine_load

say "Sanity: capture ran (events written; the worker caught up)"
for _ in $(seq 60); do
    [ "$(psql_at "SELECT count(*) FROM webhooks._events e WHERE NOT pg_visible_in_snapshot(e.xid, (SELECT done FROM webhooks._fanout))")" = 0 ] && break
    sleep 0.5
done
"${SQL[@]}" -c "SELECT type, count(*) AS events FROM webhooks._events GROUP BY type ORDER BY type"
read -r EVENTS WAITING DELIVERIES < <("${SQL[@]}" -At -F ' ' -c \
    "SELECT (SELECT count(*) FROM webhooks._events),
            (SELECT count(*) FROM webhooks._events e WHERE NOT pg_visible_in_snapshot(e.xid, (SELECT done FROM webhooks._fanout))),
            (SELECT count(*) FROM webhooks._deliveries)")
TRACKED_INSERT_TX=$(cat "$RESULTS" "$DIR/warmup.tsv" 2>/dev/null | awk -F'\t' '$1 == "insert" && $2 == "tracked" {n += $5} END {print n + 0}')
CREATED=$(psql_at "SELECT count(*) FROM webhooks._events WHERE type = 'order.created'")
echo "    webhooks._events: $EVENTS rows; not yet fanned out: $WAITING; _deliveries: $DELIVERIES"
echo "    order.created events: $CREATED; tracked order-insert transactions committed (pgbench, incl. warm-up): $TRACKED_INSERT_TX"
[ "$EVENTS" -gt 0 ] || die "no events were written: capture did not run"
[ "$CREATED" = "$TRACKED_INSERT_TX" ] || echo "    WARNING: order.created events != tracked insert transactions"
tx_of() {   # transactions pgbench committed for workload $1 on schema $2, warm-ups included
    cat "$RESULTS" "$DIR/warmup.tsv" 2>/dev/null | awk -F'\t' -v w="$1" -v s="$2" '$1 == w && $2 == s {n += $5} END {print n + 0}'
}
# Event rows per tracked status update (no-ops write none, a mapped status two), for the
# floor's line in the result.
TRACKED_UPDATE_TX=$(tx_of update tracked)
UPDATE_EVENTS=$(psql_at "SELECT count(*) FROM webhooks._events WHERE type <> 'order.created'")
ROWS_PER_UPDATE=$(awk -v e="$UPDATE_EVENTS" -v t="$TRACKED_UPDATE_TX" 'BEGIN {if (t > 0) printf "%.2f", e / t; else print "?"}')
echo "    status-update events: $UPDATE_EVENTS from $TRACKED_UPDATE_TX tracked update transactions ($ROWS_PER_UPDATE rows a transaction)"
if [[ " $SCHEMAS " == *" floor "* ]]; then
    read -r FLOOR_C FLOOR_U < <("${SQL[@]}" -At -F ' ' -c \
        "SELECT count(*) FILTER (WHERE type = 'order.created'), count(*) FILTER (WHERE type = 'order.status_updated') FROM floor.events")
    echo "    floor.events: $FLOOR_C order.created rows for $(tx_of insert floor) floor insert transactions, $FLOOR_U status rows for $(tx_of update floor) floor update transactions"
    [ "$FLOOR_C" = "$(tx_of insert floor)" ] && [ "$FLOOR_U" = "$(tx_of update floor)" ] \
        || echo "    WARNING: floor.events does not have one row per floor transaction"
fi
DELIVERED_OK=$(psql_at "SELECT count(*) FROM webhooks._deliveries WHERE status = 'succeeded'")
echo "    deliveries to the sink: $DELIVERED_OK succeeded of $DELIVERIES"

say "Result (medians of $ROUNDS runs of ${DURATION}s; build md5 $SO_MD5)"
ROWS_PER_UPDATE=$ROWS_PER_UPDATE python3 - "$RESULTS" "$DIR/delivering.tsv" "${TARGET_INSERT[on]}" "${TARGET_UPDATE[on]}" "${TARGET_INSERT[off]}" "${TARGET_UPDATE[off]}" <<'PY'
import os, statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
deliv = [l.rstrip("\n").split("\t") for l in open(sys.argv[2]) if l.strip()]
targets = {("on", "insert"): float(sys.argv[3]), ("on", "update"): float(sys.argv[4]),
           ("off", "insert"): float(sys.argv[5]), ("off", "update"): float(sys.argv[6])}
names = {"insert": "order insert (order + 3 items)", "update": "status update (1 UPDATE)"}
titles = {"on": "durable: fsync and synchronous_commit on", "off": "CPU-bound: fsync and synchronous_commit off"}
for f in ("on", "off"):
    fr = [r for r in rows if r[8] == f]
    if not fr:
        continue
    print(f"\n    {titles[f]}")
    print(f"    {'workload':<32} {'plain tps':>10} {'tracked tps':>12} {'ratio':>7} {'outbox tps':>11} {'ratio':>7} {'target':>7}  verdict")
    for w in ("insert", "update"):
        tps = {s: [float(r[3]) for r in fr if r[0] == w and r[1] == s and r[2].startswith("round")] for s in ("plain", "tracked", "outbox")}
        if not all(tps.values()):
            print(f"    {names[w]:<32} (not measured)")
            continue
        p, t, o = (statistics.median(tps[s]) for s in ("plain", "tracked", "outbox"))
        ratio, oratio = t / p, o / p
        tgt = targets[(f, w)]
        verdict = ("meets" if ratio >= tgt else "BELOW") + (", beats outbox" if t > o else ", loses to outbox")
        print(f"    {names[w]:<32} {p:>10.1f} {t:>12.1f} {ratio:>7.3f} {o:>11.1f} {oratio:>7.3f} {'>= ' + str(tgt):>7}  {verdict}")
        print("        runs plain / tracked / outbox: " + " / ".join(" ".join(f"{x:.0f}" for x in tps[s]) for s in ("plain", "tracked", "outbox")))
        # The ratio of each round's two runs (minutes apart, not the run's whole length): on a
        # VM whose speed drifts, rounds on both sides of the target say the verdict above is
        # within this run's noise. The verdict itself stays the ratio of the medians.
        by_round = {(r[1], r[2]): float(r[3]) for r in fr if r[0] == w and r[2].startswith("round")}
        labels = sorted({r[2] for r in fr if r[0] == w and r[2].startswith("round")}, key=lambda l: int(l[5:]))
        rr = [by_round[("tracked", l)] / by_round[("plain", l)] for l in labels
              if ("tracked", l) in by_round and ("plain", l) in by_round]
        if rr:
            print("        tracked / plain, round by round: " + ", ".join(f"{q:.3f}" for q in rr)
                  + (" (rounds on both sides of the target: within this run's noise)" if min(rr) < tgt <= max(rr) else ""))
        fl = [float(r[3]) for r in fr if r[0] == w and r[1] == "floor" and r[2].startswith("round")]
        if fl:
            per_tx = "" if w == "insert" else f", no-ops included; tracked writes {os.environ.get('ROWS_PER_UPDATE', '?')}"
            print(f"        floor (no trigger: the statement itself writes one event row a transaction{per_tx};"
                  f" constant data and id): median "
                  f"{statistics.median(fl):.1f} tps = {statistics.median(fl) / p:.3f} of plain; runs "
                  + " ".join(f"{x:.0f}" for x in fl))
            # Each round's floor ran right after its plain: the pair's ratio, and a floor faster
            # than plain (it does all plain does and more) marked as the machine's noise.
            pairs = []
            for label in sorted({r[2] for r in fr if r[0] == w and r[1] == "floor" and r[2].startswith("round")},
                                key=lambda l: int(l[5:])):
                if ("plain", label) in by_round:
                    q = by_round[("floor", label)] / by_round[("plain", label)]
                    pairs.append(f"{q:.3f}" + (" (above plain: noise)" if q > 1 else ""))
            print("        floor / plain, round by round: " + ", ".join(pairs))
        wk = [float(r[7]) for r in fr if r[0] == w and r[1] == "tracked" and r[2].startswith("round") and r[7] != "?"]
        if wk:
            print(f"        delivery worker CPU during the tracked runs (nothing subscribed): median {statistics.median(wk):.2f} cores (of {os.cpu_count()})")
        d = [r for r in rows if r[8] == f and r[0] == w and r[2] == "delivering"]
        dl = [r for r in deliv if r[0] == f and r[1] == w]
        if d and dl:
            dt = float(d[0][3])
            print(f"        with one subscription delivered to the sink: {dt:.1f} tps = {dt / p:.3f} of plain; "
                  f"worker {d[0][7]} cores; backlog when the writers stopped {dl[0][2]}, "
                  + (f"drained in {int(dl[0][3]) / 1000:.1f} s" if int(dl[0][3]) >= 0 else "NOT drained within 300 s"))
other = [float(r[6]) for r in rows]
if other:
    print(f"\n    other load during the runs (CPU not used by this cluster or pgbench): "
          f"max {max(other):.2f} cores, median {statistics.median(other):.2f} cores")
PY
[ ! -f "$DIR/skipped" ] || echo "    NOTE: some runs were skipped for time (BENCH_MAX_SECONDS)"
echo "    total time after the build: $((SECONDS - START)) s"
