#!/usr/bin/env bash
# What polling webhooks.subscription_health and webhooks.event_stats costs on a server with
# a large delivery history (issue #12: "cheap enough to poll every 10 s with 10 million
# attempts"). One command, prints the figures:
#
#   bench/health.sh
#
# 1. A release build, copied into a private PostgreSQL install tree (bench/lib.sh), and a
#    throwaway cluster (127.0.0.1, port BENCH_PORT, two delivery workers).
# 2. History filled with INSERT ... SELECT generate_series, as the worker would have left it:
#    BENCH_SUBS subscriptions (paused: the worker leaves their queues alone), BENCH_ATTEMPTS
#    attempts (10,000,000) of BENCH_ATTEMPTS/2 deliveries over the last 7 days, and the
#    rollups the worker keeps for them: per subscription and worker a minute row for each of
#    the last 120 minutes and an hour row for each of the last 29 days, with latency
#    histograms of 45 buckets; per event type (BENCH_TYPES) and writer (3) an hour row for each
#    of the last 29 days. A small backlog (100 queued deliveries) for 10 subscriptions.
# 3. EXPLAIN (ANALYZE, BUFFERS) of SELECT * FROM webhooks.subscription_health, and of
#    webhooks.event_stats (the last day, and everything), BENCH_RUNS times each after a warm-up
#    run: the median execution and planning times, and the plan of the last run.
# 4. The same for subscription_health once one subscription has BENCH_BACKLOG (1,000,000)
#    queued deliveries: counting a backlog costs in proportion to it.
# 0. First, the cost on the worker's hot path (BENCH_HOTPATH=0 skips it): BENCH_DRAIN (100,000)
#    events (keys spread over 10,000 orders, ~1 KB) queued for a paused subscription on a
#    keep-alive sink (examples/sink.rs), then drained, with the rollups and without them
#    (_delivery_stats renamed: the worker falls back to the 0.1.0 statements, as with a schema
#    not yet updated; it looks every 10 s, so the script waits 11 s after each switch),
#    alternated, BENCH_DRAIN_ROUNDS (2) rounds each: deliveries/s.
# Everything it starts is stopped and removed on exit.
#
# Knobs: BENCH_PORT (28850), BENCH_SINK_PORT (28851), BENCH_HOTPATH (1), BENCH_DRAIN, BENCH_DRAIN_ROUNDS, BENCH_SUBS (50), BENCH_ATTEMPTS (10000000), BENCH_TYPES (20),
# BENCH_BACKLOG (1000000), BENCH_RUNS (9), BENCH_SKIP_BUILD=1 reuses target/release,
# BENCH_KEEP=1 keeps the temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${BENCH_PORT:-28850}
SUBS=${BENCH_SUBS:-50}
ATTEMPTS=${BENCH_ATTEMPTS:-10000000}
TYPES=${BENCH_TYPES:-20}
BACKLOG=${BENCH_BACKLOG:-1000000}
RUNS=${BENCH_RUNS:-9}
SINK_PORT=${BENCH_SINK_PORT:-28851}
HOTPATH=${BENCH_HOTPATH:-1}
DRAIN=${BENCH_DRAIN:-100000}
DRAIN_ROUNDS=${BENCH_DRAIN_ROUNDS:-2}
DB=bench

say() { printf '\n=== %s\n' "$*"; }
die() { echo "bench: $*" >&2; exit 1; }

PG_CONFIG=$(python3 scripts/config.py postgres.pg_config)
BINDIR=$("$PG_CONFIG" --bindir)
if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
    say "Build (release)"
    timeout 2400 cargo build --release --lib >/dev/null 2>&1 || die "cargo build --release failed"
    [ "$HOTPATH" != 1 ] || timeout 900 cargo build --release --example sink >/dev/null 2>&1 || die "could not build examples/sink.rs"
fi

DIR=$(mktemp -d "${TMPDIR:-/tmp}/pg_webhooks_health_bench.XXXXXX")
chmod 755 "$DIR"
AS=()
[ "$(id -u)" -ne 0 ] || AS=(runuser -u postgres --)   # initdb refuses root
SINK=
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [ -z "$SINK" ] || kill "$SINK" 2>/dev/null || true
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
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then die "port $PORT is in use; set BENCH_PORT"; fi

