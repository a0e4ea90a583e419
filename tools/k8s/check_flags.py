#!/usr/bin/env python3
"""Checks that every scout flag a rendered manifest passes exists.

usage: check_flags.py SCOUT_BINARY RENDERED.yaml

Containers whose args start with a scout subcommand (coordinator, worker, kvstore, serve) have
each --flag checked against `scout SUBCOMMAND --help`; a ConfigMap file such a container reads
with --config PATH has each of its keys checked the same way. A typo there would only show when
the pod starts.
"""
import os
import re
import subprocess
import sys

import yaml

SUBCOMMANDS = {"coordinator", "worker", "kvstore", "serve"}


def flags_of(scout, sub, cache={}):
    if sub not in cache:
        out = subprocess.run([scout, sub, "--help"], capture_output=True, text=True, check=True).stdout
        cache[sub] = set(re.findall(r"^  --([a-z0-9-]+)", out, re.M)) | {"config"}
    return cache[sub]


def main():
    scout, rendered = sys.argv[1], sys.argv[2]
    docs = [d for d in yaml.safe_load_all(open(rendered)) if d]
    config_files = {}  # file name -> (ConfigMap name, its mapping)
    for d in docs:
        if d.get("kind") == "ConfigMap":
            for key, text in (d.get("data") or {}).items():
                try:
                    value = yaml.safe_load(text)
                except yaml.YAMLError:
                    continue
                if isinstance(value, dict):
                    config_files[key] = (d["metadata"]["name"], value)
    errors, checked = [], 0
    for d in docs:
        spec = (((d.get("spec") or {}).get("template") or {}).get("spec") or {})
        for c in spec.get("containers", []):
            args = [str(a) for a in c.get("args") or []]
            if not args or args[0] not in SUBCOMMANDS:
                continue
            known = flags_of(scout, args[0])
            where = f'{d["kind"]} {d["metadata"]["name"]}, container {c["name"]}'
            for i, a in enumerate(args[1:], 1):
                if not a.startswith("--"):
                    continue
                name = a[2:].split("=", 1)[0]
                checked += 1
                if name not in known:
                    errors.append(f"{where}: `scout {args[0]}` has no flag --{name}")
                if name == "config" and i + 1 < len(args):
                    base = os.path.basename(args[i + 1])
                    if base in config_files:
                        cm, mapping = config_files[base]
                        for key in mapping:
                            checked += 1
                            if key not in known:
                                errors.append(f"ConfigMap {cm}, {base}: `scout {args[0]}` has no flag --{key}")
    for e in errors:
        print(e)
    print(f"check_flags: {checked} scout flags checked, {len(errors)} unknown")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
