#!/usr/bin/env bash
# Delivery benchmark, one command, every figure of issue #9 with its target, in one run:
#
#   bench/delivery.sh
#
# 1. Throughput of signed, logged deliveries (about 1 KB payloads) from a backlog, for three key
#    shapes (keys spread over 10,000 orders, one hot key, no key), with 1 and 2 delivery
#    workers; beside it, the sink's ceiling measured with a plain HTTP load client (same HTTP
#    library, keep-alive, same concurrency, no database), and the ratio.
# 2. Latency from commit to the receiver reading the request: idle, and at a steady 500 events/s.
# 3. A backlog of BENCH_BIG events (1,000,000: 100,000 orders x 10) for one subscription: rate
#    per 100,000-event window, the workers' peak RssAnon, table and index sizes before and after.
# 4. Fan-out to 50 subscriptions: deliveries/s overall and per subscription.
# 5. Failure isolation: the same with one endpoint answering 500 and one never answering in
#    time (1 s deadline); the other 48 against their healthy rate. Both fan-out runs use the
#    default per-endpoint cap (8); the throughput runs let one endpoint use all 32 threads.
# 6. A long steady run with retention: BENCH_STEADY_RATE events/s (1,000) for
#    BENCH_STEADY_SECONDS (240) to one subscription, webhooks.retention = 20 s; the tables'
#    and indexes' sizes every 15 s, flat when the last is at most 1.2 x the one half-way (and
#    pgbench kept 0.95 of the rate). It runs with the last BENCH_WORKERS and phase 4's cap (8).
#    What retention deletes is reused once autovacuum has vacuumed it, and autovacuum visits a
#    database once a minute (autovacuum_naptime): the sizes grow for the first minute or two,
#    then stay where they are. Half-way through the default run is past that.
#
# A throwaway cluster (127.0.0.1, port BENCH_PORT, fsync and synchronous_commit off: the worker's
# CPU cost, undiluted by WAL flushes; the delivery path has no client waiting on a flush) runs
# a private copy of the release build (bench/lib.sh); a Rust keep-alive sink (examples/sink.rs)
# answers on 127.0.0.1. Everything is stopped and removed on exit.
# Knobs: BENCH_PORT (28832; the sinks use the next two), BENCH_EVENTS per shape (50000),
# BENCH_BIG (1000000), BENCH_WORKERS ("1 2"), BENCH_LATENCY_SAMPLES (200), BENCH_KEEP=1 keeps
# the temp dir, BENCH_SKIP_BUILD=1 uses target/release as it is, BENCH_STEADY_RATE and
# BENCH_STEADY_SECONDS (phase 6; 0 seconds skips it).
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${BENCH_PORT:-28832}
SINK_PORT=$((PORT + 1))
LAT_SINK_PORT=$((PORT + 2))
EVENTS=${BENCH_EVENTS:-50000}
BIG=${BENCH_BIG:-1000000}
WORKERS_LIST=${BENCH_WORKERS:-1 2}
SAMPLES=${BENCH_LATENCY_SAMPLES:-200}
STEADY_RATE=${BENCH_STEADY_RATE:-1000}
STEADY_SECONDS=${BENCH_STEADY_SECONDS:-240}
CONCURRENCY=32
DB=bench

say() { printf '\n=== %s\n' "$*"; }
die() { echo "bench: $*" >&2; exit 1; }

if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
    ./scripts/setup.sh >/dev/null
fi
PG_CONFIG=$(python3 scripts/config.py postgres.pg_config)
BINDIR=$("$PG_CONFIG" --bindir)
if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
    say "Build (release)"
    timeout 1800 cargo build --release --lib >/dev/null 2>&1 || die "cargo build --release failed"
    timeout 900 cargo build --release --example sink --example load >/dev/null 2>&1 || die "could not build examples/sink.rs and examples/load.rs"
fi

