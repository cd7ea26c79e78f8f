-- pg_webhooks 0.1.0 -> 0.2.0. Each part under its issue's line; the objects must come out as a
-- fresh 0.2.0 install makes them (columns last, same ACLs: what api.sql's REVOKE/GRANT block
-- does to a fresh install is done here to the new objects).

-- #12 observability: subscription_health, event_stats, request()
-- A library newer than the schema keeps working until this update (the worker writes the
-- rollups only once it sees _delivery_stats, src/queue.rs stats_schema); the capture path's
-- tables (_events, _tracked) are not changed.

-- The subscription's failure streak and last error, kept by the worker (bootstrap.sql).
ALTER TABLE webhooks._subscriptions
    ADD COLUMN consecutive_failures integer NOT NULL DEFAULT 0,
    ADD COLUMN last_error       text,
    ADD COLUMN last_error_at    timestamptz,
    ADD COLUMN last_status_code integer;

-- Backlog count and oldest queued delivery per subscription (bootstrap.sql). Rebuilt in this
-- transaction, which holds off the queue's writers meanwhile: about 1.5 s per million queued
-- deliveries (bench/health.sh, 2 cores).
DROP INDEX webhooks._queue_subscription_idx;
CREATE INDEX _queue_subscription_idx ON webhooks._queue (subscription_id, delivery_id);

-- API: Private. The rollup behind webhooks.subscription_health (see src/stats.rs), kept by
-- the worker as it records outcomes: per subscription, minute or hour (UTC) and worker, the
-- attempts that ended in it (by their start) and a histogram of their response times. Each
-- worker writes rows of its own only, so two workers never wait for one row. Minute rows
-- serve the last hour and are deleted after two hours; hour rows serve the last day and are
-- kept as long as the history (webhooks.retention).
CREATE TABLE webhooks._delivery_stats (
    width           interval NOT NULL CHECK (width IN ('1 minute', '1 hour')),
    bucket          timestamptz NOT NULL,
    subscription_id bigint NOT NULL,
    worker          smallint NOT NULL,
    attempts        bigint NOT NULL DEFAULT 0,
    succeeded       bigint NOT NULL DEFAULT 0,   -- 2xx: the delivery is done
    failed          bigint NOT NULL DEFAULT 0,   -- anything else (retried or dead)
    dead            bigint NOT NULL DEFAULT 0,   -- failed attempts that were the delivery's last
    -- Response times: count per bucket, four buckets per doubling from 0.1 ms (stats.rs);
    -- trailing empty buckets are left out.
    latency_hist    bigint[] NOT NULL DEFAULT '{}',
    -- Reads take every subscription's rows of a window: the window's range of this key.
    PRIMARY KEY (width, bucket, subscription_id, worker)
-- A row is updated by each batch of its minute: room on the page keeps that update there.
) WITH (fillfactor = 50);

-- API: Private. The rollup behind webhooks.event_stats: per hour (UTC), event type and writer,
-- the events fanned out (emitted, counted by worker 0 as it fans them out; webhook.test events
-- by send_test, writer -1) and the outcomes recorded (by each worker, writer = its number).
CREATE TABLE webhooks._event_stats (
    bucket     timestamptz NOT NULL,
    event_type text NOT NULL,
    worker     smallint NOT NULL,
    emitted    bigint NOT NULL DEFAULT 0,
    delivered  bigint NOT NULL DEFAULT 0,   -- deliveries that succeeded
    retried    bigint NOT NULL DEFAULT 0,   -- failed attempts followed by a retry
    dead       bigint NOT NULL DEFAULT 0,   -- deliveries that ended dead after their last attempt
    PRIMARY KEY (bucket, event_type, worker)
) WITH (fillfactor = 50);

-- The Rust functions (as `cargo pgrx schema` writes them).
CREATE FUNCTION webhooks."_hist_add"(
	"a" bigint[], /* Vec < Option < i64 > > */
	"b" bigint[] /* Vec < Option < i64 > > */
) RETURNS bigint[] /* Vec < i64 > */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_hist_add_wrapper';

CREATE FUNCTION webhooks."_hist_quantile"(
	"hist" bigint[], /* Vec < Option < i64 > > */
	"q" double precision /* f64 */
) RETURNS double precision /* Option < f64 > */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_hist_quantile_wrapper';

CREATE FUNCTION webhooks."_request"(
	"delivery_id" bigint /* Option < i64 > */
) RETURNS TABLE (
	"method" TEXT,  /* String */
	"url" TEXT,  /* String */
	"headers" jsonb,  /* JsonB */
	"body" TEXT  /* String */
)
STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_request_wrapper';

