#!/usr/bin/env python3
"""A CRD's openAPIV3Schema -> a standalone, strict JSON Schema for check-jsonschema.

    crd2schema.py CRD.yaml VERSION OUT.json

The conversion deploy/schemas/README.md describes: the schema of one served version, with
- `additionalProperties: false` wherever properties are listed and unknown fields are not
  preserved (a typo fails here; the API server would silently prune it);
- int-or-string fields as `anyOf` integer/string;
- `apiVersion` and `kind` pinned, `metadata` an object, `spec` required;
- Go's (?i) in patterns spelt out as [xX] classes (JSON Schema's regexes have no flags);
- descriptions dropped (they are for people, and make the file several times larger).
CEL rules (`x-kubernetes-validations`) cannot be expressed in JSON Schema and are left out.
"""

import json
import re
import sys

import yaml


def case_insensitive(pattern: str) -> str:
    """Go's (?i) flag, which JSON Schema's (ECMA-262) regexes lack: each letter as [xX]."""
    p = pattern.replace("(?i)", "")
    assert "[" not in p, f"cannot rewrite {pattern!r}"
    return re.sub(r"[A-Za-z]", lambda m: f"[{m.group().lower()}{m.group().upper()}]", p)


def convert(crd: dict, version: str) -> dict:
    v = next(x for x in crd["spec"]["versions"] if x["name"] == version)
    schema = v["schema"]["openAPIV3Schema"]

    def walk(n):
        if isinstance(n, dict):
            n.pop("description", None)
            n.pop("x-kubernetes-validations", None)
            if isinstance(n.get("pattern"), str) and "(?i)" in n["pattern"]:
                n["pattern"] = case_insensitive(n["pattern"])
            if n.get("x-kubernetes-int-or-string"):
                n.pop("type", None)
                n["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            if "properties" in n and "additionalProperties" not in n and not n.get("x-kubernetes-preserve-unknown-fields"):
                n["additionalProperties"] = False
            for x in n.values():
                walk(x)
        elif isinstance(n, list):
            for x in n:
                walk(x)

    walk(schema)
    schema["properties"]["apiVersion"] = {"const": f'{crd["spec"]["group"]}/{version}'}
    schema["properties"]["kind"] = {"const": crd["spec"]["names"]["kind"]}
    schema["properties"]["metadata"] = {"type": "object"}
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    required = schema.setdefault("required", [])
    for r in ("apiVersion", "kind", "spec"):
        if r not in required:
            required.append(r)
    return schema


def main() -> None:
    crd_path, version, out_path = sys.argv[1:4]
    with open(crd_path) as f:
        crd = yaml.safe_load(f)
    with open(out_path, "w") as f:
        json.dump(convert(crd, version), f, sort_keys=True)
        f.write("\n")
    print("wrote", out_path)


if __name__ == "__main__":
    main()
