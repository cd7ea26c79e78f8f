-- pg_webhooks 0.1.0 -> 0.2.0 (ALTER EXTENSION pg_webhooks UPDATE).
--
-- Brings a 0.1.0 database to exactly what CREATE EXTENSION gives at 0.2.0: tests/upgrade.rs
-- compares the two, object by object (definitions, privileges, comments). The tables capture
-- writes (_events, _tracked) are not changed, so that capture keeps working between a package
-- upgrade and this script; the delivery workers wait for it (worker_status() says so).
\echo Use "ALTER EXTENSION pg_webhooks UPDATE" to load this file. \quit

-- #12 worker status: read from shared memory.
CREATE FUNCTION webhooks."worker_status"() RETURNS TABLE (
	"database" TEXT,
	"worker" INT,
	"pid" INT,
	"state" TEXT,
	"started_at" timestamp with time zone,
	"last_wake_at" timestamp with time zone,
	"requests_in_flight" INT,
	"queue_depth" bigint,
	"queue_depth_at" timestamp with time zone,
	"claimed" bigint,
	"attempts" bigint,
	"succeeded" bigint,
	"failed" bigint,
	"dead" bigint,
	"bytes_sent" bigint
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'worker_status_wrapper';
REVOKE EXECUTE ON FUNCTION webhooks.worker_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION webhooks.worker_status() TO webhooks_reader;
COMMENT ON FUNCTION webhooks.worker_status() IS
    'One row per delivery worker of every database in webhooks.database, read from shared memory (no table is read): state, pid, last wake, requests in flight, queue depth, counters since the worker started. What a monitoring system should scrape.';
