#!/usr/bin/env python3
"""Checks a docker compose file without Docker: YAML (no duplicate keys), the Compose
Specification's JSON schema (demo/compose-spec.schema.json, see demo/compose-spec.schema.md), and
that every service a service names (depends_on, network_mode "service:X", volumes_from, extends,
links) exists.

    compose-check.py FILE|-          exit 0 if valid; 1 with one line per problem on stderr
    compose-check.py --json FILE|-   also prints the document as JSON (YAML anchors and merge
                                     keys resolved), for tests that inspect it

Needs jsonschema and PyYAML (`make compose-check-tool` installs them into .venv/).
"""

import json
import os
import sys

import jsonschema
import yaml

SCHEMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compose-spec.schema.json")


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key written twice in one mapping, as Compose does (a merge key
    `<<` may still be overridden)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def where(path):
    return "/".join(str(p) for p in path) or "(top level)"


def service_references(doc):
    """Problems with references between services."""
    services = doc.get("services") or {}
    problems = []

    def check(name, what, target):
        if target not in services:
            problems.append(f"services/{name}: {what} names service {target!r}, which is not defined")

    for name, svc in services.items():
        if not isinstance(svc, dict):
            continue
        deps = svc.get("depends_on") or []
        for dep in deps if isinstance(deps, list) else deps.keys():
            check(name, "depends_on", dep)
        mode = svc.get("network_mode")
        if isinstance(mode, str) and mode.startswith("service:"):
            check(name, "network_mode", mode[len("service:"):])
        for source in svc.get("volumes_from") or []:
            if source.split(":")[0] != "container":  # "container:NAME" is not a service
                check(name, "volumes_from", source.split(":")[0])
        for link in svc.get("links") or []:
            check(name, "links", link.split(":")[0])
        ext = svc.get("extends")
        if isinstance(ext, dict) and "file" not in ext:
            check(name, "extends", ext.get("service"))
        elif isinstance(ext, str):
            check(name, "extends", ext)
    return problems


def check(text):
    """Returns (document or None, problems)."""
    try:
        doc = yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as e:
        return None, ["not valid YAML: " + " ".join(str(e).split())]
    if not isinstance(doc, dict):
        return None, ["not a compose file: the top level is not a mapping"]
    with open(SCHEMA, encoding="utf-8") as f:
        schema = json.load(f)
    validator = jsonschema.Draft7Validator(schema)
    problems = [
        f"{where(e.absolute_path)}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]
    if not problems:
        problems = service_references(doc)
    return doc, problems


def main(argv):
    as_json = "--json" in argv
    args = [a for a in argv if a != "--json"]
    if len(args) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    name = args[0]
    text = sys.stdin.read() if name == "-" else open(name, encoding="utf-8").read()
    doc, problems = check(text)
    label = "<stdin>" if name == "-" else name
    for p in problems:
        print(f"compose-check: {label}: {p}", file=sys.stderr)
    if problems:
        return 1
    if as_json:
        json.dump(doc, sys.stdout, indent=2, sort_keys=True)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