-- Response-time histograms of many rollup rows added up (src/stats.rs). API: Private
CREATE AGGREGATE webhooks._hist_sum(bigint[]) (SFUNC = webhooks._hist_add, STYPE = bigint[]);

-- The request of a delivery, masked (src/request.rs). It reads _secrets (header names, how
-- many secrets sign) with the owner's rights; the caller needs only EXECUTE on it, which
-- webhooks_reader has. API: Public
CREATE FUNCTION webhooks.request(delivery_id bigint)
RETURNS TABLE (method text, url text, headers jsonb, body text)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT r.method, r.url, r.headers, r.body FROM webhooks._request(delivery_id) AS r $$;

-- webhook.test events are counted as emitted (api.sql).
CREATE OR REPLACE FUNCTION webhooks.send_test(id bigint) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p_id  bigint := id;
    v_seq bigint;
    v_at  timestamptz;
BEGIN
    PERFORM webhooks._subscription_exists(p_id);
    -- A test event is delivered to this subscription only: transaction id 0, which is in no
    -- batch the fan-out takes.
    INSERT INTO webhooks._events (type, entity, key, data, xid)
    VALUES ('webhook.test', 'webhook', NULL,
            jsonb_build_object('subscription_id', p_id, 'message', 'This is a test delivery from pg_webhooks.'),
            '0'::xid8)
    RETURNING seq, created_at INTO v_seq, v_at;
    -- Fan-out never sees it, so it is counted as emitted here (writer -1: SQL functions).
    INSERT INTO webhooks._event_stats AS t (bucket, event_type, worker, emitted)
    VALUES (date_trunc('hour', v_at, 'UTC'), 'webhook.test', -1, 1)
    ON CONFLICT (bucket, event_type, worker) DO UPDATE SET emitted = t.emitted + 1;
    RETURN webhooks._enqueue_unordered(v_seq, p_id, NULL);
END
$$;

-- A subscription's queued deliveries, counted in _queue_subscription_idx. A function, so that
-- the view's plan does not carry the count's cost: with a large backlog that cost would make
-- every poll of the view JIT-compiled (700 ms of a 1 s poll with a 1M backlog, bench/health.sh).
-- It reads the queue with its owner's rights, for webhooks_reader. API: Private
CREATE FUNCTION webhooks._backlog(p_subscription bigint) RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $$ SELECT count(*) FROM webhooks._queue q WHERE q.subscription_id = p_subscription $$;