DIR=$(mktemp -d "${TMPDIR:-/tmp}/pg_webhooks_delivery_bench.XXXXXX")
chmod 755 "$DIR"
AS=()
[ "$(id -u)" -ne 0 ] || AS=(runuser -u postgres --)   # initdb refuses root
SINKS=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for p in "${SINKS[@]}"; do kill "$p" 2>/dev/null || true; done
    if [ -f "$DIR/data/postmaster.pid" ]; then
        "${AS[@]}" "$BINDIR/pg_ctl" -D "$DIR/data" stop -m immediate -w >/dev/null 2>&1 || true
    fi
    if [ "${BENCH_KEEP:-0}" = 1 ]; then echo "bench: kept $DIR"; else rm -rf "$DIR"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# shellcheck source=bench/lib.sh
. bench/lib.sh
private_tree "$DIR" || die "could not make the private install tree"
for p in "$PORT" "$SINK_PORT" "$LAT_SINK_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then die "port $p is in use; set BENCH_PORT"; fi
done

target/release/examples/sink "$SINK_PORT" >/dev/null 2>&1 &
SINKS+=($!)
target/release/examples/sink "$LAT_SINK_PORT" --keep-ids >/dev/null 2>&1 &
SINKS+=($!)

[ ${#AS[@]} -eq 0 ] || chown postgres "$DIR"
"${AS[@]}" "$BINDIR/initdb" -A trust -U postgres --no-sync -E UTF8 -D "$DIR/data" >/dev/null
cat >"$DIR/data/postgresql.auto.conf" <<CONF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
max_connections = 100
shared_preload_libraries = 'pg_webhooks'
webhooks.database = '$DB'
webhooks.allow_http = on
webhooks.allow_private_network = on
webhooks.concurrency = $CONCURRENCY
webhooks.max_in_flight_per_endpoint = $CONCURRENCY
webhooks.poll_interval = '1s'
shared_buffers = '1GB'
fsync = off
synchronous_commit = off
max_wal_size = '8GB'
checkpoint_timeout = '30min'
jit = off
log_min_messages = warning
CONF
PSQL=("$BINDIR/psql" -X -q -t -A -h 127.0.0.1 -p "$PORT" -U postgres -v ON_ERROR_STOP=1)
q() { "${PSQL[@]}" -d "$DB" -c "$1"; }

start_cluster() {   # start_cluster WORKERS
    "${AS[@]}" "$BINDIR/pg_ctl" -D "$DIR/data" -p "$PRIV_BIN/postgres" -l "$DIR/server.log" \
        -o "-c webhooks.workers=$1" -w -t 60 start >/dev/null || { tail -20 "$DIR/server.log"; die "PostgreSQL did not start"; }
}
wait_workers() {   # wait_workers N: the delivery workers are connected to the database
    for _ in $(seq 1 300); do
        [ "$(q "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pg_webhooks worker%' AND datname = '$DB'")" -ge "$1" ] && return 0
        sleep 0.1
    done
    die "the $1 delivery workers did not start"
}
stop_cluster() { "${AS[@]}" "$BINDIR/pg_ctl" -D "$DIR/data" stop -m fast -w -t 60 >/dev/null; }
worker_pids() { q "SELECT string_agg(pid::text, ' ') FROM pg_stat_activity WHERE application_name LIKE 'pg_webhooks worker%'"; }
# Sum of the workers' RssAnon, in kB.
rss_anon() { local t=0 p r; for p in $1; do r=$(awk '/^RssAnon/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0); t=$((t + ${r:-0})); done; echo "$t"; }
sink_count() { curl -s "http://127.0.0.1:$SINK_PORT/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"])'; }
# Empty history, queue and subscriptions between phases (the stream position stays valid).
reset() {
    # One subscription a transaction: unsubscribing many in one, while the workers record
    # outcomes of several of them, can deadlock with a record (each locks its subscriptions'
    # queue rows, then the subscriptions, in its own order).
    local id
    for id in $(q "SELECT id FROM webhooks._subscriptions ORDER BY id"); do
        q "SELECT webhooks.unsubscribe($id)" >/dev/null
    done
    # TRUNCATE takes its tables in the order listed; a worker's claim, running meanwhile, takes
    # _events before _queue (its plan's order): either can be the other's deadlock. A deadlock
    # aborts one of the two, so the TRUNCATE goes again if it was the one.
    local try
    for try in 1 2 3 4 5; do
        if q "TRUNCATE webhooks._queue, webhooks._deliveries, webhooks._attempts, webhooks._events" >/dev/null 2>"$DIR/truncate.err"; then
            break
        fi
        grep -q "deadlock detected" "$DIR/truncate.err" && [ "$try" -lt 5 ] || { cat "$DIR/truncate.err" >&2; die "TRUNCATE failed"; }
        echo "  (the reset's TRUNCATE deadlocked with a worker; again)"
        sleep 0.5
    done
    q "VACUUM ANALYZE webhooks._queue" >/dev/null
}
# emit N events for KEY (an SQL expression of g), in transactions of 2,000 (emit takes a lock per
# distinct key, held to commit: the lock table bounds the keys of one transaction); ~1 KB of data.
emit() {
    local n=$1 key=$2 done=0 chunk
    while [ "$done" -lt "$n" ]; do
        chunk=$((n - done < 2000 ? n - done : 2000))
        q "SELECT count(webhooks.emit('order.updated',
                   jsonb_build_object('order_id', g, 'status', 'paid', 'total', 59.90, 'note', repeat('x', 900)),
                   $key)) FROM generate_series($done + 1, $done + $chunk) g" >/dev/null
        done=$((done + chunk))
    done
}
wait_queued() { until [ "$(q "SELECT count(*) FROM webhooks._queue")" -ge "$1" ]; do sleep 0.2; done; }

say "Machine: $(nproc) cores; build: release pg_webhooks.so md5 $SO_MD5 ($SRC_STATE); fsync off"
RESULTS="$DIR/results"
: >"$RESULTS"
record() { echo "$*" >>"$RESULTS"; }

# --- 1. Sink ceiling: a plain load client, same concurrency, ~1 KB bodies.
CEILING=$(target/release/examples/load "http://127.0.0.1:$SINK_PORT/load" "$CONCURRENCY" 5 1100 | sed -n 's/.*per_second=\([0-9]*\).*/\1/p')
ONE=$(target/release/examples/load "http://127.0.0.1:$SINK_PORT/load" 1 3 1100 | sed -n 's/.*per_second=\([0-9]*\).*/\1/p')
echo "sink ceiling (plain HTTP load client, $CONCURRENCY keep-alive connections, 1.1 KB bodies, no database): $CEILING requests/s"
echo "  over one connection, one request at a time (what one ordering key can get, in order): $ONE requests/s"
record "ceiling $CEILING"
record "ceiling1 $ONE"

# --- 1. Throughput per key shape and number of workers.
FIRST=1
for W in $WORKERS_LIST; do
    start_cluster "$W"
    if [ "$FIRST" = 1 ]; then
        "${PSQL[@]}" -d postgres -c "CREATE DATABASE $DB"
        q "CREATE EXTENSION pg_webhooks"
        FIRST=0
    fi
    wait_workers "$W"
    say "Throughput: $EVENTS events queued while paused, then drained; $W worker(s)"
    for SHAPE in spread hot none; do
        case $SHAPE in spread) KEY="(g % 10000)::text" ;; hot) KEY="'hot'" ;; none) KEY="NULL" ;; esac
        reset
        SUB=$(q "SELECT id FROM webhooks.subscribe('http://127.0.0.1:$SINK_PORT/t')")
        q "SELECT webhooks.pause($SUB)" >/dev/null
        emit "$EVENTS" "$KEY"
        wait_queued "$EVENTS"
        START=$(date +%s.%N)
        q "SELECT webhooks.resume($SUB)" >/dev/null
        while [ "$(q "SELECT count(*) FROM webhooks._queue")" -gt 0 ]; do sleep 0.05; done
        END=$(date +%s.%N)
        OK=$(q "SELECT count(*) FROM webhooks._deliveries WHERE status = 'succeeded'")
        LOGGED=$(q "SELECT count(*) FROM webhooks._attempts WHERE status_code = 200")
        RATE=$(python3 -c "print(round($OK / ($END - $START)))")
        printf '  %-7s %d of %d succeeded, %d attempts logged, %.2f s: %d deliveries/s (target >= 10,000; %.2f of the sink ceiling)\n' \
            "$SHAPE" "$OK" "$EVENTS" "$LOGGED" "$(python3 -c "print($END - $START)")" "$RATE" "$(python3 -c "print($RATE / $CEILING)")"
        record "throughput $W $SHAPE $RATE $OK $EVENTS"
    done
    [ "$W" = "${WORKERS_LIST##* }" ] || stop_cluster
