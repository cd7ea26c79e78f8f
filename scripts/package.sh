#!/usr/bin/env bash
# Builds the release artifacts of pg_webhooks from a checkout, in one command:
#
#   target/dist/pg_webhooks-<version>-pg<N>-<triplet>.tar.gz   the files of `cargo pgrx package`
#       (usr/lib/postgresql/<N>/lib/pg_webhooks.so, usr/share/postgresql/<N>/extension/
#       pg_webhooks.control and pg_webhooks--*.sql), for `tar -C / -xzf`
#   target/dist/postgresql-<N>-pg-webhooks_<version>_<arch>.deb  the same files as a Debian
#       package named like PostgreSQL's own extension packages, for `dpkg -i`
#   target/dist/SHA256SUMS
#
# The version is Cargo.toml's; the control file, the generated SQL script and CHANGELOG.md must
# agree with it or nothing is built. Besides the install script of this version the package
# carries every update script sql/pg_webhooks--A--B.sql and the archived install scripts of
# earlier versions, sql/archive/pg_webhooks--X.sql, and each of those must reach this version
# through update scripts. Both artifacts come out byte for byte the same for the same commit
# and build (SOURCE_DATE_EPOCH = the last commit's time unless set; sorted entries; fixed
# owners and times). Writes nothing outside target/: PostgreSQL's directories are not touched.
# Reads pgrx.toml (PostgreSQL version and pg_config, [package] maintainer and description).
set -euo pipefail
cd "$(dirname "$0")/.."
umask 022
start=$SECONDS
./scripts/setup.sh

die() { echo "package: $*" >&2; exit 1; }
cfg() { python3 scripts/config.py "$1"; }
EXT=pg_webhooks
VERSION=$(python3 scripts/package.py cargo version)
PG_VERSION=$(cfg postgres.version)
PG_CONFIG=$(cfg postgres.pg_config)
MAINTAINER=$(cfg package.maintainer)
PACKAGE=postgresql-$PG_VERSION-${EXT//_/-}   # Debian's names: postgresql-15-pg-stat-kcache
ARCH=$(dpkg --print-architecture)
TRIPLET=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null)
[ -n "$TRIPLET" ] || die "dpkg-architecture found no multiarch triplet"
[[ $("$PG_CONFIG" --version) == "PostgreSQL $PG_VERSION."* ]] ||
    die "$PG_CONFIG is $("$PG_CONFIG" --version), pgrx.toml says PostgreSQL $PG_VERSION"
PKGLIBDIR=$("$PG_CONFIG" --pkglibdir)
EXTDIR=$("$PG_CONFIG" --sharedir)/extension
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    # Exported only after the build: the cc crate reruns the build scripts of ring and others
    # (and so relinks everything) whenever SOURCE_DATE_EPOCH changes, i.e. at every commit.
    SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null) ||
        die "not a git checkout: set SOURCE_DATE_EPOCH for the artifacts' timestamps"
fi

# The control file names its default version; cargo-pgrx writes Cargo.toml's in place of
# @CARGO_VERSION@. A literal version must be the same one.
control_version=$(sed -n "s/^default_version *= *'\(.*\)' *$/\1/p" "$EXT.control")
case "$control_version" in
    @CARGO_VERSION@ | "$VERSION") ;;
    *) die "$EXT.control has default_version '$control_version', Cargo.toml has $VERSION" ;;
esac

DIST=target/dist
STAGE=$DIST/stage
PGRX_OUT=$STAGE/pgrx   # what `cargo pgrx package` wrote, untouched
ROOT=$STAGE/debian/$PACKAGE   # the package's file system tree, where dpkg-shlibdeps expects it
rm -rf "$STAGE"
mkdir -p "$STAGE"
rm -f "$DIST/${PACKAGE}_"*.deb "$DIST/$EXT-"*.tar.gz "$DIST/SHA256SUMS"

echo "package: cargo pgrx package (release) for PostgreSQL $PG_VERSION ($PG_CONFIG)"
cargo pgrx package --pg-config "$PG_CONFIG" --out-dir "$PWD/$PGRX_OUT"
export SOURCE_DATE_EPOCH

