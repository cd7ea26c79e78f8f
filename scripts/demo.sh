#!/usr/bin/env bash
# The README's demo: set up, build and install pg_webhooks, start a throwaway cluster and a
# verifying webhook receiver, let an "application" write orders, then show what was
# delivered, how (attempts, retries) and whether every signature verified. Everything it
# starts is stopped and removed on exit (also on Ctrl-C or failure). Reads pgrx.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n=== %s\n' "$*"; }
die() { echo "demo: $*" >&2; exit 1; }
cfg() { python3 scripts/config.py "$1"; }

say "Setup (packages, cargo-pgrx, Python standardwebhooks)"
./scripts/setup.sh
PG_CONFIG=$(cfg postgres.pg_config)
PORT=$(cfg demo.port)
RPORT=$(cfg demo.receiver_port)
DB=$(cfg demo.database)
BINDIR=$("$PG_CONFIG" --bindir)

say "Build and install the extension into $("$PG_CONFIG" --pkglibdir)"
if [ "$(id -u)" -eq 0 ]; then
    cargo pgrx install --pg-config "$PG_CONFIG"
    AS=(runuser -u postgres --)   # initdb refuses root: the cluster runs as postgres
else
    cargo pgrx install --pg-config "$PG_CONFIG" --sudo
    AS=()                         # a normal user runs the cluster as itself
fi

for p in "$PORT" "$RPORT"; do    # fixed ports (pgrx.toml [demo]): fail clearly if taken
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
        die "port $p is already in use (another demo running?); change [demo] in pgrx.toml"
    fi
done

DIR=$(mktemp -d "${TMPDIR:-/tmp}/pg_webhooks_demo.XXXXXX")
RECEIVER_PID=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -f "$DIR/data/postmaster.pid" ]; then
        "${AS[@]}" "$BINDIR/pg_ctl" -D "$DIR/data" stop -m fast -w >/dev/null 2>&1 || true
    fi
    if [ -n "$RECEIVER_PID" ]; then
        kill "$RECEIVER_PID" 2>/dev/null || true
        wait "$RECEIVER_PID" 2>/dev/null || true
    fi
    rm -rf "$DIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "demo: interrupted" >&2; exit 130' INT TERM