done

# --- 2. Latency, commit to the receiver reading the request (event created_at is taken in the
# committing transaction; with fsync off the commit itself takes microseconds).
reset
SUB=$(q "SELECT id FROM webhooks.subscribe('http://127.0.0.1:$LAT_SINK_PORT/lat')")
say "Latency: idle ($SAMPLES single events 20 ms apart) and steady (500 events/s for 20 s)"
# One session (a warm backend, as an application's pool has), an event per transaction, 20 ms
# apart; the event's created_at is taken in the transaction, a few microseconds before its commit.
for i in $(seq 1 "$SAMPLES"); do
    echo "SELECT webhooks.emit('bench.idle', jsonb_build_object('i', $i, 'note', repeat('x', 900)), '$i');"
    echo "SELECT pg_sleep(0.02);"
done | "${PSQL[@]}" -d "$DB" >/dev/null
cat >"$DIR/steady.sql" <<'SQL'
\set n random(1, 10000)
SELECT webhooks.emit('bench.steady', jsonb_build_object('order_id', :n, 'note', repeat('x', 900)), :n::text);
SQL
"$BINDIR/pgbench" -n -h 127.0.0.1 -p "$PORT" -U postgres -c 4 -j 2 -R 500 -T 20 -f "$DIR/steady.sql" "$DB" >"$DIR/steady.out" 2>&1 ||
    { cat "$DIR/steady.out"; die "pgbench failed"; }