-- Per subscription, from the rollups the worker keeps (never from _attempts, whatever its
-- size): the last hour is the minute rows starting after now() - 1 hour (the current minute
-- and the 59 before it), the last day the hour rows starting after now() - 1 day (the current
-- hour and the 23 before it), each a range of _delivery_stats' key. The backlog is counted in
-- _queue_subscription_idx (_backlog, an index-only scan: its cost grows with the backlog), the
-- oldest queued delivery is a probe of it. Polling reads about 84 rollup rows per subscription and
-- worker.
CREATE VIEW webhooks.subscription_health AS
SELECT s.id AS subscription_id,
       webhooks._mask_url(s.url) AS url,
       s.state,
       s.disabled_reason,
       s.failing_since,
       COALESCE(h.attempts, 0) AS attempts_1h,
       COALESCE(h.succeeded, 0) AS delivered_1h,
       COALESCE(h.failed, 0) AS failed_1h,
       COALESCE(h.dead, 0) AS dead_1h,
       round(h.succeeded::numeric / NULLIF(h.attempts, 0), 4) AS success_rate_1h,
       webhooks._hist_quantile(h.hist, 0.50) AS p50_ms_1h,
       webhooks._hist_quantile(h.hist, 0.95) AS p95_ms_1h,
       webhooks._hist_quantile(h.hist, 0.99) AS p99_ms_1h,
       COALESCE(d.attempts, 0) AS attempts_24h,
       COALESCE(d.succeeded, 0) AS delivered_24h,
       COALESCE(d.failed, 0) AS failed_24h,
       COALESCE(d.dead, 0) AS dead_24h,
       round(d.succeeded::numeric / NULLIF(d.attempts, 0), 4) AS success_rate_24h,
       webhooks._hist_quantile(d.hist, 0.50) AS p50_ms_24h,
       webhooks._hist_quantile(d.hist, 0.95) AS p95_ms_24h,
       webhooks._hist_quantile(d.hist, 0.99) AS p99_ms_24h,
       webhooks._backlog(s.id) AS backlog,
       o.created_at AS oldest_queued_at,
       now() - o.created_at AS oldest_queued_age,
       s.consecutive_failures,
       s.last_error,
       s.last_error_at,
       s.last_status_code
  FROM webhooks._subscriptions s
  LEFT JOIN (SELECT t.subscription_id, sum(t.attempts)::bigint AS attempts, sum(t.succeeded)::bigint AS succeeded,
                    sum(t.failed)::bigint AS failed, sum(t.dead)::bigint AS dead,
                    webhooks._hist_sum(t.latency_hist) AS hist
               FROM webhooks._delivery_stats t
              WHERE t.width = '1 minute' AND t.bucket > now() - interval '1 hour'
              GROUP BY t.subscription_id) h ON h.subscription_id = s.id
  LEFT JOIN (SELECT t.subscription_id, sum(t.attempts)::bigint AS attempts, sum(t.succeeded)::bigint AS succeeded,
                    sum(t.failed)::bigint AS failed, sum(t.dead)::bigint AS dead,
                    webhooks._hist_sum(t.latency_hist) AS hist
               FROM webhooks._delivery_stats t
              WHERE t.width = '1 hour' AND t.bucket > now() - interval '1 day'
              GROUP BY t.subscription_id) d ON d.subscription_id = s.id
  -- The oldest queued delivery of each subscription is its lowest id (ids are taken in
  -- creation order): the first entry of each subscription in _queue_subscription_idx, one
  -- probe per subscription with a queue (as END_ORPHANS walks it). Ordered by both columns
  -- with a range on the first, so that only this index can answer it: a min(delivery_id)
  -- per subscription may be planned as a walk of the primary key in id order filtered by
  -- subscription, which reads the whole queue for a subscription that has nothing queued.
  LEFT JOIN (
        WITH RECURSIVE o(sub, id) AS (
            (SELECT q.subscription_id, q.delivery_id FROM webhooks._queue q
              ORDER BY q.subscription_id, q.delivery_id LIMIT 1)
          UNION ALL
            SELECT n.subscription_id, n.delivery_id
              FROM o CROSS JOIN LATERAL (
                   SELECT q.subscription_id, q.delivery_id FROM webhooks._queue q
                    WHERE q.subscription_id > o.sub
                    ORDER BY q.subscription_id, q.delivery_id LIMIT 1) n
        )
        SELECT o.sub, (SELECT d.created_at FROM webhooks._deliveries d WHERE d.id = o.id) AS created_at
          FROM o
       ) o ON o.sub = s.id;

-- Per event type and hour (UTC), from _event_stats: a filter on hour is a range of its key.
CREATE VIEW webhooks.event_stats AS
SELECT t.event_type,
       t.bucket AS hour,
       sum(t.emitted)::bigint AS emitted,
       sum(t.delivered)::bigint AS delivered,
       sum(t.retried)::bigint AS retried,
       sum(t.dead)::bigint AS dead
  FROM webhooks._event_stats t
 GROUP BY t.bucket, t.event_type;

COMMENT ON FUNCTION webhooks.request(bigint) IS
    'The HTTP request that was (or will be) sent for a delivery: body byte for byte, headers with signatures and custom header values masked.';
COMMENT ON VIEW webhooks.subscription_health IS
    'Per subscription: state, attempts, success rate and response times over the last hour and day (from rollups the worker keeps), backlog, failure streak.';