[ ${#AS[@]} -eq 0 ] || chown postgres:postgres "$DIR"

say "Throwaway cluster in $DIR (port $PORT, database $DB)"
"${AS[@]}" "$BINDIR/initdb" -A trust -U postgres --no-sync -E UTF8 -D "$DIR/data" >/dev/null
{
    echo "port = $PORT"
    echo "listen_addresses = '127.0.0.1'"
    echo "unix_socket_directories = '$DIR'"
    echo "shared_preload_libraries = 'pg_webhooks'"
    cfg demo.settings
} >"$DIR/data/postgresql.auto.conf"   # initdb created it, so it keeps its owner
sed 's/^/    /' "$DIR/data/postgresql.auto.conf"
if ! "${AS[@]}" "$BINDIR/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 start >/dev/null; then
    tail -n 20 "$DIR/server.log" >&2 || true
    die "PostgreSQL did not start (server log above)"
fi
PSQL=("$BINDIR/psql" -X -q -h "$DIR" -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -P pager=off)
"${PSQL[@]}" -d postgres -c "CREATE DATABASE $DB"   # the worker waits for it to exist
SQL=("${PSQL[@]}" -d "$DB")

say "Webhook receiver on 127.0.0.1:$RPORT (tests/receiver.py, verifies signatures)"
python3 tests/receiver.py --port "$RPORT" --quiet >"$DIR/receiver.log" 2>&1 &
RECEIVER_PID=$!
RECV="http://127.0.0.1:$RPORT"
for _ in $(seq 100); do
    curl -fsS "$RECV/_health" >/dev/null 2>&1 && break
    kill -0 "$RECEIVER_PID" 2>/dev/null || { cat "$DIR/receiver.log" >&2; die "the receiver exited"; }
    sleep 0.2
done
curl -fsS "$RECV/_health" >/dev/null || die "the receiver did not answer on port $RPORT"

say "Install the extension, create the shop's tables and track them"
"${SQL[@]}" -e <<'SQL'
CREATE EXTENSION pg_webhooks;
CREATE TABLE orders (id bigint PRIMARY KEY, customer text, status text NOT NULL DEFAULT 'pending', total numeric);
CREATE TABLE order_items (id bigserial PRIMARY KEY, order_id bigint REFERENCES orders ON DELETE CASCADE, sku text, qty int);
SELECT webhooks.track('orders', status_column => 'status',
                      children => '{"items": {"table": "order_items", "foreign_key": "order_id"}}') \gset
SQL

say "Subscribe two endpoints (each secret is returned once; only a prefix is shown)"
read -r ERP_ID ERP_SECRET < <("${SQL[@]}" -At -F ' ' -c \
    "SELECT id, secret FROM webhooks.subscribe('$RECV/erp', '{*}', description => 'ERP: every event')")
read -r WH_ID WH_SECRET < <("${SQL[@]}" -At -F ' ' -c \
    "SELECT id, secret FROM webhooks.subscribe('$RECV/warehouse', '{order.paid,order.shipped,order.cancelled}',
        description => 'Warehouse: fulfilment events', signature => 'hex', signature_header => 'X-Warehouse-Signature')")
[ -n "${ERP_SECRET:-}" ] && [ -n "${WH_SECRET:-}" ] || die "subscribe returned no secret"
echo "    #$ERP_ID $RECV/erp        all events ({*}), Standard Webhooks signature, secret ${ERP_SECRET:0:10}…"
echo "    #$WH_ID $RECV/warehouse  order.paid/shipped/cancelled, hex signature in X-Warehouse-Signature, secret ${WH_SECRET:0:10}…"

# The receiver verifies with the same secrets; /warehouse fails twice first (503 with
# Retry-After: 1, then 500) so retries show up. Secrets go on stdin, not the command line.
control() { curl -fsS -H 'content-type: application/json' --data-binary @- "$RECV/_control/endpoint" >/dev/null; }
control <<<"{\"path\": \"/erp\", \"secret\": \"$ERP_SECRET\"}"
control <<<"{\"path\": \"/warehouse\", \"secret\": \"$WH_SECRET\", \"style\": \"hex\",
             \"header\": \"X-Warehouse-Signature\", \"responses\": [503, 500], \"retry_after\": \"1\"}"
echo "    receiver: /erp verifies Standard Webhooks; /warehouse verifies hex and answers 503, 500, then 200"

say "The application writes orders (plain SQL; no webhook code in the application)"
"${SQL[@]}" -a <<SQL
-- orders 1 and 2 with their items, one transaction each; order 3 without items
BEGIN;
INSERT INTO orders (id, customer, total) VALUES (1, 'Ada Lovelace', 59.90);
INSERT INTO order_items (order_id, sku, qty) VALUES (1, 'A-1', 2), (1, 'B-7', 1);
COMMIT;
BEGIN;
INSERT INTO orders (id, customer, total) VALUES (2, 'Grace Hopper', 120.00);
INSERT INTO order_items (order_id, sku, qty) VALUES (2, 'C-3', 4);
COMMIT;
INSERT INTO orders (id, customer, total) VALUES (3, 'Alan Turing', 15.00);
-- order 1: pending -> paid -> shipped in separate transactions (one event pair each)
UPDATE orders SET status = 'paid' WHERE id = 1;
UPDATE orders SET status = 'shipped' WHERE id = 1;
-- order 2: pending -> paid -> shipped in ONE transaction (net effect: pending -> shipped)
BEGIN;
UPDATE orders SET status = 'paid' WHERE id = 2;
UPDATE orders SET status = 'shipped' WHERE id = 2;
COMMIT;
UPDATE orders SET status = 'cancelled' WHERE id = 3;
-- any other event, and a test delivery to the ERP endpoint
SELECT webhooks.emit('inventory.adjusted', '{"sku": "A-1", "delta": -2}', 'A-1') AS event_id;
SELECT webhooks.send_test($ERP_ID) AS test_delivery_id;
SQL

say "Waiting for the background worker to deliver everything (at most 60 s)"
# Done when every event has been fanned out (/erp takes '*', so each has a delivery) and no
# delivery is still pending or retrying.
OPEN_SQL="SELECT (SELECT count(*) FROM webhooks.events e
                   WHERE NOT EXISTS (SELECT 1 FROM webhooks.deliveries d WHERE d.event_id = e.id))
               + (SELECT count(*) FROM webhooks.deliveries WHERE status IN ('pending', 'retrying'))"
start=$SECONDS
while :; do
    open=$("${SQL[@]}" -At -c "$OPEN_SQL")
    if [ "$open" -eq 0 ]; then echo "    all delivered after $((SECONDS - start)) s"; break; fi
    if [ $((SECONDS - start)) -ge 60 ]; then echo "    timed out: $open still open"; break; fi
    sleep 0.5
done

say "What the receiver got (GET /_log), in arrival order"
# Prints one line per request, then a last line "<requests> <verified>" for the summary.
recv=$(python3 - "$RECV" <<'PY'
import json, sys, urllib.request
log = json.load(urllib.request.urlopen(sys.argv[1] + "/_log"))
t0 = log[0]["received_at"] if log else 0
print(f"{'#':>3} {'at':>6}  {'path':<11} {'type':<22} {'webhook-id':<36} answer verified")
for r in log:
    typ = (r["json"] or {}).get("type", "?")
    ok = {True: "true", False: "FALSE", None: "-"}[r["verified"]]
    print(f"{r['seq']:>3} {r['received_at'] - t0:>5.1f}s  {r['path']:<11} {typ:<22} "
          f"{r['headers'].get('webhook-id', '-'):<36} {r['status']:>6} {ok}"
          + (f"  ({r['verify_error']})" if r["verify_error"] else ""))
# One request in full: the net effect of order 2's single transaction, as the ERP saw it.
for r in log:
    if r["path"] == "/erp" and (r["json"] or {}).get("type") == "order.status_updated" \
            and r["json"]["data"].get("id") == 2:
        print("\nPOST /erp, order 2 (pending -> paid -> shipped in one transaction):")
        for h in ("webhook-id", "webhook-timestamp", "webhook-signature"):
            print(f"  {h}: {r['headers'].get(h, '-')[:60]}")
        print("  body, byte for byte: " + r["body"])
        break
print(len(log), sum(r["verified"] is True for r in log))
PY
)
printf '%s\n' "${recv%$'\n'*}"
read -r REQUESTS VERIFIED <<<"${recv##*$'\n'}"

say "webhooks.events: one row per committed change, in commit order"
"${SQL[@]}" -c "SELECT type, key, data->>'previous_status' AS previous_status, data->>'status' AS status,
                       jsonb_array_length(data->'items') AS items
                  FROM webhooks.events ORDER BY seq"
say "webhooks.deliveries: one row per event x subscription"
"${SQL[@]}" -c "SELECT id, subscription_id, event_type, event_key, status, attempts, last_status_code, last_error
                  FROM webhooks.deliveries ORDER BY id"
say "webhooks.attempts of the warehouse subscription (#$WH_ID): every HTTP attempt"
"${SQL[@]}" -c "SELECT a.delivery_id, d.event_type, d.event_key, a.attempt, a.status_code,
                       round(a.duration_ms::numeric, 1) AS duration_ms, a.error
                  FROM webhooks.attempts a JOIN webhooks.deliveries d ON d.id = a.delivery_id
                 WHERE d.subscription_id = $WH_ID ORDER BY a.delivery_id, a.attempt"
say "webhooks.subscriptions (no secrets in here)"
"${SQL[@]}" -c "SELECT id, url, event_types, active, signature, signature_header, description
                  FROM webhooks.subscriptions ORDER BY id"

read -r DELIVERIES SUCCEEDED < <("${SQL[@]}" -At -F ' ' -c \
    "SELECT count(*), count(*) FILTER (WHERE status = 'succeeded') FROM webhooks.deliveries")

# The runbook (README "Runbook"): what operating it from SQL looks like on these data.
HEALTH="SELECT subscription_id AS sub, state, attempts_1h AS attempts, success_rate_1h AS success,
               p50_ms_1h AS p50_ms, p99_ms_1h AS p99_ms, backlog,
               date_trunc('second', oldest_queued_age) AS oldest_age, consecutive_failures AS fails,
               last_status_code AS last_code, last_error
          FROM webhooks.subscription_health ORDER BY 1"
WORKERS="SELECT database, worker, pid IS NOT NULL AS running, state, requests_in_flight AS in_flight,
                queue_depth, claimed, succeeded, failed, dead, bytes_sent
           FROM webhooks.worker_status() ORDER BY database, worker"
say "Runbook 1: healthy. webhooks.subscription_health and webhooks.worker_status()"
"${SQL[@]}" -c "$HEALTH"
# "billing" is listed in webhooks.database but was never created: its worker is not running.
"${SQL[@]}" -c "$WORKERS"

say "Runbook 2: an endpoint that is down (a CRM answering 500 to everything)"
read -r CRM_ID CRM_SECRET < <("${SQL[@]}" -At -F ' ' -c \
    "SELECT id, secret FROM webhooks.subscribe('$RECV/crm', '{order.*}', description => 'CRM (down)')")
control <<<"{\"path\": \"/crm\", \"secret\": \"$CRM_SECRET\", \"default_status\": 500, \"body\": \"upstream unavailable\"}"
"${SQL[@]}" -c "UPDATE orders SET customer = customer || ' ' WHERE id IN (1, 2)" >/dev/null
for _ in $(seq 120); do
    fails=$("${SQL[@]}" -At -c "SELECT consecutive_failures FROM webhooks.subscription_health WHERE subscription_id = $CRM_ID")
    [ "${fails:-0}" -ge 4 ] && break
    sleep 0.5
done
"${SQL[@]}" -c "$HEALTH"
"${SQL[@]}" -c "SELECT d.id, d.event_type, d.status, d.attempts, d.next_attempt_at > now() AS waiting, d.last_error
                  FROM webhooks.deliveries d WHERE d.subscription_id = $CRM_ID ORDER BY d.id"
echo "    what was sent, exactly (secrets masked):"
"${SQL[@]}" -c "SELECT method, url, headers, body FROM webhooks.request(
                  (SELECT min(id) FROM webhooks.deliveries WHERE subscription_id = $CRM_ID))" -x