sleep 2
q "COPY (SELECT id, type, extract(epoch FROM created_at) FROM webhooks._events WHERE type IN ('bench.idle', 'bench.steady')) TO STDOUT" >"$DIR/created.tsv"
curl -s "http://127.0.0.1:$LAT_SINK_PORT/stats" >"$DIR/lat.json"
python3 - "$DIR/created.tsv" "$DIR/lat.json" "$RESULTS" <<'PY'
import json, sys
arrivals = json.load(open(sys.argv[2]))["arrivals"]
lat = {"bench.idle": [], "bench.steady": []}
missing = 0
for line in open(sys.argv[1]):
    i, t, c = line.rstrip("\n").split("\t")
    if i in arrivals:
        lat[t].append((arrivals[i] - float(c)) * 1000)
    else:
        missing += 1
def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]
out = open(sys.argv[3], "a")
for t, targets in (("bench.idle", "p50 <= 1 ms"), ("bench.steady", "p50 <= 5 ms, p99 <= 50 ms")):
    xs = lat[t]
    print(f"  {t[6:]:7s} {len(xs)} events: p50 {pct(xs, .5):.2f} ms, p99 {pct(xs, .99):.2f} ms, max {max(xs):.2f} ms (target {targets})")
    out.write(f"latency {t[6:]} {pct(xs, .5):.3f} {pct(xs, .99):.3f}\n")
if missing:
    print(f"  {missing} events were not received")
PY

