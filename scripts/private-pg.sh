#!/usr/bin/env bash
# A private PostgreSQL install tree, so that a build of pg_webhooks can be installed and tested
# without touching PostgreSQL's system directories (which `cargo pgrx test`, `cargo pgrx
# install` and the Debian package write): two checkouts, or a test run beside a benchmark, then
# never swap the library under each other.
#
#   scripts/private-pg.sh DIR        prints DIR/pg_config, a pg_config that names the tree
#   cargo pgrx install --pg-config DIR/pg_config           # installs into the tree only
#   PG_CONFIG=DIR/pg_config cargo test --test delivery     # end-to-end tests against it
#
# PostgreSQL finds $libdir and its share directory relative to its own binary, so the tree
# copies the binaries that start a server (postgres, initdb, pg_ctl) and links every other
# file to the system installation; only pg_webhooks' own files are the tree's.
set -euo pipefail
dir=$(realpath -m "${1:?usage: private-pg.sh DIR}")
real=${REAL_PG_CONFIG:-/usr/bin/pg_config}
bindir=$("$real" --bindir) pkglibdir=$("$real" --pkglibdir) sharedir=$("$real" --sharedir)
inst="$dir/inst"
mkdir -p "$inst$bindir" "$inst$pkglibdir" "$inst$sharedir/extension"
for f in "$bindir"/*; do
    b=$(basename "$f")
    [ -e "$inst$bindir/$b" ] && continue
    case "$b" in
        postgres | initdb | pg_ctl | pg_basebackup | pg_dump | pg_restore) cp "$f" "$inst$bindir/$b" ;;
        pg_config) ;;
        *) ln -s "$f" "$inst$bindir/$b" ;;
    esac
done
for f in "$pkglibdir"/*; do
    b=$(basename "$f")
    case "$b" in pg_webhooks*) ;; *) [ -e "$inst$pkglibdir/$b" ] || ln -s "$f" "$inst$pkglibdir/$b" ;; esac
done
for f in "$sharedir"/*; do
    b=$(basename "$f")
    case "$b" in extension) ;; *) [ -e "$inst$sharedir/$b" ] || ln -s "$f" "$inst$sharedir/$b" ;; esac
done
for f in "$sharedir"/extension/*; do
    b=$(basename "$f")
    case "$b" in pg_webhooks*) ;; *) [ -e "$inst$sharedir/extension/$b" ] || ln -s "$f" "$inst$sharedir/extension/$b" ;; esac
done
# The tree must be readable by the postgres user the test clusters run as.
chmod -R a+rX "$dir"
cat >"$dir/pg_config" <<EOF
#!/bin/sh
# pg_config for the private tree $inst (made by scripts/private-pg.sh)
case "\$1" in
    --bindir) echo "$inst$bindir" ;;
    --pkglibdir) echo "$inst$pkglibdir" ;;
    --sharedir) echo "$inst$sharedir" ;;
    *) exec "$real" "\$@" ;;
esac
EOF
chmod a+rx "$dir/pg_config"
echo "$dir/pg_config"
