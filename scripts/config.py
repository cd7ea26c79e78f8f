"""Print one value of pgrx.toml (dotted path), or the demo settings as postgresql.conf lines."""
import sys
import tomllib
from pathlib import Path

config = tomllib.loads((Path(__file__).resolve().parent.parent / "pgrx.toml").read_text())
key = sys.argv[1]
if key == "demo.settings":
    for name, value in config["demo"]["settings"].items():
        print(f"{name} = '{value}'")
else:
    node = config
    for part in key.split("."):
        node = node[part]
    print(node)