[ ${#AS[@]} -eq 0 ] || chown postgres "$DIR"
"${AS[@]}" "$BINDIR/initdb" -A trust -U postgres --no-sync -E UTF8 -D "$DIR/data" >/dev/null
cat >"$DIR/data/postgresql.auto.conf" <<CONF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
shared_preload_libraries = 'pg_webhooks'
webhooks.database = '$DB'
webhooks.workers = 2
webhooks.allow_http = on
webhooks.allow_private_network = on
shared_buffers = '1GB'
fsync = off
synchronous_commit = off
max_wal_size = '8GB'
checkpoint_timeout = '30min'
maintenance_work_mem = '512MB'
log_min_messages = warning
CONF
"${AS[@]}" "$BINDIR/pg_ctl" -D "$DIR/data" -p "$PRIV_BIN/postgres" -l "$DIR/server.log" -w -t 60 start >/dev/null ||
    { tail -20 "$DIR/server.log"; die "PostgreSQL did not start"; }
PSQL=("$BINDIR/psql" -X -q -t -A -h 127.0.0.1 -p "$PORT" -U postgres -v ON_ERROR_STOP=1)
"${PSQL[@]}" -d postgres -c "CREATE DATABASE $DB"
q() { "${PSQL[@]}" -d "$DB" -c "$1"; }
q "CREATE EXTENSION pg_webhooks"

say "Machine: $(nproc) cores; $SRC_STATE, .so md5 $SO_MD5"

if [ "$HOTPATH" = 1 ]; then
    if (exec 3<>"/dev/tcp/127.0.0.1/$SINK_PORT") 2>/dev/null; then die "port $SINK_PORT is in use; set BENCH_SINK_PORT"; fi
    target/release/examples/sink "$SINK_PORT" >/dev/null 2>&1 &
    SINK=$!
    say "Worker hot path: $DRAIN queued deliveries drained to a keep-alive sink, with and without the rollups"
    SUB=$(q "SELECT id FROM webhooks.subscribe('http://127.0.0.1:$SINK_PORT/drain')")
    declare -A RATES=([with]="" [without]="")
    for round in $(seq 1 "$DRAIN_ROUNDS"); do
        for variant in with without; do
            if [ "$variant" = without ]; then
                q "ALTER TABLE webhooks._delivery_stats RENAME TO _delivery_stats_off"
            fi
            sleep 11   # the worker looks for the rollups at most every 10 s (queue.rs stats_schema)
            q "SELECT webhooks.pause($SUB)" >/dev/null
            q "SELECT count(webhooks.emit('bench.drain', jsonb_build_object('g', g, 'note', repeat('x', 900)), (g % 10000)::text))
                 FROM generate_series(1, $DRAIN) g" >/dev/null
            until [ "$(q "SELECT count(*) FROM webhooks._queue")" -ge "$DRAIN" ]; do sleep 0.2; done
            t0=$(date +%s.%N)
            q "SELECT webhooks.resume($SUB)" >/dev/null
            while [ "$(q "SELECT count(*) FROM webhooks._queue")" -gt 0 ]; do sleep 0.05; done
            t1=$(date +%s.%N)
            rate=$(python3 -c "print(round($DRAIN / ($t1 - $t0)))")
            RATES[$variant]="${RATES[$variant]} $rate"
            printf '    round %d, %-13s %7d deliveries/s\n' "$round" "$variant rollups:" "$rate"
            if [ "$variant" = without ]; then
                q "ALTER TABLE webhooks._delivery_stats_off RENAME TO _delivery_stats"
            fi
            q "TRUNCATE webhooks._queue, webhooks._deliveries, webhooks._attempts, webhooks._events,
                        webhooks._delivery_stats, webhooks._event_stats"
        done
    done
    med() { tr ' ' '\n' <<<"$1" | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
    echo "    median: with the rollups $(med "${RATES[with]}")/s, without $(med "${RATES[without]}")/s"
    q "SELECT webhooks.unsubscribe($SUB)" >/dev/null
    q "TRUNCATE webhooks._deliveries, webhooks._attempts, webhooks._events, webhooks._delivery_stats, webhooks._event_stats"
fi
say "Filling: $SUBS subscriptions, $ATTEMPTS attempts, rollups"
start=$(date +%s)
q "SELECT count(*) FROM generate_series(1, $SUBS) i,
          LATERAL webhooks.subscribe('http://127.0.0.1:9/hook/' || i, '{bench.*}') s" >/dev/null
q "UPDATE webhooks._subscriptions SET state = 'paused'"
FIRST=$(q "SELECT min(id) FROM webhooks._subscriptions")
LAST=$((FIRST + SUBS - 1))
DELIVERIES=$((ATTEMPTS / 2))
# Deliveries over the last 7 days, two attempts each (a failure, then a success).
q "INSERT INTO webhooks._deliveries (id, event_seq, subscription_id, status, attempts, created_at, delivered_at)
   SELECT i, i, $FIRST + i % $SUBS, 'succeeded', 2,
          now() - interval '7 days' * (1 - i::float8 / $DELIVERIES),
          now() - interval '7 days' * (1 - i::float8 / $DELIVERIES) + interval '5 seconds'
     FROM generate_series(1, $DELIVERIES) i"
q "INSERT INTO webhooks._attempts (delivery_id, attempt, started_at, duration_ms, status_code, response_body, error)
   SELECT d, a, now() - interval '7 days' * (1 - d::float8 / $DELIVERIES) + (a - 1) * interval '5 seconds',
          20 + 200 * random(), CASE a WHEN 1 THEN 500 ELSE 200 END, 'ok', CASE a WHEN 1 THEN 'HTTP 500' END
     FROM generate_series(1, $DELIVERIES) d, generate_series(1, 2) a"
q "SELECT setval(pg_get_serial_sequence('webhooks._deliveries', 'id'), $DELIVERIES)" >/dev/null
# The rollups: what the two workers would have written for that traffic.
HIST="ARRAY(SELECT (random() * 100)::int8 FROM generate_series(1, 45))"
q "INSERT INTO webhooks._delivery_stats (width, bucket, subscription_id, worker, attempts, succeeded, failed, dead, latency_hist)
   SELECT '1 minute', date_trunc('minute', now()) - m * interval '1 minute', s, w, 100, 50, 50, 0, $HIST
     FROM generate_series(0, 119) m, generate_series($FIRST, $LAST) s, generate_series(0, 1) w"
q "INSERT INTO webhooks._delivery_stats (width, bucket, subscription_id, worker, attempts, succeeded, failed, dead, latency_hist)
   SELECT '1 hour', date_trunc('hour', now()) - h * interval '1 hour', s, w, 6000, 3000, 3000, 0, $HIST
     FROM generate_series(0, 29 * 24 - 1) h, generate_series($FIRST, $LAST) s, generate_series(0, 1) w"
q "INSERT INTO webhooks._event_stats (bucket, event_type, worker, emitted, delivered, retried, dead)
   SELECT date_trunc('hour', now()) - h * interval '1 hour', 'bench.type' || t, w, 1000, 900, 90, 1
     FROM generate_series(0, 29 * 24 - 1) h, generate_series(1, $TYPES) t, generate_series(-1, 1) w"
# A small backlog for ten subscriptions.
q "WITH d AS (
       INSERT INTO webhooks._deliveries (event_seq, subscription_id, next_attempt_at)
       SELECT i, $FIRST + i % 10, now() FROM generate_series(1, 1000) i RETURNING id, subscription_id, event_seq)
   INSERT INTO webhooks._queue (delivery_id, subscription_id, event_seq) SELECT id, subscription_id, event_seq FROM d"
q "VACUUM ANALYZE"
echo "    filled in $(( $(date +%s) - start )) s"
q "SELECT '    ' || c.relname || ': ' || to_char(c.reltuples, 'FM999,999,999') || ' rows, ' || pg_size_pretty(pg_total_relation_size(c.oid))
     FROM pg_class c WHERE c.relnamespace = 'webhooks'::regnamespace AND c.relkind = 'r'
      AND c.relname IN ('_attempts', '_deliveries', '_queue', '_delivery_stats', '_event_stats') ORDER BY 1"

# measure LABEL SQL: median execution and planning time of EXPLAIN ANALYZE over RUNS runs.
measure() {
    local label=$1 sql=$2 i out exec plan
    q "EXPLAIN (ANALYZE, BUFFERS) $sql" >/dev/null   # warm-up
    : >"$DIR/exec" ; : >"$DIR/plan"
    for i in $(seq 1 "$RUNS"); do
        out=$(q "EXPLAIN (ANALYZE, BUFFERS) $sql")
        echo "$out" | sed -n 's/^Execution Time: \([0-9.]*\) ms/\1/p' >>"$DIR/exec"
        echo "$out" | sed -n 's/^Planning Time: \([0-9.]*\) ms/\1/p' >>"$DIR/plan"
    done
    echo "$out" >"$DIR/last_plan"
    exec=$(sort -n "$DIR/exec" | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    plan=$(sort -n "$DIR/plan" | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    rows=$(q "SELECT count(*) FROM ($sql) x")
    printf '    %-58s %8.2f ms execution, %6.2f ms planning (median of %d), %s rows\n' "$label" "$exec" "$plan" "$RUNS" "$rows"
}

say "Poll cost (EXPLAIN ANALYZE, median of $RUNS)"
measure "SELECT * FROM webhooks.subscription_health" "SELECT * FROM webhooks.subscription_health"
cp "$DIR/last_plan" "$DIR/health_plan"
measure "webhooks.subscription_health WHERE subscription_id = <one>" "SELECT * FROM webhooks.subscription_health WHERE subscription_id = $((FIRST + 6))"
measure "webhooks.event_stats WHERE hour > now() - '1 day'" "SELECT * FROM webhooks.event_stats WHERE hour > now() - interval '1 day'"
measure "SELECT * FROM webhooks.event_stats (29 days)" "SELECT * FROM webhooks.event_stats"
q "SELECT 'For comparison: the last day from _attempts (README query): ' || round(extract(epoch FROM clock_timestamp() - now()) * 1000) || ' ms'
     FROM (SELECT d.subscription_id, count(*), percentile_cont(0.95) WITHIN GROUP (ORDER BY a.duration_ms)
             FROM webhooks._attempts a JOIN webhooks._deliveries d ON d.id = a.delivery_id
            WHERE a.started_at > now() - interval '24 hours' GROUP BY 1) x LIMIT 1" | sed 's/^/    /'

say "Backlog: one subscription with $BACKLOG queued deliveries"
start=$(date +%s)
q "WITH d AS (
       INSERT INTO webhooks._deliveries (event_seq, subscription_id, next_attempt_at)
       SELECT i, $((FIRST + 10)), now() FROM generate_series(1, $BACKLOG) i RETURNING id, subscription_id, event_seq)
   INSERT INTO webhooks._queue (delivery_id, subscription_id, event_seq) SELECT id, subscription_id, event_seq FROM d"
q "VACUUM ANALYZE webhooks._queue"
echo "    queued in $(( $(date +%s) - start )) s"
measure "SELECT * FROM webhooks.subscription_health" "SELECT * FROM webhooks.subscription_health"
cp "$DIR/last_plan" "$DIR/backlog_plan"
q "SELECT '    backlog ' || backlog || ', oldest queued ' || oldest_queued_age FROM webhooks.subscription_health WHERE subscription_id = $((FIRST + 10))"
start=$(date +%s%N)
q "REINDEX INDEX webhooks._queue_subscription_idx"
echo "    rebuilding _queue_subscription_idx (as the update to 0.2.0 does) over $(q "SELECT count(*) FROM webhooks._queue") queued: $(( ($(date +%s%N) - start) / 1000000 )) ms"

say "Plan of SELECT * FROM webhooks.subscription_health (small backlogs)"
sed 's/^/    /' "$DIR/health_plan"
say "Plan of SELECT * FROM webhooks.subscription_health (one backlog of $BACKLOG)"
sed 's/^/    /' "$DIR/backlog_plan"