COMMENT ON COLUMN webhooks.subscription_health.url IS 'The endpoint, credentials masked.';
COMMENT ON COLUMN webhooks.subscription_health.state IS 'active | paused | disabled';
COMMENT ON COLUMN webhooks.subscription_health.disabled_reason IS 'Why it was disabled (410 Gone, failing continuously), if it was.';
COMMENT ON COLUMN webhooks.subscription_health.failing_since IS 'Start of the current run of failures (for webhooks.disable_after), NULL while healthy.';
COMMENT ON COLUMN webhooks.subscription_health.attempts_1h IS 'Attempts started in the current minute and the 59 before it.';
COMMENT ON COLUMN webhooks.subscription_health.delivered_1h IS 'Of those, the ones that succeeded (2xx): deliveries done.';
COMMENT ON COLUMN webhooks.subscription_health.failed_1h IS 'Of those, the ones that failed (retried or dead).';
COMMENT ON COLUMN webhooks.subscription_health.dead_1h IS 'Failed attempts that were their delivery''s last (it ended dead).';
COMMENT ON COLUMN webhooks.subscription_health.success_rate_1h IS 'delivered_1h / attempts_1h, NULL without attempts.';
COMMENT ON COLUMN webhooks.subscription_health.p50_ms_1h IS 'Median response time (ms) of the last hour''s attempts, within about 9% (histogram).';
COMMENT ON COLUMN webhooks.subscription_health.p95_ms_1h IS '95th percentile response time (ms), last hour, within about 9%.';
COMMENT ON COLUMN webhooks.subscription_health.p99_ms_1h IS '99th percentile response time (ms), last hour, within about 9%.';
COMMENT ON COLUMN webhooks.subscription_health.attempts_24h IS 'Attempts started in the current hour and the 23 before it.';
COMMENT ON COLUMN webhooks.subscription_health.delivered_24h IS 'Of those, the ones that succeeded (2xx).';
COMMENT ON COLUMN webhooks.subscription_health.failed_24h IS 'Of those, the ones that failed (retried or dead).';
COMMENT ON COLUMN webhooks.subscription_health.dead_24h IS 'Failed attempts that were their delivery''s last (it ended dead).';
COMMENT ON COLUMN webhooks.subscription_health.success_rate_24h IS 'delivered_24h / attempts_24h, NULL without attempts.';
COMMENT ON COLUMN webhooks.subscription_health.p50_ms_24h IS 'Median response time (ms), last day, within about 9%.';
COMMENT ON COLUMN webhooks.subscription_health.p95_ms_24h IS '95th percentile response time (ms), last day, within about 9%.';
COMMENT ON COLUMN webhooks.subscription_health.p99_ms_24h IS '99th percentile response time (ms), last day, within about 9%.';
COMMENT ON COLUMN webhooks.subscription_health.backlog IS 'Deliveries queued (due, waiting for a retry, held or in flight).';
COMMENT ON COLUMN webhooks.subscription_health.oldest_queued_at IS 'When its oldest queued delivery was created.';
COMMENT ON COLUMN webhooks.subscription_health.oldest_queued_age IS 'now() - oldest_queued_at.';
COMMENT ON COLUMN webhooks.subscription_health.consecutive_failures IS 'Failed attempts since the last successful one.';
COMMENT ON COLUMN webhooks.subscription_health.last_error IS 'Error of the last failed attempt (e.g. HTTP 500, timeout), URL credentials masked.';
COMMENT ON COLUMN webhooks.subscription_health.last_error_at IS 'When the last failed attempt started.';
COMMENT ON COLUMN webhooks.subscription_health.last_status_code IS 'HTTP status of the last failed attempt, NULL if it got no response.';
COMMENT ON VIEW webhooks.event_stats IS 'Per event type and hour (UTC): events emitted, deliveries delivered, attempts retried, deliveries dead.';
COMMENT ON COLUMN webhooks.event_stats.event_type IS 'The event type, e.g. order.paid.';
COMMENT ON COLUMN webhooks.event_stats.hour IS 'Start of the hour (UTC) the events were created, or the outcomes attempted, in.';
COMMENT ON COLUMN webhooks.event_stats.emitted IS 'Events of the type created in the hour and fanned out (while some subscription existed).';
COMMENT ON COLUMN webhooks.event_stats.delivered IS 'Deliveries of the type that succeeded in the hour.';
COMMENT ON COLUMN webhooks.event_stats.retried IS 'Failed attempts in the hour after which the delivery was retried.';
COMMENT ON COLUMN webhooks.event_stats.dead IS 'Deliveries that ended dead in the hour (their last attempt failed).';

REVOKE ALL ON webhooks._delivery_stats, webhooks._event_stats, webhooks.subscription_health, webhooks.event_stats
    FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION webhooks._hist_add(bigint[], bigint[]), webhooks._hist_quantile(bigint[], double precision),
                           webhooks._hist_sum(bigint[]), webhooks._request(bigint), webhooks.request(bigint),
                           webhooks._backlog(bigint)
    FROM PUBLIC;
GRANT SELECT ON webhooks.subscription_health, webhooks.event_stats TO webhooks_reader;
GRANT EXECUTE ON FUNCTION webhooks.request(bigint), webhooks._hist_sum(bigint[]),
                          webhooks._hist_quantile(bigint[], double precision), webhooks._backlog(bigint)
    TO webhooks_reader;