# --- 3. A large backlog for one subscription.
reset
say "Backlog: $BIG events ($((BIG / 10)) orders x 10), one subscription, queued while paused, then drained"
SUB=$(q "SELECT id FROM webhooks.subscribe('http://127.0.0.1:$SINK_PORT/big')")
q "SELECT webhooks.pause($SUB)" >/dev/null
emit "$BIG" "(g % $((BIG / 10)))::text"
wait_queued "$BIG"
SIZES="SELECT string_agg(format('%s %s', c.relname, pg_size_pretty(pg_relation_size(c.oid))), ', ' ORDER BY c.relname)
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'webhooks' AND c.relkind IN ('r', 'i') AND c.relname ~ '^_(events|deliveries|queue|attempts)'"
echo "  sizes before: $(q "$SIZES")"
PIDS=$(worker_pids)
BASE=$(sink_count)
START=$(date +%s.%N)
q "SELECT webhooks.resume($SUB)" >/dev/null
MAX_RSS=0
python3 - "$SINK_PORT" "$BIG" "$BASE" "$START" >"$DIR/windows.txt" <<'PY' &
import json, sys, time, urllib.request
port, big, base, start = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
window = 100_000
marks, last = [start], start
deadline = time.time() + 1800
while time.time() < deadline:
    n = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/stats"))["requests"] - base
    now = time.time()
    while len(marks) <= n // window and len(marks) <= big // window:
        marks.append(now)
    if n >= big:
        break
    time.sleep(0.1)
rates = [window / (b - a) for a, b in zip(marks, marks[1:])]
for i, r in enumerate(rates):
    print(f"  window {i + 1:2d} ({i * window:>9,}-{(i + 1) * window:>9,}): {r:,.0f} deliveries/s")
if rates:
    print(f"windows {min(rates):.0f} {max(rates):.0f}")
PY
WATCH=$!
while kill -0 "$WATCH" 2>/dev/null; do
    R=$(rss_anon "$PIDS"); [ "$R" -gt "$MAX_RSS" ] && MAX_RSS=$R
    sleep 0.2
done
wait "$WATCH" || true
END=$(date +%s.%N)
echo "  sizes after:  $(q "$SIZES")"
grep -v '^windows' "$DIR/windows.txt" || true
echo "  workers' peak RssAnon while draining: $((MAX_RSS / 1024)) MB (target <= 100 MB); drained in $(python3 -c "print(round($END - $START, 1))") s"
record "big_rss_mb $((MAX_RSS / 1024))"
grep '^windows' "$DIR/windows.txt" >>"$RESULTS" || true

# --- 4 and 5. Fan-out to 50 subscriptions, healthy and with two bad endpoints.
fan_out() {   # fan_out LABEL EVENTS BAD(0|1)
    local label=$1 n=$2 bad=$3 i url
    reset
    for i in $(seq 1 50); do
        url="http://127.0.0.1:$SINK_PORT/$label$i"
        if [ "$bad" = 1 ] && [ "$i" = 1 ]; then url="http://127.0.0.1:$SINK_PORT/fail$label"; fi
        if [ "$bad" = 1 ] && [ "$i" = 2 ]; then url="http://127.0.0.1:$SINK_PORT/hang$label"; fi
        q "SELECT webhooks.pause(id) FROM webhooks.subscribe('$url', timeout => '1 second', retry_schedule => '1s,1s,1s')" >/dev/null
    done
    emit "$n" "(g % 10000)::text"
    wait_queued $((n * 50))
    local start end
    start=$(date +%s.%N)
    q "SELECT count(webhooks.resume(id)) FROM webhooks._subscriptions" >/dev/null
    # Done when every healthy subscription has all its deliveries.
    until [ "$(q "SELECT count(*) FROM webhooks._deliveries WHERE status = 'succeeded'")" -ge $((n * (bad == 1 ? 48 : 50))) ]; do sleep 0.1; done
    end=$(date +%s.%N)
    curl -s "http://127.0.0.1:$SINK_PORT/stats" >"$DIR/fan_$label.json"
    python3 - "$DIR/fan_$label.json" "$label" "$n" "$start" "$end" "$RESULTS" "$bad" <<'PY'
import json, statistics, sys
stats, label, n, start, end, results, bad = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), sys.argv[6], sys.argv[7] == "1"
paths = json.load(open(stats))["paths"]
# Per subscription: its deliveries over the time from resume to its last one.
rates = {p: v[0] / (v[2] - start) for p, v in paths.items() if p.startswith("/" + label) and v[0] >= n}
mean = statistics.mean(rates.values())
spread = max(abs(r / mean - 1) for r in rates.values())
total = n * len(rates) / (end - start)
print(f"  {label}: {len(rates)} healthy subscriptions x {n} events: {total:,.0f} deliveries/s overall; "
      f"per subscription mean {mean:,.0f}/s, min {min(rates.values()):,.0f}, max {max(rates.values()):,.0f} "
      f"(within {spread * 100:.1f}% of the mean; target 10%)")