# What cargo-pgrx wrote, exactly: the library, the control file, this version's install
# script and the update scripts of sql/ (cargo-pgrx copies those; other full scripts it skips).
expected=("${PKGLIBDIR#/}/$EXT.so" "${EXTDIR#/}/$EXT.control" "${EXTDIR#/}/$EXT--$VERSION.sql")
for f in sql/"$EXT"--*--*.sql; do
    [ -e "$f" ] && expected+=("${EXTDIR#/}/$(basename "$f")")
done
want=$(printf '%s\n' "${expected[@]}" | LC_ALL=C sort)
got=$(cd "$PGRX_OUT" && find . -type f -printf '%P\n' | LC_ALL=C sort)
[ "$want" = "$got" ] || die "cargo pgrx package wrote other files than expected:
$(diff <(echo "$want") <(echo "$got") | sed -n 's/^[<>]/  &/p')
(< expected, > written)"
generated=$(cd "$PGRX_OUT/${EXTDIR#/}" && ls "$EXT"--*.sql | grep -v -- "^$EXT--.*--" || true)
[ "$generated" = "$EXT--$VERSION.sql" ] ||
    die "the generated install script is '$generated', Cargo.toml's version is $VERSION"
[ -s "$PGRX_OUT/${EXTDIR#/}/$EXT--$VERSION.sql" ] || die "$EXT--$VERSION.sql is empty"
packaged_version=$(sed -n "s/^default_version *= *'\(.*\)' *$/\1/p" "$PGRX_OUT/${EXTDIR#/}/$EXT.control")
[ "$packaged_version" = "$VERSION" ] ||
    die "the packaged control file says default_version '$packaged_version', Cargo.toml $VERSION"

mkdir -p "$ROOT"
cp -a "$PGRX_OUT/." "$ROOT/"

# Archived install scripts of earlier versions: `CREATE EXTENSION pg_webhooks VERSION 'old'`
# and the update tests need them. They are copied as they are (no @CARGO_VERSION@ filter:
# that would stamp this version into an old script).
for f in sql/archive/"$EXT"--*.sql; do
    [ -e "$f" ] || continue
    name=$(basename "$f")
    [[ $name != "$EXT"--*--*.sql ]] || die "$f is an update script; those belong in sql/"
    ! grep -q '@CARGO_VERSION@\|@GIT_HASH@' "$f" || die "$f has an unsubstituted @...@ token"
    if [ "$name" = "$EXT--$VERSION.sql" ]; then
        # The archive may keep the current version's script; it must be the generated one.
        cmp -s "$f" "$ROOT/${EXTDIR#/}/$name" ||
            die "$f differs from the install script this build generated; archive it anew"
        continue
    fi
    install -m 0644 "$f" "$ROOT/${EXTDIR#/}/$name"
done
paths=$(python3 scripts/package.py upgrades "$EXT" "$VERSION" "$ROOT/${EXTDIR#/}" | paste -sd, -)
[ -n "$paths" ] || paths="none (sql/archive/ holds no install script of an earlier version)"
echo "package: update paths to $VERSION in the package: $paths"

