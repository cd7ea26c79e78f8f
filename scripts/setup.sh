#!/usr/bin/env bash
# Installs everything pg_webhooks needs on a fresh Debian machine, skipping what is there:
# PostgreSQL and its headers, clang, dpkg-dev (scripts/package.sh: dpkg-shlibdeps,
# dpkg-architecture), cargo-pgrx (pinned), `cargo pgrx init`, and the Python Standard Webhooks
# library the test receiver verifies signatures with, Flask and Express for the seed receivers
# (tests/seeds). Reads pgrx.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

cfg() { python3 scripts/config.py "$1"; }
PG_VERSION=$(cfg postgres.version)
PG_CONFIG=$(cfg postgres.pg_config)
PGRX_VERSION=$(cfg tooling.cargo_pgrx_version)
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

missing=()
for pkg in "postgresql-$PG_VERSION" "postgresql-server-dev-$PG_VERSION" libclang-dev clang sudo pkg-config libssl-dev curl dpkg-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! cargo pgrx --version 2>/dev/null | grep -q " $PGRX_VERSION\$"; then
    echo "setup: installing cargo-pgrx $PGRX_VERSION (a few minutes, once)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

if ! grep -qs "^pg$PG_VERSION = \"$PG_CONFIG\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    cargo pgrx init "--pg$PG_VERSION" "$PG_CONFIG"
fi

if ! python3 -c 'import standardwebhooks' 2>/dev/null; then
    echo "setup: installing the standardwebhooks Python library"
    # Debian's own python3 refuses system-wide pip installs; install for this user then.
    python3 -m pip install -q --disable-pip-version-check standardwebhooks 2>/dev/null \
        || python3 -m pip install -q --disable-pip-version-check --user --break-system-packages standardwebhooks
fi

# The receivers written to the letter of ../shared/seeds (tests/seeds.rs) run under Flask and
# Express, as those documents' code does: Flask from PyPI, Express from npm (pinned in
# tests/seeds/package-lock.json, installed into tests/seeds/node_modules).
if ! python3 -c 'import flask' 2>/dev/null; then
    echo "setup: installing the Flask Python library"
    python3 -m pip install -q --disable-pip-version-check flask 2>/dev/null \
        || python3 -m pip install -q --disable-pip-version-check --user --break-system-packages flask
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "setup: installing Node.js"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
if [ ! -d tests/seeds/node_modules/express ]; then
    echo "setup: installing Express for tests/seeds"
    (cd tests/seeds && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