for p in ("/fail" + label, "/hang" + label):
    if p in paths:
        print(f"    {p}: {paths[p][0]} attempts reached the sink")
open(results, "a").write(f"fanout {label} {total:.0f} {mean:.1f} {spread:.4f}\n")
PY
}
FAN_EVENTS=$((EVENTS / 25))
# With 50 endpoints, the cap they would run with: 8 of the 32 requests in flight each (the
# default), so that a hanging endpoint holds 8 threads, not all of them.
q "ALTER SYSTEM SET webhooks.max_in_flight_per_endpoint = 8" >/dev/null
q "SELECT pg_reload_conf()" >/dev/null
sleep 1
say "Fan-out: $FAN_EVENTS events to 50 subscriptions ($((FAN_EVENTS * 50)) deliveries)"
fan_out healthy "$FAN_EVENTS" 0
say "Failure isolation: the same, with one endpoint answering 500 and one never answering (1 s deadline)"
fan_out isolated "$FAN_EVENTS" 1

# --- 6. A long steady run with retention: history older than 20 s is deleted as it is made.
if [ "$STEADY_SECONDS" -gt 0 ]; then
    [ "$STEADY_SECONDS" -ge 30 ] || die "BENCH_STEADY_SECONDS must be 0 (skip) or at least 30 (two samples)"
    reset
    q "ALTER SYSTEM SET webhooks.retention = '20 seconds'" >/dev/null
    q "SELECT pg_reload_conf()" >/dev/null
    SUB=$(q "SELECT id FROM webhooks.subscribe('http://127.0.0.1:$SINK_PORT/steady')")
    say "Steady with retention: $STEADY_RATE events/s for $STEADY_SECONDS s, webhooks.retention = 20 s, sizes every 15 s"
    TOTAL="SELECT pg_catalog.sum(pg_catalog.pg_relation_size(c.oid))
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'webhooks' AND c.relkind IN ('r', 'i') AND c.relname ~ '^_(events|deliveries|queue|attempts)'"
    # Live and dead rows, and (auto)vacuums so far, of the history tables: whether what
    # retention deletes is reclaimed.
    VACUUMS="SELECT string_agg(format('%s %s live %s dead %s vacuums', relname, n_live_tup, n_dead_tup,
                                      vacuum_count + autovacuum_count), ', ' ORDER BY relname)
               FROM pg_stat_user_tables WHERE schemaname = 'webhooks' AND relname IN ('_events', '_deliveries', '_attempts')"
    cat >"$DIR/retained.sql" <<'SQL'