# No debug symbols or symbol table in the shipped library (as dh_strip does for shared
# libraries); the server still finds what it calls through the dynamic symbol table.
SO=$ROOT/${PKGLIBDIR#/}/$EXT.so
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$SO"
nm -D --defined-only "$SO" | grep -qw Pg_magic_func || die "stripped $EXT.so lost Pg_magic_func"

# Shared-library dependencies of the .so, as dh_shlibdeps finds them. dpkg-shlibdeps wants a
# debian/control beside the package's tree; the .so's symbols that the postgres binary itself
# provides are in no library, so its warnings about them (--warnings bit 0) are expected and
# silenced; the other two stay.
printf 'Source: %s\n\nPackage: %s\nArchitecture: any\n' "$PACKAGE" "$PACKAGE" >"$STAGE/debian/control"
mkdir -p "$ROOT/DEBIAN"   # how dpkg-shlibdeps tells the package's root
shlibs=$(cd "$STAGE" && dpkg-shlibdeps -O --warnings=6 -e"debian/$PACKAGE/${PKGLIBDIR#/}/$EXT.so")
shlibs=${shlibs#shlibs:Depends=}
[[ $shlibs == *libc6* ]] || die "dpkg-shlibdeps found no libc6 dependency: '$shlibs'"

DOC=$ROOT/usr/share/doc/$PACKAGE
mkdir -p "$DOC"
# A version without a Debian revision is a native package: its changelog is changelog.gz.
python3 scripts/package.py changelog "$VERSION" "$PACKAGE" "$MAINTAINER" "$SOURCE_DATE_EPOCH" |
    gzip -9n >"$DOC/changelog.gz"
license=$(python3 scripts/package.py cargo license)
[ "$license" = "Apache-2.0" ] || die "Cargo.toml's license is $license; write its notice into the copyright file"
year=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y)
{
    cat <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: $EXT
Upstream-Contact: $MAINTAINER
Comment: $EXT.so links these Rust crates statically (name version: license):
EOF
    cargo tree --edges normal,no-proc-macro --prefix none --format '{p}: {l}' --features "pg$PG_VERSION" |
        sed 's/ (\*)$//; s/ (\/[^)]*)//' | LC_ALL=C sort -u | grep -v "^$EXT " | sed 's/^/ /'
    cat <<EOF

Files: *
Copyright: $year The $EXT authors
License: $license

License: Apache-2.0
 Licensed under the Apache License, Version 2.0 (the "License"); you may not
 use this file except in compliance with the License. You may obtain a copy of
 the License at
 .
     http://www.apache.org/licenses/LICENSE-2.0
 .
 Unless required by applicable law or agreed to in writing, software
 distributed under the License is distributed on an "AS IS" BASIS, WITHOUT
 WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the
 License for the specific language governing permissions and limitations under
 the License.
 .
 On Debian systems, the complete text of the Apache License, Version 2.0 can be
 found in "/usr/share/common-licenses/Apache-2.0".
EOF
} >"$DOC/copyright"

find "$ROOT" -type d -exec chmod 0755 {} +
find "$ROOT" -type f -exec chmod 0644 {} +

# No maintainer scripts: the package only adds files under PostgreSQL's own directories.
# The library is a plugin loaded by path, not from the linker's path (no ldconfig); nothing
# runs as a service of its own; and restarting PostgreSQL or editing postgresql.conf is the
# DBA's call (shared_preload_libraries needs a restart anyway), not a package's.
{
    echo "Package: $PACKAGE"
    echo "Version: $VERSION"
    echo "Architecture: $ARCH"
    echo "Maintainer: $MAINTAINER"
    echo "Installed-Size: $(python3 scripts/package.py installed-size "$ROOT")"
    echo "Depends: postgresql-$PG_VERSION, $shlibs"
    echo "Section: database"
    echo "Priority: optional"
    echo "Description: $(python3 scripts/package.py cargo description)"
    long=$(cfg package.description)   # $(...) drops the trailing blank lines
    printf '%s\n' "$long" | sed 's/^$/./; s/^/ /'
} >"$ROOT/DEBIAN/control"
(cd "$ROOT" && find usr -type f -printf '%P\n' | LC_ALL=C sort | sed 's|^|usr/|' |
    xargs -d '\n' md5sum) >"$ROOT/DEBIAN/md5sums"
chmod 0644 "$ROOT/DEBIAN/control" "$ROOT/DEBIAN/md5sums"
find "$ROOT" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

DEB=$DIST/${PACKAGE}_${VERSION}_$ARCH.deb
dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$DEB" >/dev/null

# The tarball holds the files only, no directory entries: `tar -C / -xzf` then creates what
# is missing and leaves the modes and times of /usr and the others alone.
TARBALL=$DIST/$EXT-$VERSION-pg$PG_VERSION-$TRIPLET.tar.gz
(cd "$ROOT" && find "${PKGLIBDIR#/}" "${EXTDIR#/}" -type f | LC_ALL=C sort) >"$STAGE/tar.list"
tar -C "$ROOT" --no-recursion --verbatim-files-from -T "$STAGE/tar.list" --format=gnu \
    --owner=0 --group=0 --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" -cf - | gzip -9n >"$TARBALL"

(cd "$DIST" && sha256sum "$(basename "$DEB")" "$(basename "$TARBALL")" >SHA256SUMS)
echo "package: $PACKAGE $VERSION ($ARCH), Depends: postgresql-$PG_VERSION, $shlibs"
dpkg-deb -c "$DEB" | awk '{ printf "    %s %8s %s\n", $1, $3, $6 }'
for f in "$DEB" "$TARBALL"; do
    printf 'package: wrote %s (%s bytes)\n' "$f" "$(stat -c %s "$f")"
done
sed 's/^/    sha256 /' "$DIST/SHA256SUMS"
echo "package: done in $((SECONDS - start)) s"
