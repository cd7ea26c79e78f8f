# Shared by the benchmarks (sourced): a private PostgreSQL install tree holding the release
# build, so that a debug build another test run installs into the shared PostgreSQL
# directories meanwhile cannot change what is measured. The tree links every other file to the
# system installation; only the `postgres` binary is copied (PostgreSQL finds $libdir and its
# share dir relative to it).
#   private_tree DIR    needs PG_CONFIG; sets PRIV_BIN, PRIV_LIB, PRIV_SHARE, SO_MD5, SRC_STATE
private_tree() {
    local dir=$1 bindir pkglibdir sharedir version sqlfile f
    bindir=$("$PG_CONFIG" --bindir)
    pkglibdir=$("$PG_CONFIG" --pkglibdir)
    sharedir=$("$PG_CONFIG" --sharedir)
    version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n 1)
    sqlfile="$dir/pg_webhooks--$version.sql"
    # The SQL comes from the same release build (cached: no rebuild unless src/ changed since
    # the install, in which case both the SQL and the .so below are the newer build).
    timeout 900 cargo pgrx schema --release --pg-config "$PG_CONFIG" -o "$sqlfile" >"$dir/schema.log" 2>&1 ||
        { cat "$dir/schema.log" >&2; echo "bench: cargo pgrx schema failed" >&2; return 1; }
    PRIV_BIN="$dir/inst$bindir" PRIV_LIB="$dir/inst$pkglibdir" PRIV_SHARE="$dir/inst$sharedir"
    mkdir -p "$PRIV_BIN" "$PRIV_LIB" "$PRIV_SHARE/extension"
    cp "$bindir/postgres" "$PRIV_BIN/postgres"   # a copy: PostgreSQL resolves symlinked binaries
    for f in "$pkglibdir"/*; do
        case "$(basename "$f")" in pg_webhooks.so) ;; *) ln -s "$f" "$PRIV_LIB/" ;; esac
    done
    for f in "$sharedir"/*; do
        case "$(basename "$f")" in extension) ;; *) ln -s "$f" "$PRIV_SHARE/" ;; esac
    done
    for f in "$sharedir"/extension/*; do
        case "$(basename "$f")" in pg_webhooks*) ;; *) ln -s "$f" "$PRIV_SHARE/extension/" ;; esac
    done
    cp target/release/libpg_webhooks.so "$PRIV_LIB/pg_webhooks.so"
    sed "s/@CARGO_VERSION@/$version/" pg_webhooks.control >"$PRIV_SHARE/extension/pg_webhooks.control"
    cp "$sqlfile" "$PRIV_SHARE/extension/"
    SO_MD5=$(md5sum "$PRIV_LIB/pg_webhooks.so" | cut -c1-12)
    SRC_STATE="commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    if [ -n "$(git status --porcelain -- src sql Cargo.toml Cargo.lock 2>/dev/null)" ]; then
        SRC_STATE="$SRC_STATE + uncommitted changes in src/sql (diff md5 $(git diff HEAD -- src sql Cargo.toml | md5sum | cut -c1-12))"
    fi
}