\set n random(1, 10000)
SELECT webhooks.emit('order.updated', jsonb_build_object('order_id', :n, 'status', 'paid', 'note', repeat('x', 900)), :n::text);
SQL
    "$BINDIR/pgbench" -n -h 127.0.0.1 -p "$PORT" -U postgres -c 4 -j 2 -R "$STEADY_RATE" -T "$STEADY_SECONDS" \
        -f "$DIR/retained.sql" "$DB" >"$DIR/retained.out" 2>&1 &
    BENCH_PID=$!
    : >"$DIR/sizes.txt"
    T=0
    while [ "$T" -lt "$STEADY_SECONDS" ]; do
        sleep 15
        T=$((T + 15))
        printf '  %4d s: %s; total %s bytes; %s queued; %s\n' "$T" "$(q "$SIZES")" "$(q "$TOTAL")" \
            "$(q "SELECT count(*) FROM webhooks._queue")" "$(q "$VACUUMS")"
        echo "$T $(q "$TOTAL")" >>"$DIR/sizes.txt"
    done
    wait "$BENCH_PID" || { cat "$DIR/retained.out"; die "pgbench failed"; }
    TPS=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$DIR/retained.out" | head -1)
    echo "  pgbench: ${TPS:-?} events/s of $STEADY_RATE"
    python3 - "$DIR/sizes.txt" "$RESULTS" "${TPS:-0}" "$STEADY_RATE" <<'PY'
import sys
rows = [tuple(map(int, l.split())) for l in open(sys.argv[1]) if l.strip()]
mid = rows[(len(rows) - 1) // 2]
last = rows[-1]
print(f"  total at {mid[0]} s {mid[1]:,} bytes, at {last[0]} s {last[1]:,} bytes: {last[1] / mid[1]:.2f} x")
open(sys.argv[2], "a").write(f"retained {mid[0]} {mid[1]} {last[0]} {last[1]} {float(sys.argv[3]):.0f} {sys.argv[4]}\n")
PY
    q "ALTER SYSTEM RESET webhooks.retention" >/dev/null
    q "SELECT pg_reload_conf()" >/dev/null
fi

say "Summary (targets of issue #9)"
python3 - "$RESULTS" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1])]
get = lambda k: [r for r in rows if r[0] == k]
ceiling = float(get("ceiling")[0][1])
ok = True
def line(text, met):
    global ok
    ok &= met
    print(f"  [{'met' if met else 'NOT met'}] {text}")
one = float(get("ceiling1")[0][1])
for r in get("throughput"):
    rate = float(r[3])
    extra = f"; {rate / one:.2f} of one connection's {one:,.0f}/s" if r[2] == "hot" else ""
    line(f"throughput, {r[1]} worker(s), {r[2]:6s}: {rate:,.0f}/s >= 10,000 (ratio to the sink ceiling {rate / ceiling:.2f}{extra})", rate >= 10000 and r[4] == r[5])
for r in get("latency"):
    p50, p99 = float(r[2]), float(r[3])
    if r[1] == "idle":
        line(f"idle latency p50 {p50:.2f} ms <= 1 ms", p50 <= 1)
    else:
        line(f"latency at 500 events/s: p50 {p50:.2f} ms <= 5 ms, p99 {p99:.2f} ms <= 50 ms", p50 <= 5 and p99 <= 50)
for r in get("windows"):
    line(f"backlog rate per 100,000-event window: min {float(r[1]):,.0f}/s, max {float(r[2]):,.0f}/s (flat: min >= 0.8 x max)", float(r[1]) >= 0.8 * float(r[2]))
for r in get("big_rss_mb"):
    line(f"workers' peak RssAnon {r[1]} MB <= 100 MB", int(r[1]) <= 100)
fan = {r[1]: r for r in get("fanout")}
if "healthy" in fan:
    line(f"fan-out to 50: each subscription within {float(fan['healthy'][4]) * 100:.1f}% of the mean <= 10%", float(fan["healthy"][4]) <= 0.10)
if "healthy" in fan and "isolated" in fan:
    ratio = float(fan["isolated"][3]) / float(fan["healthy"][3])
    line(f"failure isolation: the 48 healthy keep {ratio:.2f} of their healthy rate >= 0.9", ratio >= 0.9)
for r in get("retained"):
    ratio = int(r[4]) / int(r[2])
    line(f"steady run with retention at {r[5]} of {r[6]} events/s: sizes {ratio:.2f} x from {r[1]} s to {r[3]} s (flat: <= 1.2, rate >= 0.95)",
         ratio <= 1.2 and int(r[5]) >= 0.95 * int(r[6]))
print("  all targets met" if ok else "  some targets NOT met")
PY