"${SQL[@]}" -c "SELECT webhooks.unsubscribe($CRM_ID)" >/dev/null

say "Runbook 3: a backlog (the warehouse paused while orders keep coming)"
"${SQL[@]}" -c "SELECT webhooks.pause($WH_ID)" >/dev/null
"${SQL[@]}" -c "INSERT INTO orders (id, customer, total, status)
                SELECT g, 'Customer ' || g, 10, 'paid' FROM generate_series(10, 59) g" >/dev/null
for _ in $(seq 60); do
    b=$("${SQL[@]}" -At -c "SELECT backlog FROM webhooks.subscription_health WHERE subscription_id = $WH_ID")
    [ "${b:-0}" -ge 50 ] && break
    sleep 0.5
done
sleep 1   # the oldest queued delivery ages a little; worker 0 counts the queue once a second
"${SQL[@]}" -c "$HEALTH"
"${SQL[@]}" -c "$WORKERS"
"${SQL[@]}" -c "SELECT event_type, emitted, delivered, retried, dead FROM webhooks.event_stats ORDER BY event_type"
"${SQL[@]}" -c "SELECT webhooks.resume($WH_ID)" >/dev/null
echo
if [ "$DELIVERIES" -gt 0 ] && [ "$SUCCEEDED" -eq "$DELIVERIES" ] && [ "$VERIFIED" -eq "$REQUESTS" ]; then
    echo "demo: $DELIVERIES deliveries, all succeeded, $VERIFIED signatures verified by the receiver"
else
    echo "demo: FAILED: $SUCCEEDED of $DELIVERIES deliveries succeeded," \
         "$VERIFIED of $REQUESTS requests verified by the receiver" >&2
    exit 1
fi
