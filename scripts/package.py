"""Helpers of scripts/package.sh that are easier in Python than in shell.

    package.py cargo KEY                        a [package] value of Cargo.toml (version, ...)
    package.py changelog VERSION PACKAGE MAINTAINER EPOCH
                                                CHANGELOG.md as a Debian changelog, from the
                                                section of VERSION down (fails without one)
    package.py upgrades EXTNAME VERSION DIR     checks the SQL scripts in DIR: every full
                                                script other than VERSION's has a chain of
                                                update scripts to VERSION, no update script
                                                leads past VERSION; prints the paths
    package.py installed-size DIR               Installed-Size in KiB as dpkg-gencontrol
                                                counts it (files rounded up, 1 per directory)
"""
import email.utils
import os
import re
import sys
import textwrap
import tomllib
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def die(msg):
    print(f"package: {msg}", file=sys.stderr)
    sys.exit(1)


def cargo(key):
    with open(ROOT / "Cargo.toml", "rb") as f:
        print(tomllib.load(f)["package"][key])


def vkey(v):
    """Sort key for versions like 0.10.2 (numeric parts compare as numbers)."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-+~]", v)]


SECTION = re.compile(r"^## \[(?P<version>[^\]]+)\](?:\s+-\s+(?P<date>\S.*?))?\s*$")


def sections(text):
    """[(version, date or None, [paragraph or bullet text...])] in file order."""
    out = []
    items = None
    for line in text.splitlines():
        m = SECTION.match(line)
        if m:
            items = []
            out.append((m["version"], m["date"], items))
            continue
        if items is None or line.startswith("### "):
            continue
        if line.startswith("## "):  # a section of another form ends the last one
            items = None
            continue
        stripped = line.strip()
        if not stripped:
            if items and items[-1] != "":
                items.append("")
            continue
        if stripped.startswith("- "):
            items.append(stripped[2:])
        elif items and items[-1] != "":
            items[-1] += " " + stripped
        else:
            items.append(stripped)
    return [(v, d, [i for i in items if i]) for v, d, items in out]


def plain(markdown):
    """Bold and links to plain text; backticks kept (they read fine in a changelog)."""
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", markdown)
    return re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", text)


def changelog(ver, package, maintainer, epoch):
    secs = sections((ROOT / "CHANGELOG.md").read_text())
    names = [v for v, _, _ in secs]
    if ver not in names:
        die(f"CHANGELOG.md has no section '## [{ver}]' for the version in Cargo.toml")
    entries = []
    for v, date, items in secs[names.index(ver):]:
        if v.lower() == "unreleased":
            continue
        if not items:
            die(f"CHANGELOG.md: the section of {v} lists nothing")
        if date and re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
            when = datetime.strptime(date, "%Y-%m-%d").replace(tzinfo=timezone.utc)
            dist = "unstable"
        elif date and date.lower() == "unreleased":
            when = datetime.fromtimestamp(int(epoch), timezone.utc)
            dist = "UNRELEASED"
        else:
            die(f"CHANGELOG.md: section {v} needs a date (YYYY-MM-DD) or 'Unreleased'")
        lines = [f"{package} ({v}) {dist}; urgency=medium", ""]
        for item in items:
            lines += textwrap.wrap(plain(item), width=78, initial_indent="  * ",
                                   subsequent_indent="    ", break_on_hyphens=False)
        lines += ["", f" -- {maintainer}  {email.utils.format_datetime(when)}", ""]
        entries.append("\n".join(lines))
    sys.stdout.write("\n".join(entries))


def upgrades(extname, ver, directory):
    full, edges = set(), {}
    pat = re.compile(rf"^{re.escape(extname)}--(.+?)(?:--(.+))?\.sql$")
    for name in sorted(os.listdir(directory)):
        m = pat.match(name)
        if not m:
            continue
        if m[2] is None:
            full.add(m[1])
        else:
            edges.setdefault(m[1], []).append(m[2])
            for v in (m[1], m[2]):
                if vkey(v) > vkey(ver):
                    die(f"{name} mentions {v}, newer than the version {ver} in Cargo.toml")
    if ver not in full:
        die(f"no {extname}--{ver}.sql among the packaged scripts")
    for old in sorted(full - {ver}, key=vkey):
        # Breadth first, as PostgreSQL looks for the shortest chain of update scripts.
        paths, seen = [[old]], {old}
        found = None
        while paths and not found:
            nxt = []
            for p in paths:
                for n in edges.get(p[-1], []):
                    if n == ver:
                        found = p + [n]
                    elif n not in seen:
                        seen.add(n)
                        nxt.append(p + [n])
            paths = nxt
        if not found:
            die(f"the packaged full script of {old} has no chain of update scripts to {ver}")
        print(" -> ".join(found))


def installed_size(directory):
    total = 0
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if not (dirpath == directory and d == "DEBIAN")]
        total += 1
        for f in filenames:
            st = os.lstat(os.path.join(dirpath, f))
            total += (st.st_size + 1023) // 1024 if not os.path.islink(os.path.join(dirpath, f)) else 1
    print(total)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"cargo": cargo, "changelog": changelog, "upgrades": upgrades,
     "installed-size": installed_size}[cmd](*args)
