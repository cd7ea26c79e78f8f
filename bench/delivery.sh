#!/usr/bin/env bash
# Delivery benchmark, one command: throughput of signed, logged deliveries to a fast keep-alive
# sink on 127.0.0.1, idle commit-to-receiver latency, and the worker's memory while draining.
# Starts its own throwaway cluster and sink; stops and removes them on exit.
#   bench/delivery.sh            (BENCH_EVENTS=50000 BENCH_LATENCY_SAMPLES=200 to change sizes)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
PG_CONFIG=$(python3 scripts/config.py postgres.pg_config)
BIN=$("$PG_CONFIG" --bindir)
EVENTS=${BENCH_EVENTS:-50000}
SAMPLES=${BENCH_LATENCY_SAMPLES:-200}
PORT=28832
SINK_PORT=28833

cargo pgrx install --release --pg-config "$PG_CONFIG" >/dev/null 2>&1
cargo build --release --example sink 2>/dev/null

DIR=$(mktemp -d /tmp/pg_webhooks_delivery_bench.XXXXXX)
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" -eq 0 ] && chown postgres:postgres "$DIR"
SINK_PID=""
cleanup() {
    [ -n "$SINK_PID" ] && kill "$SINK_PID" 2>/dev/null || true
    as_pg "$BIN/pg_ctl" -D "$DIR/data" stop -m immediate >/dev/null 2>&1 || true
    rm -rf "$DIR"
}
trap cleanup EXIT INT TERM

as_pg "$BIN/initdb" -A trust -U postgres --no-sync -D "$DIR/data" >/dev/null
cat >> "$DIR/data/postgresql.auto.conf" <<CONF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
shared_preload_libraries = 'pg_webhooks'
webhooks.database = 'bench'
webhooks.allow_http = on
webhooks.allow_private_network = on
webhooks.concurrency = 32
webhooks.max_in_flight_per_endpoint = 32
shared_buffers = '512MB'
fsync = off
synchronous_commit = off
CONF
as_pg "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null
target/release/examples/sink "$SINK_PORT" --keep-ids >/dev/null &
SINK_PID=$!
psql_() { "$BIN/psql" -X -q -t -A -h 127.0.0.1 -p "$PORT" -U postgres -v ON_ERROR_STOP=1 "$@"; }
psql_ -d postgres -c "CREATE DATABASE bench"
psql_ -d bench -c "CREATE EXTENSION pg_webhooks"
SUB=$(psql_ -d bench -c "SELECT id FROM webhooks.subscribe('http://127.0.0.1:$SINK_PORT/in')")
echo "build: release $(md5sum "$("$PG_CONFIG" --pkglibdir)/pg_webhooks.so" | cut -c1-12); $(nproc) cores; fsync off"

# Throughput: queue EVENTS deliveries while paused, then time the drain after resume.
psql_ -d bench -c "SELECT webhooks.pause($SUB)" >/dev/null
for _ in $(seq 1 $((EVENTS / 1000))); do
    psql_ -d bench -c "SELECT count(webhooks.emit('bench.tick', jsonb_build_object('n', g, 'total', 59.90), (g % 500)::text)) FROM generate_series(1, 1000) g" >/dev/null
done
until [ "$(psql_ -d bench -c "SELECT count(*) FROM webhooks._queue")" -ge "$EVENTS" ]; do sleep 0.2; done
WORKER=$(psql_ -d bench -c "SELECT pid FROM pg_stat_activity WHERE application_name = 'pg_webhooks worker'")
START=$(date +%s.%N)
psql_ -d bench -c "SELECT webhooks.resume($SUB)" >/dev/null
MAX_RSS=0
while [ "$(psql_ -d bench -c "SELECT count(*) FROM webhooks._queue")" -gt 0 ]; do
    RSS=$(awk '/^RssAnon/ {print $2}' "/proc/$WORKER/status")
    [ "$RSS" -gt "$MAX_RSS" ] && MAX_RSS=$RSS
    sleep 0.2
done
END=$(date +%s.%N)
OK=$(psql_ -d bench -c "SELECT count(*) FROM webhooks.deliveries WHERE status = 'succeeded'")
LOGGED=$(psql_ -d bench -c "SELECT count(*) FROM webhooks.attempts WHERE status_code = 200")
SINK=$(curl -s "http://127.0.0.1:$SINK_PORT/stats" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["requests"], d["last"]-d["first"])')
python3 - "$EVENTS" "$START" "$END" "$OK" "$LOGGED" $SINK "$MAX_RSS" <<'PY'
import sys
events, start, end, ok, logged, sink_n, sink_span, rss = sys.argv[1:9]
wall = float(end) - float(start)
print(f"throughput: {ok} of {events} deliveries succeeded, {logged} attempts logged; "
      f"drain {wall:.2f} s after resume = {int(ok)/wall:,.0f} deliveries/s "
      f"(sink saw {sink_n} requests in {float(sink_span):.2f} s = {int(sink_n)/max(float(sink_span),1e-9):,.0f}/s)")
print(f"worker memory while draining: max RssAnon {int(rss)/1024:.1f} MB")
PY

# Latency: one tracked insert per transaction on an idle system, commit time = event created_at.
psql_ -d bench -c "CREATE TABLE orders (id bigint PRIMARY KEY, status text NOT NULL DEFAULT 'pending'); SELECT webhooks.track('orders')"
for i in $(seq 1 "$SAMPLES"); do
    psql_ -d bench -c "INSERT INTO orders (id) VALUES ($i)"
    sleep 0.02
done
sleep 1
psql_ -d bench -c "COPY (SELECT id, extract(epoch FROM created_at) FROM webhooks.events WHERE type = 'order.created') TO STDOUT" > "$DIR/created.tsv"
curl -s "http://127.0.0.1:$SINK_PORT/stats" > "$DIR/stats.json"
python3 - "$DIR/created.tsv" "$DIR/stats.json" <<'PY'
import json, statistics, sys
created = dict(line.split("\t") for line in open(sys.argv[1]).read().split("\n") if line)
arrivals = json.load(open(sys.argv[2]))["arrivals"]
lat = sorted((arrivals[i] - float(t)) * 1000 for i, t in created.items() if i in arrivals)
p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
print(f"idle commit-to-receiver latency over {len(lat)} transactions: p50 {statistics.median(lat):.2f} ms, "
      f"p95 {p(0.95):.2f} ms, max {lat[-1]:.2f} ms")
PY
