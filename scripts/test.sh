#!/usr/bin/env bash
# The whole test suite on a fresh machine: set-up, then `cargo pgrx test`, which runs the unit
# tests, the #[pg_test]s in a pgrx-managed cluster (after installing the extension into
# PostgreSQL's directories), and the end-to-end tests in tests/ (each starts clusters of its
# own plus a receiver on 127.0.0.1); then tests/package.sh, the Debian package installed,
# used and removed. Reads pgrx.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

PG_VERSION=$(python3 scripts/config.py postgres.version)
PGDATA_DIR=$(python3 scripts/config.py test.pgdata)

# initdb refuses root: the test cluster runs as postgres, in a directory it owns.
rm -rf "$PGDATA_DIR"
if [ "$(id -u)" -eq 0 ]; then
    mkdir -p "$PGDATA_DIR" && chown postgres:postgres "$PGDATA_DIR"
    RUNAS=(--runas postgres --pgdata "$PGDATA_DIR")
else
    RUNAS=(--pgdata "$PGDATA_DIR")
fi

# What the soak, failover, hostile-receiver, bounds and model tests counted (tests/common's
# report!), printed after the run: cargo test shows a passing test's output to no one.
rm -rf target/tmp/reports

# An optional argument runs only the tests whose names contain it.
cargo pgrx test "pg$PG_VERSION" "${RUNAS[@]}" ${1:+"$1"}

if compgen -G "target/tmp/reports/*.txt" >/dev/null; then
    for f in target/tmp/reports/*.txt; do
        echo "== what tests/$(basename "$f" .txt).rs counted"
        cat "$f"
    done
fi

# Then the Debian package as a DBA installs it (tests/package.sh, named "package"): built by
# scripts/package.sh, installed with dpkg -i into PostgreSQL's directories (after removing the
# files cargo pgrx test left there), used by a fresh cluster, removed with dpkg -r.
if [ -z "${1:-}" ] || [[ package == *"$1"* ]]; then
    tests/package.sh
fi
